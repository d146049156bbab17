"""Upkeep: the broker's periodic work beside the requests, each its own loop.

- *clock steps*: when the wall clock steps, every kernel timeout is written again;
- *hit retention*: reports older than state.hit_retention are deleted, a few at a time;
- *drift*: imr's kernel objects are checked against the index and repaired.

Each takes the broker's *turn* (or a turn of the writer thread) so that it never runs
beside a batch: the index it reads then matches what the writer applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from imr.backends.base import BackendError, Drift
from imr.config import FirewallConfig, StateConfig
from imr.core.clock import Clock
from imr.core.clock_steps import StepDetector
from imr.core.durations import format_duration
from imr.server.metrics import Metrics
from imr.server.transaction import BatchCommitter
from imr.store import Store

log = logging.getLogger("imr.broker")

# Hit retention: old hits go every PRUNE_INTERVAL seconds (the first time PRUNE_FIRST after
# start), PRUNE_ROWS per writer turn with PRUNE_PAUSE between turns, so a backlog of
# millions never holds the writer for long.
PRUNE_INTERVAL = 3600.0
PRUNE_FIRST = 60.0
PRUNE_ROWS = 5000
PRUNE_PAUSE = 0.05

InWriter = Callable[..., Awaitable[Any]]


class Upkeep:
    """Clock steps, hit retention and drift; the broker starts the loops and holds the turn."""

    def __init__(
        self,
        sections: tuple[StateConfig, FirewallConfig],  # fixed: a reload keeps them
        clocks: tuple[Clock, Callable[[], float]],
        store: Store,
        committer: BatchCommitter,
        metrics: Metrics,
        turn: asyncio.Lock,
        in_writer: InWriter,
    ) -> None:
        self._state, self._firewall = sections
        self._clock, self._monotonic = clocks
        self._store = store
        self._committer = committer
        self._metrics = metrics
        self._turn = turn
        self._in_writer = in_writer
        self._steps = StepDetector()

    async def check_clock(self) -> float | None:
        """Notice a step of the wall clock (the expiry loop calls it every tick; tests call
        it) and make the kernel agree with the state again; return the step in seconds.

        Kernel timeouts count down on their own, but the daemon's expiries are wall-clock
        times: after a step back the kernel would lift blocks early (by the step), and
        after a step forward the expiry loop lifts them early in both. So on a step the
        kernel's entries are all written again from the index, with their remaining time
        as the wall clock now counts it (imr.core.clock_steps tells a step from time passing).
        """
        step = self._steps.step(self._clock.now(), self._monotonic())
        if step is None:
            return None
        log.warning(
            "the wall clock stepped %s by %.0f s; writing every active block's timeout to"
            " the kernel again",
            "forward" if step > 0 else "back",
            abs(step),
            extra={"event": "clock_step", "seconds": step},
        )
        async with self._turn:  # between batches: the index matches what the writer applied
            await self._in_writer(self._committer.rearm_all)
        return step

    async def prune_hits(self) -> int:
        """Delete the hits older than state.hit_retention, looking at PRUNE_ROWS at a time,
        each step its own turn of the writer thread (batches go in between); return how
        many (the prune loop calls it every PRUNE_INTERVAL; tests call it)."""
        retention = self._state.hit_retention
        now = self._clock.now()
        total, after = 0, 0
        while True:
            step = self._store.prune_hits, now - retention, now, PRUNE_ROWS, after
            deleted: int
            going_on: int | None
            deleted, going_on = await self._in_writer(*step)
            total += deleted
            if going_on is None:
                break
            after = going_on
            await asyncio.sleep(PRUNE_PAUSE)
        if total:
            log.info(
                "deleted %d reports older than %s (state.hit_retention)",
                total,
                format_duration(retention),
                extra={"event": "hits_pruned", "count": total},
            )
        return total

    async def prune_loop(self) -> None:
        await asyncio.sleep(PRUNE_FIRST)
        while True:
            try:
                await self.prune_hits()
            except Exception as exc:  # a full disk, say: the next round tries again
                log.warning("deleting old reports failed: %s; trying again later", exc)
            await asyncio.sleep(PRUNE_INTERVAL)

    async def drift_loop(self) -> None:
        interval = self._firewall.drift_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_drift()
            except BackendError as exc:  # the tool's own message says enough
                log.error("drift check failed: %s; trying again in %d s", exc, interval)
            except Exception:
                log.exception("drift check failed; trying again in %d s", interval)

    async def check_drift(self) -> Drift:
        """Check imr's kernel objects against the index and repair them (the drift loop calls
        it every firewall.drift_interval; tests call it). Returns what was found."""
        async with self._turn:  # between batches: the index matches what the writer applied
            drift: Drift = await self._in_writer(self._committer.check_and_repair, self._metrics)
            return drift
