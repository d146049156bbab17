"""The quota arithmetic (imr/core/quota.py) on an injected clock: windows, reservations, caps."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from imr.config import Config, Role
from imr.core.quota import (
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    LogThrottle,
    QuotaLedger,
    QuotaLimits,
    QuotaRefusal,
    Reservation,
)
from imr.protocol import BlockRequest, BlockResult, UnblockRequest
from imr.server.access import Peer
from imr.server.broker import Broker, BrokerError
from imr.store import Store

from fakes import ROOT, FakeClock, FixedAddresses, RecordingBackend
from fakes import WEB as WEB_PEER

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

T0 = 1000.0
# A second block-role client (another uid: another principal).
READER_BLOCKER = Peer(uid=1000, gid=1000, pid=9, user="alice", roles=frozenset({Role.BLOCK}))
WEB = "uid:33"
OTHER = "cert:CN=other"


def reserve(ledger: QuotaLedger, principal: str, now: float, active: int = 0) -> Reservation:
    admitted = ledger.admit(principal, now, active)
    assert isinstance(admitted, Reservation), admitted
    return admitted


def refused(ledger: QuotaLedger, principal: str, now: float, active: int = 0) -> QuotaRefusal:
    admitted = ledger.admit(principal, now, active)
    assert isinstance(admitted, QuotaRefusal), admitted
    return admitted


def test_rate_allows_exactly_the_limit_in_any_minute_and_says_when_to_retry() -> None:
    ledger = QuotaLedger(QuotaLimits(blocks_per_minute=3, active_per_client=0, active_global=0))
    for i, now in enumerate((T0, T0 + 10, T0 + 20)):
        ledger.commit(reserve(ledger, WEB, now), f"192.0.2.{i}")
    refusal = refused(ledger, WEB, T0 + 30)
    assert (refusal.code, refusal.limit) == (RATE_LIMITED, "blocks_per_minute")
    assert refusal.retry_after == pytest.approx(30.0)  # the first one leaves the window at T0+60
    assert "at most 3 new blocks per minute" in refusal.message
    assert "retry in 30s" in refusal.message
    # Just before the first admission is a minute old: still refused; at the minute: one slot.
    refused(ledger, WEB, T0 + 59.9)
    reserve(ledger, WEB, T0 + 60)
    refused(ledger, WEB, T0 + 60)
    assert ledger.recent(WEB, T0 + 60) == 3


def test_a_burst_then_steady_pace_never_passes_the_limit_in_any_window() -> None:
    limit = 5
    ledger = QuotaLedger(QuotaLimits(limit, 0, 0))
    admitted: list[float] = []
    now = T0
    for _ in range(600):  # one attempt every 0.5 s for 5 minutes
        result = ledger.admit(WEB, now, 0)
        if isinstance(result, Reservation):
            ledger.commit(result, f"192.0.2.{len(admitted) % 250}")
            admitted.append(now)
        now += 0.5
    for start in admitted:
        in_window = [t for t in admitted if start <= t < start + 60]
        assert len(in_window) <= limit
    assert len(admitted) == limit * 5  # and the client gets its full share every minute


def test_clients_have_separate_windows() -> None:
    ledger = QuotaLedger(QuotaLimits(1, 0, 0))
    reserve(ledger, WEB, T0)
    refused(ledger, WEB, T0)
    reserve(ledger, OTHER, T0)


def test_concurrent_reservations_count_before_they_are_decided() -> None:
    ledger = QuotaLedger(QuotaLimits(blocks_per_minute=0, active_per_client=2, active_global=0))
    first, second = reserve(ledger, WEB, T0), reserve(ledger, WEB, T0)
    assert ledger.pending == 2
    refusal = refused(ledger, WEB, T0)  # nothing committed yet, but two are in flight
    assert (refusal.code, refusal.limit) == (QUOTA_EXCEEDED, "active_per_client")
    assert refusal.retry_after is None
    ledger.release(first)  # the first was refused by the writer: its share comes back
    third = reserve(ledger, WEB, T0)
    ledger.commit(second, "192.0.2.1")
    ledger.commit(third, "192.0.2.2")
    assert ledger.active(WEB) == 2 and ledger.pending == 0
    refused(ledger, WEB, T0 + 3600)


def test_release_gives_the_rate_slot_back() -> None:
    ledger = QuotaLedger(QuotaLimits(1, 0, 0))
    ledger.release(reserve(ledger, WEB, T0))  # a hit on an active block, say
    ledger.commit(reserve(ledger, WEB, T0 + 1), "192.0.2.1")
    refused(ledger, WEB, T0 + 2)


def test_two_reservations_at_the_same_instant_release_one() -> None:
    ledger = QuotaLedger(QuotaLimits(2, 0, 0))
    first = reserve(ledger, WEB, T0)
    reserve(ledger, WEB, T0)
    ledger.release(first)
    assert ledger.recent(WEB, T0) == 1
    ledger.release(first)  # twice by mistake: no effect on the other
    assert ledger.recent(WEB, T0) == 1 and ledger.pending == 1


def test_lifted_blocks_free_the_active_quota() -> None:
    ledger = QuotaLedger(QuotaLimits(0, 1, 0))
    ledger.commit(reserve(ledger, WEB, T0), "192.0.2.1")
    refused(ledger, WEB, T0)
    ledger.lifted("192.0.2.9")  # not this client's: no change
    refused(ledger, WEB, T0)
    ledger.lifted("192.0.2.1")
    reserve(ledger, WEB, T0)


def test_reblock_by_another_client_moves_the_count() -> None:
    ledger = QuotaLedger(QuotaLimits(0, 5, 0))
    ledger.commit(reserve(ledger, WEB, T0), "192.0.2.1")
    ledger.commit(reserve(ledger, OTHER, T0), "192.0.2.1")  # expired and re-blocked in a batch
    assert (ledger.active(WEB), ledger.active(OTHER)) == (0, 1)


def test_global_cap_counts_every_client_and_pending() -> None:
    ledger = QuotaLedger(QuotaLimits(0, 0, active_global=10))
    reserve(ledger, WEB, T0, active=8)
    refusal = refused(ledger, OTHER, T0, active=9)  # 9 active + 1 pending
    assert (refusal.code, refusal.limit) == (QUOTA_EXCEEDED, "active_global")
    assert "10 active blocks" in refusal.message
    reserve(ledger, OTHER, T0, active=8)


def test_restore_counts_blocks_made_before_a_restart() -> None:
    ledger = QuotaLedger(QuotaLimits(0, 2, 0))
    ledger.restore({"192.0.2.1": WEB, "192.0.2.2": WEB, "192.0.2.3": OTHER})
    assert ledger.active(WEB) == 2
    refused(ledger, WEB, T0)
    reserve(ledger, OTHER, T0)


def test_zero_means_no_limit() -> None:
    ledger = QuotaLedger(QuotaLimits(0, 0, 0))
    for i in range(1000):
        ledger.commit(reserve(ledger, WEB, T0, active=i), f"10.0.{i // 250}.{i % 250}")
    assert ledger.active(WEB) == 1000


def test_log_throttle_one_line_per_interval_with_the_suppressed_count() -> None:
    throttle = LogThrottle(interval=10.0)
    key = (WEB, "blocks_per_minute")
    assert throttle.allow(key, T0) == 0
    assert [throttle.allow(key, T0 + i) for i in range(1, 6)] == [None] * 5
    assert throttle.allow((OTHER, "blocks_per_minute"), T0 + 1) == 0  # its own key
    assert throttle.allow(key, T0 + 10) == 5
    assert throttle.allow(key, T0 + 11) is None
    assert throttle.allow(key, T0 + 25) == 1


# Through the broker (real state file, recording backend, fake clocks) ----------------------


class Ticker:
    """The broker's monotonic clock for quotas, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def broker_with(
    tmp_path: Path, **quota: int | bool
) -> AsyncIterator[tuple[Broker, RecordingBackend, Store, Ticker]]:
    config = Config.model_validate({"quota": quota})
    backend, store, ticker = RecordingBackend(), Store(tmp_path / "state.db"), Ticker()
    broker = Broker(
        config, store, backend, FakeClock(), FixedAddresses("192.0.2.1"), monotonic=ticker
    )
    broker.reconcile()
    await broker.start()
    try:
        yield broker, backend, store, ticker
    finally:
        await broker.stop()
        store.close()


