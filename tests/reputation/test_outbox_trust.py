"""Abuse mail that accuses only the guilty, only the right desk, and says what it knows
(issue #13, 11-14): a real state file, a dnslib DNS server and an aiosmtpd sink on
127.0.0.1, the outbox and `imr reports` as cron runs them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import dns.reversename
import pytest

from imr.store import Store

from reputation_servers import BlackHole, SmtpSink, ZoneServer
from reputation_servers import run_reputation_cli as run

LOG_LINE = '192.0.2.7 - - [01/May/2024:12:00:03 +0200] "POST /wp-login.php HTTP/1.1" 200 512'


def ptr(ip: str, host: str) -> str:
    return f"{dns.reversename.from_address(ip).to_text()} 300 IN PTR {host}"


DEEP = "a." * 119 + "deep.example."
RECORDS = [
    ptr("192.0.2.7", "cust7.dsl.isp.example.net."),
    "cust7.dsl.isp.example.net. 300 IN A 192.0.2.7",
    ptr("192.0.2.8", "cust8.dsl.isp.example.net."),
    "cust8.dsl.isp.example.net. 300 IN A 192.0.2.8",
    "isp.example.net. 300 IN MX 10 mx.isp.example.net.",
    ptr("203.0.113.9", "vps9.cloud.example.com."),
    "vps9.cloud.example.com. 300 IN A 203.0.113.9",
    "cloud.example.com. 300 IN MX 10 mx.cloud.example.com.",
    # The attacker's own PTR names a victim's web server.
    ptr("198.51.100.8", "www.victim.example.org."),
    "www.victim.example.org. 300 IN A 192.0.2.200",
    "victim.example.org. 300 IN MX 10 mx.victim.example.org.",
    # 120 labels, resolving back: the walk up it must stay short.
    ptr("192.0.2.27", DEEP),
    f"{DEEP} 300 IN A 192.0.2.27",
]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[ZoneServer]:
    server = ZoneServer(RECORDS).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink().start()
    try:
        yield server
    finally:
        server.stop()


def config(tmp_path: Path, nameservers: list[str], smtp_port: int, extra: str = "") -> Path:
    path = tmp_path / "imr.toml"
    path.write_text(
        f'[server]\nsocket = "{tmp_path}/imr.sock"\n[state]\npath = "{tmp_path}/state.db"\n'
        f'[reputation]\nstate_dir = "{tmp_path}/reputation"\ntimezone = "Europe/Berlin"\n'
        f"[reputation.dns]\nnameservers = {json.dumps(nameservers)}\ntimeout = 1.0\n"
        "[reputation.notify]\nenabled = true\n"
        'sender = "reports@reporter.example"\nip_contact_zone = ""\nreporter = "web.example"\n'
        f'smtp_host = "127.0.0.1"\nsmtp_port = {smtp_port}\nsmtp_timeout = 2\n' + extra
    )
    return path


def block(
    tmp_path: Path, ip: str, reason: str, source: str = "logscan:wp-login", uid: int = 33
) -> int:
    store = Store(tmp_path / "state.db")
    try:
        now = time.time() - 300
        with store.transaction():
            record = store.insert_block(ip, now, now + 86400, 1, reason, source, uid, 9)
            store.record_hit(ip, now, "block", reason, source, uid, 9, record.id)
        return record.id
    finally:
        store.close()


def unblock(tmp_path: Path, block_id: int) -> None:
    """As the daemon records `imr unblock` by an admin."""
    store = Store(tmp_path / "state.db")
    try:
        with store.transaction():
            store.lift(block_id, time.time(), "unblocked", "uid 0 (root)")
    finally:
        store.close()


def body_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text


def attachments(message: EmailMessage) -> dict[str, str]:
    found = {}
    for part in message.iter_attachments():
        assert isinstance(part, EmailMessage)
        found[str(part.get_filename())] = str(part.get_content())
    return found


def test_a_pardoned_block_is_never_mailed(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    path = config(tmp_path, [dns_server.address], sink.port)
    guilty = block(tmp_path, "192.0.2.7", LOG_LINE)
    innocent = block(tmp_path, "203.0.113.9", "false alarm")
    assert "2 queued" in run(path, "reports", "collect").output
    unblock(tmp_path, innocent)  # the admin lifts it as a false positive: after collect

    sent = run(path, "reports", "send")
    assert sent.exit_code == 0, sent.output
    assert "cancelled 203.0.113.9" in sent.output
    assert [to for _, to, _ in sink.messages] == [["abuse@isp.example.net"]]
    listed = json.loads(run(path, "reports", "list", "--all", "--json").output)
    assert {r["ip"]: r["status"] for r in listed} == {
        "192.0.2.7": "sent",
        "203.0.113.9": "cancelled",
    }

    # Collected again, the pardoned block is not queued again either.
    again = run(path, "reports", "collect")
    assert "1 pardoned" in again.output
    assert run(path, "reports", "send").exit_code == 0
    assert len(sink.messages) == 1
    assert guilty


def test_an_admin_can_cancel_a_queued_report(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    path = config(tmp_path, [dns_server.address], sink.port)
    block(tmp_path, "192.0.2.7", LOG_LINE)
    run(path, "reports", "collect")
    cancelled = run(path, "reports", "cancel", "192.0.2.7")
    assert cancelled.exit_code == 0 and "cancelled report 1 for 192.0.2.7" in cancelled.output
    assert run(path, "reports", "cancel", "192.0.2.7").exit_code == 1  # nothing waits now
    assert run(path, "reports", "send").exit_code == 0
    assert sink.messages == []
    shown = run(path, "reports", "show", "1")
    assert "cancelled" in shown.output and "cancelled by" in shown.output


def test_a_ptr_that_does_not_forward_confirm_is_never_a_recipient(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    path = config(tmp_path, [dns_server.address], sink.port)
    block(tmp_path, "198.51.100.8", LOG_LINE)
    run(path, "reports", "collect")
    sent = run(path, "reports", "send")
    assert sent.exit_code == 0, sent.output
    assert "no contact 198.51.100.8" in sent.output
    assert sink.messages == []
    assert dns_server.count("victim.example.org.") == 0
    shown = run(path, "reports", "show", "198.51.100.8").output
    assert "www.victim.example.org, which does not resolve back: not used" in shown


def test_one_reports_lookup_ends_within_its_deadline(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    """A 120-label PTR and a dead first name server: the report's lookups end within its
    deadline, and the next report of the run is still sent (fail-over)."""
    hole = BlackHole("udp")
    try:
        path = config(
            tmp_path,
            [hole.address, dns_server.address],
            sink.port,
            "report_lookup_timeout = 2.0\n",
        )
        block(tmp_path, "192.0.2.27", LOG_LINE)
        block(tmp_path, "192.0.2.7", LOG_LINE)
        run(path, "reports", "collect")
        start = time.monotonic()
        sent = run(path, "reports", "send")
        took = time.monotonic() - start
    finally:
        hole.close()
    assert sent.exit_code == 0, sent.output
    assert "no contact 192.0.2.27" in sent.output  # the walk gave up within its labels
    assert "sent 192.0.2.7" in sent.output  # failed over to the second name server
    assert took < 2.0 + 1.5, took  # the first report's 2 s at most, the second's few ms
    deep_mx = [name for name, qtype in dns_server.queries if qtype == "MX" and "deep" in name]
    assert 0 < len(deep_mx) <= 5  # not 120
    assert len(sink.messages) == 1


def test_one_message_per_desk_with_the_machine_readable_part(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    path = config(
        tmp_path,
        [dns_server.address],
        sink.port,
        'destination = "203.0.113.80"\nports_by_source = { "logscan:" = 443 }\n',
    )
    block(tmp_path, "192.0.2.7", LOG_LINE)
    block(tmp_path, "192.0.2.8", "xmlrpc flood", "logscan:xmlrpc")
    block(tmp_path, "203.0.113.9", "sqli", "modsecurity:942100")
    run(path, "reports", "collect")
    assert run(path, "reports", "send").exit_code == 0
    by_desk = {tuple(to): message for _, to, message in sink.messages}
    assert set(by_desk) == {("abuse@isp.example.net",), ("abuse@cloud.example.com",)}
    isp = by_desk[("abuse@isp.example.net",)]
    assert isp["To"] == "abuse@isp.example.net"  # the desk alone, never a list of desks
    assert isp["X-XARF"] == "PLAIN" and isp.get_content_type() == "multipart/mixed"
    body = body_of(isp)
    assert "192.0.2.7 (cust7.dsl.isp.example.net)" in body and "192.0.2.8" in body
    assert "Destination: 203.0.113.80, port 443" in body
    assert "+0100 (CET)" in body or "+0200 (CEST)" in body  # times with offset and zone

    parts = attachments(isp)
    assert set(parts) == {"report-1.txt", "logfile-1.log", "report-2.txt", "logfile-2.log"}
    report = {
        key: json.loads(value)
        for key, _, value in (line.partition(": ") for line in parts["report-1.txt"].splitlines())
    }
    assert report["Version"] == "0.2" and report["Category"] == "abuse"
    assert report["Source"] == "192.0.2.7" and report["Source-Type"] == "ipv4"
    assert report["Destination"] == "203.0.113.80" and report["Port"] == 443
    assert report["Reported-From"] == "reports@reporter.example"
    assert report["Evidence-Kind"] == "evidence"
    assert LOG_LINE in parts["logfile-1.log"]


def test_client_supplied_text_never_reaches_the_mail_raw(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    path = config(tmp_path, [dns_server.address], sink.port)
    nasty = "GET /x\r\nBcc: someone@example.org\x1b[2J\u202eevil"
    block(tmp_path, "192.0.2.7", nasty, "logscan:x\r\nX-Injected: yes")
    run(path, "reports", "collect")
    assert run(path, "reports", "send").exit_code == 0
    ((_, to, message),) = sink.messages
    assert to == ["abuse@isp.example.net"] and message["Bcc"] is None
    assert message["X-Injected"] is None
    raw = message.as_string()
    assert "\x1b" not in raw and "\u202e" not in raw
    body = body_of(message)
    assert "GET /x\\x0d\\x0aBcc: someone@example.org\\x1b[2J\\u202eevil" in body
    report = attachments(message)["report.txt"]
    assert all(": " in line for line in report.splitlines())  # one field a line, still


def test_only_blocks_with_own_evidence_are_mailed_by_default(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    path = config(tmp_path, [dns_server.address], sink.port)
    block(tmp_path, "192.0.2.7", "http:BL score 40 (threat 40, 0 days, comment spammer)", "httpbl")
    block(tmp_path, "192.0.2.8", "looked odd", "cli")
    block(tmp_path, "203.0.113.9", LOG_LINE)
    collected = run(path, "reports", "collect")
    assert "1 not mailed (httpbl)" in collected.output
    assert "1 not mailed (manual)" in collected.output
    run(path, "reports", "send")
    assert [to for _, to, _ in sink.messages] == [["abuse@cloud.example.com"]]

    # Opted in, each is worded as what it is.
    opted = config(tmp_path, [dns_server.address], sink.port, 'kinds = ["httpbl", "manual"]\n')
    (tmp_path / "reputation" / "reputation.db").unlink()
    run(opted, "reports", "collect")
    run(opted, "reports", "send")
    text = "".join(body_of(m) for _, _, m in sink.messages[1:])
    assert "because Project Honey Pot's http:BL lists it" in text
    assert "blocked by hand by an administrator of web.example" in text


def test_uids_filter_on_what_a_client_cannot_choose(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    """The source tag is the client's word; the uid is the kernel's (SO_PEERCRED)."""
    path = config(tmp_path, [dns_server.address], sink.port, "uids = [33]\n")
    block(tmp_path, "192.0.2.7", LOG_LINE, "logscan:wp-login", uid=33)  # the log scanner
    block(tmp_path, "203.0.113.9", "framed", "logscan:wp-login", uid=1000)  # a web app
    collected = run(path, "reports", "collect")
    assert "1 queued" in collected.output and "1 filtered" in collected.output
    run(path, "reports", "send")
    assert [to for _, to, _ in sink.messages] == [["abuse@isp.example.net"]]
