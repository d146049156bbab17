"""http:BL in the log scanner: every client address is looked up against a real local
DNS server (dnslib on 127.0.0.1); listed visitors are blocked, search engines and
unlisted ones are not, and a hanging server costs warnings, never signature blocks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imr.cli_context import CliContext
from imr.config import load_config
from imr.logscan.cli import scan, watch
from imr.logscan.engine import Scanner
from imr.logscan.follow import Follower
from imr.logscan.httpbl import ClientAddresses, HttpBLScan
from imr.logscan.runner import Outcome
from imr.logscan.signatures import BUILTIN
from imr.reputation.dns_client import make_resolver
from imr.reputation.httpbl import HttpBL
from imr.reputation.settings import DnsSettings, HttpBLSettings

from logscan_helpers import FakeClient, FakeDaemon, combined
from reputation_servers import BlackHole, ZoneServer

KEY = "abcdefghijkl"
LISTED = "203.0.113.7"  # harvester, threat 60, seen today: score 60 >= trigger 25
UNLISTED = "203.0.113.8"
ENGINE = "203.0.113.9"  # a search engine (Google): never blocked
ATTACKER = "198.51.100.50"  # a signature hit (Roundcube msgimport probe)


def qname(ip: str) -> str:
    return f"{KEY}.{'.'.join(reversed(ip.split('.')))}.dnsbl.httpbl.org."


RECORDS = [
    f"{qname(LISTED)} 600 IN A 127.0.60.2",
    f"{qname(ENGINE)} 600 IN A 127.0.5.0",
]


@pytest.fixture
def dns_server() -> Iterator[ZoneServer]:
    server = ZoneServer(RECORDS).start()
    try:
        yield server
    finally:
        server.stop()


def page(ip: str, n: int = 1) -> str:
    return combined(ip, f"/page/{n}.html", status=200)


def write_config(tmp_path: Path, nameserver: str, extra: str = "", key: bool = True) -> Path:
    path = tmp_path / "imr.toml"
    httpbl = f'[reputation.httpbl]\nenabled = true\nkey = "{KEY}"\n' if key else ""
    path.write_text(
        f'[server]\nsocket = "{tmp_path}/imr.sock"\n[state]\npath = "{tmp_path}/state.db"\n'
        f'[logscan]\nstate_dir = "{tmp_path}/logscan"\n{extra}'
        f'[reputation.dns]\nnameservers = ["{nameserver}"]\ntimeout = 0.5\n{httpbl}'
    )
    return path


def run_scan(config: Path, *args: str) -> Result:
    obj = CliContext(load_config(config, missing_ok=False), config)
    return CliRunner().invoke(scan, list(args), obj=obj)


def test_scan_blocks_a_listed_visitor_without_any_signature_hit(
    tmp_path: Path, dns_server: ZoneServer
) -> None:
    log = tmp_path / "access.log"
    log.write_text(page(LISTED, 1) + page(UNLISTED, 2) + page(LISTED, 3) + page(UNLISTED, 4))
    config = write_config(tmp_path, dns_server.address)
    result = run_scan(config, str(log), "--httpbl", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["hits"] == 0  # ordinary requests: no signature matched
    assert [(b["ip"], b["signature"], b["status"]) for b in report["blocks"]] == [
        (LISTED, "httpbl", "dry-run")
    ]
    block = report["blocks"][0]
    assert block["reason"] == "http:BL score 60 (threat 60, 0 days, harvester)"
    assert block["severity"] == 1  # duration = "ladder": the normal ladder
    assert report["httpbl"] == {
        "lookups": 2,
        "listed": 1,
        "to_block": 1,
        "errors": 0,
        "over_cap": 0,
    }
    # One query per address, although each appears twice.
    assert dns_server.count(qname(LISTED)) == 1 and dns_server.count(qname(UNLISTED)) == 1


def test_without_the_flag_or_setting_nothing_is_looked_up(
    tmp_path: Path, dns_server: ZoneServer
) -> None:
    log = tmp_path / "access.log"
    log.write_text(page(LISTED))
    result = run_scan(write_config(tmp_path, dns_server.address), str(log), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["blocks"] == [] and dns_server.queries == []


def test_setting_turns_it_on_and_blocks_reach_the_daemon_with_source_httpbl(
    tmp_path: Path, dns_server: ZoneServer, fake_daemon: FakeDaemon
) -> None:
    log = tmp_path / "access.log"
    log.write_text(page(UNLISTED) + page(LISTED))
    config = write_config(tmp_path, dns_server.address, "httpbl = true\n")
    text = config.read_text().replace(f"{tmp_path}/imr.sock", str(fake_daemon.path))
    config.write_text(text + 'duration = "score"\nscore_per_rung = 10\n')
    result = run_scan(config, str(log), "--verbose")  # the counts are part of the summary
    assert result.exit_code == 0, result.output
    assert f"blocked {LISTED} httpbl severity=4" in result.output
    assert "http:BL: 2 lookups, 1 listed, 1 to block" in result.output
    requests = [r for _, r in fake_daemon.requests]
    assert requests == [
        {
            "v": 1,
            "op": "block",
            "ip": LISTED,
            "reason": "http:BL score 60 (threat 60, 0 days, harvester)",
            "source": "httpbl",
            "severity": 4,  # 1 + (60 - 25) // 10
        }
    ]


def test_search_engines_internal_and_ipv6_addresses_are_not_blocked(
    tmp_path: Path, dns_server: ZoneServer
) -> None:
    log = tmp_path / "access.log"
    log.write_text(page(ENGINE) + page("2001:db8::7") + page("10.1.2.3") + page("127.0.0.1"))
    result = run_scan(
        write_config(tmp_path, dns_server.address), str(log), "--httpbl", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["blocks"] == []
    assert report["httpbl"]["lookups"] == 1 and report["httpbl"]["listed"] == 1
    # Only the search engine was asked about: no IPv6, no internal address left the host.
    assert [q for q, _ in dns_server.queries] == [qname(ENGINE).lower()]


def test_the_cap_bounds_lookups_and_says_so(tmp_path: Path, dns_server: ZoneServer) -> None:
    log = tmp_path / "access.log"
    log.write_text("".join(page(f"198.51.100.{i}", i) for i in range(1, 11)) + page(LISTED))
    config = write_config(tmp_path, dns_server.address, "httpbl_max_lookups = 4\n")
    result = run_scan(config, str(log), "--httpbl", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(dns_server.queries) == 4
    assert report["httpbl"]["lookups"] == 4 and report["httpbl"]["over_cap"] == 7
    assert report["blocks"] == []  # the listed one came after the cap
    assert any("4 lookups, the cap for this run" in w for w in report["warnings"])


def test_a_hanging_dns_server_warns_and_signature_blocks_still_happen(tmp_path: Path) -> None:
    hole = BlackHole("udp")
    try:
        log = tmp_path / "access.log"
        addresses = "".join(page(f"198.51.100.{i}", i) for i in range(1, 9))
        log.write_text(addresses + combined(ATTACKER, "/mail/bin/msgimport"))
        config = write_config(tmp_path, hole.address)
        started = time.monotonic()
        result = run_scan(config, str(log), "--httpbl", "--dry-run", "--json")
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [(b["ip"], b["signature"]) for b in report["blocks"]] == [
        (ATTACKER, "roundcube-msgimport")
    ]
    warnings = report["warnings"]
    assert "http:BL: 198.51.100.1: lookup failed: DNS timeout; not blocked by http:BL" in warnings
    assert any("3 lookups failed in a row: no more lookups this run" in w for w in warnings)
    assert report["httpbl"]["errors"] == 3  # then it stopped trying: 3 timeouts, not 8
    assert elapsed < 3 * 0.5 + 2.0


def test_no_key_is_a_usage_error(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_text(page(LISTED))
    result = run_scan(
        write_config(tmp_path, "127.0.0.1:9", key=False), str(log), "--httpbl", "--dry-run"
    )
    assert result.exit_code == 2
    assert "http:BL in the scanner needs [reputation.httpbl] with key or key_file" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    watched = CliRunner().invoke(
        watch,
        [str(log), "--httpbl", "--dry-run"],
        obj=CliContext(load_config(tmp_path / "imr.toml", missing_ok=False), tmp_path / "x"),
    )
    assert watched.exit_code == 2 and "needs [reputation.httpbl]" in watched.output


def test_client_addresses_follow_the_proxy_rules() -> None:
    import ipaddress

    addresses = ClientAddresses(trusted=(ipaddress.IPv4Network("192.0.2.0/24"),))
    proxied = combined("192.0.2.1", "/").rstrip("\n") + f' "{UNLISTED}, 192.0.2.2"\n'
    block = (page(LISTED) + proxied + page("192.0.2.1") + "garbage\n").encode()
    # The proxy itself is trusted (never blocked, never looked up); its client is.
    assert addresses.new_in(block) == [LISTED, UNLISTED]
    assert addresses.new_in(page(LISTED, 9).encode()) == []  # known: not parsed again


# Follow mode -----------------------------------------------------------------------------


class Watching:
    def __init__(self, log: Path, nameserver: str, client: FakeClient) -> None:
        settings = HttpBLSettings(key=KEY)
        resolver = make_resolver(DnsSettings(nameservers=[nameserver], timeout=1.0))
        self.check = HttpBLScan(
            HttpBL(settings, resolver, KEY).check, ClientAddresses(), 100, follow=True
        )
        self.outcomes: list[Outcome] = []
        self.follower = Follower(
            [log], Scanner(BUILTIN), client, self.outcomes.append, poll_interval=0.1
        )
        self.follower.httpbl = self.check
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.follower.run, args=(self.stop.is_set,))

    def __enter__(self) -> Watching:
        self.thread.start()
        time.sleep(0.2)  # let it open the file
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def wait_for(self, count: int, timeout: float = 5.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout and len(self.outcomes) < count:
            time.sleep(0.01)
        return time.monotonic() - started


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_watch_blocks_a_listed_visitor(
    tmp_path: Path, dns_server: ZoneServer, fake_client: FakeClient
) -> None:
    log = tmp_path / "access.log"
    log.write_text("")
    with Watching(log, dns_server.address, fake_client) as watching:
        _append(log, page(UNLISTED) + page(ENGINE) + page(LISTED))
        watching.wait_for(1)
        time.sleep(0.3)  # nothing else may follow
    assert fake_client.blocked == [
        {
            "ip": LISTED,
            "reason": "http:BL score 60 (threat 60, 0 days, harvester)",
            "source": "httpbl",
            "severity": None,
        }
    ]
    assert [o.status for o in watching.outcomes] == ["blocked"]


def test_watch_does_not_wait_on_a_hanging_dns_server(
    tmp_path: Path, fake_client: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    hole = BlackHole("udp")
    log = tmp_path / "access.log"
    log.write_text("")
    try:
        with Watching(log, hole.address, fake_client) as watching:
            _append(log, page(UNLISTED) + page(LISTED))
            time.sleep(0.1)
            _append(log, combined(ATTACKER, "/mail/bin/msgimport"))
            # The signature block arrives while both lookups are still hanging (1 s each).
            waited = watching.wait_for(1, timeout=3)
            assert fake_client.ips == [ATTACKER] and waited < 0.8
            time.sleep(2.5)  # both lookups time out, one after the other
    finally:
        hole.close()
    assert fake_client.ips == [ATTACKER]
    assert watching.check.lookups.errors == 2
    err = capsys.readouterr().err
    assert f"imr watch: http:BL: {UNLISTED}: lookup failed: DNS timeout" in err
    assert f"imr watch: http:BL: {LISTED}: lookup failed: DNS timeout" in err