async def block(broker: Broker, ip: str, peer: Peer = WEB_PEER) -> BlockResult:
    return await broker.handle(BlockRequest(op="block", ip=ip), peer)


async def outcome(broker: Broker, ip: str, peer: Peer = WEB_PEER) -> str:
    try:
        await block(broker, ip, peer)
    except BrokerError as exc:
        return exc.code
    return "ok"


def kernel(backend: RecordingBackend) -> set[str]:
    return {str(a) for a in backend.kernel}


async def test_broker_hits_on_active_blocks_pass_an_exhausted_rate(tmp_path: Path) -> None:
    async with broker_with(tmp_path, blocks_per_minute=2) as (broker, backend, _, ticker):
        assert await outcome(broker, "203.0.113.1") == "ok"
        assert await outcome(broker, "203.0.113.2") == "ok"
        assert await outcome(broker, "203.0.113.3") == RATE_LIMITED
        assert (await block(broker, "203.0.113.1"))["action"] == "record"
        assert kernel(backend) == {"203.0.113.1", "203.0.113.2"}
        ticker.now += 60
        assert await outcome(broker, "203.0.113.3") == "ok"


async def test_broker_many_requests_in_flight_get_exactly_the_quota(tmp_path: Path) -> None:
    async with broker_with(tmp_path, blocks_per_minute=5) as (broker, backend, store, _):
        results = await asyncio.gather(*(outcome(broker, f"203.0.113.{i}") for i in range(1, 41)))
        assert results.count("ok") == 5 and results.count(RATE_LIMITED) == 35
        assert len(backend.kernel) == 5 and len(store.active_blocks()) == 5
        # Refused before queueing: the writer only ever saw the five.
        registry = broker.metrics.registry
        assert registry.get_sample_value("imr_batch_size_sum") == 5


