"""One address per request through the real daemon (issue 18, item 1), JSON and text form.

Run as root:

    .venv/bin/python bench/one_address.py                      # both forms, 1 and 50 clients
    .venv/bin/python bench/one_address.py --form text --many 20000
    .venv/bin/python bench/one_address.py --profile /tmp/p     # py-spy of the 50-client runs
    .venv/bin/python bench/one_address.py --backend ipset

The daemon (nftables backend unless `--backend ipset`, Unix socket, escalation off as in
bench/daemon_blocks.py) runs as root in a namespace the script creates and deletes. For
each form (JSON: `{"v":1,"op":"block","ip":...}`; text: `block ADDRESS`) it measures, with
fresh addresses from 2001:db8::/32 every time:
  - single-block latency (1 client, one request at a time, `--count` blocks): p50, p99;
    the reply means the state row is committed (fsync) and the kernel entry exists;
  - throughput with 1 client and with `--clients` clients (`--many` blocks);
  - the daemon's CPU time (user + system, all threads, /proc) per request in each run: the
    figure that least depends on what else runs on the machine.
At the end the kernel must hold every acknowledged address. The client is one asyncio
process (raw sockets, no streams) on the same CPUs as the daemon.

With `PYTHONPATH=/some/other/checkout` the daemon of that checkout runs (how the before and
after figures in docs/performance.md were taken, interleaved).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_daemon, load, percentile, require_root, v6_address
from daemon_blocks import kernel_count


def process_cpu(pid: int) -> float:
    """User + system seconds of a process, all its threads."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def request(form: str, ip: str) -> bytes:
    if form == "json":
        return b'{"v":1,"op":"block","ip":"' + ip.encode() + b'"}\n'
    return b"block " + ip.encode() + b"\n"


def acknowledged(form: str, reply: bytes) -> bool:
    if form == "json":
        return b'"ok":true' in reply and b'"ok":false' not in reply
    return reply.startswith(b"ok ")


async def _client(
    path: Path, form: str, ips: Sequence[str], latencies: list[float], ready: asyncio.Event
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        await ready.wait()
        for ip in ips:
            t0 = time.perf_counter()
            writer.write(request(form, ip))
            reply = await reader.readline()
            latencies.append(time.perf_counter() - t0)
            if not acknowledged(form, reply):
                raise RuntimeError(f"block {ip} failed: {reply[:200]!r}")
    finally:
        writer.close()


def run_load(path: Path, form: str, ips: Sequence[str], clients: int) -> tuple[float, list[float]]:
    """(seconds from the first request to the last reply, per-request latencies)."""
    shares = [ips[i::clients] for i in range(clients) if ips[i::clients]]
    latencies: list[float] = []

    async def main() -> float:
        ready = asyncio.Event()
        tasks = [asyncio.create_task(_client(path, form, s, latencies, ready)) for s in shares]
        await asyncio.sleep(0.2)  # every connection made
        t0 = time.perf_counter()
        ready.set()
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0

    return asyncio.run(main()), latencies


def spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    argv = [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid)]
    argv += ["-o", str(out), "-f", "raw", "-r", "1000", "--threads", "--gil", "--nonblocking"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--form", action="append", choices=["json", "text"])
    parser.add_argument("--backend", choices=["nftables", "ipset"], default="nftables")
    parser.add_argument("--count", type=int, default=3000, help="blocks for the 1-client runs")
    parser.add_argument("--many", type=int, default=20000, help="blocks for the N-client runs")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--profile", type=Path, help="py-spy raw profiles: PREFIX-FORM.txt")
    parser.add_argument("--rows", type=Path, help="append one JSON line a form here")
    args = parser.parse_args()
    require_root()
    forms = args.form or ["json", "text"]
    print(f"one_address: {load()} at start", file=sys.stderr)
    results: dict[str, dict[str, float]] = {}
    with bench_daemon(args.backend, prefix="spdone") as daemon:
        daemon.start()
        pid = daemon.pid()
        numbers = iter(range(10**7))

        def fresh(n: int) -> list[str]:
            return [v6_address(next(numbers)) for _ in range(n)]

        run_load(daemon.socket, "json", fresh(300), 1)  # warm-up
        expected = 300
        for form in forms:
            row: dict[str, float] = {}
            user0, system0 = cpu_split(pid)
            elapsed, latencies = run_load(daemon.socket, form, fresh(args.count), 1)
            user, system = cpu_split(pid)
            row["cpu1_us"] = (user + system - user0 - system0) / args.count * 1e6
            row["sys1_us"] = (system - system0) / args.count * 1e6
            row["p50_ms"] = percentile(latencies, 0.5) * 1000
            row["p99_ms"] = percentile(latencies, 0.99) * 1000
            row["rate1"] = args.count / elapsed
            profiler = spy(pid, Path(f"{args.profile}-{form}.txt")) if args.profile else None
            user0, system0 = cpu_split(pid)
            elapsed, latencies = run_load(daemon.socket, form, fresh(args.many), args.clients)
            user, system = cpu_split(pid)
            row["cpu_us"] = (user + system - user0 - system0) / args.many * 1e6
            row["sys_us"] = (system - system0) / args.many * 1e6
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(60)
            row["rate"] = args.many / elapsed
            row["p50n_ms"] = percentile(latencies, 0.5) * 1000
            row["p99n_ms"] = percentile(latencies, 0.99) * 1000
            expected += args.count + args.many
            results[form] = row
        found = kernel_count(daemon)
    print(f"one_address: {load()} at end; kernel holds {found} of {expected}", file=sys.stderr)
    print(
        "| form | p50 / p99, 1 client | 1 client | daemon CPU (system), 1 client |"
        f" {args.clients} clients (p50 / p99) | daemon CPU (system), {args.clients} clients |"
    )
    print("|---|---|---|---|---|---|")
    for form, r in results.items():
        print(
            f"| {form} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | {r['rate1']:,.0f}/s"
            f" | {r['cpu1_us']:.0f} µs ({r['sys1_us']:.0f} µs)"
            f" | {r['rate']:,.0f}/s ({r['p50n_ms']:.1f} /"
            f" {r['p99n_ms']:.1f} ms) | {r['cpu_us']:.0f} µs ({r['sys_us']:.0f} µs) |"
        )
    if args.rows is not None:
        with args.rows.open("a") as out:
            for form, r in results.items():
                out.write(json.dumps({"bench": "one_address", "form": form, **r}) + "\n")
    if found != expected:
        raise SystemExit(f"the kernel holds {found} addresses; {expected} were acknowledged")


if __name__ == "__main__":
    main()
