"""Drift: imr notices when someone changes its kernel objects behind its back, and repairs them.

The broker part runs with the recording backend; the daemon part runs the real
daemon (drift_interval = 1 s) in namespaces while a foreign command flushes
imr's set or chain or removes its jump, and checks that the kernel is repaired
within the interval, that a blocked peer is refused again, and that the log
says what was found and done. The backends' own check() and repair are in the
shared conformance suite (tests/backend_conformance.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from pathlib import Path

import pytest
from test_broker import block, running

from imr.backends.base import Drift, Expected, expected_counts, slot_of_text
from imr.config import Config

from daemon_harness import (
    ATTACKER_V4,
    BLOCKER,
    SERVER_V4,
    Daemon,
    daemon_world,
)
from fakes import ROOT, RecordingBackend

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

INTERVAL = 1  # seconds, in the daemon tests' config
REPAIR_WAIT = 6.0  # seconds: several intervals, so a slow CI machine still makes it


# ---------------------------------------------------------------------------
# Pure parts


def test_expected_counts_tolerate_blocks_about_to_expire() -> None:
    now = 1000.0
    entries = [
        (slot_of_text("192.0.2.7"), now + 3600),
        (slot_of_text("192.0.2.8"), now + 2),  # a kernel timeout may take it any moment
        (slot_of_text("192.0.2.9"), now - 1),  # overdue, the broker lifts it shortly
        (slot_of_text("2001:db8::7"), now + 3600),
        (slot_of_text("203.0.113.0/24"), now + 3600),
        (slot_of_text("2001:db8:5::/48"), now + 3600),
    ]
    expected = expected_counts(entries, now)
    assert expected == {
        "v4": Expected(1, 3),
        "v6": Expected(1, 1),
        "net4": Expected(1, 1),
        "net6": Expected(1, 1),
    }
    assert 2 in expected["v4"] and 0 not in expected["v4"] and 4 not in expected["v4"]
    assert str(expected["v4"]) == "1 to 3" and str(expected["v6"]) == "1"


def test_drift_describes_itself() -> None:
    assert not Drift().found and Drift().describe() == "no drift"
    drift = Drift(("chain IMR is missing",), ("chain IMR holds 0 rules, expected 3",))
    assert drift.found
    assert drift.describe() == "chain IMR is missing; chain IMR holds 0 rules, expected 3"


# ---------------------------------------------------------------------------
# The broker with the recording backend


def repairs(broker: object, kind: str) -> float:
    registry = broker.metrics.registry  # type: ignore[attr-defined]
    return registry.get_sample_value("imr_drift_repairs_total", {"kind": kind}) or 0.0


async def test_lost_entries_are_restored_from_the_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imr.broker")
    async with running(tmp_path) as (broker, backend, _, _s):
        for address in ("203.0.113.7", "203.0.113.8", "2001:db8:2::7"):
            await block(broker, address)
        await block(broker, "203.0.113.128/25", peer=ROOT)
        before = dict(backend.kernel)
        prepared = backend.prepared

        assert not (await broker.check_drift()).found  # all well: nothing is touched
        assert backend.prepared == prepared

        backend.kernel.clear()  # someone flushed imr's objects
        drift = await broker.check_drift()
        assert drift.entries and not drift.structure
        assert backend.kernel == before
        assert backend.prepared == prepared  # the structure was fine
        assert repairs(broker, "entries") == 1 and repairs(broker, "structure") == 0
        assert not (await broker.check_drift()).found
    messages = [r.getMessage() for r in caplog.records if r.name == "imr.broker"]
    assert any(m.startswith("drift in recording: recording v4 holds 0 entries") for m in messages)
    assert "drift repaired: restored 4 blocks from the state" in messages


async def test_a_missing_hook_is_put_back_without_touching_entries(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, _, _s):
        await block(broker, "203.0.113.7")
        applies = len(backend.applies)
        prepared = backend.prepared
        backend.unhooked = True
        drift = await broker.check_drift()
        assert drift.structure and not drift.entries
        assert backend.prepared == prepared + 1 and not backend.unhooked
        assert len(backend.applies) == applies
        assert repairs(broker, "structure") == 1 and repairs(broker, "entries") == 0


async def test_a_block_the_kernel_timed_out_a_moment_early_is_no_drift(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, clock, _s):
        await block(broker, "203.0.113.7")
        await block(broker, "203.0.113.8")
        clock.advance(86400 - 2)  # both due in 2 s; a set backend's kernel timeout
        del backend.kernel[ipaddress.ip_address("203.0.113.7")]  # lifted one already
        assert not (await broker.check_drift()).found


async def test_the_drift_loop_runs_on_its_own(tmp_path: Path) -> None:
    config = Config.model_validate({"firewall": {"drift_interval": "1s"}})
    backend = RecordingBackend()
    async with running(tmp_path, config, backend) as (broker, _, _c, _s):
        await block(broker, "203.0.113.7")
        backend.kernel.clear()
        for _ in range(40):  # bounded: 4 s
            if backend.kernel:
                break
            await asyncio.sleep(0.1)
        assert set(backend.kernel) == {ipaddress.ip_address("203.0.113.7")}


async def test_the_drift_check_can_be_turned_off(tmp_path: Path) -> None:
    config = Config.model_validate({"firewall": {"drift_check": False, "drift_interval": "1s"}})
    backend = RecordingBackend()
    async with running(tmp_path, config, backend) as (broker, _, _c, _s):
        await block(broker, "203.0.113.7")
        backend.kernel.clear()
        await asyncio.sleep(1.5)
        assert backend.checks == 0 and backend.kernel == {}


async def test_drift_checks_never_run_beside_a_batch(tmp_path: Path) -> None:
    """Many blocks arriving while the check runs: it must never see a half-published batch
    (it would "repair" from a stale index and drop fresh blocks)."""
    async with running(tmp_path) as (broker, backend, _, _s):
        requests = [block(broker, f"203.0.113.{n}", peer=ROOT) for n in range(2, 120)]
        checks = [broker.check_drift() for _ in range(30)]
        results = await asyncio.gather(*requests, *checks)
        drifts = [r for r in results if isinstance(r, Drift)]
        assert len(drifts) == 30 and not any(d.found for d in drifts)
        assert len(backend.kernel) == 118


# ---------------------------------------------------------------------------
# The real daemon

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


def start(world: Daemon, backend: str) -> None:
    """The harness's config with another backend and a 1 s drift interval."""
    world.ports = (80,)
    world.write_config()
    text = world.config_file.read_text()
    text = text.replace(
        'backend = "iptables"', f'backend = "{backend}"\ndrift_interval = "{INTERVAL}s"'
    )
    world.config_file.write_text(text)
    result = world.start()
    assert result.returncode == 0, result.stderr


