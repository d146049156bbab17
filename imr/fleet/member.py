"""This host as a fleet member: the publisher, the follower, and the checks on the event
loop that every remote event passes before it reaches the broker's writer.

The broker is reached through a narrow interface (`FleetBroker`): its protection view and
one entry, `submit_remote`, that queues a remote change for the same writer as local
changes (so one transaction holds the change and the stream position).
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
    member_networks,
    target_refusal,
)
from imr.core.quota import LogThrottle
from imr.fleet import keys
from imr.fleet.connection import FleetConfigError, check_files
from imr.fleet.events import Event, EventRefusal
from imr.fleet.follower import Follower, Incoming
from imr.fleet.publisher import Publisher
from imr.fleet.stats import FleetStats
from imr.terminal import escape

log = logging.getLogger("imr.fleet")


class FleetBroker(Protocol):
    def protection_view(self) -> tuple[frozenset[IPAddress], frozenset[IPAddress], Config]: ...

    def submit_remote(
        self, stream: str, position: str, seq: int, event: Event | None, admin: bool
    ) -> asyncio.Future[Any]: ...  # the writer's outcome (imr.server.changes.RemoteResult)


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
        self._members = member_networks(m.addresses for m in settings.members.values())

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.publisher.run(), name="imr-fleet-publisher"),
            asyncio.create_task(self.follower.run(), name="imr-fleet-follower"),
        ]

    def _protection(self) -> Protection:
        own, broadcast, config = self._broker.protection_view()
        allowlist = (*config.protect.allowlist, *self._members)
        # What this host never escalates, a non-admin origin may not block here either.
        never = (*config.escalation.never_aggregate, *config.logscan.trusted_proxies)
        return Protection(own, broadcast, allowlist, config.protect.network_min_prefix, never)

    async def apply(self, batch: list[Incoming]) -> None:
        """Check each event, queue the good ones (and every position) for the writer, and
        wait until the writer committed them all."""
        protection = self._protection()
        waiting: list[tuple[Incoming, Event | None, asyncio.Future[dict[str, Any]]]] = []
        seq = dict(self._seq)
        # The position stored with an event is the last entry handed over *whole*: an entry
        # of many events may be split across the writer's batches, and a crash between them
        # must read the entry again (its applied events are then skipped by their seq).
        done = dict(self.follower.positions)
        for index, item in enumerate(batch):
            event = self._checked(item, protection, seq)
            if event is not None:
                seq[item.origin] = event.seq
            following = batch[index + 1] if index + 1 < len(batch) else None
            if following is None or (following.stream, following.position) != (
                item.stream,
                item.position,
            ):
                done[item.stream] = item.position
            # Refused events too: their position is stored, so they are not read again.
            future = self._broker.submit_remote(
                item.stream,
                done[item.stream],
                seq.get(item.origin, 0),
                event,
                item.origin in self._admins,
            )
            waiting.append((item, event, future))
        for item, event, future in waiting:
            try:
                await future
            except Exception as exc:  # the writer's BrokerError: refused or failed there
                code = getattr(exc, "code", "apply_failed")
                self._refused(item, code, getattr(exc, "message", str(exc)))
                continue
            if event is not None:
                self._stats.applied(item.origin, event.at, time.time())
        self._seq = seq

    def _checked(self, item: Incoming, protection: Protection, seq: dict[str, int]) -> Event | None:
        event = item.event
        if isinstance(event, EventRefusal):
            self._refused(item, event.value, "")
            return None
        if event.seq <= seq.get(item.origin, 0):
            return None  # published twice (a crash between XADD and the outbox delete)
        stamped = entry_time(item.position)
        if stamped is None or stamped > time.time() + FUTURE_SLACK:
            self._refused(item, EventRefusal.FUTURE.value, item.position)
            return None
        if not self._quota.admit(item.origin, stamped):
            self._refused(item, EventRefusal.QUOTA.value, "")
            return None
        found = target_refusal(event.ip, protection, item.origin in self._admins)
        if found is not None:
            self._refused(item, found[0], f"{event.ip}: {found[1].message}")
            return None
        return event

    def _refused(self, item: Incoming, reason: str, why: str) -> None:
        self._stats.refuse(reason)
        # One line per origin and reason every 10 s: a hostile member cannot flood the log.
        suppressed = self._log.allow((item.origin, reason), self._monotonic())
        if suppressed is None:
            return
        log.warning(
            "fleet: refused event %s from %s: %s%s%s",
            item.position,
            escape(item.origin),
            reason,
            f" ({escape(why)})" if why else "",
            f"; {suppressed} more like it since the last such line" if suppressed else "",
        )
