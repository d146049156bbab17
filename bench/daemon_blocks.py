"""Block latency and throughput through the real daemon, over the Unix socket.

Runs the daemon as root inside a network namespace it creates (and deletes),
with the backend named on the command line, and measures:
  - single-block latency: request to acknowledgement (the kernel entry and the
    state row exist when the reply arrives), one client, sequential;
  - throughput: distinct addresses blocked and acknowledged per second with 1
    and with 50 concurrent clients (each on its own connection);
  - restart to ready with the blocks made above.
Addresses come from 2001:db8::/32 (documentation). Prints a markdown table.

    .venv/bin/python bench/daemon_blocks.py --backend iptables --count 2000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

IMR = str(Path(sys.executable).parent / "imr")


def addresses(start: int) -> Iterator[str]:
    for n in itertools.count(start):
        yield f"2001:db8:{(n >> 32) & 0xFFFF:x}:{(n >> 16) & 0xFFFF:x}::{n & 0xFFFF:x}"


class Connection:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def block(self, ip: str) -> None:
        self.sock.sendall(json.dumps({"v": 1, "op": "block", "ip": ip}).encode() + b"\n")
        reply = json.loads(self.file.readline())
        if not reply["ok"]:
            raise RuntimeError(reply["error"])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="iptables")
    parser.add_argument("--flavour", default="nft", choices=["nft", "legacy"])
    parser.add_argument("--count", type=int, default=2000, help="blocks per measurement")
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon changes the firewall of a namespace it creates")

    ns = f"imrbench-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="imrbench-"))
    config = work / "imr.toml"
    config.write_text(
        f'[server]\nsocket = "{work}/imr.sock"\npid_file = "{work}/imr.pid"\n'
        f'log_file = "{work}/imr.log"\nmax_connections = {args.clients + 8}\n'
        f'[state]\npath = "{work}/state.db"\n'
        f'[firewall]\nbackend = "{args.backend}"\niptables_flavour = "{args.flavour}"\n'
        "ports = [80, 443]\n"
    )
    imr = [IMR, "--config", str(config)]
    run(["ip", "netns", "add", ns])
    rows: list[tuple[str, str]] = []
    try:
        run(["ip", "netns", "exec", ns, *imr, "server", "start"])
        socket_path = work / "imr.sock"
        source = addresses(1)

        # Latency: sequential, one connection.
        conn = Connection(socket_path)
        latencies = []
        for _ in range(args.count):
            ip = next(source)
            t0 = time.perf_counter()
            conn.block(ip)
            latencies.append(time.perf_counter() - t0)
        conn.close()
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        rows.append(("single-block latency p50 / p99 (1 client)", f"{p50:.2f} ms / {p99:.2f} ms"))
        rows.append(("throughput, 1 client", f"{args.count / sum(latencies):,.0f} blocks/s"))

        # Throughput: many clients at once, each its own connection and addresses.
        per_client = max(1, args.count // args.clients)
        batches = [[next(source) for _ in range(per_client)] for _ in range(args.clients)]
        connections = [Connection(socket_path) for _ in range(args.clients)]
        barrier = threading.Barrier(args.clients + 1)

        def worker(c: Connection, ips: list[str]) -> None:
            barrier.wait()
            for ip in ips:
                c.block(ip)

        threads = [
            threading.Thread(target=worker, args=(c, b))
            for c, b in zip(connections, batches, strict=True)
        ]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        for c in connections:
            c.close()
        total = per_client * args.clients
        rows.append((f"throughput, {args.clients} clients", f"{total / elapsed:,.0f} blocks/s"))

        active = args.count + total
        run([*imr, "server", "stop"])
        t0 = time.perf_counter()
        run(["ip", "netns", "exec", ns, *imr, "server", "start"])
        rows.append(
            (f"restart to ready, {active:,} active blocks", f"{time.perf_counter() - t0:.2f} s")
        )
        status = json.loads(run([*imr, "server", "status", "--json"]).stdout)
        rss_kb = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{status['pid']}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        )
        rows.append(
            (f"daemon RSS with {status['active_blocks']:,} blocks", f"{rss_kb / 1024:.0f} MB")
        )
        backend = status["backend_detail"]
    finally:
        subprocess.run([*imr, "server", "stop"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(work, ignore_errors=True)

    print(f"backend: {backend}; {args.count} blocks per measurement\n")
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
