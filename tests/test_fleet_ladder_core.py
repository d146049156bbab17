"""One ladder for the fleet with network escalation (issues #14 and #16), without daemons:
the pure core's order independence, and the broker's writer applying fleet members'
network blocks (a real state file, the fake clock, the recording backend).

The real daemons, kernels and packets are tests/test_fleet_ladder.py.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_broker import block, running

from imr.config import Config
from imr.core.addresses import IPNetwork
from imr.core.fleet import Protection, merged, network_plan, target_refusal
from imr.core.prefixes import Coverage
from imr.fleet.events import Event
from imr.protocol import ShowRequest
from imr.server.broker import Broker
from imr.server.changes import RemoteChange
from imr.server.prefix_blocks import SOURCE
from imr.store import Store

from fakes import ROOT, FakeClock, RecordingBackend
from fleet_harness import free_port, make_key

pytestmark = pytest.mark.anyio

HOUR = 3600.0
NET6 = "2001:db8:77::/64"


def v6(n: int) -> str:
    return f"2001:db8:77::{n:x}"


# --- The pure core ---------------------------------------------------------------------


def fold(arrivals: list[tuple[str, int, float]]) -> dict[str, tuple[int, float]]:
    """The networks in force after `arrivals` (network, rung, expiry) met in this order,
    applied as the writer does: merged with the same network, else network_plan."""
    coverage, active = Coverage(), dict[str, tuple[int, float]]()
    for text, rung, expires_at in arrivals:
        network: IPNetwork = ipaddress.ip_network(text)
        if text in active:
            active[text] = merged(active[text], rung, expires_at)
            continue
        plan = network_plan(network, coverage)
        if plan.covered_by is not None:
            continue  # history only
        for inner in plan.supersedes:
            coverage.remove(inner)
            del active[str(inner)]
        coverage.add(network)
        active[text] = (rung, expires_at)
    return active


def test_concurrent_escalations_end_the_same_in_any_order() -> None:
    """Two members escalate one /64 (different rungs and expiries), a third a /48 around it,
    a fourth an unrelated /24: every order of arrival ends with the same networks, rungs
    and expiries."""
    arrivals = [
        (NET6, 1, 1000.0),
        (NET6, 2, 900.0),
        ("2001:db8:77::/64", 1, 1200.0),
        ("2001:db8:77::/48", 1, 500.0),
        ("203.0.113.0/24", 1, 700.0),
    ]
    ends = {tuple(sorted(fold(list(order)).items())) for order in itertools.permutations(arrivals)}
    assert ends == {(("2001:db8:77::/48", (1, 500.0)), ("203.0.113.0/24", (1, 700.0)))}
    same = [a for a in arrivals if a[0] == NET6]
    assert {tuple(fold(list(o)).items()) for o in itertools.permutations(same)} == {
        ((NET6, (2, 1200.0)),)
    }


def test_a_remote_network_passes_the_guard_unless_an_admin_sent_it() -> None:
    protection = Protection(
        frozenset(),
        frozenset(),
        (ipaddress.ip_network("192.0.2.50/32"),),  # a member's address
        {4: 16, 6: 32},
        (ipaddress.ip_network("2001:db8:cd::/48"),),
    )
    found = target_refusal("192.0.2.48/28", protection)
    assert found is not None and found[0] == "protected_target"
    assert target_refusal("192.0.2.48/28", protection, admin=True) is not None  # never
    found = target_refusal("2001:db8:cd:1::/64", protection)
    assert found is not None and found[0] == "never_aggregate"
    assert target_refusal("2001:db8:cd:1::/64", protection, admin=True) is None
    assert target_refusal("2001:db8:cd::1", protection) is None  # an address: no guard


# --- The writer ------------------------------------------------------------------------

SEQ = itertools.count(1)


def event(clock: FakeClock, ip: str, kind: str = "block", **fields: Any) -> Event:
    now = clock.now()
    values: dict[str, Any] = {
        "origin": "a",
        "seq": next(SEQ),
        "kind": kind,
        "ip": ip,
        "at": now,
        "expires_at": 0.0 if kind == "lift" else now + HOUR,
        "rung": 1,
        "offence": 1,
        "reason": "test",
        "source": SOURCE if "/" in ip else "modsecurity",
    }
    values.update(fields)
    return Event(**values)


async def remote(broker: Broker, found: Event, admin: bool = False) -> None:
    """One fleet event through the writer, as the member hands it over; none is refused."""
    stream = f"imr:fleet:{found.origin}"
    change = RemoteChange(stream, f"{found.seq}-0", found.seq, found, admin)
    result = dict(await broker.submit_remote([change]))
    assert result["refused"] == []


def config() -> Config:
    return Config.model_validate({"protect": {"allowlist": ["198.51.100.0/24"]}})


def texts(backend: RecordingBackend) -> set[str]:
    return {str(a) for a in backend.kernel}


def active(store: Store) -> dict[str, str | None]:
    return {r.ip: r.origin for r in store.active_blocks()}


async def test_a_members_addresses_count_here_and_its_network_holds_them_out(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, config()) as (broker, backend, clock, store):
        for n in (1, 2):
            await remote(broker, event(clock, v6(n)))
        assert texts(backend) == {v6(1), v6(2)}
        # The member's escalation: the addresses it counted leave the kernel here too.
        await remote(broker, event(clock, NET6))
        assert texts(backend) == {NET6}
        # A later block under it (here, or from the member) gets no kernel entry.
        await remote(broker, event(clock, v6(3)))
        await block(broker, v6(4))
        assert texts(backend) == {NET6}
        assert active(store) == {NET6: "a", v6(1): "a", v6(2): "a", v6(3): "a", v6(4): None}
        shown = await broker.handle(ShowRequest(op="show", ip=v6(3)), ROOT)
        assert shown["covered_by"] == NET6
        # Its lift (the origin's, or an admin key's): the addresses are back in.
        await remote(broker, event(clock, NET6, "lift"))
        assert texts(backend) == {v6(n) for n in range(1, 5)}


async def test_remote_blocks_count_for_an_escalation_here(tmp_path: Path) -> None:
    """Three addresses of one /64 blocked on another member (which did not escalate: its
    own guard refused, or it runs without escalation) make the /64 a network block here."""
    async with running(tmp_path, config()) as (broker, backend, clock, store):
        for n in (1, 2, 3):
            await remote(broker, event(clock, v6(n)))
        assert texts(backend) == {NET6}
        (row,) = [r for r in store.active_blocks() if r.ip == NET6]
        assert (row.origin, row.source) == (None, SOURCE)


async def test_old_remote_blocks_escalate_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, backend, clock, _store):
        old = clock.now() - 2 * HOUR  # a member catching up on blocks still in force
        for n in (1, 2, 3):
            await remote(broker, event(clock, v6(n), at=old))
        assert texts(backend) == {v6(1), v6(2), v6(3)}


async def test_overlapping_networks_from_members_leave_one_in_the_kernel(
    tmp_path: Path,
) -> None:
    wide = "2001:db8:77::/48"
    async with running(tmp_path, config()) as (broker, backend, clock, store):
        for n in (1, 2, 3):  # this host's own escalation of the /64
            await block(broker, v6(n))
        assert texts(backend) == {NET6}
        # A member's /48 around it: the /64 ends (superseded), its addresses stay out.
        await remote(broker, event(clock, wide))
        assert texts(backend) == {wide}
        assert NET6 not in active(store)
        # The /64 again from another member: history only, the kernel unchanged.
        await remote(broker, event(clock, NET6, origin="c"))
        assert texts(backend) == {wide} and NET6 not in active(store)
        rows = store.offences([NET6])[NET6]
        assert rows.count == 2
        # The same /48 from a third member: merged (the later expiry wins).
        later = clock.now() + 5 * HOUR
        merge = event(clock, wide, origin="c", rung=2, expires_at=later)
        await remote(broker, merge)
        assert backend.kernel[ipaddress.ip_network(wide)] == later


async def test_an_escalation_is_published_and_never_covers_a_member(tmp_path: Path) -> None:
    """Fleet mode (no Redis reachable: the outbox keeps what would be published): the
    escalation gets an outbox row before the address that completed it, and a prefix
    holding another member's address is never escalated here."""
    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "pw").chmod(0o600)
    publics = {name: make_key(tmp_path / f"{name}.key") for name in ("b", "a")}
    fleet = {
        "enabled": True,
        "name": "b",
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",  # nobody listens
        "password_file": str(tmp_path / "pw"),
        "private_key": str(tmp_path / "b.key"),
        "members": {
            "b": {"public_key": publics["b"]},
            "a": {"public_key": publics["a"], "addresses": ["2001:db8:78::2"]},
        },
    }
    settings = Config.model_validate({"protect": {"allowlist": []}, "fleet": fleet})
    async with running(tmp_path, settings) as (broker, backend, _clock, store):
        for n in (1, 2, 3):
            await block(broker, v6(n))
            await block(broker, f"2001:db8:78::{n + 10:x}")
        assert texts(backend) - {v6(n) for n in (1, 2, 3)} == {
            NET6,
            "2001:db8:78::b",
            "2001:db8:78::c",
            "2001:db8:78::d",
        }
        with sqlite3.connect(store.path) as db:
            published = [
                json.loads(row[0])
                for row in db.execute("SELECT event FROM fleet_outbox ORDER BY seq")
            ]
        ips = [e["ip"] for e in published]
        assert ips.index(NET6) == ips.index(v6(3)) - 1  # before the address that completed it
        (network,) = [e for e in published if e["ip"] == NET6]
        assert (network["kind"], network["source"], network["rung"]) == ("block", SOURCE, 1)
        assert "2001:db8:78::/64" not in ips


