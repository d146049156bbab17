"""Load: many concurrent clients for a fixed time on the daemon's listeners; errors, rate, memory.

Runs the real daemon as root in a network namespace it creates (and deletes),
with the nftables backend, the Unix socket and the TCP listener (plain TCP on
loopback, a bearer token). Each client holds one connection and sends, one
after the other until the time is up or its request budget is spent, a mix of:

    block (40 %)    addresses from the client's own pool of 2001:db8::/32
                    documentation addresses: new blocks first, then reports on
                    blocks it already made (recorded as hits)
    show (15 %), list limit=50 (15 %), status (15 %), ping (15 %)

Half of the clients use the Unix socket, half TCP (`--tcp-share`). Every
reply must be "ok": the script exits 1 on any error. It prints requests/s,
latency percentiles per op, the daemon's CPU time, and its RSS at ready,
every 10 s, at the end and after a settle. Quotas are off (a quota refusal
would count as an error; quotas have their own tests).

    .venv/bin/python bench/load.py                       # 50 clients, 60 s
    .venv/bin/python bench/load.py --clients 10 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from imr.server.access import hash_token

from netns import Netns, create_netns

IMR = str(Path(sys.executable).parent / "imr")
TCP_PORT = 7700
TOKEN = "imr_load-benchmark-token-0123456789abcdef01234567"  # noqa: S105 - a bench token
MIX = [("block", 40), ("show", 15), ("list", 15), ("status", 15), ("ping", 15)]


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    by_listener: Counter[str] = field(default_factory=Counter)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pool(client: int, size: int) -> list[str]:
    return [f"2001:db8:10ad:{client:x}::{n:x}" for n in range(1, size + 1)]


async def client(
    index: int,
    listener: str,
    socket_path: Path,
    deadline: float,
    budget: int,
    pool_size: int,
    stats: Stats,
) -> None:
    rng = random.Random(index)
    ops = [op for op, weight in MIX for _ in range(weight)]
    addresses = pool(index, pool_size)
    blocks = itertools.cycle(addresses)
    if listener == "unix":
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", TCP_PORT)
        writer.write(f"auth {TOKEN}\n".encode())
        if not (await reader.readline()).startswith(b"ok authenticated"):
            stats.errors["auth"] += 1
            return
    try:
        for _ in range(budget):
            if time.monotonic() >= deadline:
                break
            op = rng.choice(ops)
            request: dict[str, object] = {"v": 1, "op": op}
            if op == "block":
                request |= {"ip": next(blocks), "reason": "load", "source": "bench:load"}
            elif op == "show":
                request["ip"] = rng.choice(addresses)
            elif op == "list":
                request["limit"] = 50
            started = time.perf_counter()
            writer.write(json.dumps(request).encode() + b"\n")
            line = await reader.readline()
            elapsed = time.perf_counter() - started
            if not line:
                stats.errors["connection closed"] += 1
                return
            reply = json.loads(line)
            if not reply["ok"]:
                stats.errors[f"{op}: {reply['error']['code']}"] += 1
                continue
            stats.latencies[op].append(elapsed)
            stats.by_listener[listener] += 1
            if op == "block":
                stats.actions[reply["result"]["action"]] += 1
    finally:
        writer.close()


async def watch_memory(pid: int, deadline: float, samples: list[tuple[float, int]]) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
        samples.append((time.monotonic() - started, rss_kb(pid)))


async def run_load(args: argparse.Namespace, socket_path: Path, pid: int) -> tuple[Stats, float]:
    stats = Stats()
    deadline = time.monotonic() + args.seconds
    tcp_clients = round(args.clients * args.tcp_share)
    listeners = ["tcp"] * tcp_clients + ["unix"] * (args.clients - tcp_clients)
    started = time.perf_counter()
    samples: list[tuple[float, int]] = []
    memory = asyncio.create_task(watch_memory(pid, deadline, samples))
    await asyncio.gather(
        *(
            client(i, listener, socket_path, deadline, args.requests, args.pool, stats)
            for i, listener in enumerate(listeners)
        )
    )
    elapsed = time.perf_counter() - started
    memory.cancel()
    args.samples = samples
    return stats, elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--requests", type=int, default=4000, help="budget per client")
    parser.add_argument("--pool", type=int, default=200, help="distinct addresses per client")
    parser.add_argument("--tcp-share", type=float, default=0.5, help="share of clients on TCP")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds before the last RSS")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon changes the firewall of a namespace it creates")

    work = Path(tempfile.mkdtemp(prefix="imrload-"))
    config = work / "imr.toml"
    config.write_text(
        f'[server]\nsocket = "{work}/imr.sock"\npid_file = "{work}/imr.pid"\n'
        f'log_file = "{work}/imr.log"\nmax_connections = {args.clients + 16}\n'
        f'[server.tcp]\nenabled = true\nlisten = "127.0.0.1"\nport = {TCP_PORT}\n'
        f'[state]\npath = "{work}/state.db"\n'
        '[firewall]\nbackend = "nftables"\nports = [80, 443]\n'
        "[quota]\nblocks_per_minute = 0\nactive_per_client = 0\nactive_global = 0\n"
        f'[access.tokens.load]\nsha256 = "{hash_token(TOKEN)}"\nrole = ["block", "read"]\n'
    )
    imr = [IMR, "--config", str(config)]
    ns: Netns | None = None
    try:
        ns = create_netns("imrload")
        ns.run(*imr, "server", "start", timeout=60)
        pid = int((work / "imr.pid").read_text())
        rss_ready = rss_kb(pid)
        cpu_start = cpu_seconds(pid)
        with ns.entered():  # the TCP client sockets live in the daemon's namespace
            stats, elapsed = asyncio.run(run_load(args, work / "imr.sock", pid))
        rss_end = rss_kb(pid)
        daemon_cpu = cpu_seconds(pid) - cpu_start
        time.sleep(args.settle)
        rss_settled = rss_kb(pid)
        status = json.loads(
            subprocess.run(
                [*imr, "server", "status", "--json"], capture_output=True, text=True, check=True
            ).stdout
        )
    finally:
        subprocess.run([*imr, "server", "stop"], capture_output=True, check=False)
        if ns is not None:
            ns.delete()
        shutil.rmtree(work, ignore_errors=True)

    total = sum(len(v) for v in stats.latencies.values())
    every = [x for v in stats.latencies.values() for x in v]
    print(
        f"{args.clients} clients ({', '.join(f'{n} {k}' for k, n in sorted(_count(args)))}),"
        f" {elapsed:.1f} s, budget {args.requests} requests per client;"
        f" backend {status['backend']}; {status['active_blocks']:,} active blocks at the end\n"
    )
    print("| measure | value |\n| --- | --- |")
    print(f"| requests answered ok | {total:,} ({total / elapsed:,.0f} requests/s) |")
    print(f"| errors | {sum(stats.errors.values())} {dict(stats.errors) or ''} |")
    by = ", ".join(f"{k} {n:,}" for k, n in sorted(stats.by_listener.items()))
    print(f"| by listener | {by} |")
    acts = ", ".join(f"{k} {n:,}" for k, n in sorted(stats.actions.items()))
    print(f"| block outcomes | {acts} |")
    print(
        f"| latency p50 / p95 / p99 / max, all ops | {percentile(every, 0.5):.1f} /"
        f" {percentile(every, 0.95):.1f} / {percentile(every, 0.99):.1f} /"
        f" {max(every) * 1000:.0f} ms |"
    )
    for op, _ in MIX:
        values = stats.latencies[op]
        if values:
            print(
                f"| {op} p50 / p99 ({len(values):,}) | {statistics.median(values) * 1000:.1f} /"
                f" {percentile(values, 0.99):.1f} ms |"
            )
    series = ", ".join(f"{t:.0f} s {kb / 1024:.1f}" for t, kb in args.samples)
    print(
        f"| daemon RSS: ready / end / after {args.settle:.0f} s settle | {rss_ready / 1024:.1f} /"
        f" {rss_end / 1024:.1f} / {rss_settled / 1024:.1f} MB |"
    )
    print(f"| daemon RSS during the run (MB) | {series} |")
    share = daemon_cpu / elapsed
    print(f"| daemon CPU during the run | {daemon_cpu:.1f} s ({share:.0%} of one CPU) |")
    if stats.errors:
        sys.exit(1)


def _count(args: argparse.Namespace) -> list[tuple[str, int]]:
    tcp = round(args.clients * args.tcp_share)
    return [("TCP", tcp), ("Unix", args.clients - tcp)]


if __name__ == "__main__":
    main()
