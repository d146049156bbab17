"""Publishes this member's outbox to its own stream.

The writer puts an event in the outbox table in the transaction of the change it
describes; this task reads the outbox with its own SQLite connection, appends the events
to the stream (XADD, signed here, off the request path) and deletes the rows only once
Redis has answered for them. A crash between XADD and the delete publishes the event
again with the same seq, which followers skip; so nothing is lost and nothing is applied
twice. No client request waits on any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from imr.fleet import events
from imr.fleet.connection import Backoff, connect
from imr.fleet.settings import FleetSettings
from imr.fleet.stats import FleetStats

log = logging.getLogger("imr.fleet")

BATCH = 500  # events per pipeline
IDLE_CHECK = 1.0  # seconds between looks at the outbox when nobody wakes us
TRIM_EVERY = 60.0
# Published rows are deleted at most this often (seconds), or when idle: each delete is a
# write transaction that the broker's writer would wait for. A crash before the delete
# publishes them again with the same seq, which followers skip.
DELETE_EVERY = 1.0


class Publisher:
    def __init__(
        self,
        settings: FleetSettings,
        state_path: Path,
        signer: Callable[[bytes], bytes],
        stats: FleetStats,
    ) -> None:
        self._settings = settings
        self._state_path = state_path
        self._sign = signer
        self._stats = stats
        self._stream = settings.stream(settings.name)
        self._wake = asyncio.Event()
        self._db: sqlite3.Connection | None = None
        self._last_trim = 0.0
        self._through = 0  # the last seq Redis holds (this process's knowledge)
        self._deleted = 0  # rows up to this seq are deleted
        self._last_delete = 0.0

    def wake(self) -> None:
        """The writer committed outbox rows: publish them now."""
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff()
        try:
            while True:
                client = connect(self._settings)
                try:
                    await client.ping()
                    self._stats.publisher_connected = True
                    if backoff.succeeded():
                        log.warning("fleet: publisher reconnected to Redis; draining the outbox")
                    await self._drain_forever(client)
                except Exception as exc:  # Redis, the network, the state file: retry, never die
                    if not isinstance(exc, RedisError | OSError):
                        log.exception("fleet: unexpected error")
                    self._stats.publisher_connected = False
                    with contextlib.suppress(sqlite3.Error):  # what waits, for the log line
                        await asyncio.to_thread(self._count)
                    delay = backoff.failed()
                    log.warning(
                        "fleet: cannot publish to Redis (%s); %d events wait in the outbox;"
                        " retrying in %.1f s (local blocking goes on as before)",
                        exc,
                        self._stats.outbox_depth,
                        delay,
                    )
                    await asyncio.sleep(delay)
                finally:
                    with contextlib.suppress(Exception):
                        await client.aclose()
        finally:
            if self._db is not None:
                self._db.close()

    def _conn(self) -> sqlite3.Connection:
        """Its own connection to the state file (WAL: reads never wait for the writer)."""
        if self._db is None:
            self._db = sqlite3.connect(
                self._state_path, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA busy_timeout=5000")
            # A lost delete only publishes again (same seq): no fsync of its own.
            self._db.execute("PRAGMA synchronous=NORMAL")
        return self._db

    async def _drain_forever(self, client: Any) -> None:
        while True:
            rows = await asyncio.to_thread(self._read)
            if not rows:
                if self._deleted < self._through:
                    await asyncio.to_thread(self._delete)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_CHECK)
                await self._trim(client)
                continue
            pipe = client.pipeline(transaction=False)
            # Up to MAX_ENTRY_EVENTS events an entry, one signature each: a flood or a
            # catch-up costs followers one verification per entry.
            for start in range(0, len(rows), events.MAX_ENTRY_EVENTS):
                part = rows[start : start + events.MAX_ENTRY_EVENTS]
                body = b"[" + b",".join(self._event_json(s, b) for s, b in part) + b"]"
                pipe.xadd(self._stream, events.sign(body, self._sign))
            await pipe.execute()  # raises if any XADD failed: the rows stay
            self._through = rows[-1][0]
            self._stats.published(len(rows))
            if time.monotonic() - self._last_delete >= DELETE_EVERY:
                await asyncio.to_thread(self._delete)

    @staticmethod
    def _event_json(seq: int, body: bytes) -> bytes:
        data = json.loads(body)
        data["seq"] = seq
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def _read(self) -> list[tuple[int, bytes]]:
        """The next rows Redis does not hold yet; the outbox depth counts those only."""
        db = self._conn()
        rows = db.execute(
            "SELECT seq, event FROM fleet_outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._through, BATCH),
        ).fetchall()
        if len(rows) < BATCH:
            self._stats.set_outbox(len(rows))
        else:
            self._count()
        return [(int(seq), bytes(body)) for seq, body in rows]

    def _count(self) -> None:
        depth = (
            self._conn()
            .execute("SELECT count(*) FROM fleet_outbox WHERE seq > ?", (self._through,))
            .fetchone()[0]
        )
        self._stats.set_outbox(int(depth))

    def _delete(self) -> None:
        through = self._through
        self._conn().execute("DELETE FROM fleet_outbox WHERE seq <= ?", (through,))
        self._deleted, self._last_delete = through, time.monotonic()

    async def _trim(self, client: Any) -> None:
        """Bounded retention: events older than fleet.retention leave the stream."""
        now = time.time()
        if now - self._last_trim < TRIM_EVERY:
            return
        self._last_trim = now
        oldest = int((now - self._settings.retention) * 1000)
        await client.xtrim(self._stream, minid=f"{oldest}-0", approximate=False)
