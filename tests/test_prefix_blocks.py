"""Per-prefix offences and network escalation through the broker (issue #16).

A real state file, the fake clock and the recording backend, as in test_broker; the
kernel side in namespaces is tests/test_prefix_kernel.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from test_broker import block, running

from imr.config import Config
from imr.protocol import ListRequest, ShowRequest, UnblockRequest
from imr.server.broker import Broker, BrokerError
from imr.server.prefix_blocks import SOURCE
from imr.store import Store

from fakes import ROOT, WEB, FakeClock, RecordingBackend

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

HOUR, DAY = 3600, 86400
NET6 = "2001:db8:77::/64"
NET4 = "203.0.113.0/24"


def v6(n: int, net: str = "2001:db8:77::") -> str:
    return f"{net}{n:x}"


def v4(n: int) -> str:
    return f"203.0.113.{n}"


def config(**sections: Any) -> Config:
    base: dict[str, Any] = {"protect": {"allowlist": ["198.51.100.0/24"]}}
    return Config.model_validate({**base, **sections})


def kernel_texts(backend: RecordingBackend) -> set[str]:
    return {str(a) for a in backend.kernel}


async def active(broker: Broker, networks: bool = False) -> list[str]:
    listing = await broker.handle(ListRequest(op="list", networks=networks), ROOT)
    return [b["ip"] for b in listing["blocks"]]


async def test_three_addresses_of_a_64_become_a_network_block(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, backend, clock, store):
        for n in (1, 2):
            await block(broker, v6(n))
            clock.advance(60)
        assert await active(broker, networks=True) == []
        await block(broker, v6(3))
        # The prefix is blocked on its own ladder (1h first), by the daemon, with the
        # addresses that made it in its reason; the members stay in the state file but
        # leave the kernel while the network covers them.
        assert kernel_texts(backend) == {NET6}
        assert await active(broker, networks=True) == [NET6]
        assert len(await active(broker)) == 4
        shown = await broker.handle(ShowRequest(op="show", ip=NET6), ROOT)
        row = shown["active"]
        assert row is not None
        assert (row["source"], row["duration"], row["uid"]) == (SOURCE, "1h", None)
        assert row["reason"].endswith(f"{v6(1)}, {v6(2)}, {v6(3)}")
        # A fresh address of the prefix: its own row, no kernel entry of its own.
        await block(broker, v6(0x99))
        assert kernel_texts(backend) == {NET6}
        member = await broker.handle(ShowRequest(op="show", ip=v6(0x99)), ROOT)
        assert member["active"] is not None and member["covered_by"] == NET6
        assert {r.ip for r in store.active_blocks()} >= {NET6, v6(0x99)}


async def test_the_network_ends_and_the_members_are_back_in_the_kernel(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, backend, clock, _store):
        for n in range(1, 4):
            await block(broker, v6(n))
        clock.advance(HOUR + 1)
        await broker.expire_due()
        # Still blocked one by one, until their own (1 day, 7 days) expiry.
        assert kernel_texts(backend) == {v6(1), v6(2), v6(3)}
        assert await active(broker, networks=True) == []


async def test_an_admin_unblock_pardons_the_prefix_not_the_members(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, backend, _clock, _store):
        for n in range(1, 4):
            await block(broker, v6(n))
        await broker.handle(UnblockRequest(op="unblock", ip=NET6), ROOT)
        assert kernel_texts(backend) == {v6(1), v6(2), v6(3)}
        # The count starts again: two more addresses do not escalate, a third does, and
        # the pardoned block does not make it a repeat (rung 1, 1 hour).
        for n in range(4, 6):
            await block(broker, v6(n))
        assert NET6 not in kernel_texts(backend)
        await block(broker, v6(6))
        shown = await broker.handle(ShowRequest(op="show", ip=NET6), ROOT)
        assert shown["active"] is not None
        assert (shown["active"]["rung"], shown["active"]["duration"]) == (1, "1h")
        assert [b["lift_reason"] for b in shown["blocks"]] == [None, "unblocked"]


async def test_a_repeat_escalation_climbs_the_prefix_ladder(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, _backend, clock, _store):
        for n in range(1, 4):
            await block(broker, v6(n))
        clock.advance(HOUR + 1)
        await broker.expire_due()
        for n in range(4, 7):
            await block(broker, v6(n))
        shown = await broker.handle(ShowRequest(op="show", ip=NET6), ROOT)
        assert shown["active"] is not None
        assert (shown["active"]["rung"], shown["active"]["duration"]) == (2, "1d")


async def test_eight_ipv4_addresses_of_a_24_in_any_spelling(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, backend, _clock, _store):
        # IPv4-mapped spellings are the same addresses: counted as IPv4 (rule 6).
        for n in range(1, 8):
            await block(broker, f"::ffff:{v4(n)}" if n % 2 else v4(n))
        assert NET4 not in kernel_texts(backend)
        await block(broker, "::ffff:cb00:7108")  # 203.0.113.8, in hex
        assert kernel_texts(backend) == {NET4}


async def test_a_protected_address_inside_prevents_the_escalation(tmp_path: Path) -> None:
    allow = config(protect={"allowlist": ["203.0.113.250/32", "2001:db8:77::ffff/128"]})
    async with running(tmp_path, allow) as (broker, backend, _clock, _store):
        for n in range(1, 12):
            await block(broker, v4(n))
            await block(broker, v6(n))
        assert await active(broker, networks=True) == []
        assert len(backend.kernel) == 22


async def test_the_never_aggregate_list_prevents_the_escalation(tmp_path: Path) -> None:
    never = config(escalation={"never_aggregate": ["203.0.0.0/16"]})
    async with running(tmp_path, never) as (broker, _backend, _clock, _store):
        for n in range(1, 12):
            await block(broker, v4(n))
        for n in range(1, 4):
            await block(broker, v6(n))
        assert await active(broker, networks=True) == [NET6]


async def test_a_trusted_proxy_inside_prevents_the_escalation(tmp_path: Path) -> None:
    proxy = config(logscan={"trusted_proxies": ["203.0.113.254/32"]})
    async with running(tmp_path, proxy) as (broker, _backend, _clock, _store):
        for n in range(1, 12):
            await block(broker, v4(n))
        assert await active(broker, networks=True) == []


async def test_escalation_off_and_offence_unit_128_are_the_old_behaviour(tmp_path: Path) -> None:
    old = config(escalation={"enabled": False}, policy={"ipv6_offence_prefix": 128})
    async with running(tmp_path, old) as (broker, backend, _clock, _store):
        results = [await block(broker, v6(n)) for n in range(1, 6)]
        assert [r["rung"] for r in results] == [1] * 5
        assert len(backend.kernel) == 5


async def test_a_new_address_of_an_offending_64_is_a_repeat(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, _backend, clock, _store):
        first = await block(broker, v6(1))
        clock.advance(2 * DAY)  # the first block is over: a new address comes
        second = await block(broker, v6(2))
        other = await block(broker, v6(1, "2001:db8:78::"))  # another /64: first offence
        assert (first["rung"], first["duration"]) == (1, "1d")
        assert (second["rung"], second["duration"]) == (2, "7d")
        assert "repeat" in second["why"]
        assert other["rung"] == 1


async def test_the_client_quota_counts_only_what_it_asked_for(tmp_path: Path) -> None:
    limited = config(quota={"active_per_client": 3, "blocks_per_minute": 0})
    async with running(tmp_path, limited) as (broker, backend, _clock, _store):
        for n in range(1, 4):
            await block(broker, v6(n), peer=WEB)
        assert kernel_texts(backend) == {NET6}  # the daemon's block, not the client's
        assert broker._quota.active(WEB.principal) == 3


async def test_rotation_across_64s_of_a_48_is_opt_in(tmp_path: Path) -> None:
    levels = [
        {"family": 6, "prefix": 64, "count": 3},
        {"family": 6, "prefix": 48, "member_prefix": 64, "count": 4},
    ]
    wide = config(escalation={"levels": levels})
    async with running(tmp_path, wide) as (broker, backend, _clock, store):
        for n in range(1, 4):  # one /64 escalates on its own
            await block(broker, f"2001:db8:5:1::{n}")
        assert kernel_texts(backend) == {"2001:db8:5:1::/64"}
        for n in range(2, 5):  # one address in each of three more /64s: the /48
            await block(broker, f"2001:db8:5:{n}::1")
        # The /64 inside is superseded by the /48 (interval sets refuse overlaps).
        assert kernel_texts(backend) == {"2001:db8:5::/48"}
        assert await active(broker, networks=True) == ["2001:db8:5::/48"]
        (row,) = [r for r in store.active_blocks() if "/" in r.ip]
        assert "4 blocked networks of 2001:db8:5::/48" in row.reason


async def test_a_restart_keeps_the_members_out_of_the_kernel(tmp_path: Path) -> None:
    clock = FakeClock()
    async with running(tmp_path, config(), clock=clock) as (broker, _backend, _c, _s):
        for n in range(1, 4):
            await block(broker, v6(n))
    backend = RecordingBackend()
    async with running(tmp_path, config(), backend=backend, clock=clock) as (broker, *_):
        assert kernel_texts(backend) == {NET6}
        clock.advance(HOUR + 1)
        await broker.expire_due()
        assert kernel_texts(backend) == {v6(1), v6(2), v6(3)}
    store = Store(tmp_path / "state.db")
    assert len(store.active_blocks()) == 3
    store.close()


async def test_a_reload_applies_the_escalation_settings(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, backend, _clock, _store):
        broker.apply_config(config(escalation={"enabled": False}))
        for n in range(1, 5):
            await block(broker, v6(n))
        assert await active(broker, networks=True) == []
        broker.apply_config(config())  # on again: the count starts from nothing
        for n in range(5, 8):
            await block(broker, v6(n))
        assert await active(broker, networks=True) == [NET6]
        assert NET6 in kernel_texts(backend)


async def test_an_escalation_in_a_failed_batch_is_decided_again(tmp_path: Path) -> None:
    backend = RecordingBackend()
    bad = "2001:db8:99::1"
    backend.refuse.add(ipaddress.ip_address(bad))
    async with running(tmp_path, config(), backend=backend) as (broker, _b, _clock, _s):
        for n in (1, 2):
            await block(broker, v6(n))
        # One batch: the third address (it escalates the /64) and one the kernel refuses.
        # The batch fails and is split; the third address's half must escalate again.
        results = await asyncio.gather(
            block(broker, v6(3)), block(broker, bad), return_exceptions=True
        )
        assert isinstance(results[1], BrokerError) and not isinstance(results[0], Exception)
        assert NET6 in kernel_texts(backend)
        assert await active(broker, networks=True) == [NET6]
