"""The Unix socket's fast lane and the broker in one process: no socket, no kernel.

What one `block` request costs the daemon's Python on the per-request path (parse,
admission, queue, the writer's per-change work, the reply), without the recv/send of a
socket or the nftables transaction: 50 clients, each a FastConnection fed its next line
when its reply is written (a fake transport), over a real state file (SQLite, WAL, fsync)
and a backend that does nothing. Prints the CPU (user and system, from getrusage) a
request. Run it under callgrind for a count of instructions a request that the load of
a shared machine does not move (docs/performance.md, "Speed round two, per request"):

    .venv/bin/python bench/lane_inproc.py --count 20000 --form json
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/lane_inproc.py --count 3000      # minus --count 1000

The commit place's "slow disk" switch is off (under valgrind every commit is slow).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import imr.server.commit_place as commit_place
from imr.backends.base import KernelBlock
from imr.config import Config, Role
from imr.core.addresses import Target
from imr.core.clock import SystemClock
from imr.server.access import Peer
from imr.server.broker import Broker, BrokerError
from imr.server.fast_lane import FastConnection
from imr.store import Store

from fakes import FixedAddresses, RecordingBackend

ROOT = Peer(0, 0, 4242, "root", frozenset({Role.ADMIN, Role.BLOCK, Role.READ}))


class NullBackend(RecordingBackend):
    """Commits on the event loop as nftables does (commit_place.ON_LOOP_BACKENDS)."""

    name = "nftables"

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        pass


class Client(asyncio.Transport):
    """A connection's other end: each reply written sends the client's next line."""

    def __init__(self, lines: list[bytes], finished: asyncio.Future[None], left: list[int]):
        super().__init__()
        self.lines, self.finished, self.left = lines, finished, left
        self.connection: FastConnection | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.lines and self.connection is not None:
            asyncio.get_running_loop().call_soon(self.connection.data_received, self.lines.pop())
            return
        self.left[0] -= 1
        if not self.left[0]:
            self.finished.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def lines_of(client: int, count: int, form: str) -> list[bytes]:
    """The client's requests, last first (popped from the end)."""
    lines = []
    for i in range(count):
        ip = str(ipaddress.IPv6Address(0x20010DB8 << 96 | client << 32 | i + 1)).encode()
        json_line = b'{"v":1,"op":"block","ip":"' + ip + b'"}\n'
        lines.append(json_line if form == "json" else b"block " + ip + b"\n")
    return lines[::-1]


async def run(count: int, form: str, clients: int, work: Path) -> None:
    loop = asyncio.get_running_loop()
    config = Config.model_validate(
        {"escalation": {"enabled": False}, "firewall": {"drift_check": False}}
    )
    store = Store(work / "state.db")
    broker = Broker(config, store, NullBackend(), SystemClock(), FixedAddresses("192.0.2.1"))
    broker.reconcile()
    await broker.start()
    gc.freeze()  # as the daemon does (imr/server/daemon.py)
    gc.set_threshold(50_000, 20, 20)
    finished: asyncio.Future[None] = loop.create_future()
    left, each = [clients], count // clients
    ends: list[Client] = []
    for client in range(clients):
        end = Client(lines_of(client, each, form), finished, left)
        settings = (65536, 3600.0, broker.submit_block, BrokerError)
        connection = FastConnection(asyncio.StreamReader(), None, settings, loop)  # type: ignore[arg-type]
        connection.connection_made(end)
        connection.run(ROOT, loop.time() + 3600)
        end.connection = connection
        ends.append(end)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for end in ends:
        if end.connection is not None:
            end.connection.data_received(end.lines.pop())
    await finished
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    done = each * clients
    user = (after.ru_utime - before.ru_utime) / done * 1e6
    system = (after.ru_stime - before.ru_stime) / done * 1e6
    print(
        f"lane_inproc {form}: {done:,} requests, {clients} clients: user {user:.1f} µs"
        f" + system {system:.1f} µs a request, {done / seconds:,.0f}/s"
    )
    await broker.stop()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--form", choices=["json", "text"], default="json")
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    commit_place.SLOW = float("inf")  # never to the thread: callgrind makes every commit slow
    with tempfile.TemporaryDirectory(prefix="imr-lane-") as work:
        asyncio.run(run(args.count, args.form, args.clients, Path(work)))


if __name__ == "__main__":
    main()
