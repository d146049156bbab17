"""Block latency and throughput through the real daemon, over the Unix socket, per backend.

Run as root:

    .venv/bin/python bench/daemon_blocks.py                  # nftables, ipset, iptables
    .venv/bin/python bench/daemon_blocks.py --backend nftables --count 20000
    .venv/bin/python bench/daemon_blocks.py --quick          # what bench/run-all runs

For each backend the daemon runs as root in a network namespace the script
creates (and deletes), and this measures:
  - single-block latency, request to acknowledgement: one client, one request
    at a time; when the reply arrives the state row is committed (fsync) and
    the kernel entry exists;
  - throughput: distinct addresses blocked and acknowledged per second with 1
    client and with 50 concurrent clients (each on its own connection, each
    sending its next request when its reply came);
  - the daemon's CPU time per block (user + system, all threads) in the
    50-client run: what bounds the throughput on a machine with few cores;
  - the same with `block_many` requests of 100 addresses each (1 and 50
    clients; not for per-address iptables rules), as a log scanner or a
    script with a list sends them;
  - afterwards, that the kernel holds every address acknowledged.
Addresses come from 2001:db8::/32. The load client is one asyncio process on
the same machine: it shares the CPUs with the daemon.

With fail2ban installed (Debian package fail2ban), the same namespace setup
runs a fail2ban-server of its own (bench/_fail2ban.py, nftables action) and
bans addresses with `fail2ban-client set JAIL banip`, 500 per call (its best
case: one client process per ban would be far slower), timed until the
kernel holds them all; the ratio is imr's 50-client rate over that. For the
per-address iptables backend it runs fail2ban's `iptables-multiport` action
with the same iptables flavour (`--flavour`) instead: the single-ban latency
(`fail2ban-client set JAIL banip IP`, one at a time, until the rule is in the
kernel, polled with `ip6tables -S`; fail2ban-client's own start-up counts, as
it does for a user) and its ban throughput as above, each with the ratio.

`--profile FILE` records the daemon with py-spy (pip install py-spy) during
the 50-client run of the first backend (raw collapsed stacks, GIL holder only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fail2ban
from _common import (
    BenchDaemon,
    Rows,
    bench_daemon,
    block_load,
    load,
    percentile,
    require_root,
    run,
    v6_address,
)

BACKENDS = ["nftables", "ipset", "iptables"]
# Addresses per block_many request: the bench's ~16-character addresses make a ~2 KB line
# (the longest IPv6 texts, 39 characters, fit ~90 in the default 4096-byte line).
PER_REQUEST = 100
FAIL2BAN_BANS = 2000


def process_cpu(pid: int) -> float:
    """User + system seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kernel_count(daemon: BenchDaemon) -> int:
    """Bench addresses (2001:db8::/32) imr's objects in the kernel hold; a backend's own
    markers (a sentinel element, say) are not counted."""
    if daemon.backend == "nftables":
        out = daemon.in_ns("nft", "-j", "list", "set", "inet", "imr", "blocked_v6").stdout
        values = [
            e["elem"]["val"] if isinstance(e, dict) else e
            for item in json.loads(out)["nftables"]
            if "set" in item
            for e in item["set"].get("elem", [])
        ]
    elif daemon.backend == "ipset":
        values = daemon.in_ns("ipset", "list", "imr6").stdout.split()
    elif daemon.backend == "iptables":
        values = daemon.in_ns(f"ip6tables-{daemon.flavour}", "-S", "IMR").stdout.split()
        values = [v.split("/")[0] for v in values]
    else:
        return -1
    return sum(1 for v in values if isinstance(v, str) and v.startswith("2001:db8:"))


def bench_backend(
    backend: str, count: int, clients: int, rows: Rows, profile: Path | None, flavour: str
) -> tuple[float, float, float]:
    """Rows for one backend; returns its best rate (single requests or block_many), its
    50-client rate for one address a request, and its single-block p50 (seconds)."""
    with bench_daemon(backend, flavour, prefix="imrblk") as daemon:
        daemon.start()
        next_ip = iter(range(10**7))

        def fresh(n: int) -> list[str]:
            return [v6_address(next(next_ip)) for _ in range(n)]

        block_load(daemon.socket, fresh(min(200, count)), 1)  # warm-up (imports, caches)

        elapsed, latencies = block_load(daemon.socket, fresh(count), 1)
        single_p50 = percentile(latencies, 0.5)
        rows.add(
            f"{backend}: single-block latency p50 / p99 (1 client)",
            f"{percentile(latencies, 0.5) * 1000:.2f} ms"
            f" / {percentile(latencies, 0.99) * 1000:.2f} ms",
        )
        rows.add(f"{backend}: throughput, 1 client", f"{count / elapsed:,.0f} blocks/s")

        many = count * 2
        pid = daemon.pid()
        spy = None
        if profile is not None:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "-p",
                    str(pid),
                    "-o",
                    str(profile),
                    "-f",
                    "raw",
                    "-r",
                    "250",
                    "--gil",
                    "--threads",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        cpu0 = process_cpu(pid)
        elapsed, latencies = block_load(daemon.socket, fresh(many), clients)
        cpu = process_cpu(pid) - cpu0
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        rate = many / elapsed
        per_request = rate
        rows.add(
            f"{backend}: throughput, {clients} clients",
            f"{rate:,.0f} blocks/s (p50 {percentile(latencies, 0.5) * 1000:.1f} ms,"
            f" p99 {percentile(latencies, 0.99) * 1000:.1f} ms)",
        )
        rows.add(
            f"{backend}: daemon CPU per block, {clients} clients", f"{cpu / many * 1e6:.0f} µs"
        )
        expected = min(200, count) + count + many
        if backend != "iptables":  # per-address rules: the rule count, not framing, bounds it
            for n_clients in (1, clients):
                addresses = many * 5 if backend == "nftables" else many
                cpu0 = process_cpu(pid)
                elapsed, latencies = block_load(
                    daemon.socket, fresh(addresses), n_clients, PER_REQUEST
                )
                cpu = process_cpu(pid) - cpu0
                rows.add(
                    f"{backend}: throughput, {n_clients} client{'s' * (n_clients > 1)},"
                    f" block_many of {PER_REQUEST}",
                    f"{addresses / elapsed:,.0f} blocks/s (request p50"
                    f" {percentile(latencies, 0.5) * 1000:.1f} ms; daemon CPU"
                    f" {cpu / addresses * 1e6:.0f} µs a block)",
                )
                expected += addresses
                rate = max(rate, addresses / elapsed)
        found = kernel_count(daemon)
        status = daemon.status()
        if found != expected or status["active_blocks"] != expected:
            raise SystemExit(
                f"{backend}: kernel holds {found}, daemon {status['active_blocks']},"
                f" expected {expected}"
            )
        rows.add(f"{backend}: kernel entries after the run (all acknowledged)", f"{found:,}")
        return rate, per_request, single_p50


