"""Submission to AbuseIPDB and DShield over HTTP (httpx), rate-limited, never twice.

AbuseIPDB: `POST /api/v2/report`, header `Key: <api key>`, form fields ip,
categories (comma-separated ids), comment (<= 1,024 bytes) and timestamp
(ISO 8601 with offset). The service takes one report per address per 15
minutes; imr also keeps a daily cap and pauses between requests.

DShield: `POST /submitapi/` with a JSON body {"type": "firewall", "logs": [...],
"authheader": ...} and the header `X-ISC-Authorization: ISC-HMAC-SHA256
Credentials=<b64 HMAC-SHA256(key = nonce + userid, message = api key)>
Userid=<id> Nonce=<b64 of 8 random bytes>` (the scheme of DShield's own client).

Every accepted entry goes into the outbox's ledger, so a rerun sends only what
is new. The first error that concerns the service as a whole (unreachable,
bad key, rate limit) ends that service's run; the ledger keeps what was done.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import httpx

from imr.core.durations import format_duration
from imr.reputation.exports import Incident, abuseipdb_comment, dshield_logs, iso
from imr.reputation.outbox import Outbox
from imr.reputation.settings import AbuseIPDBSettings, DShieldSettings

DSHIELD_BATCH = 1000


@dataclass
class SubmitResult:
    service: str
    accepted: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopped: str | None = None

    def line(self) -> str:
        text = f"{self.service}: {self.accepted} accepted, {len(self.skipped)} skipped"
        if self.errors:
            text += f", {len(self.errors)} refused"
        if self.stopped:
            text += f"; stopped: {self.stopped}"
        return text


class Pacer:
    """At most one request per `interval` seconds."""

    def __init__(
        self,
        interval: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._sleep = sleep
        self._clock = clock
        self._last: float | None = None

    def wait(self) -> None:
        if self._last is not None:
            pause = self._last + self.interval - self._clock()
            if pause > 0:
                self._sleep(pause)
        self._last = self._clock()


def _failure(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return f"HTTP {response.status_code}: {text[:200]}"


def submit_abuseipdb(
    incidents: Sequence[Incident],
    settings: AbuseIPDBSettings,
    api_key: str,
    outbox: Outbox,
    client: httpx.Client,
    pacer: Pacer,
    zone: ZoneInfo | None,
    now: Callable[[], float] = time.time,
) -> SubmitResult:
    result = SubmitResult("abuseipdb")
    for incident in incidents:
        key = f"{incident.ip}@{incident.blocked_at}"
        if outbox.submitted("abuseipdb", key):
            result.skipped.append(f"{incident.ip}: already submitted")
            continue
        last = outbox.last_submission("abuseipdb", incident.ip)
        if last is not None and now() - last < settings.per_address:
            since = format_duration(settings.per_address)
            result.skipped.append(f"{incident.ip}: reported less than {since} ago")
            continue
        if outbox.submissions_in_last_day("abuseipdb") >= settings.daily_cap:
            result.stopped = f"daily cap of {settings.daily_cap} reached"
            break
        pacer.wait()
        form = {
            "ip": incident.ip,
            "categories": ",".join(str(c) for c in settings.categories_for(incident.source)),
            "comment": abuseipdb_comment(incident, zone),
            "timestamp": iso(incident.blocked_at, zone),
        }
        try:
            response = client.post(
                settings.url,
                data=form,
                headers={"Key": api_key, "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            result.stopped = f"cannot reach {settings.url}: {exc.__class__.__name__} {exc}"
            break
        if response.status_code == 200:
            outbox.record_submissions("abuseipdb", [(key, incident.ip)])
            result.accepted += 1
        elif response.status_code == 422:
            # This report only (e.g. reported too recently, or an address they refuse).
            result.errors.append(f"{incident.ip}: {_failure(response)}")
        else:
            retry = response.headers.get("Retry-After")
            hint = f" (retry after {retry}s)" if retry else ""
            result.stopped = f"{_failure(response)}{hint}"
            break
    return result


def dshield_auth_header(userid: int, api_key: str, nonce: str | None = None) -> str:
    """ISC-HMAC-SHA256: HMAC-SHA256 keyed with nonce + userid over the API key, base64."""
    if nonce is None:
        nonce = base64.b64encode(os.urandom(8)).decode()
    digest = hmac.new(
        (nonce + str(userid)).encode(), msg=api_key.encode(), digestmod=hashlib.sha256
    ).digest()
    credentials = base64.b64encode(digest).decode()
    return f"ISC-HMAC-SHA256 Credentials={credentials} Userid={userid} Nonce={nonce}"


def submit_dshield(
    incidents: Sequence[Incident],
    settings: DShieldSettings,
    api_key: str,
    outbox: Outbox,
    client: httpx.Client,
    pacer: Pacer,
) -> SubmitResult:
    result = SubmitResult("dshield")
    if settings.userid is None:
        raise ValueError("reputation.dshield.userid is not set")
    fresh = []
    for entry in dshield_logs(incidents, settings):
        key = f"{entry['sip']}@{entry['time']}"
        if outbox.submitted("dshield", key):
            result.skipped.append(f"{entry['sip']} at {entry['time']}: already submitted")
        else:
            fresh.append((key, entry))
    for start in range(0, len(fresh), DSHIELD_BATCH):
        batch = fresh[start : start + DSHIELD_BATCH]
        header = dshield_auth_header(settings.userid, api_key)
        body = {"type": "firewall", "logs": [entry for _, entry in batch], "authheader": header}
        pacer.wait()
        try:
            response = client.post(
                settings.url,
                json=body,
                headers={"X-ISC-Authorization": header, "X-ISC-LogType": "firewall"},
            )
        except httpx.HTTPError as exc:
            result.stopped = f"cannot reach {settings.url}: {exc.__class__.__name__} {exc}"
            break
        # DShield answers errors with 200 and a body starting "ERROR".
        if response.status_code != 200 or response.text.lstrip().upper().startswith("ERROR"):
            result.stopped = _failure(response)
            break
        outbox.record_submissions("dshield", [(key, str(e["sip"])) for key, e in batch])
        result.accepted += len(batch)
    return result


def http_client(timeout: float) -> httpx.Client:
    """Bounded connect, read, write and pool waits: a hanging service costs `timeout` at most
    per phase, and the CLI is a process of its own: nothing waits on it but itself."""
    return httpx.Client(timeout=httpx.Timeout(timeout), headers={"User-Agent": "imr"})
