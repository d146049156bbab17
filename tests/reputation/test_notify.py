"""Abuse mail end to end: a real state file, a real DNS server, a real SMTP server.

The blocks are written with imr.store.Store as the daemon writes them; the
outbox reads them read-only, finds the contacts over DNS and mails through
aiosmtpd on 127.0.0.1. The outbox's clock is injected to cross periods and days.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

import dns.reversename
import pytest

from imr.reputation.contacts import ContactFinder, Contacts
from imr.reputation.dns_client import make_resolver
from imr.reputation.exports import pardon_check, read_state_file
from imr.reputation.mailer import SendSummary, SmtpRelay, send_due
from imr.reputation.outbox import Outbox
from imr.reputation.settings import DnsSettings, NotifySettings
from imr.store import Store

from reputation_servers import SmtpSink, ZoneServer, free_port

BERLIN = ZoneInfo("Europe/Berlin")
DAY = 86400.0
LOG_LINE = (
    '192.0.2.7 - - [01/May/2024:12:00:03 +0200] "POST /wp-login.php HTTP/1.1" 200 512 "-" "curl"'
)


def ptr(ip: str, host: str) -> str:
    return f"{dns.reversename.from_address(ip).to_text()} 300 IN PTR {host}"


RECORDS = [
    ptr("192.0.2.7", "cust7.dsl.isp.example.net."),
    "cust7.dsl.isp.example.net. 300 IN A 192.0.2.7",
    # An attacker's PTR naming someone else's server: it does not resolve back.
    ptr("198.51.100.8", "www.victim-shop.example.org."),
    "www.victim-shop.example.org. 300 IN A 192.0.2.200",
    ptr("203.0.113.9", "vps9.cloud.example.com."),
    "vps9.cloud.example.com. 300 IN A 203.0.113.9",
    ptr("203.0.113.10", "vps10.cloud.example.com."),
    "vps10.cloud.example.com. 300 IN A 203.0.113.10",
    "isp.example.net. 300 IN MX 10 mx.isp.example.net.",
    "example.org. 300 IN MX 10 mx.example.org.",
    "cloud.example.com. 300 IN MX 10 mx.cloud.example.com.",
]


def body_of(message: EmailMessage) -> str:
    """The text for people (the first text/plain part)."""
    part = message.get_body(("plain",))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


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


def block(store: Store, ip: str, at: float, reason: str, source: str, extra_hits: int = 0) -> None:
    """As the daemon does: a block row and its hit; later hits on the active block."""
    with store.transaction():
        for active in store.active_blocks():
            if active.ip == ip:  # one active block per address: the old one ran out
                store.lift(active.id, min(active.expires_at, at), "expired", "imr")
        record = store.insert_block(ip, at, at + DAY, 1, reason, source, 33, 4242)
        store.record_hit(ip, at, "block", reason, source, 33, 4242, record.id)
        for n in range(1, extra_hits + 1):
            store.record_hit(ip, at + 60 * n, "record", f"{reason} #{n}", source, 33, 4242, None)


class Harness:
    def __init__(self, tmp: Path, dns_address: str, smtp_port: int, **settings: object) -> None:
        self.clock = Clock()
        self.state = Store(tmp / "state.db")
        self.outbox = Outbox(tmp / "reputation", self.clock)
        self.settings = NotifySettings.model_validate(
            {
                "enabled": True,
                "sender": "abuse-reports@reporter.example",
                "smtp_host": "127.0.0.1",
                "smtp_port": smtp_port,
                "smtp_timeout": 2,
                "ip_contact_zone": "",
                "period": "7d",
                **settings,
            }
        )
        self.resolver = make_resolver(DnsSettings(nameservers=[dns_address], timeout=1.0))

    def collect(self) -> list[str]:
        incidents = read_state_file(self.state.path, self.clock() - 2 * DAY, self.clock() + 1)
        return [self.outbox.queue(i, self.settings.period) for i in incidents]

    def send(self, dry_run: bool = False) -> SendSummary:
        # As `imr reports send` does: what was pardoned since, from the state file now.
        history = read_state_file(self.state.path, 0, self.clock() + 1)
        return send_due(
            self.outbox,
            self.settings,
            ContactFinder(self.settings, self.resolver),
            SmtpRelay(self.settings, None),
            BERLIN,
            "www.reporter.example",
            self.clock,
            pardoned=pardon_check(history),
            dry_run=dry_run,
        )

    def close(self) -> None:
        self.outbox.close()
        self.state.close()


@pytest.fixture
def harness(tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink) -> Iterator[Harness]:
    h = Harness(tmp_path, dns_server.address, sink.port)
    try:
        yield h
    finally:
        h.close()


def test_one_well_formed_report_per_address_per_period(harness: Harness, sink: SmtpSink) -> None:
    now = harness.clock()
    block(harness.state, "192.0.2.7", now - 3600, LOG_LINE, "logscan:wp-login", extra_hits=3)
    block(harness.state, "203.0.113.9", now - 1800, "sqli in /search", "modsecurity:942100")
    assert sorted(harness.collect()) == ["queued", "queued"]
    assert harness.collect() == ["known", "known"]  # cron again: nothing new

    summary = harness.send()
    assert sorted(summary.sent) == ["192.0.2.7", "203.0.113.9"]
    assert len(sink.messages) == 2
    by_ip = {m["X-Imr-Address"]: (sender, to, m) for sender, to, m in sink.messages}
    sender, to, message = by_ip["192.0.2.7"]
    assert sender == "abuse-reports@reporter.example"
    assert to == ["abuse@isp.example.net"]
    assert message["To"] == "abuse@isp.example.net"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"].endswith("@reporter.example>")
    assert "192.0.2.7" in message["Subject"] and "logscan:wp-login" in message["Subject"]
    body = body_of(message)
    assert "192.0.2.7 (cust7.dsl.isp.example.net)" in body
    assert LOG_LINE in body  # the matched log line, as evidence
    assert f"{LOG_LINE} #3" in body
    stamp = datetime.fromtimestamp(now - 3600, BERLIN).strftime("%Y-%m-%d %H:%M:%S %z (%Z)")
    assert stamp in body  # the time, with its offset and zone
    assert "rule logscan:wp-login" in body
    assert "MX isp.example.net: mx.isp.example.net" in body  # why this recipient
    assert "at most one report per address every 7d" in body

    # The same address blocked again next day: within the period, no second mail.
    harness.clock.now += DAY
    block(harness.state, "192.0.2.7", harness.clock() - 60, "again", "logscan:wp-login")
    assert "recent" in harness.collect()
    assert harness.send().sent == []
    assert len(sink.messages) == 2

    # After the period, a new block is a new report.
    harness.clock.now += 7 * DAY
    block(harness.state, "192.0.2.7", harness.clock() - 60, "third time", "logscan:wp-login")
    assert "queued" in harness.collect()
    assert harness.send().sent == ["192.0.2.7"]
    assert len(sink.messages) == 3


def test_blocks_of_one_address_wait_together_in_one_report(
    harness: Harness, sink: SmtpSink
) -> None:
    now = harness.clock()
    block(harness.state, "203.0.113.9", now - 7200, "first", "logscan:sqli")
    harness.collect()
    with harness.state.transaction():  # ran out early, blocked again: still one report
        harness.state.lift(1, now - 5000, "expired", "imr")
    block(harness.state, "203.0.113.9", now - 600, "second", "logscan:sqli")
    assert harness.collect() == ["known", "merged"]
    (waiting,) = harness.outbox.reports()
    assert [i.reason for i in waiting.incidents] == ["first", "second"]  # each block once
    harness.send()
    assert len(sink.messages) == 1
    body = body_of(sink.messages[0][2])
    assert "first" in body and "second" in body


def test_outbox_retries_after_the_relay_was_down(tmp_path: Path, dns_server: ZoneServer) -> None:
    port = free_port()  # nothing listens there yet
    h = Harness(tmp_path, dns_server.address, port, retry_after="5m")
    try:
        block(h.state, "192.0.2.7", h.clock() - 60, LOG_LINE, "logscan:wp-login")
        h.collect()
        summary = h.send()
        assert summary.sent == [] and summary.retry == ["192.0.2.7"]
        assert summary.stopped is not None and "cannot reach the relay" in summary.stopped
        (waiting,) = h.outbox.reports()
        assert (waiting.status, waiting.attempts) == ("pending", 1)
        assert waiting.next_attempt_at == pytest.approx(h.clock() + 300)
        assert "cannot reach the relay" in (waiting.last_error or "")

        sink = SmtpSink(port).start()
        try:
            assert h.send().sent == []  # not due yet: the backoff holds
            h.clock.now += 301
            assert h.send().sent == ["192.0.2.7"]
            assert len(sink.messages) == 1
        finally:
            sink.stop()
        (done,) = h.outbox.reports()
        assert (done.status, done.attempts) == ("sent", 2)
    finally:
        h.close()


def test_backoff_doubles_and_gives_up(tmp_path: Path, dns_server: ZoneServer) -> None:
    h = Harness(tmp_path, dns_server.address, free_port(), retry_after="1m", max_attempts=3)
    try:
        block(h.state, "192.0.2.7", h.clock() - 60, "x", "cli")
        h.collect()
        h.send()
        assert h.outbox.reports()[0].next_attempt_at == pytest.approx(h.clock() + 60)
        h.clock.now += 61
        h.send()
        assert h.outbox.reports()[0].next_attempt_at == pytest.approx(h.clock() + 120)
        h.clock.now += 121
        h.send()
        (report,) = h.outbox.reports()
        assert report.status == "failed" and report.attempts == 3
        assert (report.last_error or "").startswith("gave up after 3 attempts")
    finally:
        h.close()


def test_daily_cap_holds(tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink) -> None:
    h = Harness(tmp_path, dns_server.address, sink.port, daily_cap=2)
    try:
        for ip in ("192.0.2.7", "203.0.113.10", "203.0.113.9"):
            block(h.state, ip, h.clock() - 60, "x", "cli")
        h.collect()
        summary = h.send()
        assert len(summary.sent) == 2 and summary.waiting_for_cap == 1
        assert len(sink.messages) == 2
        h.clock.now += 3600
        assert h.send().sent == []  # still within the same 24 hours
        h.clock.now += DAY
        assert len(h.send().sent) == 1
        assert len(sink.messages) == 3
    finally:
        h.close()


def test_no_contact_is_final_and_sends_nothing(harness: Harness, sink: SmtpSink) -> None:
    block(harness.state, "192.0.2.99", harness.clock() - 60, "x", "cli")  # no PTR
    harness.collect()
    summary = harness.send()
    assert summary.no_contact == ["192.0.2.99"]
    (report,) = harness.outbox.reports()
    assert report.status == "no_contact"
    assert sink.messages == []


def test_dry_run_changes_nothing(harness: Harness, sink: SmtpSink) -> None:
    block(harness.state, "192.0.2.7", harness.clock() - 60, LOG_LINE, "logscan:wp-login")
    harness.collect()
    summary = harness.send(dry_run=True)
    assert len(summary.previews) == 1 and summary.sent == []
    assert summary.previews[0]["To"] == "abuse@isp.example.net"
    assert sink.messages == []
    assert harness.outbox.reports()[0].status == "pending"


def test_the_run_stops_at_its_deadline_and_charges_nobody(
    tmp_path: Path, dns_server: ZoneServer, sink: SmtpSink
) -> None:
    """Each report's lookups take 200 s of a 5-minute run: the third waits, uncharged."""
    h = Harness(tmp_path, dns_server.address, sink.port, run_timeout="5m")
    try:
        for ip in ("192.0.2.7", "203.0.113.9", "203.0.113.10"):
            block(h.state, ip, h.clock() - 60, LOG_LINE, "logscan:wp-login")
        h.collect()
        monotonic = Clock()
        finder = ContactFinder(h.settings, h.resolver)

        class SlowFinder:
            def find(self, ip: str, deadline: float | None = None) -> Contacts:
                monotonic.now += 200
                return finder.find(ip)

        summary = send_due(
            h.outbox,
            h.settings,
            SlowFinder(),
            SmtpRelay(h.settings, None),
            BERLIN,
            "www.reporter.example",
            h.clock,
            pardoned=lambda incident: False,
            monotonic=monotonic,
        )
        assert summary.sent == ["192.0.2.7", "203.0.113.9"]
        assert summary.waiting_for_time == 1
        left = [r for r in h.outbox.reports() if r.status == "pending"]
        assert [(r.ip, r.attempts) for r in left] == [("203.0.113.10", 0)]
    finally:
        h.close()
