"""Where the writer commits a batch: on the event loop, or in the writer thread.

Handing a batch to the writer thread and its outcome back costs ~140 µs of CPU and
~0.15 ms of latency on this project's VM (thread wake-ups, the executor's and asyncio's
futures, the loop's self-pipe; bench/one_address.py, docs/performance.md "Speed round
two"), more than the Python work of a one-change batch. So a small batch is committed
on the loop itself when that is safe and short:

- the writer thread is idle: nothing queued or running there (a `show`, an export page,
  the drift check, hit pruning), and only the loop queues work for it, so nothing can
  start there while the loop commits: the Store and the Backend are never used by two
  threads at once;
- the batch is small (SMALL_BATCH): its Python work holds the GIL either way;
- the backend's change is one quick netlink exchange (ON_LOOP_BACKENDS): nftables (one
  kernel transaction, ~0.1 ms) and ipset (one message a set, a one-entry apply ~45 µs of
  CPU in a namespace, no daemon: docs/performance.md "ipset, round three"); per-address
  iptables changes take milliseconds (a process, or a chain rewritten). A repair (a
  missing table or set rebuilt) can take tens of ms even so: it is rare, and repeated
  slowness is caught below. And not in fleet mode, where the publisher's own connection
  also writes the state file (the loop must never wait for its lock);
- the last commits on the loop were quick: SLOW_IN_A_ROW of them that took SLOW seconds or
  more each (a slow disk's fsync) send the batches to the thread for HOLD seconds, so the
  loop, which also answers `status`, `list` and `ping` and reads every client, does not
  wait for the disk. (In a row: on a busy machine any one commit may be preempted.)

Otherwise the batch goes to the thread as before. Either way the outcome is the same:
the reply waits for the commit (fsync) and the kernel change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any, TypeVar

SMALL_BATCH = 64
ON_LOOP_BACKENDS = frozenset({"nftables", "ipset"})
SLOW = 0.02  # seconds; a batch of 50 new blocks takes ~1-2 ms here, fsync included
SLOW_IN_A_ROW = 3
HOLD = 10.0  # seconds in the thread after slow commits on the loop

T = TypeVar("T")


class CommitPlace:
    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor, on_loop: bool) -> None:
        self._executor = executor
        self.on_loop = on_loop  # the backend allows it (ON_LOOP_BACKENDS)
        self._jobs: set[concurrent.futures.Future[Any]] = set()  # queued or running there
        self._thread_until = 0.0
        self._slow = 0  # slow commits on the loop in a row

    async def in_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function` in the writer thread (every use of it goes through here)."""
        job = self._executor.submit(function, *args)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)  # in the thread, once it has finished
        return await asyncio.wrap_future(job)

    async def commit(self, function: Callable[[list[Any]], T], batch: list[Any]) -> T:
        """Commit `batch` with `function`, on the loop if that is safe and short (above)."""
        if (
            self.on_loop
            and len(batch) <= SMALL_BATCH
            and not self._jobs
            and time.monotonic() >= self._thread_until
        ):
            started = time.monotonic()
            try:
                return function(batch)
            finally:
                self._slow = self._slow + 1 if time.monotonic() - started >= SLOW else 0
                if self._slow >= SLOW_IN_A_ROW:
                    self._slow, self._thread_until = 0, time.monotonic() + HOLD
        return await self.in_thread(function, batch)
