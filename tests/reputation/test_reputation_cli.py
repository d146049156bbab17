"""The reputation commands through click, on a group built with register(), and the config."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import dns.reversename
import pytest

from imr.config import ConfigError, load_config
from imr.store import Store

from reputation_servers import BlackHole, HttpRecorder, SmtpSink, ZoneServer
from reputation_servers import run_reputation_cli as run

KEY = "abcdefghijkl"


@pytest.fixture(scope="module")
def dns_server() -> Iterator[ZoneServer]:
    server = ZoneServer(
        [
            f"{KEY}.7.2.0.192.dnsbl.httpbl.org. 600 IN A 127.1.60.4",
            f"{dns.reversename.from_address('192.0.2.7').to_text()} 300 IN PTR a.isp.example.net.",
            "a.isp.example.net. 300 IN A 192.0.2.7",
            "isp.example.net. 300 IN MX 10 mx.isp.example.net.",
        ]
    ).start()
    try:
        yield server
    finally:
        server.stop()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imr.toml"
    path.write_text(
        f'[server]\nsocket = "{tmp_path}/imr.sock"\n[state]\npath = "{tmp_path}/state.db"\n'
        f'[reputation]\nstate_dir = "{tmp_path}/reputation"\ntimezone = "UTC"\n' + text
    )
    return path


# Configuration ------------------------------------------------------------------------


def test_everything_is_off_by_default(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""), missing_ok=False)
    assert not config.reputation.httpbl.enabled and not config.reputation.notify.enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[reputation.httpbl]\nenabled = true\n", "set key or key_file"),
        ('[reputation.httpbl]\nkey = "SHORT"\n', "12 lower-case letters"),
        ("[reputation.notify]\nenabled = true\n", "set sender"),
        ('[reputation.notify]\nsender = "not-an-address"\n', "expected a mail address"),
        ('[reputation.dns]\nnameservers = ["dns.example"]\n', "must be an IP address"),
        ("[reputation]\nhttp_interval = -1\n", "reputation.http_interval"),
        ("[reputation.abuseipdb]\ncategories = [0]\n", "category ids are 1 to 255"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "imr.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, missing_ok=False)


def test_timezone_must_be_known(tmp_path: Path) -> None:
    path = tmp_path / "imr.toml"
    path.write_text('[reputation]\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError, match="not a known time zone"):
        load_config(path, missing_ok=False)


def test_secrets_are_never_printed(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'[reputation.httpbl]\nkey = "{KEY}"\n')
    config = load_config(path, missing_ok=False)
    assert KEY not in config.to_toml() and KEY not in repr(config)


# check ---------------------------------------------------------------------------------


def test_check_prints_the_verdict_and_why(tmp_path: Path, dns_server: ZoneServer) -> None:
    key_file = tmp_path / "httpbl.key"
    key_file.write_text(KEY + "\n")
    path = write_config(
        tmp_path,
        f'[reputation.dns]\nnameservers = ["{dns_server.address}"]\n'
        f'[reputation.httpbl]\nenabled = true\nkey_file = "{key_file}"\n',
    )
    result = run(path, "check", "192.0.2.7")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("192.0.2.7: block (score 59)")
    assert "comment spammer" in result.output

    result = run(path, "check", "--json", "198.51.100.1")
    assert result.exit_code == 0
    assert json.loads(result.output)["status"] == "not_listed"


def test_check_block_refuses_private_and_reserved_addresses(
    tmp_path: Path, dns_server: ZoneServer
) -> None:
    for ip in ("10.0.0.7", "172.16.5.5", "192.168.1.1", "127.0.0.2", "100.64.1.1", "fe80::1"):
        dns_server.add(
            f"{KEY}.{'.'.join(reversed(ip.split('.')))}.dnsbl.httpbl.org. 600 IN A 127.1.60.4"
        )
    path = write_config(
        tmp_path,
        f'[reputation.dns]\nnameservers = ["{dns_server.address}"]\n'
        f'[reputation.httpbl]\nenabled = true\nkey = "{KEY}"\n',
    )
    for ip in ("10.0.0.7", "172.16.5.5", "192.168.1.1", "127.0.0.2", "100.64.1.1", "fe80::1"):
        result = run(path, "check", "--block", ip)
        assert result.exit_code == 1, (ip, result.output)
        assert f"imr: {ip} is a private or reserved address: never blocked" in result.output
        assert dns_server.count(f"{KEY}.{'.'.join(reversed(ip.split('.')))}.dnsbl.httpbl.org.") == 0


def test_check_without_key_is_a_config_error(tmp_path: Path) -> None:
    result = run(write_config(tmp_path, ""), "check", "192.0.2.7")
    assert result.exit_code == 2
    assert "http:BL needs an access key" in result.output


def test_check_with_unreadable_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, f'[reputation.httpbl]\nenabled = true\nkey_file = "{tmp_path}/missing"\n'
    )
    result = run(path, "check", "192.0.2.7")
    assert result.exit_code == 2 and "cannot read" in result.output


def test_check_timeout_fails_with_status_1(tmp_path: Path) -> None:
    hole = BlackHole("udp")
    try:
        path = write_config(
            tmp_path,
            f'[reputation.dns]\nnameservers = ["{hole.address}"]\ntimeout = 0.3\n'
            f'[reputation.httpbl]\nkey = "{KEY}"\n',
        )
        result = run(path, "check", "192.0.2.7")
    finally:
        hole.close()
    assert result.exit_code == 1
    assert "192.0.2.7: unknown" in result.output and "DNS timeout" in result.output


# reports and report ------------------------------------------------------------------------


def _state(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    now = time.time()
    with store.transaction():
        b = store.insert_block(
            "192.0.2.7", now - 60, now + 86340, 1, "wp-login", "logscan:wp", 33, 9
        )
        store.record_hit("192.0.2.7", now - 60, "block", "wp-login", "logscan:wp", 33, 9, b.id)
    store.close()


def test_reports_need_the_feature_on(tmp_path: Path) -> None:
    result = run(write_config(tmp_path, ""), "reports", "collect")
    assert result.exit_code == 2 and "abuse mail is off" in result.output


def test_reports_collect_list_send_show(tmp_path: Path, dns_server: ZoneServer) -> None:
    _state(tmp_path)
    sink = SmtpSink().start()
    try:
        path = write_config(
            tmp_path,
            f'[reputation.dns]\nnameservers = ["{dns_server.address}"]\n'
            "[reputation.notify]\nenabled = true\n"
            'sender = "reports@reporter.example"\nip_contact_zone = ""\n'
            f'smtp_host = "127.0.0.1"\nsmtp_port = {sink.port}\n',
        )
        result = run(path, "reports", "collect", "--from", "state")
        assert result.exit_code == 0, result.output
        assert "1 queued" in result.output
        listed = run(path, "reports", "list")
        assert "pending" in listed.output and "192.0.2.7" in listed.output

        dry = run(path, "reports", "send", "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert "To: abuse@isp.example.net" in dry.output
        assert sink.messages == []

        sent = run(path, "reports", "send")
        assert sent.exit_code == 0, sent.output
        assert "sent 192.0.2.7" in sent.output
        assert len(sink.messages) == 1

        shown = run(path, "reports", "show", "192.0.2.7")
        assert "sent" in shown.output and "abuse@isp.example.net" in shown.output
        assert "MX isp.example.net" in shown.output
    finally:
        sink.stop()


def test_reports_send_relay_down_exits_1(tmp_path: Path, dns_server: ZoneServer) -> None:
    _state(tmp_path)
    hole = BlackHole("tcp")  # a relay that never greets
    try:
        path = write_config(
            tmp_path,
            f'[reputation.dns]\nnameservers = ["{dns_server.address}"]\n'
            "[reputation.notify]\nenabled = true\nsmtp_timeout = 0.5\n"
            'sender = "reports@reporter.example"\nip_contact_zone = ""\n'
            f'smtp_host = "127.0.0.1"\nsmtp_port = {hole.port}\n',
        )
        run(path, "reports", "collect", "--from", "state")
        result = run(path, "reports", "send")
    finally:
        hole.close()
    assert result.exit_code == 1
    assert "retried" in result.output and "timed out" in result.output


def test_report_export_and_submit(tmp_path: Path) -> None:
    _state(tmp_path)
    recorder = HttpRecorder().start()
    try:
        path = write_config(
            tmp_path,
            f'[reputation.abuseipdb]\nkey = "k3y"\nurl = "{recorder.url}/api/v2/report"\n',
        )
        csv_result = run(path, "report", "--format", "abuseipdb", "--since", "1h", "--submit")
        assert csv_result.exit_code == 0, csv_result.output
        assert csv_result.output.splitlines()[0] == "IP,Categories,ReportDate,Comment"
        assert "abuseipdb: 1 accepted" in csv_result.output
        assert recorder.requests[0].headers["key"] == "k3y"

        as_json = run(path, "report", "--format", "json", "--since", "1h")
        assert json.loads(as_json.output)["incidents"][0]["ip"] == "192.0.2.7"

        bad = run(path, "report", "--format", "csv", "--submit")
        assert bad.exit_code == 2
        bad_since = run(path, "report", "--format", "csv", "--since", "soon")
        assert bad_since.exit_code == 2
    finally:
        recorder.stop()


def test_report_from_daemon_when_not_running(tmp_path: Path) -> None:
    path = write_config(tmp_path, "")
    result = run(path, "report", "--format", "json", "--from", "daemon")
    assert result.exit_code == 3 and "not running" in result.output
