"""Block history → incidents → report formats (JSON, CSV, AbuseIPDB bulk CSV, DShield).

The history comes from the state file, opened read-only (SQLite WAL: readers
never hold up the daemon's writer), or, for a user who may not read the file,
from the daemon's `export` op. An incident is one block with the hits that
belong to it: the same address, from the block's start to its end.

Times are written with their offset (ISO 8601), in reputation.timezone or the
system's local zone.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import ipaddress
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from imr.reputation.settings import AbuseIPDBSettings, DShieldSettings
from imr.store import SCHEMA_VERSION

HistorySource = Literal["auto", "state", "daemon"]
COMMENT_LIMIT = 1024  # AbuseIPDB truncates comments after 1,024 bytes


class HistoryError(Exception):
    """The block history cannot be read; the message is for the user."""


class ExportClient(Protocol):
    def request(self, op: str, **fields: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Hit:
    at: float
    outcome: str
    reason: str
    source: str


@dataclass(frozen=True)
class Incident:
    ip: str
    blocked_at: float
    expires_at: float
    lifted_at: float | None
    offence: int
    rung: int
    reason: str
    source: str
    hits: tuple[Hit, ...] = ()

    @property
    def ended_at(self) -> float:
        return self.lifted_at if self.lifted_at is not None else self.expires_at

    @property
    def last_seen(self) -> float:
        return max([self.blocked_at, *(h.at for h in self.hits)])

    def as_json(self, zone: ZoneInfo | None) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "blocked_at": iso(self.blocked_at, zone),
            "expires_at": iso(self.expires_at, zone),
            "lifted_at": iso(self.lifted_at, zone) if self.lifted_at is not None else None,
            "offence": self.offence,
            "rung": self.rung,
            "source": self.source,
            "reason": self.reason,
            "last_seen": iso(self.last_seen, zone),
            "hits": [
                {
                    "at": iso(h.at, zone),
                    "outcome": h.outcome,
                    "source": h.source,
                    "reason": h.reason,
                }
                for h in self.hits
            ],
        }

    def to_record(self) -> dict[str, Any]:
        """Exact form (epoch floats) for the outbox: the block's time is part of its key."""
        record = dataclasses.asdict(self)
        record["hits"] = [dataclasses.asdict(h) for h in self.hits]
        return record

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Incident:
        fields = {k: v for k, v in data.items() if k != "hits"}
        return cls(**fields, hits=tuple(Hit(**h) for h in data.get("hits", [])))


# Times ---------------------------------------------------------------------------


def local_time(epoch: float, zone: ZoneInfo | None) -> datetime:
    moment = datetime.fromtimestamp(epoch, zone)
    return moment if zone is not None else moment.astimezone()


def iso(epoch: float, zone: ZoneInfo | None) -> str:
    return local_time(epoch, zone).isoformat(timespec="seconds")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# Reading the history ---------------------------------------------------------------

_BLOCKS = (
    "SELECT ip, blocked_at, expires_at, lifted_at, offence, rung, reason, source FROM blocks"
    " WHERE blocked_at >= ? AND blocked_at < ? ORDER BY blocked_at, id"
)
_HITS = (
    "SELECT ip, at, outcome, reason, source FROM hits"
    " WHERE at >= ? AND ip IN (SELECT ip FROM blocks WHERE blocked_at >= ? AND blocked_at < ?)"
    " ORDER BY at, id"
)


def read_state_file(path: Path, since: float, until: float) -> list[Incident]:
    """Incidents that began in [since, until), straight from the state file (read-only)."""
    if not path.exists():
        raise HistoryError(f"{path}: no state file (is the daemon configured with another?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise HistoryError(f"{path}: cannot open the state file: {exc}") from None
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{path}: schema version {version} is newer than this imr knows")
        blocks = db.execute(_BLOCKS, (since, until)).fetchall()
        hits = db.execute(_HITS, (since, since, until)).fetchall()
    except sqlite3.Error as exc:
        raise HistoryError(f"{path}: cannot read the state file: {exc}") from None
    finally:
        db.close()
    return join(
        [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]) for r in blocks],
        [(r[0], r[1], r[2], r[3], r[4]) for r in hits],
    )


def read_daemon(client: ExportClient, since: float, until: float) -> list[Incident]:
    """The same from the daemon's `export` op (roles read or admin)."""
    data = client.request("export")
    blocks = [
        (
            b["ip"],
            parse_time(b["blocked_at"]),
            parse_time(b["expires_at"]),
            parse_time(b["lifted_at"]) if b.get("lifted_at") else None,
            int(b["offence"]),
            int(b["rung"]),
            b.get("reason") or "",
            b.get("source") or "",
        )
        for b in data.get("blocks", [])
    ]
    blocks = [b for b in blocks if since <= b[1] < until]
    hits = [
        (h["ip"], parse_time(h["at"]), h["outcome"], h.get("reason") or "", h.get("source") or "")
        for h in data.get("hits", [])
    ]
    return join(blocks, [h for h in hits if h[1] >= since])


