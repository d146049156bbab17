"""The state file: every block and every reported hit, in SQLite (WAL).

Blocks are rows that stay forever: lifting a block sets `lifted_at`, so the
history of an address outlives its blocks (the original tool's archive file).
Commits use synchronous=FULL: once `transaction()` returns, the row survives a
crash of the daemon or the machine, so the client may hear "ok".

Only the daemon's writer thread uses a Store (sqlite3 connections are not
shared between threads).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imr.core.policy import PreviousBlock
from imr.store_migrate import backup_before_migration

# Each entry upgrades the schema by one version; never edit a released entry,
# append a new one (statements are split on ";": keep semicolons out of literals).
# PRAGMA user_version holds the current version.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE blocks (
        id          INTEGER PRIMARY KEY,
        ip          TEXT    NOT NULL,
        blocked_at  REAL    NOT NULL,
        expires_at  REAL    NOT NULL,
        rung        INTEGER NOT NULL,
        offence     INTEGER NOT NULL,
        reason      TEXT    NOT NULL,
        source      TEXT    NOT NULL,
        uid         INTEGER,
        pid         INTEGER,
        lifted_at   REAL,
        lift_reason TEXT,
        lifted_by   TEXT
    );
    CREATE UNIQUE INDEX blocks_one_active_per_ip ON blocks(ip) WHERE lifted_at IS NULL;
    CREATE INDEX blocks_by_ip ON blocks(ip, blocked_at);
    CREATE TABLE hits (
        id       INTEGER PRIMARY KEY,
        ip       TEXT    NOT NULL,
        at       REAL    NOT NULL,
        outcome  TEXT    NOT NULL,
        reason   TEXT    NOT NULL,
        source   TEXT    NOT NULL,
        uid      INTEGER,
        pid      INTEGER,
        block_id INTEGER REFERENCES blocks(id)
    );
    CREATE INDEX hits_by_ip ON hits(ip, at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


@contextlib.contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (also for other SQLite files)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # A failed COMMIT leaves the transaction open: roll it back too.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class StoreError(Exception):
    """The state file cannot be opened or is from a newer imr."""


@dataclass(frozen=True, slots=True)  # slots: the daemon holds one per active block
class BlockRecord:
    id: int
    ip: str
    blocked_at: float
    expires_at: float
    rung: int
    offence: int
    reason: str
    source: str
    uid: int | None
    pid: int | None
    lifted_at: float | None = None
    lift_reason: str | None = None
    lifted_by: str | None = None

    def as_previous(self) -> PreviousBlock:
        return PreviousBlock(self.blocked_at, self.rung, self.expires_at, self.lifted_at)


@dataclass(frozen=True, slots=True)
class Offences:
    """An address's block history as the repeat ladder sees it."""

    count: int  # blocks it ever had: the next one is offence count + 1
    last: BlockRecord | None  # the latest block that counts (see Store.offences)


@dataclass(frozen=True)
class HitRecord:
    id: int
    ip: str
    at: float
    outcome: str
    reason: str
    source: str
    uid: int | None
    pid: int | None
    block_id: int | None


