"""Block history → incidents → report formats (JSON, CSV, AbuseIPDB bulk CSV, DShield).

The history comes from the state file, opened read-only (SQLite WAL: readers
never hold up the daemon's writer), or, for a user who may not read the file,
from the daemon's `export` op. An incident is one block with the hits that
belong to it: the same address, from the block's start to its end.

Times are written with their offset (ISO 8601), in reputation.timezone or the
system's local zone.

A *pardoned* block is one an admin lifted by hand (`imr unblock`, lift reason
"unblocked") or that the daemon lifted because the address is protected (lift
reason "protected"): a false positive. It and its hits leave the host in no
export, submission or mail unless asked for (`--include-pardoned`).

Text that a client chose (reasons, sources) is neutralised for spreadsheets
(OWASP CSV injection) in the CSV formats, and escaped as AbuseIPDB's bulk CSV
specifies (backslash before `"` and before a backslash).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import ipaddress
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from imr.reputation.settings import AbuseIPDBSettings, DShieldSettings, ReputationSettings
from imr.store import SCHEMA_VERSION

HistorySource = Literal["auto", "state", "daemon"]
COMMENT_LIMIT = 1024  # AbuseIPDB truncates comments after 1,024 bytes
# AbuseIPDB's bulk report takes at most 10,000 lines and 2 MB per file
# (counted here with the header line, and as 2,000,000 bytes to stay inside either reading).
BULK_MAX_LINES = 10_000
BULK_MAX_BYTES = 2_000_000
# Lift reasons that mean "this block was a mistake" (imr/server/broker.py writes them).
PARDONS = frozenset({"unblocked", "protected"})
# OWASP "CSV Injection": a cell starting with one of these is a formula to a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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
    # Read from the state file; None in outbox records written before it was kept.
    lift_reason: str | None = None
    uid: int | None = None  # the requesting peer's uid as the daemon saw it (not chosen)

    @property
    def pardoned(self) -> bool:
        return self.lift_reason in PARDONS

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
            "lift_reason": self.lift_reason,
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
    "SELECT ip, blocked_at, expires_at, lifted_at, offence, rung, reason, source,"
    " lift_reason, uid FROM blocks"
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
        [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in blocks],
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
            b.get("lift_reason"),
            b.get("uid"),
        )
        for b in data.get("blocks", [])
    ]
    blocks = [b for b in blocks if since <= b[1] < until]
    hits = [
        (h["ip"], parse_time(h["at"]), h["outcome"], h.get("reason") or "", h.get("source") or "")
        for h in data.get("hits", [])
    ]
    return join(blocks, [h for h in hits if h[1] >= since])


BlockRow = tuple[str, float, float, float | None, int, int, str, str, str | None, int | None]
HitRow = tuple[str, float, str, str, str]


def join(blocks: Sequence[BlockRow], hits: Sequence[HitRow]) -> list[Incident]:
    """Give each block the hits of its address between its start and its end."""
    by_ip: dict[str, list[HitRow]] = {}
    for hit in hits:
        by_ip.setdefault(hit[0], []).append(hit)
    incidents = []
    for ip, blocked_at, expires_at, lifted_at, offence, rung, reason, source, why, uid in blocks:
        end = lifted_at if lifted_at is not None else expires_at
        mine = tuple(
            Hit(at, outcome, hit_reason, hit_source)
            for _, at, outcome, hit_reason, hit_source in by_ip.get(ip, [])
            if blocked_at <= at <= end
        )
        incidents.append(
            Incident(
                ip, blocked_at, expires_at, lifted_at, offence, rung, reason, source, mine, why, uid
            )
        )
    return incidents


def without_pardoned(incidents: Sequence[Incident]) -> tuple[list[Incident], int]:
    """The incidents that were not pardoned, and how many were (with their hits)."""
    kept = [i for i in incidents if not i.pardoned]
    return kept, len(incidents) - len(kept)


def pardon_check(history: Sequence[Incident]) -> Callable[[Incident], bool]:
    """Whether a block (kept elsewhere, e.g. queued in the outbox) is pardoned in `history`.
    The daemon's export gives times to the second, the state file exactly: a block is the
    same address blocked less than a second apart."""
    pardons: dict[str, list[float]] = {}
    for incident in history:
        if incident.pardoned:
            pardons.setdefault(incident.ip, []).append(incident.blocked_at)
    return lambda incident: any(
        abs(at - incident.blocked_at) < 1 for at in pardons.get(incident.ip, ())
    )


def neutralise(cell: str) -> str:
    """OWASP's advice for CSV injection: a leading quote makes a formula-like cell text."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


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
                neutralise(i.source),
                neutralise(i.reason),
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


