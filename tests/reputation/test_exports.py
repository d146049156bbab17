"""Report exports from a real state file, and submission to a local HTTP server."""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from imr.reputation import exports
from imr.reputation.exports import Incident, read_state_file
from imr.reputation.outbox import Outbox
from imr.reputation.settings import AbuseIPDBSettings, DShieldSettings
from imr.reputation.submit import (
    Pacer,
    dshield_auth_header,
    http_client,
    submit_abuseipdb,
    submit_dshield,
)
from imr.store import Store

from reputation_servers import BlackHole, HttpRecorder

BERLIN = ZoneInfo("Europe/Berlin")
ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")


@pytest.fixture
def incidents(tmp_path: Path) -> list[Incident]:
    now = time.time()
    store = Store(tmp_path / "state.db")
    with store.transaction():
        b = store.insert_block(
            "192.0.2.7",
            now - 600,
            now + 86000,
            1,
            "wp-login: 5 hit(s); GET /wp-login.php",
            "logscan:wp-login",
            33,
            1,
        )
        store.record_hit(
            "192.0.2.7",
            now - 600,
            "block",
            "wp-login: 5 hit(s); GET /wp-login.php",
            "logscan:wp-login",
            33,
            1,
            b.id,
        )
        store.record_hit(
            "192.0.2.7",
            now - 300,
            "record",
            "xmlrpc: 3 hit(s); POST /xmlrpc.php",
            "logscan:xmlrpc",
            33,
            1,
            b.id,
        )
        c = store.insert_block(
            "2001:db8::5", now - 200, now + 86000, 2, "x" * 3000, "logscan:sshd", 0, 1
        )
        store.record_hit("2001:db8::5", now - 200, "block", "x" * 3000, "logscan:sshd", 0, 1, c.id)
        # Older than the window: not exported.
        store.insert_block("203.0.113.1", now - 5 * 86400, now - 4 * 86400, 1, "old", "cli", 0, 1)
    store.close()
    return read_state_file(tmp_path / "state.db", now - 86400, now + 1)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "reputation")
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def recorder() -> Iterator[HttpRecorder]:
    server = HttpRecorder().start()
    try:
        yield server
    finally:
        server.stop()


def test_history_joins_hits_to_their_block(incidents: list[Incident]) -> None:
    assert [i.ip for i in incidents] == ["192.0.2.7", "2001:db8::5"]
    first = incidents[0]
    assert [h.outcome for h in first.hits] == ["block", "record"]
    assert first.source == "logscan:wp-login" and first.offence == 1


def test_json_export(incidents: list[Incident]) -> None:
    data = json.loads(exports.to_json(incidents, BERLIN))
    first = data["incidents"][0]
    assert set(first) == {
        "ip", "blocked_at", "expires_at", "lifted_at", "lift_reason", "offence", "rung", "source",
        "reason", "last_seen", "hits",
    }  # fmt: skip
    assert ISO_WITH_OFFSET.match(first["blocked_at"])
    assert first["hits"][1]["reason"].startswith("xmlrpc")
    # The outbox keeps incidents exactly (the block's time is part of its key).
    assert Incident.from_record(incidents[0].to_record()) == incidents[0]


def test_csv_export(incidents: list[Incident]) -> None:
    rows = list(csv.reader(io.StringIO(exports.to_csv(incidents, BERLIN))))
    assert tuple(rows[0]) == exports.CSV_FIELDS
    assert rows[1][0] == "192.0.2.7" and rows[1][8] == "2"
    assert len(rows) == 3


def test_abuseipdb_bulk_csv_has_the_documented_columns(incidents: list[Incident]) -> None:
    settings = AbuseIPDBSettings.model_validate(
        {"categories_by_source": {"logscan:sshd": [18, 22]}}
    )
    text = exports.to_abuseipdb_csv(incidents, settings, BERLIN)
    assert text.splitlines()[0] == "IP,Categories,ReportDate,Comment"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["IP"] == "192.0.2.7" and rows[0]["Categories"] == "21"
    assert rows[1]["IP"] == "2001:db8::5" and rows[1]["Categories"] == "18,22"
    assert '"18,22"' in text  # several categories are enclosed in quotes
    assert ISO_WITH_OFFSET.match(rows[0]["ReportDate"])
    assert "xmlrpc: 3 hit(s)" in rows[0]["Comment"]
    assert len(rows[1]["Comment"].encode()) <= 1024  # the service's limit


def test_dshield_format_fields(incidents: list[Incident]) -> None:
    settings = DShieldSettings(userid=12345, target_ip="10.0.0.1", target_port=443)
    lines = exports.to_dshield(incidents, settings, BERLIN).splitlines()
    assert len(lines) == 2  # one per hit; IPv6 left out (DShield takes IPv4 only)
    fields = lines[0].split("\t")
    assert len(fields) == 9
    date, author, count, sip, sport, dip, dport, proto, flags = fields
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d\d:\d\d$", date)
    assert (author, count, sip, sport, dip, dport, proto, flags) == (
        "12345", "1", "192.0.2.7", "???", "10.0.0.1", "443", "TCP", "",
    )  # fmt: skip


# Submission ---------------------------------------------------------------------------