_BLOCK_COLUMNS = (
    "id, ip, blocked_at, expires_at, rung, offence, reason, source, uid, pid,"
    " lifted_at, lift_reason, lifted_by"
)
_HIT_COLUMNS = "id, ip, at, outcome, reason, source, uid, pid, block_id"


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot open the state file: {exc}") from None
        path.chmod(0o640)

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this imr knows"
                f" ({SCHEMA_VERSION}); upgrade imr"
            )
        if version < SCHEMA_VERSION:
            backup_before_migration(self._db, self.path, version)
        for number in range(version, SCHEMA_VERSION):
            with self.transaction():
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number + 1}")

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One durable transaction: committed (fsync'd) on success, rolled back on error."""
        return immediate_transaction(self._db)

    # Writes (inside transaction()) ------------------------------------------

    def insert_block(
        self,
        ip: str,
        blocked_at: float,
        expires_at: float,
        rung: int,
        reason: str,
        source: str,
        uid: int | None,
        pid: int | None,
    ) -> BlockRecord:
        """One new block, its offence number counted from the history (the daemon's writer
        uses insert_blocks for a batch)."""
        offence = self.offences([ip])[ip].count + 1
        record = BlockRecord(
            self.next_block_id(),
            ip,
            blocked_at,
            expires_at,
            rung,
            offence,
            reason,
            source,
            uid,
            pid,
        )
        self.insert_blocks([record])
        return record

    def next_block_id(self) -> int:
        """The id the next block gets (as SQLite would choose it: max + 1); for insert_blocks."""
        return int(self._db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM blocks").fetchone()[0])

    def insert_blocks(self, records: Sequence[BlockRecord]) -> None:
        """Many new blocks in one statement, with the ids their records carry (from
        next_block_id(), inside the same transaction: the only writer holds it)."""
        self._db.executemany(
            "INSERT INTO blocks"
            " (id, ip, blocked_at, expires_at, rung, offence, reason, source, uid, pid)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.id,
                    r.ip,
                    r.blocked_at,
                    r.expires_at,
                    r.rung,
                    r.offence,
                    r.reason,
                    r.source,
                    r.uid,
                    r.pid,
                )
                for r in records
            ],
        )

    def escalate(self, block_id: int, rung: int, expires_at: float) -> None:
        self._db.execute(
            "UPDATE blocks SET rung = ?, expires_at = ? WHERE id = ?", (rung, expires_at, block_id)
        )

    def lift(self, block_id: int, at: float, reason: str, by: str) -> None:
        self._db.execute(
            "UPDATE blocks SET lifted_at = ?, lift_reason = ?, lifted_by = ?"
            " WHERE id = ? AND lifted_at IS NULL",
            (at, reason, by, block_id),
        )

    def record_hit(
        self,
        ip: str,
        at: float,
        outcome: str,
        reason: str,
        source: str,
        uid: int | None,
        pid: int | None,
        block_id: int | None,
    ) -> None:
        self.record_hits([(ip, at, outcome, reason, source, uid, pid, block_id)])

    def record_hits(self, hits: Sequence[tuple[Any, ...]]) -> None:
        """Many record_hit()s in one statement: (ip, at, outcome, reason, source, uid, pid,
        block_id) each."""
        self._db.executemany(
            "INSERT INTO hits (ip, at, outcome, reason, source, uid, pid, block_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            hits,
        )

    # Reads --------------------------------------------------------------------

    def active_blocks(self) -> list[BlockRecord]:
        """Every block in force, oldest row first (by id: sorting by blocked_at cost SQLite
        a temporary B-tree; listings sort for themselves)."""
        # The lifted_* columns are NULL here by the WHERE clause: not read (100,000 rows at
        # start; this loop is ~0.3 s of a restart).
        rows = self._db.execute(
            "SELECT id, ip, blocked_at, expires_at, rung, offence, reason, source, uid, pid"
            " FROM blocks WHERE lifted_at IS NULL ORDER BY id"
        )
        # The daemon keeps these for its whole life: reasons, sources and uids repeat, so
        # they share one object each (a uid past 256 is otherwise one int object per row);
        # rows are not all held at once.
        shared: dict[Any, Any] = {}
        share = shared.setdefault
        return [
            BlockRecord(
                i, ip, at, expires, rung, n, share(why, why), share(src, src), share(u, u), p
            )
            for i, ip, at, expires, rung, n, why, src, u, p in rows
        ]

    def offences(self, ips: Sequence[str]) -> dict[str, Offences]:
        """The history the ladder needs for each address, in one query per 500 addresses.

        `last` is the latest block that counts for the repeat ladder: a block an admin
        lifted by hand is taken as a pardon (a false positive, usually) and does not make
        the next block a repeat. Every address asked for gets an entry.
        """
        found = {ip: Offences(0, None) for ip in ips}
        unique = list(found)
        for start in range(0, len(unique), 500):  # well inside SQLite's variable limit
            part = unique[start : start + 500]
            rows = self._db.execute(
                f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE ip IN ({','.join('?' * len(part))})"
                " ORDER BY blocked_at, id",
                part,
            )
            for row in rows:
                record = BlockRecord(*row)
                earlier = found[record.ip]
                counts = record.lift_reason != "unblocked"
                found[record.ip] = Offences(earlier.count + 1, record if counts else earlier.last)
        return found

    def history(self, ip: str) -> tuple[list[BlockRecord], list[HitRecord]]:
        blocks = self._db.execute(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE ip = ? ORDER BY blocked_at, id", (ip,)
        ).fetchall()
        hits = self._db.execute(
            f"SELECT {_HIT_COLUMNS} FROM hits WHERE ip = ? ORDER BY at, id", (ip,)
        ).fetchall()
        return [BlockRecord(*r) for r in blocks], [HitRecord(*r) for r in hits]

    def export(self) -> dict[str, Any]:
        blocks = self._db.execute(f"SELECT {_BLOCK_COLUMNS} FROM blocks ORDER BY id").fetchall()
        hits = self._db.execute(f"SELECT {_HIT_COLUMNS} FROM hits ORDER BY id").fetchall()
        return {
            "schema_version": SCHEMA_VERSION,
            "blocks": [BlockRecord(*r) for r in blocks],
            "hits": [HitRecord(*r) for r in hits],
        }
