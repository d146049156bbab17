"""The fast lane's outcomes from the writer loop (lane_reply.LaneReply): errors and metrics.

tests/test_fast_lane.py compares the lane with the streams path for answers decided at
admission and for blocks; here the writer itself fails a change (the kernel refuses an
address, so its batch is split and that change fails alone), which the lane hears through
set_exception, and the requests are counted as handle() counts them, once the batch is
answered (Metrics.request_later, flush_requests).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_fast_lane import comparable, one_by_one, pipelined, serving

pytestmark = pytest.mark.anyio

REFUSED = "203.0.113.66"
SCRIPT = [
    b'{"v":1,"id":"a","op":"block","ip":"203.0.113.66"}\n',
    b"block 203.0.113.66\n",
    b"block 203.0.113.67\n",
    b'{"v":1,"op":"block","ip":"203.0.113.67","reason":"again"}\n',
]


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


@pytest.mark.parametrize("send", [one_by_one, pipelined])
async def test_a_change_the_writer_fails_is_answered_as_the_streams_path(
    tmp_path: Path, send: object
) -> None:
    answers, pages = {}, {}
    for lane in (True, False):
        async with serving(tmp_path, lane, escalation=False) as (path, backend, broker):
            backend.refuse = {ipaddress.ip_address(REFUSED)}
            replies = await send(path, SCRIPT)  # type: ignore[operator]
            answers[lane] = [comparable(r) for r in replies]
            pages[lane] = generate_latest(broker.metrics.registry).decode()
            assert REFUSED not in map(str, backend.kernel)
    assert answers[True] == answers[False]
    assert answers[True][0].startswith(b'{"v":1,"id":"a","ok":false,"error":{"code":"internal')
    assert answers[True][1].startswith(b"error internal_error: ")
    assert answers[True][2].startswith(b"ok blocked 203.0.113.67 until ")
    assert answers[True][3].startswith(b'{"v":1,"id":null,"ok":true,"result":{"ip":"203.0.113.67"')
    for name in ("imr_requests_total", "imr_request_duration_seconds_count"):
        assert samples(pages[True], name) == samples(pages[False], name)
    counted = samples(pages[True], "imr_requests_total")
    assert sorted(
        (dict(labels)["result"], value) for labels, value in counted.items() if value
    ) == [("internal_error", 2.0), ("ok", 2.0)]