def test_abuseipdb_submission(
    incidents: list[Incident], outbox: Outbox, recorder: HttpRecorder
) -> None:
    settings = AbuseIPDBSettings(url=f"{recorder.url}/api/v2/report")
    with http_client(5) as client:
        result = submit_abuseipdb(incidents, settings, "k3y", outbox, client, Pacer(0), BERLIN)
    assert result.accepted == 2 and result.stopped is None
    first = recorder.requests[0]
    assert (first.method, first.path) == ("POST", "/api/v2/report")
    assert first.headers["key"] == "k3y"
    assert first.headers["accept"] == "application/json"
    assert first.headers["content-type"] == "application/x-www-form-urlencoded"
    form = urllib.parse.parse_qs(first.body.decode())
    assert form["ip"] == ["192.0.2.7"]
    assert form["categories"] == ["21"]
    assert ISO_WITH_OFFSET.match(form["timestamp"][0])
    assert form["comment"][0].startswith("logscan:wp-login: wp-login: 5 hit(s)")

    # Again: the ledger knows both, nothing is sent twice.
    with http_client(5) as client:
        again = submit_abuseipdb(incidents, settings, "k3y", outbox, client, Pacer(0), BERLIN)
    assert again.accepted == 0 and len(again.skipped) == 2
    assert len(recorder.requests) == 2


def test_abuseipdb_rate_limit_stops_the_run(
    incidents: list[Incident], outbox: Outbox, recorder: HttpRecorder
) -> None:
    recorder.status, recorder.body = 429, b'{"errors": [{"detail": "Daily rate limit"}]}'
    settings = AbuseIPDBSettings(url=f"{recorder.url}/api/v2/report")
    with http_client(5) as client:
        result = submit_abuseipdb(incidents, settings, "k3y", outbox, client, Pacer(0), None)
    assert result.accepted == 0 and result.stopped is not None and "429" in result.stopped
    assert len(recorder.requests) == 1  # stopped at the first refusal
    assert not outbox.submitted("abuseipdb", f"192.0.2.7@{incidents[0].blocked_at}")


def test_dshield_auth_header_known_answer() -> None:
    # The value DShield's own Python client computes for these inputs.
    assert dshield_auth_header(12345, "secretkey", "ADOUf58prEY=") == (
        "ISC-HMAC-SHA256 Credentials=1y5abGdvi8l691fBHtBjHicFThimxHSvZq4JN4Fagz0="
        " Userid=12345 Nonce=ADOUf58prEY="
    )


def test_dshield_submission(
    incidents: list[Incident], outbox: Outbox, recorder: HttpRecorder
) -> None:
    recorder.body = b"OK"
    settings = DShieldSettings(userid=777, url=f"{recorder.url}/submitapi/")
    with http_client(5) as client:
        result = submit_dshield(incidents, settings, "k3y", outbox, client, Pacer(0))
    assert result.accepted == 2  # the IPv6 block is left out: DShield takes IPv4 only
    (request,) = recorder.requests
    assert request.path == "/submitapi/"
    assert request.headers["x-isc-logtype"] == "firewall"
    assert request.headers["content-type"] == "application/json"
    header = request.headers["x-isc-authorization"]
    match = re.fullmatch(r"ISC-HMAC-SHA256 Credentials=(\S+) Userid=777 Nonce=(\S+)", header)
    assert match is not None
    credentials, nonce = match.groups()
    assert len(base64.b64decode(nonce)) == 8
    expected = hmac.new((nonce + "777").encode(), b"k3y", hashlib.sha256).digest()
    assert base64.b64decode(credentials) == expected
    body = json.loads(request.body)
    assert body["type"] == "firewall" and body["authheader"] == header
    entry = body["logs"][0]
    assert set(entry) == {"time", "sip", "dip", "sport", "dport", "proto", "flags", "version"}
    assert (entry["sip"], entry["proto"], entry["version"]) == ("192.0.2.7", 6, 4)
    assert {e["sip"] for e in body["logs"]} == {"192.0.2.7"}

    with http_client(5) as client:
        again = submit_dshield(incidents, settings, "k3y", outbox, client, Pacer(0))
    assert again.accepted == 0 and len(recorder.requests) == 1


def test_dshield_error_body_is_a_failure(
    incidents: list[Incident], outbox: Outbox, recorder: HttpRecorder
) -> None:
    recorder.body = b"ERROR: no authinfo"
    settings = DShieldSettings(userid=777, url=f"{recorder.url}/submitapi/")
    with http_client(5) as client:
        result = submit_dshield(incidents, settings, "k3y", outbox, client, Pacer(0))
    assert result.accepted == 0 and result.stopped is not None and "ERROR" in result.stopped


def test_hanging_api_times_out(incidents: list[Incident], outbox: Outbox) -> None:
    hole = BlackHole("tcp")
    try:
        settings = AbuseIPDBSettings(url=f"http://{hole.address}/api/v2/report")
        started = time.monotonic()
        with http_client(0.5) as client:
            result = submit_abuseipdb(incidents, settings, "k", outbox, client, Pacer(0), None)
        elapsed = time.monotonic() - started
    finally:
        hole.close()
    assert result.accepted == 0 and result.stopped is not None
    assert "cannot reach" in result.stopped
    assert elapsed < 2


def test_pacer_spaces_requests() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(1.0, sleep=sleep, clock=lambda: now[0])
    pacer.wait()  # the first request goes at once
    now[0] += 0.2
    pacer.wait()  # 0.2 s later: waits the rest of the second
    now[0] += 5
    pacer.wait()  # long after: no wait
    assert slept == [pytest.approx(0.8)]