async def test_broker_a_hit_that_becomes_a_new_block_must_pass_the_quota(tmp_path: Path) -> None:
    """The admin's unblock is queued just ahead of the client's report of the same address:
    admitted as a hit, it would make a new block; it is sent back through the quota."""
    async with broker_with(tmp_path, blocks_per_minute=1) as (broker, backend, store, _):
        assert await outcome(broker, "203.0.113.1") == "ok"
        unblock = broker.handle(UnblockRequest(op="unblock", ip="203.0.113.1"), ROOT)
        _, again = await asyncio.gather(unblock, outcome(broker, "203.0.113.1"))
        assert again == RATE_LIMITED
        assert backend.kernel == {} and store.active_blocks() == []
        # Within its quota the same race simply blocks again.
        broker._quota.limits = QuotaLimits(3, 0, 0)
        assert await outcome(broker, "203.0.113.2") == "ok"
        unblock = broker.handle(UnblockRequest(op="unblock", ip="203.0.113.2"), ROOT)
        _, again = await asyncio.gather(unblock, outcome(broker, "203.0.113.2"))
        assert again == "ok" and kernel(backend) == {"203.0.113.2"}


async def test_broker_a_failed_block_gives_its_share_back(tmp_path: Path) -> None:
    async with broker_with(tmp_path, blocks_per_minute=1) as (broker, backend, _, _):
        backend.refuse.add(ipaddress.ip_address("203.0.113.1"))
        assert await outcome(broker, "203.0.113.1") == "internal_error"
        assert await outcome(broker, "203.0.113.2") == "ok"