BlockRow = tuple[str, float, float, float | None, int, int, str, str]
HitRow = tuple[str, float, str, str, str]


def join(blocks: Sequence[BlockRow], hits: Sequence[HitRow]) -> list[Incident]:
    """Give each block the hits of its address between its start and its end."""
    by_ip: dict[str, list[HitRow]] = {}
    for hit in hits:
        by_ip.setdefault(hit[0], []).append(hit)
    incidents = []
    for ip, blocked_at, expires_at, lifted_at, offence, rung, reason, source in blocks:
        end = lifted_at if lifted_at is not None else expires_at
        mine = tuple(
            Hit(at, outcome, hit_reason, hit_source)
            for _, at, outcome, hit_reason, hit_source in by_ip.get(ip, [])
            if blocked_at <= at <= end
        )
        incidents.append(
            Incident(ip, blocked_at, expires_at, lifted_at, offence, rung, reason, source, mine)
        )
    return incidents


# Formats ---------------------------------------------------------------------------


def to_json(incidents: Sequence[Incident], zone: ZoneInfo | None) -> str:
    return json.dumps({"incidents": [i.as_json(zone) for i in incidents]}, indent=2) + "\n"


CSV_FIELDS = (
    "ip",
    "blocked_at",
    "expires_at",
    "lifted_at",
    "offence",
    "rung",
    "source",
    "reason",
    "hits",
    "last_seen",
)


def to_csv(incidents: Sequence[Incident], zone: ZoneInfo | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for i in incidents:
        writer.writerow(
            [
                i.ip,
                iso(i.blocked_at, zone),
                iso(i.expires_at, zone),
                iso(i.lifted_at, zone) if i.lifted_at is not None else "",
                i.offence,
                i.rung,
                i.source,
                i.reason,
                len(i.hits),
                iso(i.last_seen, zone),
            ]
        )
    return out.getvalue()


ABUSEIPDB_FIELDS = ("IP", "Categories", "ReportDate", "Comment")


def abuseipdb_comment(incident: Incident, zone: ZoneInfo | None) -> str:
    """What was seen, cut to the service's 1,024 bytes (on a character boundary)."""
    lines = [f"{incident.source or 'imr'}: {incident.reason or 'blocked'}"]
    seen = {incident.reason}
    for hit in incident.hits:
        if hit.reason and hit.reason not in seen:
            seen.add(hit.reason)
            lines.append(f"{iso(hit.at, zone)} {hit.reason}")
    text = "\n".join(lines)
    data = text.encode("utf-8")
    if len(data) <= COMMENT_LIMIT:
        return text
    return data[: COMMENT_LIMIT - 3].decode("utf-8", "ignore") + "..."


def to_abuseipdb_csv(
    incidents: Sequence[Incident], settings: AbuseIPDBSettings, zone: ZoneInfo | None
) -> str:
    """AbuseIPDB's bulk-report CSV: IP, Categories, ReportDate, Comment (strict order)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(ABUSEIPDB_FIELDS)
    for i in incidents:
        categories = ",".join(str(c) for c in settings.categories_for(i.source))
        writer.writerow([i.ip, categories, iso(i.blocked_at, zone), abuseipdb_comment(i, zone)])
    return out.getvalue()


def dshield_time(epoch: float, zone: ZoneInfo | None) -> str:
    """DShield's date: 'YYYY-MM-DD HH:MM:SS +HH:MM'."""
    moment = local_time(epoch, zone)
    offset = moment.strftime("%z")
    return moment.strftime("%Y-%m-%d %H:%M:%S ") + f"{offset[:3]}:{offset[3:]}"


def dshield_events(incidents: Sequence[Incident]) -> list[tuple[str, float]]:
    """One event per hit (the block's own hit included); a block without hits counts once."""
    events: list[tuple[str, float]] = []
    for i in incidents:
        times = [h.at for h in i.hits] or [i.blocked_at]
        events.extend((i.ip, at) for at in times)
    return events


def to_dshield(
    incidents: Sequence[Incident], settings: DShieldSettings, zone: ZoneInfo | None
) -> str:
    """DShield's tab-separated format: date, author, count, source IP, source port,
    target IP, target port, protocol, flags. imr does not know the source port: '???'."""
    author = str(settings.userid or 0)
    lines = []
    for ip, at in dshield_events(incidents):
        fields = [
            dshield_time(at, zone),
            author,
            "1",
            ip,
            "???",
            settings.target_ip,
            str(settings.target_port),
            "TCP",
            "",
        ]
        lines.append("\t".join(fields))
    return "\n".join(lines) + ("\n" if lines else "")


def dshield_logs(incidents: Sequence[Incident], settings: DShieldSettings) -> list[dict[str, Any]]:
    """The submit API's 'firewall' entries (the fields DShield's own fwlogparser sends)."""
    return [
        {
            "time": int(at),
            "sip": ip,
            "dip": settings.target_ip,
            "sport": 0,
            "dport": settings.target_port,
            "proto": 6,
            "flags": "",
            "version": ipaddress.ip_address(ip).version,
        }
        for ip, at in dshield_events(incidents)
    ]
