"""http:BL: the verdict and score, against a real DNS server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from imr.reputation.dns_client import make_resolver
from imr.reputation.httpbl import Answer, HttpBL, HttpBLError, judge, score
from imr.reputation.settings import DnsSettings, HttpBLSettings

from reputation_servers import BlackHole, ZoneServer

KEY = "abcdefghijkl"
ZONE = "dnsbl.httpbl.org"


def name(ip: str) -> str:
    return f"{KEY}.{'.'.join(reversed(ip.split('.')))}.{ZONE}."


RECORDS = [
    f"{name('192.0.2.7')} 600 IN A 127.3.40.4",  # comment spammer, 3 days, threat 40
    f"{name('192.0.2.8')} 600 IN A 127.0.5.0",  # a search engine (Google)
    f"{name('192.0.2.9')} 600 IN A 127.200.100.3",  # suspicious harvester, 200 days old
    f"{name('198.51.100.4')} 600 IN A 127.255.255.7",  # as bad as it gets, but 255 days old
    f"{name('203.0.113.5')} 30 IN A 127.0.120.2",  # harvester, today, short TTL
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns_server() -> Iterator[ZoneServer]:
    server = ZoneServer(RECORDS).start()
    try:
        yield server
    finally:
        server.stop()


def checker(server_address: str, clock: FakeClock | None = None, **overrides: object) -> HttpBL:
    settings = HttpBLSettings.model_validate({"enabled": True, "key": KEY, **overrides})
    resolver = make_resolver(DnsSettings(nameservers=[server_address], timeout=1.0))
    return HttpBL(settings, resolver, KEY, clock or FakeClock())


# Pure -------------------------------------------------------------------------------


def test_score_discounts_linearly_to_zero_at_max_age() -> None:
    assert score(Answer(0, 100, 1)) == 100
    assert score(Answer(51, 100, 1)) == 80  # 100 * 204 / 255
    assert score(Answer(255, 255, 7)) == 0
    assert score(Answer(10, 100, 1), max_age_days=20) == 50
    assert score(Answer(30, 100, 1), max_age_days=20) == 0
    assert score(Answer(0, 5, 0)) == 0  # search engine: the third octet is no threat


def test_answers_that_are_not_httpbl_are_refused() -> None:
    with pytest.raises(HttpBLError, match="not an http:BL answer"):
        Answer.parse("10.3.40.4")


def test_severity_from_score_when_configured() -> None:
    settings = HttpBLSettings(trigger=25, duration="score", score_per_rung=50)
    assert judge("192.0.2.1", Answer(0, 25, 1), settings).severity == 1
    assert judge("192.0.2.1", Answer(0, 75, 1), settings).severity == 2
    assert judge("192.0.2.1", Answer(0, 255, 1), settings).severity == 5
    ladder = HttpBLSettings(trigger=25)
    verdict = judge("192.0.2.1", Answer(0, 255, 1), ladder)
    assert verdict.block and verdict.severity is None and "normal ladder" in verdict.why


# Against the DNS server ---------------------------------------------------------------


def test_listed_above_trigger_is_blocked(dns_server: ZoneServer) -> None:
    verdict = checker(dns_server.address).check("192.0.2.7")
    assert verdict.status == "listed"
    assert verdict.block
    assert verdict.score == 39  # 40 * 252 // 255
    assert "comment spammer" in verdict.why and ">= trigger 25" in verdict.why
    assert verdict.reason() == "http:BL score 39 (threat 40, 3 days, comment spammer)"


def test_not_listed_is_nxdomain(dns_server: ZoneServer) -> None:
    verdict = checker(dns_server.address).check("192.0.2.10")
    assert (verdict.status, verdict.block, verdict.score) == ("not_listed", False, 0)
    assert dns_server.count(name("192.0.2.10")) == 1


def test_search_engine_is_never_blocked(dns_server: ZoneServer) -> None:
    verdict = checker(dns_server.address, trigger=1).check("192.0.2.8")
    assert verdict.status == "listed"
    assert not verdict.block
    assert "search engine (Google)" in verdict.why and "never blocked" in verdict.why


def test_old_entry_falls_below_the_trigger(dns_server: ZoneServer) -> None:
    old = checker(dns_server.address).check("192.0.2.9")
    assert old.status == "listed" and not old.block
    assert old.score == 21  # 100 * 55 // 255
    assert "< trigger 25" in old.why and "harvester" in old.why
    oldest = checker(dns_server.address, trigger=1).check("198.51.100.4")
    assert oldest.score == 0 and not oldest.block


def test_timeout_gives_an_error_fast_and_never_blocks() -> None:
    hole = BlackHole("udp")
    try:
        settings = HttpBLSettings(enabled=True, key=KEY)
        resolver = make_resolver(DnsSettings(nameservers=[hole.address], timeout=0.5))
        lookup = HttpBL(settings, resolver, KEY)
        started = time.monotonic()
        verdict = lookup.check("192.0.2.7")
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert verdict.status == "error" and not verdict.block
    assert "timeout" in verdict.why.lower()
    assert elapsed < 1.5
    # Failures are not cached: the next lookup asks again.
    assert lookup.queries == 1


def test_cache_honours_the_answer_ttl(dns_server: ZoneServer) -> None:
    clock = FakeClock()
    lookup = checker(dns_server.address, clock)
    qname = name("203.0.113.5")
    assert lookup.check("203.0.113.5").block
    clock.now += 29
    assert lookup.check("203.0.113.5").block
    assert dns_server.count(qname) == 1  # served from the cache within the 30 s TTL
    clock.now += 2
    assert lookup.check("203.0.113.5").block
    assert dns_server.count(qname) == 2  # expired: asked again


def test_negative_answers_are_cached_for_the_soa_minimum(dns_server: ZoneServer) -> None:
    clock = FakeClock()
    lookup = checker(dns_server.address, clock)
    qname = name("192.0.2.11")
    lookup.check("192.0.2.11")
    clock.now += 59
    lookup.check("192.0.2.11")
    assert dns_server.count(qname) == 1  # SOA TTL 60 caps the negative TTL (RFC 2308)
    clock.now += 2
    lookup.check("192.0.2.11")
    assert dns_server.count(qname) == 2


def test_ipv6_is_skipped_without_a_query(dns_server: ZoneServer) -> None:
    lookup = checker(dns_server.address)
    verdict = lookup.check("2001:db8::7")
    assert verdict.status == "skipped" and not verdict.block
    assert lookup.queries == 0
    mapped = lookup.check("::ffff:192.0.2.7")
    assert mapped.ip == "192.0.2.7" and mapped.block


# Issue #13, item 14 -----------------------------------------------------------------


class _Garbage:
    """A UDP 'name server' that answers every query with a malformed message."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            # The query's id, "a response", one answer promised, then a broken name.
            self.sock.sendto(data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\xff\xff", peer)

    def close(self) -> None:
        self.sock.close()


def test_a_malformed_answer_is_reported_as_malformed() -> None:
    garbage = _Garbage()
    try:
        start = time.monotonic()
        verdict = checker(garbage.address).check("192.0.2.7")
        took = time.monotonic() - start
    finally:
        garbage.close()
    assert verdict.status == "error" and not verdict.block
    assert "malformed DNS answer" in verdict.why and "timeout" not in verdict.why.lower()
    assert took < 0.5  # said at once, not after waiting out the lifetime


def test_reserved_type_bits_are_no_threat(dns_server: ZoneServer) -> None:
    dns_server.add(f"{name('192.0.2.30')} 600 IN A 127.0.200.8")  # reserved bit 8 alone
    dns_server.add(f"{name('192.0.2.31')} 600 IN A 127.0.200.136")  # 8 + 128: reserved
    dns_server.add(f"{name('192.0.2.32')} 600 IN A 127.0.200.9")  # suspicious + reserved 8
    bl = checker(dns_server.address)
    for ip in ("192.0.2.30", "192.0.2.31"):
        verdict = bl.check(ip)
        assert (verdict.status, verdict.block, verdict.score) == ("listed", False, 0), ip
        assert "no threat type" in verdict.why
    mixed = bl.check("192.0.2.32")
    assert mixed.block and "suspicious" in mixed.why and "reserved type bits 8" in mixed.why


def test_cached_ttls_are_capped(dns_server: ZoneServer) -> None:
    dns_server.add(f"{name('192.0.2.33')} 604800 IN A 127.1.60.4")  # a week
    clock = FakeClock()
    bl = checker(dns_server.address, clock)  # max_cache_ttl: 1 hour by default
    bl.check("192.0.2.33")
    clock.now += 3599
    bl.check("192.0.2.33")
    assert bl.queries == 1
    clock.now += 2
    bl.check("192.0.2.33")
    assert bl.queries == 2  # asked again after an hour, not a week


def test_private_and_reserved_addresses_are_never_looked_up(dns_server: ZoneServer) -> None:
    bl = checker(dns_server.address)
    for ip in ("10.1.2.3", "192.168.0.1", "127.0.0.1", "100.64.0.1", "169.254.1.1", "240.0.0.1"):
        verdict = bl.check(ip)
        assert verdict.status == "skipped" and not verdict.block, ip
        assert "private or reserved" in verdict.why
    assert bl.queries == 0
