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
import errno
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imr.core.policy import PreviousBlock
from imr.server.files import FileError, check_owned, make_dirs, open_owned
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
    # Fleet mode (docs/fleet.md): the member a block came from (NULL: this host), the
    # events waiting to be published, and how far each other member's stream is applied.
    """
    ALTER TABLE blocks ADD COLUMN origin TEXT;
    CREATE TABLE fleet_outbox (
        seq   INTEGER PRIMARY KEY AUTOINCREMENT,
        event BLOB NOT NULL
    );
    CREATE TABLE fleet_positions (
        stream   TEXT PRIMARY KEY,
        position TEXT NOT NULL,
        seq      INTEGER NOT NULL
    );
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


# SQLite's primary result codes for a file that cannot take a write: SQLITE_READONLY (8),
# SQLITE_IOERR (10; its extended codes keep 10 in the low byte), SQLITE_FULL (13).
_UNWRITABLE_CODES = frozenset({8, 10, 13})
_UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def unwritable(exc: BaseException) -> bool:
    """Whether `exc` says the state file cannot be written now (disk or quota full, an I/O
    error, a read-only file system), rather than that one change was wrong: every other
    write would fail the same way, and reads still work."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _UNWRITABLE_CODES
    return isinstance(exc, OSError) and exc.errno in _UNWRITABLE_ERRNOS


# slots: the daemon holds one per active block. Not frozen: a frozen class's __init__
# sets its 14 fields through object.__setattr__, 1.4 against 0.3 µs a row (one a new
# block; docs/performance.md "Per request, round three"). Nothing assigns a field (rows
# change by dataclasses.replace); unsafe_hash keeps the frozen class's hash.
@dataclass(slots=True, unsafe_hash=True)
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
    origin: str | None = None  # the fleet member it came from; None: decided here

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
    " lifted_at, lift_reason, lifted_by, origin"
)
_HIT_COLUMNS = "id, ip, at, outcome, reason, source, uid, pid, block_id"
_ADDED_LATER = frozenset({"origin"})  # by migrations after the first