async def test_an_ipv6_64_that_offended_on_a_member_makes_a_repeat_here(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, _backend, clock, _store):
        await remote(broker, event(clock, v6(1)))
        clock.advance(60)
        result = await block(broker, v6(2))  # another address of the same /64
        assert (result["rung"], result["duration"]) == (2, "7d")


async def test_a_48_escalates_over_an_escalated_64_at_its_base(tmp_path: Path) -> None:
    """The /64 escalated first lies at the /48's first address: the /48 still escalates and
    supersedes it (a narrower network at the base once counted as covering the /48)."""
    levels = [
        {"family": 6, "prefix": 64, "count": 3, "window": "1h"},
        {"family": 6, "prefix": 48, "member_prefix": 64, "count": 4, "window": "1h"},
    ]
    settings = Config.model_validate(
        {"protect": {"allowlist": []}, "escalation": {"levels": levels}}
    )
    async with running(tmp_path, settings) as (broker, backend, _clock, store):
        for n in (1, 2, 3):
            await block(broker, v6(n))  # 2001:db8:77::/64, the /48's first /64
        assert texts(backend) == {NET6}
        for subnet in (1, 2, 3):
            await block(broker, f"2001:db8:77:{subnet}::1")
        assert texts(backend) == {"2001:db8:77::/48"}
        assert NET6 not in active(store)
