"""Where a batch is committed (imr/server/commit_place.py): never beside work in the thread."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imr.server import commit_place
from imr.server.commit_place import CommitPlace

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
