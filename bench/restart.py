"""Restart to ready with many active blocks, and the daemon's memory (RSS) with them.

Run as root:

    .venv/bin/python bench/restart.py                    # 10,000 and 100,000, nftables
    .venv/bin/python bench/restart.py --backend ipset --sizes 10000
    .venv/bin/python bench/restart.py --quick            # what bench/run-all runs

For each size N the state file is seeded directly through imr.store.Store
with N active blocks (2001:db8::/32 addresses in canonical text, as the daemon
writes them, expiring in a day), then `imr server start` is timed until it
returns: it returns once the daemon
answers on its socket, after start-up put every block into the kernel in one
step. Then the script checks that the kernel holds all N entries and that
the daemon reports N active blocks, reads the daemon's RSS, stops it (blocks
stay) and times a second start with the kernel already full (a restart).
Each start is also split into phases by the daemon log's time stamps (ms):
until the backend is chosen (the CLI's and the daemon's imports, the config,
the fork, the state file), reconcile (from the host's addresses read to "restored":
reading the rows, checking them, loading the kernel, the in-memory index), and
the rest until `imr server start` returned (listening, the CLI's exit). And the
CPU time both processes spent (the CLI until it returned, the daemon until it
was ready): on a shared machine the wall time waits for the CPU, this does not.

With fail2ban installed, the same is done with fail2ban: N bans (a modest
N: fail2ban re-adds bans one by one at start) are made and put in the
kernel, fail2ban is stopped (its nftables action removes its set on stop),
started again and timed until the kernel holds all N bans again.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _fail2ban
from _common import BenchDaemon, Rows, bench_daemon, load, require_root, rss_mb, run, v6_address
from daemon_blocks import kernel_count

from imr.store import Store

FAIL2BAN_BANS = 2000
FAIL2BAN_TIMEOUT = 600.0  # seconds; the restart is abandoned (and said so) past this


def seed(daemon: BenchDaemon, count: int) -> None:
    now = time.time()
    store = Store(daemon.state)
    try:
        with store.transaction():
            for i in range(count):
                # Canonical text, as the daemon writes it (str() of the parsed address).
                ip = str(ipaddress.IPv6Address(v6_address(i)))
                store.insert_block(ip, now - 60, now + 86400, 1, "bench seed", "bench", 0, 1)
    finally:
        store.close()


# The daemon log's lines that end each phase, in order.
PHASES = (
    ("backend chosen", "firewall backend "),
    ("addresses read", "local addresses: "),
    ("reconciled", "restored "),
)


def timed_start(daemon: BenchDaemon) -> tuple[float, str]:
    """`imr server start` in seconds, and its phases from the daemon log's time stamps."""
    log = daemon.work / "imr.log"
    log.write_text("")  # only this start's lines
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.time()
    seconds = daemon.start()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    # utime and stime of the daemon (fields 14 and 15 of /proc/PID/stat, in clock ticks).
    stat = Path(f"/proc/{daemon.pid()}/stat").read_text().rsplit(")", 1)[1].split()
    daemon_cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    marks: list[str] = []
    last = 0.0
    lines = log.read_text().splitlines()
    for name, text in PHASES:
        line = next((line for line in lines if f": {text}" in line), None)
        if line is None:
            marks.append(f"{name} ?")
            continue
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        marks.append(f"{name} +{stamp - began - last:.2f}")
        last = stamp - began
    marks.append(f"returned +{seconds - last:.2f}")
    marks.append(f"CPU {cli_cpu + daemon_cpu:.2f} s: CLI {cli_cpu:.2f}, daemon {daemon_cpu:.2f}")
    return seconds, ", ".join(marks)


def bench_size(backend: str, count: int, rows: Rows) -> float:
    """Rows for one size; returns the restart time (kernel already holding the blocks)."""
    with bench_daemon(backend, prefix="imrrst") as daemon:
        seed(daemon, count)
        cold, cold_phases = timed_start(daemon)
        found = kernel_count(daemon)
        status = daemon.status()
        if found != count or status["active_blocks"] != count:
            raise SystemExit(
                f"{backend} {count}: kernel holds {found}, daemon {status['active_blocks']}"
            )
        rss = rss_mb(daemon.pid())
        daemon.stop()
        warm, warm_phases = timed_start(daemon)
        if kernel_count(daemon) != count:
            raise SystemExit(f"{backend} {count}: kernel lost blocks over a restart")
    rows.add(
        f"{backend}: start to ready, {count:,} active blocks, empty kernel",
        f"{cold:.2f} s ({cold_phases})",
    )
    rows.add(
        f"{backend}: restart to ready, {count:,} active blocks", f"{warm:.2f} s ({warm_phases})"
    )
    rows.add(f"{backend}: daemon RSS with {count:,} active blocks", f"{rss:.0f} MB")
    return warm


def bench_fail2ban(bans: int, rows: Rows, imr_seconds: float, imr_count: int) -> None:
    ns = f"imrf2r-{os.getpid()}"
    run(["ip", "netns", "add", ns])
    try:
        with _fail2ban.fail2ban(ns) as f2b:
            f2b.start()
            f2b.ban([v6_address(i) for i in range(bans)])
            if f2b.wait_in_kernel(bans, timeout=FAIL2BAN_TIMEOUT) is None:
                raise SystemExit(f"fail2ban did not put {bans} bans in the kernel")
            f2b.stop()
            left = f2b.in_kernel()
            t0 = time.perf_counter()
            f2b.start()
            back = f2b.wait_in_kernel(bans, timeout=FAIL2BAN_TIMEOUT - (time.perf_counter() - t0))
            seconds = time.perf_counter() - t0
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    measure = (
        f"restart until all bans are back in the kernel: imr {imr_count:,} blocks"
        f" vs fail2ban {_fail2ban.version()} {bans:,} bans ({left} left in the kernel"
        " while fail2ban was stopped)"
    )
    if back is None:
        rows.add(measure, f"{imr_seconds:.2f} s", f"> {seconds:.0f} s (gave up)", "")
        return
    per_ban = seconds / bans
    rows.add(
        measure,
        f"{imr_seconds:.2f} s ({imr_seconds / imr_count * 1e6:.1f} µs a block)",
        f"{seconds:.1f} s ({per_ban * 1000:.2f} ms a ban)",
        f"{per_ban / (imr_seconds / imr_count):,.0f} x per entry",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="nftables", choices=["nftables", "ipset", "iptables"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--quick", action="store_true", help="fewer fail2ban bans (run-all)")
    parser.add_argument("--skip-fail2ban", action="store_true")
    parser.add_argument("--rows", type=Path, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    require_root()
    rows = Rows("restart")
    print(f"restart: {load()} at start", file=sys.stderr)
    results = {count: bench_size(args.backend, count, rows) for count in args.sizes}
    if not args.skip_fail2ban and _fail2ban.available():
        biggest = max(results)
        bench_fail2ban(500 if args.quick else FAIL2BAN_BANS, rows, results[biggest], biggest)
    print(f"restart: {load()} at end", file=sys.stderr)
    rows.print_table()
    rows.save(args.rows)


if __name__ == "__main__":
    main()