def kernel_state(world: Daemon, backend: str) -> str:
    """imr's IPv4 rules, or the elements of its IPv4 set (without running timers)."""
    if backend != "nftables":
        return world.rules(4)
    result = world.server.run("nft", "-j", "list", "set", "inet", "imr", "blocked_v4", check=False)
    if result.returncode != 0:
        return "no set"
    (item,) = [i for i in json.loads(result.stdout)["nftables"] if "set" in i]
    values = [e["elem"]["val"] if isinstance(e, dict) else e for e in item["set"].get("elem", [])]
    return " ".join(sorted(values))


def log_text(world: Daemon) -> str:
    return world.log_file.read_text() if world.log_file.exists() else ""


# (backend, foreign command breaking imr's state, what the log must say was found)
DAMAGE = [
    # A stray: an entry the state does not hold (issue #12: left by a refused request).
    (
        "nftables",
        ["nft", "add", "element", "inet", "imr", "blocked_v4", "{ 203.0.113.99 }"],
        "set inet imr blocked_v4 holds 2 addresses, expected 1",
    ),
    ("ipset", ["ipset", "add", "imr4", "203.0.113.99"], "ipset imr4 holds 2 entries, expected 1"),
    (
        "iptables",
        ["iptables-nft", "-A", "IMR", "-s", "203.0.113.99", "-j", "REJECT"],
        "chain IMR (iptables-nft) holds 2 rules, expected 1",
    ),
    (
        "nftables",
        ["nft", "flush", "set", "inet", "imr", "blocked_v4"],
        "set inet imr blocked_v4 lost its marker element 255.255.255.255",
    ),
    ("nftables", ["nft", "delete", "table", "inet", "imr"], "table inet imr is missing"),
    ("nftables", ["nft", "flush", "chain", "inet", "imr", "input"], "holds 0 rules, expected 4"),
    ("iptables", ["iptables-nft", "-F", "IMR"], "chain IMR (iptables-nft) holds 0 rules"),
    (
        "iptables",
        ["iptables-nft", "-D", "INPUT", "-j", "IMR"],
        "the jump from INPUT to IMR is missing (iptables-nft)",
    ),
    ("ipset", ["ipset", "flush", "imr4"], "ipset imr4 holds 0 entries, expected 1"),
    (
        "ipset",
        ["iptables-nft", "-D", "INPUT", "-j", "IMR"],
        "the jump from INPUT to IMR is missing (iptables-nft)",
    ),
]


