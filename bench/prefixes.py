"""Network escalation on and off (issue #16): kernel elements, restart, RSS, block latency.

Run as root:

    .venv/bin/python bench/prefixes.py                 # 100,000 blocks, 5,000 /64s, 2,000 /24s
    .venv/bin/python bench/prefixes.py --scale 0.2     # a fifth of each (a loaded machine)

For each setting (`escalation.enabled` false, then true) a daemon with the nftables backend
starts in its own namespace with an empty state, and one client blocks the addresses
through the Unix socket with block_many (100 a request), taking the prefixes in turn as a
rotating attacker does: half IPv6 (10 addresses in each of 5,000 /64s of 2001:db8::/32),
half IPv4 (25 addresses in each of 2,000 /24s of 10.0.0.0/8: the documentation ranges
have three /24s; these are set elements in a throwaway namespace that no packet uses).
Then it reads:
- the kernel elements in imr's four sets (addresses and networks);
- the daemon's RSS;
- single-block latency: 300 `block` requests one after the other on one connection, for
  fresh addresses in fresh prefixes (the escalation check runs on each, and escalates none);
- restart to ready: `imr server stop`, then `imr server start` timed until it returned.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import time
from pathlib import Path

from _common import BenchDaemon, Rows, bench_daemon, block_load, load, require_root, rss_mb
from restart import timed_start

V6 = int(ipaddress.IPv6Address("2001:db8::"))
V4 = int(ipaddress.IPv4Address("10.0.0.0"))
SETS = ("blocked_v4", "blocked_v6", "blocked_net_v4", "blocked_net_v6")


def addresses(v6_prefixes: int, v4_prefixes: int, total: int) -> list[str]:
    """`total` addresses, half of each family, the prefixes taken in turn."""
    per64 = max(1, total // 2 // v6_prefixes)
    per24 = max(1, total // 2 // v4_prefixes)
    found: list[str] = []
    for n in range(per64):
        found += [str(ipaddress.IPv6Address(V6 + (p << 64) + n + 1)) for p in range(v6_prefixes)]
    for n in range(per24):
        found += [str(ipaddress.IPv4Address(V4 + (p << 8) + n + 1)) for p in range(v4_prefixes)]
    return found


def kernel_elements(daemon: BenchDaemon) -> dict[str, int]:
    counts = {}
    for name in SETS:
        out = daemon.in_ns("nft", "-j", "list", "set", "inet", "imr", name).stdout
        elements = [
            e
            for item in json.loads(out)["nftables"]
            if "set" in item
            for e in item["set"].get("elem", [])
        ]
        counts[name] = len(elements)
    return counts


def single_latencies(path: Path, count: int) -> list[float]:
    """Seconds per `block`, one request after the other, fresh addresses of fresh prefixes."""

    async def main() -> list[float]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        found = []
        try:
            for n in range(count):
                ip = str(ipaddress.IPv6Address(V6 + ((0xFFFF0000 + n) << 64) + 1))
                t0 = time.perf_counter()
                writer.write(b'{"v":1,"op":"block","ip":"' + ip.encode() + b'"}\n')
                reply = await reader.readline()
                found.append(time.perf_counter() - t0)
                if b'"action":"block"' not in reply:
                    raise RuntimeError(f"block {ip} failed: {reply[:200]!r}")
        finally:
            writer.close()
        return found

    return asyncio.run(main())


def bench_setting(enabled: bool, ips: list[str], rows: Rows) -> dict[str, float]:
    label = "escalation on" if enabled else "escalation off"
    with bench_daemon("nftables", prefix="imrpfx") as daemon:
        daemon.escalation = enabled
        daemon.write_config()
        with daemon.config.open("a") as config:
            config.write(
                "[quota]\nblocks_per_minute = 0\nactive_per_client = 0\nactive_global = 0\n"
            )
        daemon.start()
        seconds, _ = block_load(daemon.socket, ips, clients=1, per_request=100)
        latencies = single_latencies(daemon.socket, 300)
        elements = kernel_elements(daemon)
        rss = rss_mb(daemon.pid())
        active = int(str(daemon.status()["active_blocks"]))
        daemon.stop()
        restart, phases = timed_start(daemon)
        after = kernel_elements(daemon)
    median = statistics.median(latencies) * 1000
    p95 = sorted(latencies)[int(0.95 * len(latencies))] * 1000
    total = sum(elements.values())
    rows.add(f"{label}: {len(ips):,} blocks via block_many", f"{seconds:.1f} s")
    rows.add(
        f"{label}: kernel elements",
        f"{total:,} ({', '.join(f'{k} {v:,}' for k, v in elements.items())}); "
        f"{active:,} active blocks in the state",
    )
    rows.add(f"{label}: daemon RSS", f"{rss:.0f} MB")
    rows.add(f"{label}: single-block latency", f"median {median:.2f} ms, p95 {p95:.2f} ms")
    rows.add(f"{label}: restart to ready", f"{restart:.2f} s ({phases})")
    if after != elements:
        rows.add(f"{label}: kernel after the restart differs", json.dumps(after))
    return {"median": median, "total": total, "restart": restart, "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full sizes")
    parser.add_argument("--on-first", action="store_true", help="escalation on, then off")
    parser.add_argument("--rows", type=Path, default=None, help="append JSON rows here")
    args = parser.parse_args()
    require_root()
    total = int(100_000 * args.scale)
    ips = addresses(max(1, int(5000 * args.scale)), max(1, int(2000 * args.scale)), total)
    rows = Rows("prefixes")
    print(f"bench/prefixes.py: {len(ips):,} blocks; {load()}", file=sys.stderr)
    if args.on_first:  # the machine's load drifts: the order shows how much
        on, off = bench_setting(True, ips, rows), bench_setting(False, ips, rows)
    else:
        off, on = bench_setting(False, ips, rows), bench_setting(True, ips, rows)
    rows.add(
        "on / off",
        f"kernel elements {on['total'] / off['total']:.3f}, single-block median latency"
        f" {on['median'] / off['median']:.2f}, restart {on['restart'] / off['restart']:.2f},"
        f" RSS {on['rss'] / off['rss']:.2f}",
    )
    rows.print_table()
    rows.save(args.rows)


if __name__ == "__main__":
    main()