class TooBig(Exception):
    """A bulk file over the service's limits; the message names the limit."""


def _quoted(text: str) -> str:
    """A quoted field as AbuseIPDB's bulk CSV reads it: `"` and `\\` escaped with a backslash
    (their spec; doubling the quote is not it), so a comment that ends in a backslash
    ends in `\\\\"`, never in an escaped closing quote."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _abuseipdb_line(ip: str, categories: str, date: str, comment: str) -> str:
    # As in the service's own example: the address and date bare (they never hold a
    # comma or quote), the categories and the comment always quoted.
    return f"{ip},{_quoted(categories)},{date},{_quoted(comment)}\n"


def to_abuseipdb_parts(
    incidents: Sequence[Incident], settings: AbuseIPDBSettings, zone: ZoneInfo | None
) -> list[str]:
    """AbuseIPDB's bulk-report CSV (IP, Categories, ReportDate, Comment, strict order), split
    into files that each keep inside the service's limits (BULK_MAX_LINES, BULK_MAX_BYTES)."""
    header = ",".join(ABUSEIPDB_FIELDS) + "\n"
    parts: list[str] = []
    lines = [header]
    size = len(header.encode())
    for i in incidents:
        categories = ",".join(str(c) for c in settings.categories_for(i.source))
        comment = neutralise(abuseipdb_comment(i, zone))
        line = _abuseipdb_line(i.ip, categories, iso(i.blocked_at, zone), comment)
        length = len(line.encode())
        if len(lines) >= BULK_MAX_LINES or size + length > BULK_MAX_BYTES:
            parts.append("".join(lines))
            lines, size = [header], len(header.encode())
        lines.append(line)
        size += length
    parts.append("".join(lines))
    return parts


def to_abuseipdb_csv(
    incidents: Sequence[Incident], settings: AbuseIPDBSettings, zone: ZoneInfo | None
) -> str:
    """The bulk CSV as one file; TooBig when it would pass the service's limits."""
    parts = to_abuseipdb_parts(incidents, settings, zone)
    if len(parts) > 1:
        raise TooBig(
            f"{len(incidents)} reports pass AbuseIPDB's bulk limits ({BULK_MAX_LINES:,} lines"
            f" or {BULK_MAX_BYTES:,} bytes per file): use --output FILE to write"
            f" {len(parts)} files, or a shorter --since"
        )
    return parts[0]


def dshield_time(epoch: float, zone: ZoneInfo | None) -> str:
    """DShield's date: 'YYYY-MM-DD HH:MM:SS +HH:MM'."""
    moment = local_time(epoch, zone)
    offset = moment.strftime("%z")
    return moment.strftime("%Y-%m-%d %H:%M:%S ") + f"{offset[:3]}:{offset[3:]}"


def dshield_events(incidents: Sequence[Incident]) -> list[tuple[str, float]]:
    """One event per hit (the block's own hit included); a block without hits counts once.

    IPv4 sources only: DShield's formats and reference clients (fwlogparser, the
    tab-separated spec) know IPv4 alone, and imr found no documented IPv6 support, so
    IPv6 entries are left out rather than sent to be refused (`dshield_ipv6_left_out`)."""
    events: list[tuple[str, float]] = []
    for i in incidents:
        if ipaddress.ip_address(i.ip).version != 4:
            continue
        times = [h.at for h in i.hits] or [i.blocked_at]
        events.extend((i.ip, at) for at in times)
    return events


def dshield_ipv6_left_out(incidents: Sequence[Incident]) -> int:
    """How many blocks dshield_events() leaves out for being IPv6."""
    return sum(1 for i in incidents if ipaddress.ip_address(i.ip).version != 4)


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
            "version": 4,
        }
        for ip, at in dshield_events(incidents)
    ]


def render(fmt: str, incidents: list[Incident], settings: ReputationSettings) -> list[str]:
    """The report's text, as one file or (AbuseIPDB's bulk limits) several."""
    zone = settings.zone()
    if fmt == "abuseipdb":
        return to_abuseipdb_parts(incidents, settings.abuseipdb, zone)
    return [
        {
            "json": lambda: to_json(incidents, zone),
            "csv": lambda: to_csv(incidents, zone),
            "dshield": lambda: to_dshield(incidents, settings.dshield, zone),
        }[fmt]()
    ]
