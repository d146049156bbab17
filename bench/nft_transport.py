"""Where an nftables transaction's time goes: a libnftables context per call, or one kept.

Run as root:  .venv/bin/python bench/nft_transport.py [--count 100]

In a throwaway namespace, one small transaction is run `--count` times, in
four ways, and the median time per transaction printed:
  - only adds one element, with a new libnftables context per call;
  - adds, deletes and re-adds one element (what imr's apply() sends for a
    new or escalated block), new context per call;
  - the same, with one context kept for all calls (what imr does);
  - the same through `nft -f -`, a process per call (imr's fallback).
Closing an nfnetlink socket waits for the kernel's deferred release of
deleted set elements (an RCU grace period): a context per call pays that
whenever the transaction deleted something.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import Rows, load, require_root

from imr.backends.libnftables import LibNftables

# The test helpers' namespaces (tests/ is not a package; mypy checks it on its own).
from netns import netns  # type: ignore[import-not-found, unused-ignore]

SET = "inet imrt s6"
SETUP = "add table inet imrt\nadd set inet imrt s6 { type ipv6_addr; flags timeout; }\n"


def add_only(n: int) -> str:
    return f"add element {SET} {{ 2001:db8:1::{n + 1:x} timeout 1d }}\n"


def churn(n: int) -> str:
    e = f"2001:db8:2::{n + 1:x}"
    return (
        f"add element {SET} {{ {e} }}\ndelete element {SET} {{ {e} }}\n"
        f"add element {SET} {{ {e} timeout 1d }}\n"
    )


def median_ms(count: int, once: Callable[[int], None]) -> float:
    times = []
    for n in range(count):
        t0 = time.perf_counter()
        once(n)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="30 transactions each")
    parser.add_argument("--rows", type=Path, help="append result rows (JSON lines) here")
    args = parser.parse_args()
    require_root()
    count = 30 if args.quick else args.count
    lib = LibNftables()._lib  # the same ctypes bindings imr uses
    rows = Rows("nft_transport")
    print(f"nft_transport: {load()}", file=sys.stderr)

    def fresh(script: str) -> None:
        ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        try:
            if lib.nft_run_cmd_from_buffer(ctx, script.encode()) != 0:
                raise RuntimeError(lib.nft_ctx_get_error_buffer(ctx))
        finally:
            lib.nft_ctx_free(ctx)

    with netns("imrnft") as ns, ns.entered():
        fresh(SETUP)
        kept = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(kept)
        lib.nft_ctx_buffer_error(kept)

        def in_kept(script: str) -> None:
            if lib.nft_run_cmd_from_buffer(kept, script.encode()) != 0:
                raise RuntimeError(lib.nft_ctx_get_error_buffer(kept))

        def by_process(script: str) -> None:
            subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, timeout=30)

        cases = [
            ("add 1 element, new context per call", lambda n: fresh(add_only(n))),
            ("add + delete + add, new context per call", lambda n: fresh(churn(n))),
            ("add + delete + add, context kept (imr)", lambda n: in_kept(churn(10_000 + n))),
            ("add + delete + add, `nft -f -` per call", lambda n: by_process(churn(20_000 + n))),
        ]
        for label, once in cases:
            rows.add(f"one transaction: {label}", f"{median_ms(count, once):.2f} ms")
        lib.nft_ctx_free(ctypes.c_void_p(kept))
    rows.print_table()
    rows.save(args.rows)


if __name__ == "__main__":
    main()