def bench_fail2ban_iptables(
    flavour: str, bans: int, rows: Rows, imr_p50: float, imr_rate: float
) -> None:
    """fail2ban's iptables-multiport action beside the per-address iptables backend."""
    ns = f"imrf2b-{os.getpid()}"
    run(["ip", "netns", "add", ns])
    singles = 15
    try:
        with _fail2ban.fail2ban(ns, f"iptables-{flavour}") as f2b:
            f2b.start()
            latencies = []
            for i in range(singles):
                t0 = time.perf_counter()
                f2b.ban([v6_address(2 * 10**6 + i)])
                if f2b.wait_in_kernel(i + 1, timeout=60, poll=0.002) is None:
                    raise SystemExit("fail2ban did not put a ban in the kernel in 60 s")
                latencies.append(time.perf_counter() - t0)
            ips = [v6_address(10**6 + i) for i in range(bans)]
            t0 = time.perf_counter()
            f2b.ban(ips)
            if f2b.wait_in_kernel(singles + bans, timeout=900, poll=0.2) is None:
                raise SystemExit(f"fail2ban did not put {bans} bans in the kernel in 900 s")
            rate = bans / (time.perf_counter() - t0)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    f2b_p50 = percentile(latencies, 0.5)
    what = f"fail2ban {_fail2ban.version()} iptables-multiport ({flavour} flavour)"
    rows.add(
        f"single-block p50: imr iptables vs {what} ({singles} bans one at a time)",
        f"{imr_p50 * 1000:.1f} ms",
        f"{f2b_p50 * 1000:.1f} ms",
        f"{f2b_p50 / imr_p50:,.1f} x faster",
    )
    rows.add(
        f"throughput: imr iptables, 50 clients, vs {what} ({bans:,} bans, banip 500 per call)",
        f"{imr_rate:,.0f} blocks/s",
        f"{rate:,.0f} bans/s",
        f"{imr_rate / rate:,.1f} x",
    )


def bench_fail2ban(bans: int, rows: Rows, imr_rate: float) -> None:
    ns = f"imrf2b-{os.getpid()}"
    run(["ip", "netns", "add", ns])
    try:
        with _fail2ban.fail2ban(ns) as f2b:
            f2b.start()
            ips = [v6_address(10**6 + i) for i in range(bans)]
            t0 = time.perf_counter()
            f2b.ban(ips)
            if f2b.wait_in_kernel(bans, timeout=600, poll=0.05) is None:
                raise SystemExit(f"fail2ban did not put {bans} bans in the kernel in 600 s")
            rate = bans / (time.perf_counter() - t0)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    rows.add(
        f"ban throughput: imr nftables (best run above) vs fail2ban {_fail2ban.version()}"
        f" ({bans:,} bans, banip 500 per call, nftables action)",
        f"{imr_rate:,.0f} blocks/s",
        f"{rate:,.0f} bans/s",
        f"{imr_rate / rate:,.0f} x",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", action="append", choices=[*BACKENDS, "dryrun"])
    parser.add_argument("--count", type=int, default=4000, help="blocks for the 1-client runs")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="fewer blocks (bench/run-all)")
    parser.add_argument("--skip-fail2ban", action="store_true")
    parser.add_argument(
        "--flavour", choices=["nft", "legacy"], default="nft", help="iptables flavour"
    )
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the daemon")
    parser.add_argument("--rows", type=Path, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    require_root()
    backends = args.backend or BACKENDS
    rows = Rows("daemon_blocks")
    print(f"daemon_blocks: {load()} at start", file=sys.stderr)
    nft_rate = None
    for i, backend in enumerate(backends):
        count = args.count
        if args.quick:
            count = 1000
        if backend == "iptables":  # per-address rules: ~10-100 ms a change as the chain grows
            count = min(count, 150 if args.quick else 500)
        profile = args.profile if i == 0 else None
        rate, per_request, p50 = bench_backend(
            backend, count, args.clients, rows, profile, args.flavour
        )
        if backend == "nftables":
            nft_rate = rate
        if backend == "iptables" and not args.skip_fail2ban and _fail2ban.available():
            bench_fail2ban_iptables(
                args.flavour, 200 if args.quick else 500, rows, p50, per_request
            )
    if nft_rate is not None and not args.skip_fail2ban and _fail2ban.available():
        bench_fail2ban(500 if args.quick else FAIL2BAN_BANS, rows, nft_rate)
    print(f"daemon_blocks: {load()} at end", file=sys.stderr)
    rows.print_table()
    rows.save(args.rows)


if __name__ == "__main__":
    main()
