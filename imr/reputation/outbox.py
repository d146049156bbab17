"""The outbox on disk (SQLite in reputation.state_dir): abuse reports waiting to be
mailed, and the ledger of what was submitted to AbuseIPDB/DShield.

- One report per address per period: a block of an address that already has a
  report younger than the period is merged into that report while it waits,
  and dropped once it was sent. The same block is never queued twice.
- Retries: a failed delivery waits retry_after, then twice that, ... (at most a
  day) and gives up after max_attempts; the report says why.
- Daily cap: at most daily_cap reports sent in any 24 hours; the rest wait.
- One sender at a time (a lock file), so overlapping cron runs cannot mail twice.
- Cancelled: every block of the report was pardoned (an admin lifted it as a false
  positive) before it was sent, or an admin cancelled it (`imr reports cancel`).
  Its blocks stay known (never queued again); it does not hold back a new report.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from imr.reputation.exports import Incident
from imr.store import immediate_transaction

MAX_BACKOFF = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    id              INTEGER PRIMARY KEY,
    ip              TEXT    NOT NULL,
    created_at      REAL    NOT NULL,
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL,
    last_error      TEXT,
    recipients      TEXT    NOT NULL DEFAULT '[]',
    trail           TEXT    NOT NULL DEFAULT '[]',
    incidents       TEXT    NOT NULL,
    sent_at         REAL,
    message_id      TEXT
);
CREATE INDEX IF NOT EXISTS reports_by_ip ON reports(ip, created_at);
CREATE TABLE IF NOT EXISTS queued_blocks (
    ip         TEXT NOT NULL,
    blocked_at REAL NOT NULL,
    report_id  INTEGER NOT NULL REFERENCES reports(id),
    PRIMARY KEY (ip, blocked_at)
);
CREATE TABLE IF NOT EXISTS submissions (
    service TEXT NOT NULL,
    key     TEXT NOT NULL,
    ip      TEXT NOT NULL,
    at      REAL NOT NULL,
    PRIMARY KEY (service, key)
);
CREATE INDEX IF NOT EXISTS submissions_by_ip ON submissions(service, ip, at);
"""

Status = Literal["pending", "sent", "failed", "no_contact", "cancelled"]
QueueResult = Literal["queued", "merged", "known", "recent"]


class OutboxError(Exception):
    """The outbox cannot be opened or is in use; the message is for the user."""


@dataclass
class Report:
    id: int
    ip: str
    created_at: float
    status: Status
    attempts: int
    next_attempt_at: float
    last_error: str | None
    recipients: list[str]
    trail: list[str]
    incidents: list[Incident]
    sent_at: float | None = None
    message_id: str | None = None


# Full literal queries (no string building): the columns in _report()'s order.
_SELECT_LATEST_TOUCHED = """
    SELECT id, ip, created_at, status, attempts, next_attempt_at, last_error, recipients,
           trail, incidents, sent_at, message_id
    FROM reports WHERE ip = ? ORDER BY max(created_at, coalesce(sent_at, 0)) DESC LIMIT 1
"""
_SELECT_ALL = """
    SELECT id, ip, created_at, status, attempts, next_attempt_at, last_error, recipients,
           trail, incidents, sent_at, message_id
    FROM reports ORDER BY id
"""
_SELECT_PENDING = """
    SELECT id, ip, created_at, status, attempts, next_attempt_at, last_error, recipients,
           trail, incidents, sent_at, message_id
    FROM reports WHERE status = 'pending' ORDER BY id
"""
_SELECT_BY_ID = """
    SELECT id, ip, created_at, status, attempts, next_attempt_at, last_error, recipients,
           trail, incidents, sent_at, message_id
    FROM reports WHERE id = ?
"""
_SELECT_LATEST = """
    SELECT id, ip, created_at, status, attempts, next_attempt_at, last_error, recipients,
           trail, incidents, sent_at, message_id
    FROM reports WHERE ip = ? ORDER BY id DESC LIMIT 1
"""
_SELECT_DUE = """
    SELECT id, ip, created_at, status, attempts, next_attempt_at, last_error, recipients,
           trail, incidents, sent_at, message_id
    FROM reports WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id
"""