async def test_broker_active_cap_counts_until_lifted_and_admins_are_exempt(tmp_path: Path) -> None:
    async with broker_with(tmp_path, active_per_client=1, active_global=3) as (
        broker,
        backend,
        _,
        _,
    ):
        assert await outcome(broker, "203.0.113.1") == "ok"
        assert await outcome(broker, "203.0.113.2") == QUOTA_EXCEEDED
        assert await outcome(broker, "203.0.113.3", ROOT) == "ok"
        assert await outcome(broker, "203.0.113.4", ROOT) == "ok"
        assert await outcome(broker, "203.0.113.5", ROOT) == "ok"  # exempt from the total
        await broker.handle(UnblockRequest(op="unblock", ip="203.0.113.1"), ROOT)
        assert await outcome(broker, "203.0.113.2") == QUOTA_EXCEEDED  # now the global cap
        for ip in ("203.0.113.3", "203.0.113.4"):
            await broker.handle(UnblockRequest(op="unblock", ip=ip), ROOT)
        assert await outcome(broker, "203.0.113.2") == "ok"
        assert len(backend.kernel) == 2


async def test_broker_admins_count_when_not_exempt(tmp_path: Path) -> None:
    async with broker_with(tmp_path, blocks_per_minute=1, admin_exempt=False) as (
        broker,
        _,
        _,
        _,
    ):
        assert await outcome(broker, "203.0.113.1", ROOT) == "ok"
        assert await outcome(broker, "203.0.113.2", ROOT) == RATE_LIMITED


async def test_broker_restart_counts_active_blocks_for_the_uid_that_made_them(
    tmp_path: Path,
) -> None:
    async with broker_with(tmp_path, active_per_client=2) as (broker, _, _, _):
        assert await outcome(broker, "203.0.113.1") == "ok"
        assert await outcome(broker, "203.0.113.2") == "ok"
    async with broker_with(tmp_path, active_per_client=2) as (broker, _, _, _):
        assert await outcome(broker, "203.0.113.3") == QUOTA_EXCEEDED
        assert await outcome(broker, "203.0.113.3", READER_BLOCKER) == "ok"


def test_hits_on_blocked_addresses_are_limited_per_client_in_any_minute() -> None:
    ledger = QuotaLedger(QuotaLimits(hits_per_minute=2))
    assert ledger.admit_hit(WEB, T0) is None
    assert ledger.admit_hit(WEB, T0 + 5) is None
    refusal = ledger.admit_hit(WEB, T0 + 10)
    assert refusal is not None
    assert (refusal.code, refusal.limit) == (RATE_LIMITED, "hits_per_minute")
    assert "retry in 50s" in refusal.message
    assert ledger.admit_hit(OTHER, T0 + 10) is None  # another client has its own window
    assert ledger.admit_hit(WEB, T0 + 60) is None  # the first hit left the window
    assert QuotaLedger(QuotaLimits(hits_per_minute=0)).admit_hit(WEB, T0) is None  # 0: no limit


async def test_broker_hit_flood_is_refused_and_writes_no_more_hit_rows(tmp_path: Path) -> None:
    async with broker_with(tmp_path, hits_per_minute=3) as (broker, _, store, ticker):
        assert await outcome(broker, "203.0.113.1") == "ok"
        results = [await outcome(broker, "203.0.113.1") for _ in range(10)]
        assert results == ["ok"] * 3 + [RATE_LIMITED] * 7
        # One hit row for the block itself and one per admitted report, none for refusals.
        _, hits = store.history("203.0.113.1")
        assert len(hits) == 4
        assert await outcome(broker, "203.0.113.1", ROOT) == "ok"  # admins are exempt
        ticker.now += 60
        assert await outcome(broker, "203.0.113.1") == "ok"
