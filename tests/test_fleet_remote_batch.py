"""The writer's side of a fleet catch-up (imr/server/batch_transaction.py): thousands of remote
events as one change, with a real state file, a fake clock and a recording backend."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from imr.config import Config
from imr.fleet.events import Event
from imr.server.broker import Broker
from imr.server.changes import RemoteChange
from imr.store import Store

from fakes import FakeClock, FixedAddresses, RecordingBackend

pytestmark = pytest.mark.anyio

STREAM = "imr:fleet:a"


def remote(clock: FakeClock, n: int, ip: str, lasts: float = 3600) -> RemoteChange:
    """Event number n of member a, alone in its stream entry (so the entry's position)."""
    now = clock.now()
    event = Event("a", n, "block", ip, now - 10, now - 10 + lasts, 2, 1, "scan", "test")
    return RemoteChange(STREAM, f"{1000 + n}-0", n, event, False)


async def test_a_failed_chunk_is_split_in_order_and_only_the_bad_event_fails(
    tmp_path: Path,
) -> None:
    """The kernel refuses one address of the first of two chunks queued together: the
    writer splits that chunk, so only that event fails, and its good events commit before
    the second chunk, whose positions end up stored (they never move back)."""
    backend, clock = RecordingBackend(), FakeClock()
    store = Store(tmp_path / "state.db")
    config = Config.model_validate({"escalation": {"enabled": False}})
    broker = Broker(config, store, backend, clock, FixedAddresses("192.0.2.1"))
    broker.reconcile()
    await broker.start()
    try:
        ips = [f"203.0.113.{n}" for n in range(1, 21)]
        backend.refuse.add(ipaddress.ip_address(ips[4]))
        first = [remote(clock, n + 1, ip) for n, ip in enumerate(ips[:10])]
        first[7] = remote(clock, 8, ips[7], lasts=5)  # over already: history only
        second = [remote(clock, n + 11, ip) for n, ip in enumerate(ips[10:])]
        waiting = [broker.submit_remote(first), broker.submit_remote(second)]
        results = [await future for future in waiting]
    finally:
        await broker.stop()
    assert [(i, code) for i, code, _ in results[0]["refused"]] == [(4, "internal_error")]  # type: ignore[typeddict-item]
    assert results[1]["refused"] == []  # type: ignore[typeddict-item]
    assert store.positions() == {STREAM: ("1020-0", 20)}
    active = {r.ip for r in store.active_blocks()}
    assert active == set(ips) - {ips[4], ips[7]}
    assert {str(a) for a in backend.kernel} == active
    assert [r.lift_reason for r in store.history(ips[7])[0]] == ["expired"]
    assert store.history(ips[4]) == ([], [])
    assert all(r.origin == "a" for r in store.active_blocks())
    store.close()