def _report(row: Sequence[object]) -> Report:
    incidents = [Incident.from_record(i) for i in json.loads(str(row[9]))]
    return Report(
        int(str(row[0])),
        str(row[1]),
        float(str(row[2])),
        str(row[3]),  # type: ignore[arg-type]
        int(str(row[4])),
        float(str(row[5])),
        None if row[6] is None else str(row[6]),
        json.loads(str(row[7])),
        json.loads(str(row[8])),
        incidents,
        None if row[10] is None else float(str(row[10])),
        None if row[11] is None else str(row[11]),
    )


def _merge(old: Incident, new: Incident) -> Incident:
    """The incident with every hit of both (same block seen again, or a later block)."""
    seen = {(h.at, h.reason) for h in old.hits}
    hits = old.hits + tuple(h for h in new.hits if (h.at, h.reason) not in seen)
    return Incident(
        old.ip,
        old.blocked_at,
        old.expires_at,
        old.lifted_at,
        old.offence,
        old.rung,
        old.reason,
        old.source,
        tuple(sorted(hits, key=lambda h: h.at)),
    )


class Outbox:
    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self._clock = clock
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = state_dir / "reputation.db"
            self._db = sqlite3.connect(path, isolation_level=None, timeout=10)
            path.chmod(0o600)  # evidence and addresses: not for every local user
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"{state_dir}: cannot open the outbox: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Hold the sender lock; OutboxError if another run holds it."""
        path = self.state_dir / "send.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutboxError(f"another run is sending (lock {path} is held)") from None
            yield
        finally:
            os.close(fd)

    # Queueing ----------------------------------------------------------------------

    def queue(self, incident: Incident, period: float) -> QueueResult:
        """Queue a report for this block, once, honouring one report per address per period."""
        now = self._clock()
        with self._transaction():
            known = self._db.execute(
                "SELECT report_id FROM queued_blocks WHERE ip = ? AND blocked_at = ?",
                (incident.ip, incident.blocked_at),
            ).fetchone()
            latest = self._db.execute(_SELECT_LATEST_TOUCHED, (incident.ip,)).fetchone()
            report = _report(latest) if latest else None
            pending = report is not None and report.status == "pending"
            if report is not None and pending and (known is None or int(known[0]) == report.id):
                self._merge_into(report, incident)
                return "merged" if known is None else "known"
            if known is not None:
                return "known"
            if report is not None and report.status == "cancelled":
                report = None  # a mistake, not a report: it holds nothing back
            if report is not None and max(report.created_at, report.sent_at or 0) > now - period:
                self._remember(incident, report.id)
                return "recent"
            cursor = self._db.execute(
                "INSERT INTO reports (ip, created_at, status, next_attempt_at, incidents)"
                " VALUES (?, ?, 'pending', ?, ?)",
                (incident.ip, now, now, json.dumps([incident.to_record()])),
            )
            self._remember(incident, int(cursor.lastrowid or 0))
            return "queued"

    def _merge_into(self, report: Report, incident: Incident) -> None:
        incidents = list(report.incidents)
        for index, old in enumerate(incidents):
            if old.blocked_at == incident.blocked_at:
                incidents[index] = _merge(old, incident)
                break
        else:
            incidents.append(incident)
        self._db.execute(
            "UPDATE reports SET incidents = ? WHERE id = ?",
            (json.dumps([i.to_record() for i in incidents]), report.id),
        )
        self._remember(incident, report.id)

    def _remember(self, incident: Incident, report_id: int) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO queued_blocks (ip, blocked_at, report_id) VALUES (?, ?, ?)",
            (incident.ip, incident.blocked_at, report_id),
        )

    # Reading -----------------------------------------------------------------------

    def reports(self, pending_only: bool = False) -> list[Report]:
        rows = self._db.execute(_SELECT_PENDING if pending_only else _SELECT_ALL).fetchall()
        return [_report(r) for r in rows]

    def get(self, report_id: int) -> Report | None:
        found = self._db.execute(_SELECT_BY_ID, (report_id,)).fetchone()
        return _report(found) if found else None

    def latest_for(self, ip: str) -> Report | None:
        row = self._db.execute(_SELECT_LATEST, (ip,)).fetchone()
        return _report(row) if row else None

    def due(self) -> list[Report]:
        rows = self._db.execute(_SELECT_DUE, (self._clock(),)).fetchall()
        return [_report(r) for r in rows]

    def sent_in_last_day(self) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM reports WHERE status = 'sent' AND sent_at > ?",
            (self._clock() - 86400,),
        ).fetchone()
        return int(row[0])

    # Outcomes ----------------------------------------------------------------------

    def cancel(self, report_id: int, why: str) -> bool:
        """Cancel a waiting report; False if it is not waiting (sent, failed, ...)."""
        cursor = self._db.execute(
            "UPDATE reports SET status = 'cancelled', last_error = ?"
            " WHERE id = ? AND status = 'pending'",
            (why, report_id),
        )
        return cursor.rowcount > 0

    def replace_incidents(self, report_id: int, incidents: Sequence[Incident]) -> None:
        """Keep only these blocks in a waiting report (the others were pardoned)."""
        self._db.execute(
            "UPDATE reports SET incidents = ? WHERE id = ? AND status = 'pending'",
            (json.dumps([i.to_record() for i in incidents]), report_id),
        )

    def mark_sent(
        self, report_id: int, recipients: list[str], trail: list[str], message_id: str
    ) -> None:
        self._db.execute(
            "UPDATE reports SET status = 'sent', sent_at = ?, attempts = attempts + 1,"
            " recipients = ?, trail = ?, message_id = ?, last_error = NULL WHERE id = ?",
            (self._clock(), json.dumps(recipients), json.dumps(trail), message_id, report_id),
        )

    def mark_no_contact(self, report_id: int, trail: list[str]) -> None:
        self._db.execute(
            "UPDATE reports SET status = 'no_contact', trail = ?, attempts = attempts + 1,"
            " last_error = 'no abuse contact found' WHERE id = ?",
            (json.dumps(trail), report_id),
        )

    def mark_failed(self, report_id: int, error: str, trail: list[str]) -> None:
        """A permanent refusal (the relay rejected every recipient): no more tries."""
        self._db.execute(
            "UPDATE reports SET status = 'failed', attempts = attempts + 1, last_error = ?,"
            " trail = ? WHERE id = ?",
            (error, json.dumps(trail), report_id),
        )

    def mark_retry(
        self, report: Report, error: str, retry_after: float, max_attempts: int
    ) -> Status:
        """Count the attempt; wait retry_after * 2^(attempts-1), or give up after max_attempts."""
        attempts = report.attempts + 1
        if attempts >= max_attempts:
            self._db.execute(
                "UPDATE reports SET status = 'failed', attempts = ?, last_error = ? WHERE id = ?",
                (attempts, f"gave up after {attempts} attempts: {error}", report.id),
            )
            return "failed"
        wait = min(MAX_BACKOFF, retry_after * 2 ** (attempts - 1))
        self._db.execute(
            "UPDATE reports SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
            (attempts, self._clock() + wait, error, report.id),
        )
        return "pending"

    # Submission ledger (AbuseIPDB, DShield) ------------------------------------------

    def submitted(self, service: str, key: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM submissions WHERE service = ? AND key = ?", (service, key)
        ).fetchone()
        return row is not None

    def last_submission(self, service: str, ip: str) -> float | None:
        row = self._db.execute(
            "SELECT max(at) FROM submissions WHERE service = ? AND ip = ?", (service, ip)
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def submissions_in_last_day(self, service: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM submissions WHERE service = ? AND at > ?",
            (service, self._clock() - 86400),
        ).fetchone()
        return int(row[0])

    def record_submissions(self, service: str, entries: Sequence[tuple[str, str]]) -> None:
        """entries: (key, ip) pairs that the service accepted."""
        now = self._clock()
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO submissions (service, key, ip, at) VALUES (?, ?, ?, ?)",
                [(service, key, ip, now) for key, ip in entries],
            )

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return immediate_transaction(self._db)
