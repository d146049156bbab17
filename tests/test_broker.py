"""The broker with a real state file, a fake clock and a recording backend.

1-day and 7-day expiries run on the injected clock; the kernel side is the
recording backend (the real backends have their own tests in namespaces).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from imr.backends.base import KernelBlock
from imr.config import Config
from imr.fleet.keys import generate, load_private, public_text
from imr.protocol import BlockRequest, BlockResult, ListRequest, ShowRequest, UnblockRequest
from imr.server.access import Peer
from imr.server.broker import Broker, BrokerError
from imr.store import Store

from fakes import NOBODY, READER, ROOT, WEB, FakeClock, FixedAddresses, RecordingBackend

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

DAY = 86400
ATTACKER = "203.0.113.7"


@asynccontextmanager
async def running(
    tmp_path: Path,
    config: Config | None = None,
    backend: RecordingBackend | None = None,
    clock: FakeClock | None = None,
) -> AsyncIterator[tuple[Broker, RecordingBackend, FakeClock, Store]]:
    # Escalation off unless a test asks for it: these tests block many addresses of one /24
    # and read one kernel entry per address (tests/test_prefix_blocks.py turns it on).
    config = config or Config.model_validate(
        {"protect": {"allowlist": ["198.51.100.0/24"]}, "escalation": {"enabled": False}}
    )
    backend = backend or RecordingBackend()
    clock = clock or FakeClock()
    store = Store(tmp_path / "state.db")
    broker = Broker(
        config,
        store,
        backend,
        clock,
        FixedAddresses("192.0.2.1", "2001:db8::1", broadcast=["192.0.2.255"]),
    )
    broker.reconcile()
    await broker.start()
    try:
        yield broker, backend, clock, store
    finally:
        await broker.stop()
        store.close()


async def block(broker: Broker, ip: str, peer: Peer = WEB, **fields: Any) -> BlockResult:
    return await broker.handle(BlockRequest(op="block", ip=ip, **fields), peer)


def addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


async def test_block_is_recorded_and_applied(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, clock, store):
        result = await block(broker, ATTACKER, reason="msgimport scan", source="modsecurity:99999")
        assert result["action"] == "block"
        assert result["expires_at"] is not None and result["duration"] == "1d"
        assert backend.kernel == {addr(ATTACKER): clock.now() + DAY}
        (row,) = store.active_blocks()
        assert (row.ip, row.rung, row.offence, row.uid, row.pid) == (ATTACKER, 1, 1, 33, 4242)
        assert (row.reason, row.source) == ("msgimport scan", "modsecurity:99999")


async def test_one_day_then_seven_days_for_a_repeat(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, clock, store):
        await block(broker, ATTACKER)
        clock.advance(DAY - 1)
        await broker.expire_due()
        assert addr(ATTACKER) in backend.kernel  # not yet due
        clock.advance(1)
        await broker.expire_due()
        assert backend.kernel == {}
        assert store.active_blocks() == []

        clock.advance(3 * DAY)  # comes back within the 30-day window
        again = await block(broker, ATTACKER)
        assert (again["rung"], again["offence"], again["duration"]) == (2, 2, "7d")
        assert backend.kernel[addr(ATTACKER)] == clock.now() + 7 * DAY
        blocks, hits = store.history(ATTACKER)
        assert [b.lift_reason for b in blocks] == ["expired", None]
        assert [h.outcome for h in hits] == ["block", "block"]


async def test_hit_on_blocked_address_is_recorded_without_duplicate_rule(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, clock, store):
        await block(broker, ATTACKER)
        clock.advance(60)
        second = await block(broker, ATTACKER, reason="again")
        assert second["action"] == "record"
        assert len(backend.applies) == 2
        # The same entry again, re-armed with the same expiry (a set backend's timeout);
        # the kernel still holds one entry for it.
        assert backend.applies[1] == ([KernelBlock(addr(ATTACKER), clock.now() - 60 + DAY)], [])
        assert backend.kernel == {addr(ATTACKER): clock.now() - 60 + DAY}
        clock.advance(2 * 3600)  # still attacking an hour later: escalate
        third = await block(broker, ATTACKER)
        assert (third["action"], third["rung"]) == ("escalate", 2)
        assert backend.kernel[addr(ATTACKER)] == clock.now() + 7 * DAY
        assert len(store.active_blocks()) == 1
        _, hits = store.history(ATTACKER)
        assert [h.outcome for h in hits] == ["block", "record", "escalate"]


async def test_custom_ladder_from_config(tmp_path: Path) -> None:
    config = Config.model_validate({"policy": {"ladder": ["1h", "1d", "7d", "30d"]}})
    async with running(tmp_path, config) as (broker, _, clock, _store):
        durations = []
        for _ in range(5):
            result = await block(broker, ATTACKER)
            durations.append(result["duration"])
            clock.advance(31 * DAY)
            await broker.expire_due()
            clock.advance(-30 * DAY)  # come back one day after release, inside the window
        assert durations == ["1h", "1d", "7d", "30d", "30d"]


@pytest.mark.parametrize(
    ("ip", "code"),
    [
        ("127.0.0.1", "loopback_address"),
        ("::1", "loopback_address"),
        ("192.0.2.1", "own_address"),
        ("2001:db8::1", "own_address"),
        ("::ffff:192.0.2.1", "own_address"),
        ("192.0.2.255", "broadcast_address"),
        ("198.51.100.23", "allowlisted"),
        ("not-an-ip", "invalid_address"),
        ("203.0.113.0/24", "network_not_allowed"),
    ],
)
async def test_protected_and_malformed_addresses_are_refused(
    tmp_path: Path, ip: str, code: str
) -> None:
    async with running(tmp_path) as (broker, backend, _, store):
        with pytest.raises(BrokerError) as refused:
            await block(broker, ip)
        assert refused.value.code == code
        assert backend.kernel == {} and store.active_blocks() == []


async def test_roles(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, _, store):
        with pytest.raises(BrokerError, match="not allowed") as refused:
            await block(broker, ATTACKER, peer=NOBODY)
        assert refused.value.code == "forbidden"
        with pytest.raises(BrokerError, match="not allowed"):
            await block(broker, ATTACKER, peer=READER)
        assert backend.kernel == {} and store.active_blocks() == []

        await block(broker, ATTACKER, peer=WEB)
        for peer in (WEB, READER, NOBODY):
            with pytest.raises(BrokerError, match="not allowed"):
                await broker.handle(UnblockRequest(op="unblock", ip=ATTACKER), peer)
        with pytest.raises(BrokerError, match="not allowed"):
            await broker.handle(ListRequest(op="list"), WEB)
        listed = await broker.handle(ListRequest(op="list"), READER)
        assert [b["ip"] for b in listed["blocks"]] == [ATTACKER]
        assert addr(ATTACKER) in backend.kernel

        await broker.handle(UnblockRequest(op="unblock", ip=ATTACKER), ROOT)
        assert backend.kernel == {}
        with pytest.raises(BrokerError) as again:
            await broker.handle(UnblockRequest(op="unblock", ip=ATTACKER), ROOT)
        assert again.value.code == "not_blocked"


async def test_show_keeps_history_after_unblock(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, _, clock, _store):
        await block(broker, ATTACKER, reason="first")
        await broker.handle(UnblockRequest(op="unblock", ip=ATTACKER, reason="oops"), ROOT)
        clock.advance(60)
        second = await block(broker, ATTACKER, reason="second")
        # An admin unblock is a pardon: the next block is not a repeat.
        assert (second["rung"], second["offence"]) == (1, 2)
        shown = await broker.handle(ShowRequest(op="show", ip=ATTACKER), READER)
        assert shown["active"] is not None and shown["active"]["reason"] == "second"
        assert [b["lift_reason"] for b in shown["blocks"]] == [None, "unblocked"]  # newest
        assert [h["reason"] for h in shown["hits"]] == ["second", "first"]


async def test_batch_failure_fails_only_the_bad_request(tmp_path: Path) -> None:
    backend = RecordingBackend()
    bad = "203.0.113.66"
    backend.refuse.add(addr(bad))
    good = [f"203.0.113.{i}" for i in range(1, 40)] + [f"2001:db8::{i:x}" for i in range(2, 30)]

    # 68 new blocks at once from one client: more than the default quota lets through.
    config = Config.model_validate(
        {
            "protect": {"allowlist": ["198.51.100.0/24"]},
            "quota": {"blocks_per_minute": 0},
            "escalation": {"enabled": False},  # one kernel entry per address (issue #16)
        }
    )
    async with running(tmp_path, config, backend=backend) as (broker, _, _clock, store):
        results = await asyncio.gather(
            *(block(broker, ip) for ip in [*good[:20], bad, *good[20:]]),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1
        assert isinstance(errors[0], BrokerError) and errors[0].code == "internal_error"
        assert {str(a) for a in backend.kernel} == set(good)
        assert {r.ip for r in store.active_blocks()} == set(good)
        assert store.history(bad) == ([], [])
        # Requests that arrived together were applied together.
        assert len(backend.applies) < len(good)


async def test_block_ids_follow_the_committed_rows_across_a_failed_batch(tmp_path: Path) -> None:
    """The writer keeps the next block id between batches (no MAX(id) query a batch): a
    batch that failed (rolled back) must not move it on, nor may a restart reuse one."""
    backend = RecordingBackend()
    bad = "203.0.113.66"
    backend.refuse.add(addr(bad))
    async with running(tmp_path, backend=backend) as (broker, _, _clock, store):
        await block(broker, "203.0.113.1")
        with pytest.raises(BrokerError):
            await block(broker, bad)
        await block(broker, "203.0.113.2")
        assert [(r.id, r.ip) for r in store.active_blocks()] == [
            (1, "203.0.113.1"),
            (2, "203.0.113.2"),
        ]
    async with running(tmp_path, backend=RecordingBackend()) as (broker, _, _clock, store):
        await block(broker, "203.0.113.3")
        assert [r.id for r in store.active_blocks()] == [1, 2, 3]


async def test_reconcile_lifts_expired_and_restores_the_rest(tmp_path: Path) -> None:
    clock = FakeClock()

    # Severity starts a block at a higher rung only with the opt-in (core/policy.py).
    skips = Config.model_validate(
        {"protect": {"allowlist": ["198.51.100.0/24"]}, "policy": {"severity_skips_rungs": True}}
    )

    async with running(tmp_path, skips, clock=clock) as (broker, _, c, _s):
        await block(broker, ATTACKER)  # 1 day
        c.advance(60)
        await block(broker, "2001:db8::bad", severity=2)  # 7 days
    clock.advance(2 * DAY)  # the daemon was down for two days
    fresh = RecordingBackend()
    fresh.kernel = {addr("203.0.113.250"): 0.0}  # a leftover imr rule with no state row

    async with running(tmp_path, backend=fresh, clock=clock) as (broker, backend, _, store):
        assert set(backend.kernel) == {addr("2001:db8::bad")}
        assert [r.ip for r in store.active_blocks()] == ["2001:db8::bad"]
        blocks, _ = store.history(ATTACKER)
        assert blocks[0].lift_reason == "expired"
        status = broker.status()
        assert status["active_blocks"] == 1


async def test_requests_arriving_together_share_one_transaction(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, _, store):
        ips = [f"203.0.113.{i}" for i in range(1, 51)]
        await asyncio.gather(*(block(broker, ip) for ip in ips))
        assert {str(a) for a in backend.kernel} == set(ips)
        assert len(store.active_blocks()) == 50
        assert len(backend.applies) <= 3


async def test_a_reload_that_allowlists_a_blocked_address_lifts_it(tmp_path: Path) -> None:
    """The allowlist reloaded (SIGHUP) protects an address already blocked: the next tick
    lifts it from the kernel and records it as `protected`; other blocks stay."""
    async with running(tmp_path) as (broker, backend, _clock, store):
        await block(broker, ATTACKER)
        await block(broker, "203.0.113.99")
        reloaded = Config.model_validate(
            {"protect": {"allowlist": ["198.51.100.0/24", "203.0.113.7/32"]}}
        )
        broker.apply_config(reloaded)
        await broker.expire_due()
        assert addr(ATTACKER) not in backend.kernel
        assert addr("203.0.113.99") in backend.kernel
        assert [row.ip for row in store.active_blocks()] == ["203.0.113.99"]
        blocks, _ = store.history(ATTACKER)
        assert [b.lift_reason for b in blocks] == ["protected"]


def _fleet_config(tmp_path: Path) -> Config:
    """Fleet mode with a load balancer member at 192.0.2.2; Redis is unreachable (port 1),
    which fleet mode treats as "Redis down": local blocking goes on."""
    key = tmp_path / "fleet.key"
    public = (key.exists() and public_text(load_private(key).public_key())) or generate(key)
    members = {
        "web1": {"public_key": public, "addresses": ["192.0.2.1"]},
        "lb": {"public_key": public, "addresses": ["192.0.2.2", "2001:db8::2"]},
    }
    fleet = {"enabled": True, "name": "web1", "members": members}
    fleet |= {"private_key": str(key), "redis_url": "redis://127.0.0.1:1/0"}
    return Config.model_validate({"escalation": {"enabled": False}, "fleet": fleet})


async def test_in_fleet_mode_a_local_client_cannot_block_a_member(tmp_path: Path) -> None:
    """A hook whose realip settings are wrong reports the proxy: the members' addresses are
    protected for local requests too (docs/fleet.md), not only against remote events."""
    async with running(tmp_path, _fleet_config(tmp_path)) as (broker, backend, _, store):
        for ip in ("192.0.2.2", "::ffff:192.0.2.2", "2001:db8::2"):
            with pytest.raises(BrokerError) as refused:
                await block(broker, ip)
            assert refused.value.code == "allowlisted"
        assert backend.kernel == {} and store.active_blocks() == []
        await block(broker, ATTACKER)  # anyone else still can be blocked
        assert addr(ATTACKER) in backend.kernel


async def test_a_member_blocked_before_fleet_mode_is_lifted_at_start(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, _, store):
        await block(broker, "192.0.2.2")
        assert addr("192.0.2.2") in backend.kernel
    kernel = RecordingBackend()
    kernel.kernel = dict(backend.kernel)
    async with running(tmp_path, _fleet_config(tmp_path), kernel) as (_, backend, _, store):
        assert addr("192.0.2.2") not in backend.kernel
        assert store.active_blocks() == []
        blocks, _ = store.history("192.0.2.2")
        assert [b.lift_reason for b in blocks] == ["protected"]
