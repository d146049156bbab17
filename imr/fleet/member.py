"""This host as a fleet member: the publisher, the follower, and the checks on the event
loop that every remote event passes before it reaches the broker's writer.

The broker is reached through a narrow interface (`FleetBroker`): its protection view and
one entry, `submit_remote`, that queues remote events (up to CHUNK of them, as one change)
for the same writer as local changes (so one transaction holds the changes and the stream
positions).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from imr.config import Config
from imr.core.addresses import IPAddress
from imr.core.fleet import (
    FUTURE_SLACK,
    OriginQuota,
    Protection,
    entry_time,
    target_refusal,
)
from imr.core.quota import LogThrottle
from imr.fleet import keys
from imr.fleet.connection import FleetConfigError, check_files
from imr.fleet.events import Event, EventRefusal
from imr.fleet.follower import Follower, Incoming
from imr.fleet.publisher import Publisher
from imr.fleet.stats import FleetStats
from imr.server.changes import RemoteChange
from imr.terminal import escape

log = logging.getLogger("imr.fleet")

# Events handed to the writer as one change (whole entries; ~50 of them): a catch-up of
# 100,000 events is ~20 changes, each a part of one state and one kernel transaction,
# instead of 100,000 changes in ~200 batches of 512 (bench/fleet.py, catch-up).
CHUNK = 5000


class FleetBroker(Protocol):
    def protection_view(self) -> tuple[frozenset[IPAddress], frozenset[IPAddress], Config]: ...

    def submit_remote(
        self, events: list[RemoteChange]
    ) -> asyncio.Future[Any]: ...  # the writer's outcome (imr.server.changes.RemoteBatchResult)


class FleetMember:
    def __init__(
        self,
        config: Config,
        broker: FleetBroker,
        positions: Mapping[str, tuple[str, int]],
        stats: FleetStats,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        settings = config.fleet
        self._config = config
        self._broker = broker
        self._stats = stats
        self._monotonic = monotonic
        try:
            private = keys.load_private(settings.private_key)
            public = {name: keys.load_public(m.public_key) for name, m in settings.members.items()}
            check_files(settings)  # the password files: a start-up error, not a dead task
        except (keys.FleetKeyError, FleetConfigError) as exc:
            raise RuntimeError(f"fleet: {exc}") from None
        if keys.public_text(private.public_key()) != settings.members[settings.name].public_key:
            raise RuntimeError(
                f"fleet: {settings.private_key} is not the key of fleet.members.{settings.name}"
            )
        self._admins = {name for name, m in settings.members.items() if m.admin}
        self._quota = OriginQuota(settings.per_origin_per_minute)
        self._log = LogThrottle(10.0)
        self._seq = {
            origin: positions.get(settings.stream(origin), ("0-0", 0))[1]
            for origin in settings.members
        }
        verifiers = {name: functools.partial(keys.verify, key) for name, key in public.items()}
        self.publisher = Publisher(settings, config.state.path, private.sign, stats)
        self.follower = Follower(settings, verifiers, positions, self.apply, stats)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.publisher.run(), name="imr-fleet-publisher"),
            asyncio.create_task(self.follower.run(), name="imr-fleet-follower"),
        ]

    def _protection(self) -> Protection:
        own, broadcast, config = self._broker.protection_view()
        allowlist = tuple(config.guarded.allowlist)  # every member's addresses included
        # What this host never escalates, a non-admin origin may not block here either.
        never = (*config.escalation.never_aggregate, *config.logscan.trusted_proxies)
        return Protection(own, broadcast, allowlist, config.protect.network_min_prefix, never)

    async def apply(self, batch: list[Incoming]) -> None:
        """Check each entry's events and hand them to the writer CHUNK at a time (refused
        ones too: their positions are stored), then wait until the writer committed all."""
        protection = self._protection()
        seq = dict(self._seq)
        # The position stored with an event is the last entry handed over *whole*: if the
        # writer splits a chunk that failed, a crash between two of an entry's events must
        # read the entry again (its applied events are then skipped by seq).
        done = dict(self.follower.positions)
        # Each chunk with the origins' last seq after it: kept once the chunk is settled, so
        # an apply that stops half-way still skips what it handed over when read again.
        waiting: list[tuple[list[RemoteChange], asyncio.Future[Any], dict[str, int]]] = []
        chunk: list[RemoteChange] = []
        for entry in batch:
            self._check_entry(entry, protection, seq, done, chunk)
            if len(chunk) >= CHUNK:
                waiting.append((chunk, self._broker.submit_remote(chunk), dict(seq)))
                chunk = []
                await asyncio.sleep(0)  # the writer starts on it while the next is checked
        if chunk:
            waiting.append((chunk, self._broker.submit_remote(chunk), dict(seq)))
        for items, future, after in waiting:
            await self._settle(items, future)
            self._seq = after

    def _check_entry(
        self,
        entry: Incoming,
        protection: Protection,
        seq: dict[str, int],
        done: dict[str, str],
        out: list[RemoteChange],
    ) -> None:
        """The entry's events as the writer's changes, each checked (None: refused)."""
        origin, stream = entry.origin, entry.stream
        admin = origin in self._admins
        stamped = entry_time(entry.position)
        if stamped is not None and stamped > time.time() + FUTURE_SLACK:
            stamped = None
        last = len(entry.events) - 1
        for index, found in enumerate(entry.events):
            event = self._checked(entry, found, stamped, protection, seq)
            if event is not None:
                seq[origin] = event.seq
            if index == last:
                done[stream] = entry.position
            out.append(RemoteChange(stream, done[stream], seq.get(origin, 0), event, admin))

    def _checked(
        self,
        entry: Incoming,
        found: Event | EventRefusal,
        stamped: float | None,
        protection: Protection,
        seq: dict[str, int],
    ) -> Event | None:
        """The event if it passes the checks on the loop; `stamped` is None for an entry
        stamped too far ahead (or not readable)."""
        if isinstance(found, EventRefusal):
            self._refused(entry.origin, entry.position, found.value, "")
            return None
        if found.seq <= seq.get(entry.origin, 0):
            return None  # published twice (a crash between XADD and the outbox delete)
        if stamped is None:
            self._refused(entry.origin, entry.position, EventRefusal.FUTURE.value, entry.position)
            return None
        if not self._quota.admit(entry.origin, stamped):
            self._refused(entry.origin, entry.position, EventRefusal.QUOTA.value, "")
            return None
        refusal = target_refusal(found.ip, protection, entry.origin in self._admins)
        if refusal is not None:
            why = f"{found.ip}: {refusal[1].message}"
            self._refused(entry.origin, entry.position, refusal[0], why)
            return None
        return found

    async def _settle(self, items: list[RemoteChange], future: asyncio.Future[Any]) -> None:
        """Count what the writer applied and log what it refused (it splits a chunk that
        fails, so a failure stays with its own event; the state file refusing writes fails
        them all)."""
        try:
            result = await future
        except Exception as exc:  # the writer's BrokerError
            why = (getattr(exc, "code", "apply_failed"), getattr(exc, "message", str(exc)))
            result = {"refused": [(index, *why) for index in range(len(items))]}
        skip = set()
        for index, code, message in result["refused"]:
            skip.add(index)
            item = items[index]
            if item.event is not None:
                self._refused(item.event.origin, item.position, code, message)
        applied: dict[str, list[float]] = {}
        for index, item in enumerate(items):
            if item.event is not None and index not in skip:
                applied.setdefault(item.event.origin, []).append(item.event.at)
        now = time.time()
        for origin, times in applied.items():
            self._stats.applied_many(origin, times, now)

    def _refused(self, origin: str, position: str, reason: str, why: str) -> None:
        self._stats.refuse(reason)
        # One line per origin and reason every 10 s: a hostile member cannot flood the log.
        suppressed = self._log.allow((origin, reason), self._monotonic())
        if suppressed is None:
            return
        log.warning(
            "fleet: refused event %s from %s: %s%s%s",
            position,
            escape(origin),
            reason,
            f" ({escape(why)})" if why else "",
            f"; {suppressed} more like it since the last such line" if suppressed else "",
        )
