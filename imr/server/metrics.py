"""Prometheus metrics of one daemon, and the HTTP endpoint that serves them.

Every daemon has its own `Metrics` (its own CollectorRegistry: no global
state, so tests can run several brokers in one process). The broker always
counts, which costs a lock and an addition per event; the endpoint is
started only when `metrics.enabled` is set, and runs prometheus_client's
WSGI server in its own threads, so a slow or hostile scraper never holds
up the event loop or the writer.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_wsgi_server

from imr.config import MetricsConfig, Role
from imr.fleet.stats import FleetStats
from imr.server.access import Peer
from imr.wire_codes import WireCode

log = logging.getLogger("imr.metrics")

# Batches hold 1 to 512 changes (broker.MAX_BATCH).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A block waits for one fsync'd transaction and one firewall call: milliseconds, or a
# second or more for iptables-legacy under load.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# A request's series: its count, its latency, and its refusal count (None: not a refusal).
Children = tuple[Counter, Histogram, Counter | None]


class MetricsError(Exception):
    """The metrics endpoint cannot listen; the message says where and why."""


class Metrics:
    """The daemon's counters, by name; the broker and its helpers call the methods below."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Label children by (op, roles, result): a few dozen keys at most (fixed sets).
        self._children: dict[tuple[str, frozenset[Role], str], Children] = {}
        r = self.registry
        self.active_blocks = Gauge(
            "imr_active_blocks", "Active blocks, by firewall backend.", ["backend"], registry=r
        )
        self.requests = Counter(
            "imr_requests",
            "Requests answered, by op, the caller's role and the result (ok or the error code).",
            ["op", "role", "result"],
            registry=r,
        )
        self.refusals = Counter(
            "imr_refusals",
            "Requests refused, by reason (the error code): forbidden, allowlisted, rate_limited...",
            ["reason"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "imr_quota_refusals",
            "Block requests refused by a quota, by the limit that refused them.",
            ["limit"],
            registry=r,
        )
        self.batch_size = Histogram(
            "imr_batch_size",
            "Changes committed per writer batch (one state transaction, one firewall call).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "imr_request_duration_seconds",
            "Time from a request's arrival to its answer, by op.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.expiries = Counter("imr_expiries", "Blocks lifted because they expired.", registry=r)
        self.drift_repairs = Counter(
            "imr_drift_repairs",
            "Differences between the firewall and the state file that imr repaired, by kind.",
            ["kind"],
            registry=r,
        )
        self.fleet = FleetStats(r)  # registered always, counted only in fleet mode
        self._later: list[tuple[str, Peer, str, float]] = []  # request_later's, until flushed

    def request_done(self, op: str, peer: Peer, result: str, seconds: float) -> None:
        requests, latency, refusals = self._children_of(op, peer, result)
        requests.inc()
        latency.observe(seconds)
        if refusals is not None:
            refusals.inc()

    def _children_of(self, op: str, peer: Peer, result: str) -> Children:
        key = (op, peer.roles, result)
        children = self._children.get(key)
        if children is None:  # labels() costs a lock and a tuple per call: once per key
            children = self._children[key] = (
                self.requests.labels(op, role_label(peer), result),
                self.latency.labels(op),
                self.refusals.labels(result)
                if result not in ("ok", WireCode.INTERNAL_ERROR, "cancelled")
                else None,
            )
        return children

    def request_later(self, op: str, peer: Peer, result: str, seconds: float) -> None:
        """request_done, counted at the next flush_requests: the fast lane's requests, which
        the writer loop answers a batch at a time, then flushes (request_done's locks and
        calls cost ~2 µs a request; bench/one_address.py)."""
        self._later.append((op, peer, result, seconds))

    def flush_requests(self) -> None:
        """Count the requests request_later holds: the same counts, buckets and sum (added
        in the same order) as request_done of each, one update of each series per batch."""
        later, self._later = self._later, []
        counts: dict[Counter, int] = {}
        observed: dict[Histogram, list[float]] = {}  # each series' values in their order
        for op, peer, result, seconds in later:
            requests, latency, refusals = self._children_of(op, peer, result)
            counts[requests] = counts.get(requests, 0) + 1
            if refusals is not None:
                counts[refusals] = counts.get(refusals, 0) + 1
            observed.setdefault(latency, []).append(seconds)
        for counter, count in counts.items():
            counter.inc(count)
        for latency, values in observed.items():
            _observe_all(latency, values)

    def quota_refused(self, limit: str) -> None:
        self.quota_refusals.labels(limit).inc()

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def expired(self, count: int) -> None:
        if count:
            self.expiries.inc(count)

    def set_active(self, backend: str, count: int) -> None:
        self.active_blocks.labels(backend).set(count)

    def drift_repaired(self, kind: str, count: int = 1) -> None:
        """For the drift check; `kind` is one of a small fixed set (e.g. "missing", "extra")."""
        self.drift_repairs.labels(kind).inc(count)


def _observe_all(latency: Histogram, values: list[float]) -> None:
    """observe() of each value, as one update of each bucket and of the sum. prometheus_client
    has no public call for that: its bucket and sum values (there since its first versions)
    are used if they are as expected, else observe() each (tests/test_metrics_batch.py)."""
    buckets, total = getattr(latency, "_buckets", None), getattr(latency, "_sum", None)
    bounds = getattr(latency, "_upper_bounds", None)
    if buckets is None or total is None or bounds is None or len(buckets) != len(bounds):
        for value in values:
            latency.observe(value)
        return
    counts = [0] * len(bounds)
    running = total.get()
    for value in values:
        running += value  # observe adds every value to the sum, in this order
        if value == value:  # NaN is in no bucket: `amount <= bound` is never true
            counts[bisect_left(bounds, value)] += 1  # the first bound >= value
    total.set(running)
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


def role_label(peer: Peer) -> str:
    """One role per request for the label: the most powerful the caller has."""
    for role in (Role.ADMIN, Role.BLOCK, Role.READ):
        if role in peer.roles:
            return role.value
    return "none"


class MetricsServer:
    """The /metrics endpoint on the configured address, in prometheus_client's own threads."""

    def __init__(self, config: MetricsConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        host, port = self._config.host, self._config.port
        try:
            self._server, self._thread = start_wsgi_server(
                port, addr=host, registry=self._metrics.registry
            )
        except OSError as exc:
            raise MetricsError(
                f"metrics.listen = {self._config.listen!r}: cannot listen: {exc.strerror or exc}"
            ) from None
        log.info("metrics on http://%s/metrics", self._config.listen)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
