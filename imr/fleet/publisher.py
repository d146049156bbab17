"""Publishes this member's outbox to its own stream.

The writer puts an event in the outbox table in the transaction of the change it
describes; this task reads the outbox with its own SQLite connection, appends the events
to the stream (XADD, signed here, off the request path) and deletes the rows only once
Redis has answered for them. A crash between XADD and the delete publishes the event
again with the same seq, which followers skip; so nothing is lost and nothing is applied
twice. No client request waits on any of this.

With `fleet.wait_replicas = N`, "Redis has answered" means more: the XADDs are followed by
`WAIT N`, and a row is *sent* once the primary holds its event but *safe* (deletable) only
once N replicas hold it too. After any reconnect (a failover: Sentinel names a new
primary) everything sent but not safe is sent again, so an event the old primary took but
never replicated is not lost.
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
from imr.fleet.connection import Backoff, connected, primary_address
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
# How long (ms) one WAIT waits for fleet.wait_replicas replicas; an event not confirmed by
# then stays in the outbox (and is sent again after a reconnect).
WAIT_MS = 1000


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
        self._through = 0  # the last seq Redis holds safely (this process's knowledge)
        self._sent = 0  # the last seq sent on this connection (>= _through)
        self._short = False  # the last WAIT found too few replicas (for the log)
        self._deleted = 0  # rows up to this seq are deleted
        self._last_delete = 0.0

    def wake(self) -> None:
        """The writer committed outbox rows: publish them now."""
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff()
        try:
            while True:
                try:
                    async with connected(self._settings) as client:
                        await client.ping()
                        if self._settings.wait_replicas:  # NOPERM here, not after XADDs
                            await client.wait(0, 0)
                        self._connected(client, backoff.succeeded())
                        await self._drain_forever(client)
                except Exception as exc:  # Redis, the network, the state file: retry, never die
                    if not isinstance(exc, RedisError | OSError):
                        log.exception("fleet: unexpected error")
                    self._stats.publisher_connected = False
                    self._stats.redis_primary = None
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
            if self._db is not None:
                self._db.close()

    def _connected(self, client: Any, after_outage: bool) -> None:
        # What the last primary took but no replica confirmed may be gone with it.
        self._sent = self._through
        self._stats.publisher_connected = True
        self._stats.redis_primary = primary_address(client)
        if after_outage:
            where = f" (primary {self._stats.redis_primary})" if self._stats.redis_primary else ""
            log.warning("fleet: publisher reconnected to Redis%s; draining the outbox", where)

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
                if self._sent > self._through:
                    await self._confirm(client.pipeline(transaction=False), self._sent)
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
            await self._confirm(pipe, rows[-1][0])  # raises if any XADD failed: the rows stay
            self._stats.published(len(rows))
            if time.monotonic() - self._last_delete >= DELETE_EVERY:
                await asyncio.to_thread(self._delete)

    async def _confirm(self, pipe: Any, last: int) -> None:
        """Send the pipeline (XADDs, or nothing); with fleet.wait_replicas, WAIT for that
        many replicas. Rows up to `last` are then sent, and safe if enough replicas hold
        them."""
        wanted = self._settings.wait_replicas
        if wanted:
            pipe.wait(wanted, WAIT_MS)
        replies = await pipe.execute()
        self._sent = last
        if not wanted or replies[-1] >= wanted:
            self._through = last
            if self._short:
                self._short = False
                log.warning("fleet: %d replica(s) confirm the published events again", wanted)
        elif not self._short:
            self._short = True
            log.warning(
                "fleet: only %d of fleet.wait_replicas = %d replica(s) confirmed the published"
                " events in %d ms; they stay in the outbox until enough replicas hold them",
                replies[-1],
                wanted,
                WAIT_MS,
            )

    @staticmethod
    def _event_json(seq: int, body: bytes) -> bytes:
        data = json.loads(body)
        data["seq"] = seq
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def _read(self) -> list[tuple[int, bytes]]:
        """The next rows not sent yet; the outbox depth counts the rows not safe yet."""
        db = self._conn()
        rows = db.execute(
            "SELECT seq, event FROM fleet_outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._sent, BATCH),
        ).fetchall()
        if len(rows) < BATCH and self._sent == self._through:
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
