"""Wall-clock steps: the daemon and the kernel agree again after any step.

The daemon's expiries are wall-clock times; a set backend's timeouts count down on the
kernel's own clock. After a step back the kernel would lift a block early, by the step, and
reports would be answered "already blocked" while the attacker goes free. Two mechanisms
close that: a report of an address the daemon holds blocked re-arms its kernel entry, and
the expiry loop notices a step (wall minus monotonic time jumps) and writes every timeout
again. The broker parts run on a fake wall clock, a fake monotonic clock and a fake backend
whose entries time out on the monotonic one; the last test uses the real daemon and nftables.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from test_broker import block

from imr.backends.base import KernelBlock
from imr.config import Config
from imr.core.addresses import Target
from imr.server.broker import Broker
from imr.store import Store

from daemon_harness import ATTACKER_V4, BLOCKER, Daemon, daemon_world
from fakes import FakeClock, FixedAddresses, RecordingBackend

pytestmark = pytest.mark.anyio

HOUR, DAY = 3600, 86400
ATTACKER = "203.0.113.7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TimedBackend(RecordingBackend):
    """A set backend: each entry gets a timeout (its expiry as the wall clock counts it now)
    that runs down on the kernel's clock, which wall-clock steps do not move."""

    def __init__(self, wall: FakeClock, kernel_clock: FakeClock) -> None:
        super().__init__()
        self.wall, self.kernel_clock = wall, kernel_clock
        self.deadlines: dict[Target, float] = {}
        self.rewrites = 0

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        super().apply(add, remove)
        for target in remove:
            self.deadlines.pop(target, None)
        for entry in add:
            self._arm(entry)

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        super().replace_all(blocks)
        self.rewrites += 1
        self.deadlines = {}
        for entry in blocks:
            self._arm(entry)

    def _arm(self, entry: KernelBlock) -> None:
        timeout = entry.expires_at - self.wall.now()
        if timeout > 0:
            self.deadlines[entry.address] = self.kernel_clock.now() + timeout

    def live(self) -> set[str]:
        now = self.kernel_clock.now()
        return {str(a) for a, deadline in self.deadlines.items() if deadline > now}


@asynccontextmanager
async def stepping(
    tmp_path: Path,
) -> AsyncIterator[tuple[Broker, TimedBackend, FakeClock, FakeClock]]:
    wall, monotonic = FakeClock(), FakeClock(1000.0)
    backend = TimedBackend(wall, monotonic)
    store = Store(tmp_path / "state.db")
    broker = Broker(
        Config.model_validate({"firewall": {"drift_check": False}}),
        store,
        backend,
        wall,
        FixedAddresses("192.0.2.1"),
        monotonic=monotonic.now,
    )
    broker.reconcile()
    await broker.start()
    try:
        yield broker, backend, wall, monotonic
    finally:
        await broker.stop()
        store.close()


def both(wall: FakeClock, monotonic: FakeClock, seconds: float) -> None:
    """Time passes (both clocks move alike)."""
    wall.advance(seconds)
    monotonic.advance(seconds)


async def test_a_step_back_is_noticed_and_the_kernel_timeouts_are_written_again(
    tmp_path: Path,
) -> None:
    async with stepping(tmp_path) as (broker, backend, wall, monotonic):
        assert await broker.check_clock() is None  # the first look only takes the offset
        await block(broker, ATTACKER)
        wall.advance(-HOUR)  # the step: the daemon now counts 25 hours to go
        assert await broker.check_clock() == -HOUR
        assert backend.rewrites == 2  # start-up's, and the step's
        both(wall, monotonic, DAY - 60)
        await broker.expire_due()
        assert backend.live() == {ATTACKER}  # the kernel's timeout has the hour too
        assert [r.ip for r in broker._active.values()] == [ATTACKER]
        both(wall, monotonic, HOUR + 120)
        await broker.expire_due()
        assert backend.live() == set() and broker._active == {}


async def test_a_step_forward_lifts_in_both_at_once(tmp_path: Path) -> None:
    async with stepping(tmp_path) as (broker, backend, wall, _monotonic):
        assert await broker.check_clock() is None  # the first look only takes the offset
        await block(broker, ATTACKER)
        wall.advance(DAY + 1)
        assert await broker.check_clock() == DAY + 1
        await broker.expire_due()
        assert backend.live() == set() and broker._active == {}


async def test_time_passing_is_no_step(tmp_path: Path) -> None:
    async with stepping(tmp_path) as (broker, backend, wall, monotonic):
        assert await broker.check_clock() is None  # the first look only takes the offset
        await block(broker, ATTACKER)
        both(wall, monotonic, HOUR)
        wall.advance(1.5)  # slewing and timer jitter stay under the threshold
        assert await broker.check_clock() is None
        assert backend.rewrites == 1


async def test_a_report_re_arms_an_entry_the_kernel_lifted_early(tmp_path: Path) -> None:
    async with stepping(tmp_path) as (broker, backend, wall, monotonic):
        await block(broker, ATTACKER)
        monotonic.advance(DAY)  # the kernel's timeout ran out; the daemon sees 1 day to go
        assert backend.live() == set()
        again = await block(broker, ATTACKER, reason="still attacking")
        assert again["action"] == "record"
        assert backend.live() == {ATTACKER}
        assert backend.deadlines[next(iter(backend.deadlines))] == monotonic.now() + DAY
        del wall


# --- the real kernel ---

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


def elements(world: Daemon) -> dict[str, int]:
    """imr's IPv4 set: address -> seconds until the kernel lifts it."""
    result = world.server.run("nft", "-j", "list", "set", "inet", "imr", "blocked_v4")
    (item,) = [i for i in json.loads(result.stdout)["nftables"] if "set" in i]
    found = {}
    for element in item["set"].get("elem", []):
        if isinstance(element, dict):
            found[element["elem"]["val"]] = int(element["elem"].get("expires", 0))
    return found


@needs_root
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_a_report_puts_back_a_block_the_kernel_no_longer_has(
    test_users: None, anyio_backend: str
) -> None:
    with daemon_world() as world:
        world.write_config()
        text = world.config_file.read_text().replace(
            'backend = "iptables"', 'backend = "nftables"\ndrift_check = false'
        )
        world.config_file.write_text(text)
        assert world.start().returncode == 0
        first = world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "scan")
        assert first.returncode == 0, first.stderr
        assert ATTACKER_V4 in elements(world)
        # What a kernel timeout running ahead of the daemon's clock does: the entry goes.
        world.server.run(
            "nft", "delete", "element", "inet", "imr", "blocked_v4", f"{{ {ATTACKER_V4} }}"
        )
        assert ATTACKER_V4 not in elements(world)
        again = world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "still scanning")
        assert again.returncode == 0 and "already blocked" in again.stdout, again.stderr
        left = elements(world).get(ATTACKER_V4)
        assert left is not None and DAY - 120 < left <= DAY, elements(world)
