"""Compare the firewall backends: change latency and bulk load.

Run as root:  .venv/bin/python bench/backends.py [--quick]

Everything happens in a throwaway network namespace (tests/netns.py); the host's
firewall is never touched. Blocked addresses come from 2001:db8::/32.
The per-packet cost with 0 / 10,000 / 100,000 blocked addresses is measured by
bench/packet_cost.py (interleaved rounds with confidence intervals: one iperf3 run
per size, as this script did before, varied more than the 10 % it had to show).
Prints a markdown table and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from imr.backends.base import Backend, KernelBlock
from imr.backends.ipset import IpsetBackend
from imr.backends.iptables import IptablesBackend
from imr.backends.nftables import NftablesBackend
from imr.config import FirewallConfig

# The test helpers' namespaces (tests/ is not a package; mypy checks it on its own).
from netns import netns  # type: ignore[import-not-found, unused-ignore]

PORT = 5201
EXPIRES = time.time() + 86400
CONFIG = FirewallConfig(protocol="udp", ports=[str(PORT)])


def addresses(count: int, offset: int = 0) -> list[KernelBlock]:
    base = int(ipaddress.IPv6Address("2001:db8:1::")) + offset
    return [KernelBlock(ipaddress.IPv6Address(base + i), EXPIRES) for i in range(count)]


def timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def apply_each(backend: Backend, batches: Sequence[Sequence[KernelBlock]]) -> None:
    for batch in batches:
        backend.apply(batch, [])


def bench(label: str, make: Callable[[], Backend], big: bool, quick: bool) -> dict[str, str]:
    row = {"backend": label}
    singles, batches = (20, 4) if quick else (100, 20)
    with netns("imrb") as server, server.entered():
        backend = make()
        backend.prepare()
        blocks = addresses(singles)
        seconds = timed(lambda: apply_each(backend, [[b] for b in blocks]))
        row["apply 1 (ms/op)"] = f"{seconds / singles * 1000:.1f}"
        chunks = [addresses(500, 1_000_000 + i * 500) for i in range(batches)]
        seconds = timed(lambda: apply_each(backend, chunks))
        row["apply 500 (ms/batch)"] = f"{seconds / batches * 1000:.0f}"
        ten = addresses(10_000)
        row["replace_all 10k (s)"] = f"{timed(lambda: backend.replace_all(ten)):.2f}"
        assert len(backend.installed()) == 10_000
        if big:
            hundred = addresses(100_000)
            row["replace_all 100k (s)"] = f"{timed(lambda: backend.replace_all(hundred)):.2f}"
            assert len(backend.installed()) == 100_000
        else:
            row["replace_all 100k (s)"] = "skipped"
        backend.teardown()
        backend.close()
    return row


def table(rows: Sequence[dict[str, str]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer single applies and batches")
    parser.add_argument("--only", nargs="*", help="backend labels to run")
    parser.add_argument("--rows", type=Path, help="append result rows (JSON lines) for run-all")
    args = parser.parse_args()
    candidates: list[tuple[str, Callable[[], Backend], bool]] = [
        ("iptables (nft)", lambda: IptablesBackend(CONFIG, "nft"), False),
        ("iptables (legacy)", lambda: IptablesBackend(CONFIG, "legacy"), False),
        ("nftables", lambda: NftablesBackend(CONFIG), True),
        ("ipset (nft)", lambda: IpsetBackend(CONFIG, "nft"), True),
    ]
    rows = []
    for label, make, big in candidates:
        if args.only and label not in args.only:
            continue
        print(f"running {label} ...", file=sys.stderr, flush=True)
        rows.append(bench(label, make, big, args.quick))
    print(table(rows))
    if args.rows is not None:
        with args.rows.open("a") as out:
            for row in rows:
                label = row["backend"]
                for measure, value in row.items():
                    if measure != "backend":
                        line = {"bench": "backends", "measure": f"{label}: {measure}"}
                        out.write(json.dumps({**line, "imr": value, "fail2ban": "", "ratio": ""}))
                        out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
