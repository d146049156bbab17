"""Quotas on block requests: how many new blocks a client may make, and how many may be active.

Pure arithmetic (no I/O, no clock): the broker passes `now` (a monotonic
time in seconds, so a wall-clock step cannot lock clients out or let a
flood through) and the current number of active blocks.

Four limits, each 0 for "no limit":
  blocks_per_minute  new blocks per client in any 60-second window (a sliding
                     window log, exact: never more than the limit in any window)
  active_per_client  active blocks made by one client
  active_global      active blocks in total
  hits_per_minute    reports of already-blocked addresses per client in any
                     60-second window: each writes a hit row, so without a limit
                     a hostile client could grow the state file without bound

A request is admitted by `admit`, which *reserves* its share before the
request is queued, so concurrent requests in flight count at once; once the
writer has decided, the reservation is either committed (a new block was
made: the address now counts against the client) or released (refused,
failed, or only a hit on an already active block).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

WINDOW = 60.0  # seconds: blocks_per_minute counts admissions in the last minute

RATE_LIMITED = "rate_limited"
QUOTA_EXCEEDED = "quota_exceeded"


@dataclass(frozen=True)
class QuotaLimits:
    blocks_per_minute: int = 60
    active_per_client: int = 10_000
    active_global: int = 200_000
    hits_per_minute: int = 600


@dataclass(frozen=True)
class QuotaRefusal:
    code: str  # RATE_LIMITED or QUOTA_EXCEEDED: goes on the wire
    limit: str  # the config key that refused: "blocks_per_minute", ...
    message: str
    retry_after: float | None  # seconds until a retry can succeed; None: when blocks lift


@dataclass(frozen=True)
class Reservation:
    """One admitted request's share of its client's quota, until committed or released."""

    principal: str
    at: float
    token: int  # tells reservations apart (two can share `at`)


@dataclass
class _Client:
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (at, token), oldest first
    pending: int = 0  # admitted, not yet decided by the writer
    hits: deque[float] = field(default_factory=deque)  # when its recent hits were admitted


class QuotaLedger:
    """Per-client counts of recent admissions, pending requests and active blocks."""

    def __init__(self, limits: QuotaLimits) -> None:
        self.limits = limits
        self._clients: dict[str, _Client] = {}
        self._owner: dict[str, str] = {}  # active address -> the client whose block it is
        self._active = Counter[str]()  # client -> active blocks it made
        self._open: set[int] = set()  # tokens of reservations not yet committed or released
        self._tokens = itertools.count(1)

    def restore(self, owners: Mapping[str, str]) -> None:
        """At start: who made each active block (address -> principal)."""
        self._owner = dict(owners)
        self._active = Counter(self._owner.values())

    def admit(self, principal: str, now: float, active_total: int) -> Reservation | QuotaRefusal:
        """Reserve one new block for `principal`, or say which limit refuses it.

        `active_total` is the number of active blocks now (every client's, and
        blocks made before imr knew who asked); pending reservations are added.
        """
        limits = self.limits
        client = self._clients.setdefault(principal, _Client())
        self._prune(client, now)
        if limits.blocks_per_minute and len(client.window) >= limits.blocks_per_minute:
            retry = max(0.0, client.window[0][0] + WINDOW - now)
            return QuotaRefusal(
                RATE_LIMITED,
                "blocks_per_minute",
                f"at most {limits.blocks_per_minute} new blocks per minute per client"
                f" (quota.blocks_per_minute); retry in {_seconds(retry)}",
                retry,
            )
        mine = self._active[principal] + client.pending
        if limits.active_per_client and mine >= limits.active_per_client:
            return QuotaRefusal(
                QUOTA_EXCEEDED,
                "active_per_client",
                f"this client already has {limits.active_per_client} active blocks"
                " (quota.active_per_client); retry when some expire or are unblocked",
                None,
            )
        if limits.active_global and active_total + len(self._open) >= limits.active_global:
            return QuotaRefusal(
                QUOTA_EXCEEDED,
                "active_global",
                f"imr already holds {limits.active_global} active blocks"
                " (quota.active_global); retry when some expire or are unblocked",
                None,
            )
        reservation = Reservation(principal, now, next(self._tokens))
        client.window.append((now, reservation.token))
        client.pending += 1
        self._open.add(reservation.token)
        return reservation

    def admit_hit(self, principal: str, now: float) -> QuotaRefusal | None:
        """Count one report of an already-blocked address, or refuse it over the limit."""
        limit = self.limits.hits_per_minute
        if not limit:
            return None
        hits = self._clients.setdefault(principal, _Client()).hits
        while hits and hits[0] <= now - WINDOW:
            hits.popleft()
        if len(hits) >= limit:
            retry = max(0.0, hits[0] + WINDOW - now)
            return QuotaRefusal(
                RATE_LIMITED,
                "hits_per_minute",
                f"at most {limit} reports of already-blocked addresses per minute per client"
                f" (quota.hits_per_minute); retry in {_seconds(retry)}",
                retry,
            )
        hits.append(now)
        return None

    def commit(self, reservation: Reservation, address: str) -> None:
        """The request made a new block of `address`: it counts against its client until lifted."""
        if not self._settle(reservation):
            return
        self.lifted(address)  # a re-block within one batch: the old owner's count goes
        self._owner[address] = reservation.principal
        self._active[reservation.principal] += 1

    def release(self, reservation: Reservation) -> None:
        """The request made no new block (refused, failed, or a hit): give its share back."""
        client = self._clients.get(reservation.principal)
        if not self._settle(reservation) or client is None:
            return
        entry = (reservation.at, reservation.token)
        if entry in client.window:  # else it already left the window
            client.window.remove(entry)

    def lifted(self, address: str) -> None:
        """The block of `address` ended (expired, unblocked, protected, replaced)."""
        principal = self._owner.pop(address, None)
        if principal is None:
            return
        self._active[principal] -= 1
        if self._active[principal] <= 0:
            del self._active[principal]

    def active(self, principal: str) -> int:
        return self._active[principal]

    def recent(self, principal: str, now: float) -> int:
        """New blocks admitted for `principal` in the last minute (pending ones included)."""
        client = self._clients.get(principal)
        if client is None:
            return 0
        self._prune(client, now)
        return len(client.window)

    @property
    def pending(self) -> int:
        return len(self._open)

    def _settle(self, reservation: Reservation) -> bool:
        """Close an open reservation; False if it was settled already (then nothing to do)."""
        if reservation.token not in self._open:
            return False
        self._open.discard(reservation.token)
        client = self._clients.get(reservation.principal)
        if client is not None:
            client.pending -= 1
        return True

    def _prune(self, client: _Client, now: float) -> None:
        window = client.window
        while window and window[0][0] <= now - WINDOW:
            window.popleft()


class LogThrottle:
    """At most one log line per key per `interval` seconds, so a flood cannot flood the log.

    `allow` answers None (stay quiet) or how many lines were suppressed for
    this key since the last one logged, to say so in the line.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._suppressed = Counter[Hashable]()

    MAX_KEYS = 10_000  # keys can be client addresses: forget old ones past this many

    def allow(self, key: Hashable, now: float) -> int | None:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] += 1
            return None
        if last is None and len(self._last) >= self.MAX_KEYS:
            self._forget(now)
        self._last[key] = now
        return self._suppressed.pop(key, 0)

    def _forget(self, now: float) -> None:
        """Drop keys quiet for an interval (their counts with them); all of them if none is."""
        stale = [key for key, last in self._last.items() if now - last >= self.interval]
        for key in stale or list(self._last):
            del self._last[key]
            self._suppressed.pop(key, None)


def _seconds(value: float) -> str:
    return f"{max(1, math.ceil(value))}s"  # round up: retrying earlier is refused again
