"""The fast lane's request metrics, counted a batch at a time, read as request_done's.

Metrics.request_later + flush_requests (the writer loop's, once a batch) against
request_done of each request: the scraped page is the same (counts, every bucket, the
sum), whatever the latencies (bucket bounds exactly, below the first, beyond the last,
negative, infinite, NaN), ops, roles and results.
"""

from __future__ import annotations

import math
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from imr.config import Role
from imr.server.access import Peer
from imr.server.metrics import LATENCY_BUCKETS, Metrics

PEERS = [
    Peer(33, 33, 4242, "www-data", frozenset({Role.BLOCK})),
    Peer(0, 0, 1, "root", frozenset({Role.ADMIN, Role.BLOCK, Role.READ})),
    Peer(1000, 1000, 7, "reader", frozenset({Role.READ})),
]
RESULTS = ["ok", "forbidden", "rate_limited", "internal_error", "cancelled"]

latencies = (
    st.floats(min_value=-1.0, max_value=20.0)
    | st.sampled_from(LATENCY_BUCKETS)
    | st.sampled_from([0.0, math.inf, -math.inf, math.nan, 1e-9])
)
requests = st.tuples(
    st.sampled_from(["block", "unblock"]),
    st.sampled_from(PEERS),
    st.sampled_from(RESULTS),
    latencies,
)


def page(metrics: Metrics) -> str:
    """The scraped page without the _created series (when each series was first made)."""
    text = generate_latest(metrics.registry).decode()
    return re.sub(r"(?m)^[a-z_]+_created\b.*\n", "", text)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(requests, max_size=60), max_size=6))
def test_a_batch_at_a_time_scrapes_as_one_at_a_time(
    batches: list[list[tuple[str, Peer, str, float]]],
) -> None:
    each, later = Metrics(), Metrics()
    for batch in batches:
        for op, peer, result, seconds in batch:
            each.request_done(op, peer, result, seconds)
            later.request_later(op, peer, result, seconds)
        later.flush_requests()
        assert page(later) == page(each)


def test_nothing_is_counted_before_the_flush() -> None:
    metrics = Metrics()
    metrics.request_later("block", PEERS[0], "ok", 0.002)
    assert "imr_requests_total{" not in page(metrics)
    metrics.flush_requests()
    text = page(metrics)
    assert 'imr_requests_total{op="block",result="ok",role="block"} 1.0' in text
    assert 'imr_request_duration_seconds_bucket{le="0.0025",op="block"} 1.0' in text
    assert 'imr_request_duration_seconds_bucket{le="0.001",op="block"} 0.0' in text