STATE_FILE_MODE = 0o640  # SQLite gives the -wal and -shm files the state file's mode
_SIDE_FILES = ("-wal", "-shm")


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._prepare_files(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the state file: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            if self._db.execute("PRAGMA user_version").fetchone()[0] >= 1:
                # Before any migration touches it: a foreign file is refused unchanged.
                self._check_schema(skip=_ADDED_LATER)
            self._migrate()
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(
                f"{path}: cannot open the state file: {exc}; restore it from a backup"
                " or move it aside (docs/operations.md, state-file recovery)"
            ) from None
        except StoreError:
            self._db.close()
            raise
        for suffix in _SIDE_FILES:  # narrow what an older imr left 0644
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", STATE_FILE_MODE)

    @staticmethod
    def _prepare_files(path: Path) -> None:
        """Refuse links and files another user owns; create the file private with its mode.

        The file's mode is set before SQLite creates the -wal and -shm files, which copy it.
        """
        try:
            make_dirs(path.parent, 0o750)
            for suffix in _SIDE_FILES:
                check_owned(Path(f"{path}{suffix}"))
            fd, _ = open_owned(path, os.O_RDONLY, STATE_FILE_MODE)
            try:
                os.fchmod(fd, STATE_FILE_MODE)
            finally:
                os.close(fd)
        except FileError as exc:
            raise StoreError(f"state file: {exc}") from None
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror}") from None

    def _check_schema(self, skip: frozenset[str] = frozenset()) -> None:
        """Every table and column this imr uses is there (a file of another program's is not);
        `skip`: columns migrations add (checked before migrating)."""
        for table, columns in (("blocks", _BLOCK_COLUMNS), ("hits", _HIT_COLUMNS)):
            found = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            wanted = [c for c in columns.replace(" ", "").split(",") if c not in skip]
            missing = [c for c in wanted if c not in found]
            if missing:
                raise StoreError(
                    f"{self.path}: not an imr state file of schema version {SCHEMA_VERSION}"
                    f" (table {table} lacks {', '.join(missing)}); restore it from a backup"
                    " or move it aside (docs/operations.md, state-file recovery)"
                )

    def close(self) -> None:
        self._db.close()

    def is_new(self) -> bool:
        """Whether the file has never held a block (lifted ones count): a file that was
        missing or empty (adopt.py). Stays true until a block is written."""
        return self._db.execute("SELECT 1 FROM blocks LIMIT 1").fetchone() is None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this imr knows"
                f" ({SCHEMA_VERSION}); upgrade imr"
            )
        if version == 0 and self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(
                f"{self.path}: an SQLite file with tables but no imr schema version: not an imr"
                " state file; give state.path another file, or move this one aside"
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
            "INSERT INTO blocks (id, ip, blocked_at, expires_at, rung, offence, reason, source,"
            " uid, pid, lifted_at, lift_reason, lifted_by, origin)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    r.lifted_at,
                    r.lift_reason,
                    r.lifted_by,
                    r.origin,
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

    # Fleet mode (inside transaction()) --------------------------------------------

    def add_outbox(self, events: Sequence[bytes]) -> None:
        """Events for the publisher, in the transaction of the changes they describe."""
        self._db.executemany("INSERT INTO fleet_outbox (event) VALUES (?)", [(e,) for e in events])

    def next_outbox_seq(self) -> int:
        """The seq the next outbox row gets (AUTOINCREMENT: never one used before)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'fleet_outbox'")
        found = row.fetchone()
        return (found[0] if found else 0) + 1

    def set_position(self, stream: str, position: str, seq: int) -> None:
        self._db.execute(
            "INSERT INTO fleet_positions (stream, position, seq) VALUES (?, ?, ?)"
            " ON CONFLICT(stream) DO UPDATE SET position = excluded.position, seq = excluded.seq",
            (stream, position, seq),
        )

    def positions(self) -> dict[str, tuple[str, int]]:
        rows = self._db.execute("SELECT stream, position, seq FROM fleet_positions")
        return {stream: (position, seq) for stream, position, seq in rows}

    # Reads --------------------------------------------------------------------

    def active_blocks(self) -> list[BlockRecord]:
        """Every block in force, oldest row first (by id: sorting by blocked_at cost SQLite
        a temporary B-tree; listings sort for themselves)."""
        # The lifted_* columns are NULL here by the WHERE clause: not read (100,000 rows at
        # start; this loop is ~0.3 s of a restart).
        rows = self._db.execute(
            "SELECT id, ip, blocked_at, expires_at, rung, offence, reason, source, uid, pid,"
            " origin FROM blocks WHERE lifted_at IS NULL ORDER BY id"
        )
        # The daemon keeps these for its whole life: reasons, sources and uids repeat, so
        # they share one object each (a uid past 256 is otherwise one int object per row);
        # rows are not all held at once.
        shared: dict[Any, Any] = {}
        share = shared.setdefault
        return [
            BlockRecord(
                i,
                ip,
                at,
                expires,
                rung,
                n,
                share(why, why),
                share(src, src),
                share(u, u),
                p,
                origin=share(o, o),
            )
            for i, ip, at, expires, rung, n, why, src, u, p, o in rows
        ]

    def offences(self, ips: Sequence[str]) -> dict[str, Offences]:
        """The history the ladder needs for each address, in one query per 500 addresses.

        `last` is the latest block that counts for the repeat ladder: a block an admin
        lifted by hand is taken as a pardon (a false positive, usually) and does not make
        the next block a repeat. Every address asked for gets an entry.
        """
        # One shared (frozen) "no history" for all: a catch-up asks for 5,000 new addresses.
        found = dict.fromkeys(ips, Offences(0, None))
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
        """An address's whole history, oldest first (tests, tools; the daemon pages it)."""
        blocks = self._db.execute(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE ip = ? ORDER BY blocked_at, id", (ip,)
        ).fetchall()
        hits = self._db.execute(
            f"SELECT {_HIT_COLUMNS} FROM hits WHERE ip = ? ORDER BY at, id", (ip,)
        ).fetchall()
        return [BlockRecord(*r) for r in blocks], [HitRecord(*r) for r in hits]

    def history_page(
        self, ip: str, limit: int, before: int | None = None
    ) -> tuple[list[BlockRecord], list[HitRecord]]:
        """An address's blocks and hits, newest first, at most `limit` of each; hits only
        older than hit `before` (a page's cursor). Both walk the (ip, time) indexes from the
        newest end, so a page costs its own rows, however long the history."""
        blocks = self._db.execute(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE ip = ?"
            " ORDER BY blocked_at DESC, id DESC LIMIT ?",
            (ip, limit),
        ).fetchall()
        if before is None:
            hits = self._db.execute(
                f"SELECT {_HIT_COLUMNS} FROM hits WHERE ip = ? ORDER BY at DESC, id DESC LIMIT ?",
                (ip, limit),
            ).fetchall()
        else:
            start = self._db.execute(
                "SELECT at FROM hits WHERE id = ? AND ip = ?", (before, ip)
            ).fetchone()
            # A cursor whose hit is gone was pruned, and the hits before it with it.
            hits = []
            if start is not None:
                hits = self._db.execute(
                    f"SELECT {_HIT_COLUMNS} FROM hits WHERE ip = ? AND (at, id) < (?, ?)"
                    " ORDER BY at DESC, id DESC LIMIT ?",
                    (ip, start[0], before, limit),
                ).fetchall()
        return [BlockRecord(*r) for r in blocks], [HitRecord(*r) for r in hits]

    def blocks_after(self, after: int, limit: int) -> list[BlockRecord]:
        """One export page: blocks with an id past `after`, by id."""
        rows = self._db.execute(
            f"SELECT {_BLOCK_COLUMNS} FROM blocks WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        return [BlockRecord(*r) for r in rows]

    def hits_after(self, after: int, limit: int) -> list[HitRecord]:
        """One export page: hits with an id past `after`, by id."""
        rows = self._db.execute(
            f"SELECT {_HIT_COLUMNS} FROM hits WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        return [HitRecord(*r) for r in rows]

    def prune_hits(
        self, older_than: float, now: float, limit: int, after: int = 0
    ) -> tuple[int, int | None]:
        """Delete the hits reported before `older_than` among the next `limit` hits past id
        `after`, in one transaction. Returns (deleted, the id to go on after), or None
        for the second once a hit reported since `older_than` is reached: hits are
        written in time order, so the rest are younger still, and a call costs its own
        rows. A hit dated after `now` (by a clock that was ahead) is kept and passed over,
        so it cannot hold up the pruning of the rows behind it."""
        rows = self._db.execute(
            "SELECT id, at FROM hits WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        ).fetchall()
        old: list[tuple[int]] = []
        following: int | None = rows[-1][0] if len(rows) == limit else None
        for hit_id, at in rows:
            if older_than <= at <= now:
                following = None
                break
            if at < older_than:
                old.append((hit_id,))
        if old:
            with self.transaction():
                self._db.executemany("DELETE FROM hits WHERE id = ?", old)
        return len(old), following
