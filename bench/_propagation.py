"""Acknowledgement on one host to kernel entry on the others, for bench/fleet.py and
bench/crowdsec_peer.py. Not a benchmark itself.

One clock for everything: CLOCK_MONOTONIC, which every process on the machine shares. The
client stamps the moment it heard a block's acknowledgement (imr: the reply on the origin
member's socket; CrowdSec: `cscli decisions add` returned); a watcher per namespace
(bench/_nft_watch.py, `nft monitor elements`) stamps the moment the element appeared in
that namespace's nftables set. The difference is what an attacker sees: how long after
the decision another host still lets it in.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import percentile

WATCH = str(Path(__file__).resolve().parent / "_nft_watch.py")


class Watcher:
    """`nft monitor` in a namespace, stamping each element's first appearance."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.cpu = 0.0  # seconds of CPU it used, known after stop()
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, WATCH],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"nft monitor did not start in {ns}")

    def stop(self) -> dict[str, float]:
        """The addresses seen, with their monotonic time; raises if nft gave up early."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        found = json.loads(out.strip().splitlines()[-1])
        if found["error"]:
            raise RuntimeError(f"nft monitor in {self.ns} stopped: {found['error']}")
        self.cpu = float(found["cpu"])
        seen: dict[str, float] = found["seen"]
        return seen

    def kill(self) -> None:
        """Stop it whatever happened (SIGTERM first: it then stops its nft itself)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Sent:
    """What the client did: per address, its origin (an index) and acknowledgement time."""

    acks: dict[str, tuple[int, float]] = field(default_factory=dict)
    starts: dict[str, tuple[int, float]] = field(default_factory=dict)  # request sent
    seconds: float = 0.0  # first request sent to last acknowledgement

    def rate(self) -> float:
        return len(self.acks) / self.seconds if self.seconds else 0.0


def paced_blocks(
    sockets: Sequence[Path], ips: Sequence[str], offsets: Sequence[float], connections: int = 4
) -> Sent:
    """Block ips[n] on member n % len(sockets) at `offsets[n]` seconds after the start
    (open loop: a request whose time has come waits only for a free connection of its
    member, never for the acknowledgements of others). Every reply must be ok."""
    sent = Sent()

    async def worker(member: int, queue: asyncio.Queue[str | None]) -> None:
        reader, writer = await asyncio.open_unix_connection(str(sockets[member]))
        try:
            while (ip := await queue.get()) is not None:
                sent.starts[ip] = (member, time.monotonic())
                writer.write(b'{"v":1,"op":"block","ip":"' + ip.encode() + b'"}\n')
                reply = await reader.readline()
                sent.acks[ip] = (member, time.monotonic())
                if b'"ok":true' not in reply:
                    raise RuntimeError(f"block {ip} failed: {reply[:200]!r}")
        finally:
            writer.close()

    async def main() -> None:
        queues: list[asyncio.Queue[str | None]] = [asyncio.Queue() for _ in sockets]
        workers = [
            asyncio.create_task(worker(m, q))
            for m, q in enumerate(queues)
            for _ in range(connections)
        ]
        await asyncio.sleep(0.2)  # connected
        t0 = time.monotonic()
        for n, (ip, offset) in enumerate(zip(ips, offsets, strict=True)):
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            queues[n % len(sockets)].put_nowait(ip)
        for queue in queues:
            for _ in range(connections):
                queue.put_nowait(None)
        await asyncio.gather(*workers)
        sent.seconds = max(t for _, t in sent.acks.values()) - t0

    asyncio.run(main())
    return sent


@dataclass
class Spread:
    """Acknowledgement-to-kernel times over every (address, receiving host) pair, in ms."""

    latencies: list[float]
    missing: int

    def text(self) -> str:
        if not self.latencies:
            return f"none arrived ({self.missing} missing)"
        p50, p99 = (percentile(self.latencies, q) for q in (0.5, 0.99))
        text = f"{p50:.1f} / {p99:.1f} / {max(self.latencies):.1f}"
        return text + (f" ({self.missing} missing)" if self.missing else "")

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction)


def spread(acks: dict[str, tuple[int, float]], seen: Sequence[dict[str, float]]) -> Spread:
    """`seen[j]` is host j's watcher result; an address's origin (its index) is skipped,
    every other host must hold it. With origin -1 (CrowdSec: the decision is made on the
    LAPI, no host of `seen`) every host counts."""
    latencies: list[float] = []
    missing = 0
    for ip, (origin, acked) in acks.items():
        for host, found in enumerate(seen):
            if host == origin:
                continue
            if ip in found:
                latencies.append((found[ip] - acked) * 1000)
            else:
                missing += 1
    return Spread(latencies, missing)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
