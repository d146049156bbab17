"""Where a batch is committed (imr/server/commit_place.py): never beside work in the thread."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imr.backends.base import KernelBlock
from imr.config import Config
from imr.core.addresses import Target
from imr.protocol import BlockRequest
from imr.server import commit_place
from imr.server.broker import Broker
from imr.server.commit_place import CommitPlace
from imr.store import Store

from fakes import WEB, FakeClock, FixedAddresses, RecordingBackend

pytestmark = pytest.mark.anyio


def where(batch: list[int]) -> str:
    return threading.current_thread().name


async def test_a_small_batch_commits_on_the_loop_when_the_thread_is_idle() -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="writer") as executor:
        place = CommitPlace(executor, on_loop=True)
        assert await place.commit(where, [1]) == threading.current_thread().name
        assert (await place.commit(where, list(range(65)))).startswith("writer")  # not small
        assert (await CommitPlace(executor, False).commit(where, [1])).startswith("writer")


async def test_never_on_the_loop_while_the_thread_has_work() -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="writer") as executor:
        place = CommitPlace(executor, on_loop=True)
        release = threading.Event()
        running = asyncio.ensure_future(place.in_thread(release.wait, 5))
        await asyncio.sleep(0.05)  # the job runs in the thread
        committing = asyncio.ensure_future(place.commit(where, [1]))
        await asyncio.sleep(0.05)
        assert not committing.done()  # queued behind the job, in the thread
        release.set()
        assert await running
        assert (await committing).startswith("writer")
        assert await place.commit(where, [1]) == threading.current_thread().name  # idle again


async def test_slow_commits_on_the_loop_send_the_next_ones_to_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commit_place, "SLOW", 0.01)

    def slow(batch: list[int]) -> str:
        time.sleep(0.02)  # a slow disk's fsync
        return where(batch)

    with ThreadPoolExecutor(1, thread_name_prefix="writer") as executor:
        place = CommitPlace(executor, on_loop=True)
        for _ in range(commit_place.SLOW_IN_A_ROW - 1):
            assert await place.commit(slow, [1]) == threading.current_thread().name
        assert await place.commit(where, [1]) == threading.current_thread().name  # quick: reset
        for _ in range(commit_place.SLOW_IN_A_ROW):
            assert await place.commit(slow, [1]) == threading.current_thread().name
        assert (await place.commit(where, [1])).startswith("writer")


class NamedBackend(RecordingBackend):
    """A recording backend under a real backend's name, noting the thread of each apply."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.threads: list[str] = []

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        self.threads.append(threading.current_thread().name)
        super().apply(add, remove)


@pytest.mark.parametrize(
    ("backend_name", "on_loop"), [("nftables", True), ("ipset", True), ("iptables", False)]
)
async def test_the_broker_commits_on_the_loop_only_with_a_quick_backend(
    tmp_path: Path, backend_name: str, on_loop: bool
) -> None:
    """nftables and ipset change the kernel in one netlink exchange (~0.1 ms); per-address
    iptables rules take milliseconds, so their batches stay in the writer thread."""
    backend = NamedBackend(backend_name)
    store = Store(tmp_path / "state.db")
    config = Config.model_validate({"escalation": {"enabled": False}})
    broker = Broker(config, store, backend, FakeClock(), FixedAddresses("192.0.2.1"))
    broker.reconcile()
    await broker.start()
    try:
        result = await broker.handle(BlockRequest(op="block", ip="203.0.113.7"), WEB)
        assert result["action"] == "block"
    finally:
        await broker.stop()
        store.close()
    loop_thread = threading.current_thread().name
    assert backend.threads[-1] == loop_thread if on_loop else backend.threads[-1] != loop_thread
    assert list(backend.kernel) == [ipaddress.ip_address("203.0.113.7")]
