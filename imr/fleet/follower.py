"""Follows every other member's stream and hands their events to the broker.

One connection, one blocking XREAD over all the other members' streams (push: Redis
answers as soon as an event is appended). Each reply is decoded and verified here, then
applied by the broker through its writer, which stores the stream positions in the same
transaction as the applied changes; the positions kept here move on only after that.
So a SIGKILL during apply loses nothing (the events are read again) and applies nothing
twice (each origin's seq is remembered with its position).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from imr.fleet import events
from imr.fleet.connection import BLOCK_MS, Backoff, connected
from imr.fleet.events import Event, EventRefusal
from imr.fleet.settings import FleetSettings
from imr.fleet.stats import FleetStats

log = logging.getLogger("imr.fleet")

# Entries per stream per read (up to 100 events each): a catch-up is read in parts of up to
# 5,000 events, each read and verified while the one before is applied (bench/fleet.py).
COUNT = 50


@dataclass(frozen=True, slots=True)
class Incoming:
    """One stream entry: its events (up to events.MAX_ENTRY_EVENTS under one signature), each
    decoded and verified, or why it is refused (a refusal of the whole entry is one item)."""

    stream: str
    position: str  # the entry's id
    origin: str  # the member whose stream it is
    events: list[Event | EventRefusal]


Apply = Callable[[list[Incoming]], Awaitable[None]]


class Follower:
    def __init__(
        self,
        settings: FleetSettings,
        verifiers: Mapping[str, Callable[[bytes, bytes], bool]],
        positions: Mapping[str, tuple[str, int]],
        apply: Apply,
        stats: FleetStats,
    ) -> None:
        self._settings = settings
        self._verifiers = verifiers
        self._apply = apply
        self._stats = stats
        self._origin_of = {settings.stream(m): m for m in settings.members if m != settings.name}
        self.positions = {s: positions.get(s, ("0-0", 0))[0] for s in self._origin_of}

    async def run(self) -> None:
        if not self.positions:
            return  # a fleet of one: nothing to follow
        backoff = Backoff()
        while True:
            try:
                async with connected(self._settings) as client:
                    await self._check_trimmed(client)
                    self._stats.follower_connected = True
                    if backoff.succeeded():
                        log.warning("fleet: follower reconnected to Redis; catching up")
                    await self._follow(client)
            except Exception as exc:  # Redis, the network, the state file: retry, never die
                if not isinstance(exc, RedisError | OSError):
                    log.exception("fleet: unexpected error")
                self._stats.follower_connected = False
                delay = backoff.failed()
                log.warning(
                    "fleet: cannot read the fleet's streams (%s); retrying in %.1f s"
                    " (blocks in force stay in force)",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _follow(self, client: Any) -> None:
        """Read (and verify) the next entries while the ones read before are applied: one
        apply at a time, in order. `self.positions` moves on after each apply, the read
        cursor as soon as entries are read."""
        cursor = dict(self.positions)
        applying: asyncio.Task[None] | None = None
        try:
            while True:
                reply = await client.xread(cursor, count=COUNT, block=BLOCK_MS)
                batch = self._decoded(reply or [], cursor)
                if applying is not None:
                    await applying  # raises what the apply raised
                    applying = None
                if batch:
                    applying = asyncio.create_task(self._applied(batch))
        except BaseException as exc:
            # An apply under way is finished before the next connection reads from
            # self.positions (on a stop, it is cancelled: the state file has what committed).
            if applying is not None:
                if isinstance(exc, asyncio.CancelledError):
                    applying.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await applying
            raise

    def _decoded(self, reply: list[Any], cursor: dict[str, str]) -> list[Incoming]:
        """The reply's entries, each verified and decoded; the cursor moves past them."""
        batch: list[Incoming] = []
        for stream_raw, entries in reply:
            stream = _text(stream_raw)
            origin = self._origin_of.get(stream)
            if origin is None:
                continue
            for entry_id, fields in entries:
                position = _text(entry_id)
                found = events.decode_entry(fields, origin, self._verifiers)
                batch.append(Incoming(stream, position, origin, found))
                cursor[stream] = position
        return batch

    async def _applied(self, batch: list[Incoming]) -> None:
        await self._apply(batch)  # the positions are in the state file now
        for entry in batch:
            self.positions[entry.stream] = entry.position

    async def _check_trimmed(self, client: Any) -> None:
        """A position older than a stream's first entry was trimmed away: what is retained
        is replayed in full (retention covers every block in force and every offence that
        still counts), and the log says so."""
        for stream, position in self.positions.items():
            if position == "0-0":
                continue
            try:
                first = await client.xrange(stream, count=1)
            except ResponseError:
                continue
            if first and _older(position, _text(first[0][0])):
                self._stats.replays += 1
                log.warning(
                    "fleet: position %s in %s was trimmed away (stream starts at %s):"
                    " replaying everything retained",
                    position,
                    stream,
                    _text(first[0][0]),
                )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _older(position: str, first: str) -> bool:
    a, _, b = position.partition("-")
    c, _, d = first.partition("-")
    return (int(a), int(b or 0)) < (int(c), int(d or 0))
