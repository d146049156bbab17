"""Fleet counters: Prometheus metrics in the daemon's registry, and the same figures kept
plainly for `imr fleet status` (which asks the daemon's `status`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0)


@dataclass
class OriginSeen:
    last_event_at: float = 0.0  # the origin's decision time of the last event applied
    last_seen: float = 0.0  # when it arrived here
    applied: int = 0
    lag: float = 0.0  # seconds from its decision to its application here, last event


@dataclass
class FleetStats:
    registry: CollectorRegistry
    published_total: int = 0
    applied_total: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    origins: dict[str, OriginSeen] = field(default_factory=dict)
    outbox_depth: int = 0
    publisher_connected: bool = False
    follower_connected: bool = False
    replays: int = 0  # catch-ups whose stored position was trimmed away
    redis_primary: str | None = None  # HOST:PORT Sentinel named last (None: no Sentinel)
    # The last lags (s), for percentiles in `imr fleet status` (and bench/fleet.py).
    recent_lags: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def __post_init__(self) -> None:
        r = self.registry
        self._published = Counter("imr_fleet_published", "Events published.", registry=r)
        self._applied = Counter(
            "imr_fleet_applied", "Remote events applied, by origin.", ["origin"], registry=r
        )
        self._refused = Counter(
            "imr_fleet_refused", "Remote events refused, by reason.", ["reason"], registry=r
        )
        self._lag = Histogram(
            "imr_fleet_lag_seconds",
            "From the origin's decision to the change in this host's kernel.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self._outbox = Gauge("imr_fleet_outbox_depth", "Events not yet published.", registry=r)

    def published(self, count: int) -> None:
        self.published_total += count
        self._published.inc(count)

    def applied(self, origin: str, event_at: float, now: float) -> None:
        self.applied_many(origin, [event_at], now)

    def applied_many(self, origin: str, event_times: list[float], now: float) -> None:
        """applied() for many events of one origin, committed at `now` (a catch-up's chunk)."""
        if not event_times:
            return
        seen = self.origins.setdefault(origin, OriginSeen())
        seen.applied += len(event_times)
        seen.last_event_at = max(seen.last_event_at, max(event_times))
        seen.last_seen = now
        lags = [now - at if at < now else 0.0 for at in event_times]
        seen.lag = lags[-1]
        self.applied_total += len(lags)
        self._applied.labels(origin).inc(len(lags))
        observe = self._lag.observe
        for lag in lags:
            observe(lag)
        self.recent_lags.extend(lags)

    def refuse(self, reason: str, count: int = 1) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + count
        self._refused.labels(reason).inc(count)

    def set_outbox(self, depth: int) -> None:
        self.outbox_depth = depth
        self._outbox.set(depth)

    def describe(self, name: str) -> dict[str, Any]:
        now = time.time()
        return {
            "member": name,
            "publisher_connected": self.publisher_connected,
            "follower_connected": self.follower_connected,
            "published": self.published_total,
            "applied": self.applied_total,
            "refused": dict(sorted(self.refused.items())),
            "outbox_depth": self.outbox_depth,
            "full_replays": self.replays,
            "redis_primary": self.redis_primary,
            "lag_ms": _percentiles(self.recent_lags),
            "origins": {
                origin: {
                    "applied": seen.applied,
                    "last_event_at": seen.last_event_at,
                    "last_seen_ago": round(now - seen.last_seen, 3),
                    "lag_seconds": round(seen.lag, 4),
                }
                for origin, seen in sorted(self.origins.items())
            },
        }


def _percentiles(lags: deque[float]) -> dict[str, float]:
    """p50, p99 and max of the last lags, in ms (origin's decision to the commit here)."""
    if not lags:
        return {}
    ordered = sorted(lags)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "count": len(ordered),
        "p50": round(at(0.50) * 1000, 2),
        "p99": round(at(0.99) * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
    }