@needs_root
@pytest.mark.parametrize(
    ("backend", "damage", "found"),
    DAMAGE,
    ids=[f"{backend}:{' '.join(damage[1:4])}" for backend, damage, _ in DAMAGE],
)
def test_daemon_repairs_foreign_damage_within_the_interval(
    test_users: None, backend: str, damage: list[str], found: str
) -> None:
    with daemon_world() as world:
        start(world, backend)
        world.listen(80)
        result = world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "drift test")
        assert result.returncode == 0, result.stderr
        assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
        kernel_before = kernel_state(world, backend)

        # No check that the damage took effect before the repair: with a 1 s interval the
        # repair may come first. The log line naming what was found proves it.
        world.server.run(*damage)

        def repaired() -> bool:
            now = kernel_state(world, backend)
            return now == kernel_before and "drift repaired" in log_text(world)

        assert world.wait_for(repaired, REPAIR_WAIT), log_text(world)[-2000:]
        assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
        log = log_text(world)
        assert f"drift in {backend}: " in log and found in log, log[-2000:]
        # The state file is the source of the repair and is not changed by it.
        assert world.state_rows("SELECT ip, lifted_at FROM blocks") == [(ATTACKER_V4, None)]


@needs_root
def test_an_ipset_block_recreates_a_destroyed_set_on_its_way(test_users: None) -> None:
    """A small batch commits on the event loop with ipset (imr/server/commit_place.py); a set
    destroyed by hand is recreated by the block itself there, as in the writer thread, and
    the block is acknowledged only once its entry is in the kernel and the rule is back."""
    with daemon_world() as world:
        start(world, "ipset")
        text = world.config_file.read_text()  # no drift check to race the block's own repair
        world.config_file.write_text(text.replace(f'"{INTERVAL}s"', '"1h"'))
        world.stop()
        assert world.start().returncode == 0
        world.listen(80)
        # A set in use by a rule cannot be destroyed: flush imr's chain first.
        world.server.run("iptables-nft", "-F", "IMR")
        world.server.run("ipset", "destroy", "imr4")
        result = world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "repair test")
        assert result.returncode == 0, result.stderr
        assert ATTACKER_V4 in world.server.run("ipset", "list", "imr4").stdout
        assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
        assert "sets imr4/imr6/imrnet4/imrnet6 are missing; creating them again" in log_text(world)
