"""The fuzz of tests/test_fuzz.py with a larger budget: the parser, then the live daemon.

Same code (tests/fuzz_cases.py), more examples and bytes. Needs root: the
daemon runs with the nftables backend in namespaces it creates (and deletes),
with the Unix socket (clients are the real unprivileged block-role test user)
and the TCP listener (a block-role token, and clients that never
authenticate). Prints what was sent and answered, and exits non-zero on the
first property that fails (hypothesis prints the example and a blob to
reproduce it).

    .venv/bin/python bench/fuzz.py                     # ~5 minutes on 2 vCPUs
    .venv/bin/python bench/fuzz.py --examples 500 --random-connections 100 --parser-examples 2000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_cases import (
    TEXT_VERBS,
    Tally,
    check_survived,
    free_text,
    hypothesis_fuzz,
    json_lines,
    json_round_trip,
    parses_or_refuses,
    random_bytes_fuzz,
    reply_is_one_line,
    text_lines,
    text_round_trip,
    token,
    valid_requests,
)
from robust_harness import (
    FUZZ_TOKEN,
    Ledger,
    Options,
    dedicated_user,
    protected_addresses,
    running,
    tcp_connector,
    unix_connector,
)

VmRSS = "VmRSS:"


def takes(line: bytes) -> None:
    parses_or_refuses(line)


def parser_phase(examples: int) -> None:
    budget = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    properties: list[tuple[str, Any]] = [
        ("any bytes", given(st.binary(max_size=2000))(takes)),
        ("generated JSON lines", given(json_lines())(takes)),
        ("generated text lines", given(text_lines())(takes)),
        ("valid JSON round trip", given(valid_requests)(json_round_trip)),
        (
            "valid text round trip",
            given(
                st.sampled_from(TEXT_VERBS),
                token,
                free_text,
                st.sampled_from([str.lower, str.upper, str.title]),
            )(text_round_trip),
        ),
        (
            "replies are one line",
            given(st.text(), st.text(), st.one_of(st.none(), st.text(max_size=64)))(
                reply_is_one_line
            ),
        ),
    ]
    for name, prop in properties:
        started = time.perf_counter()
        budget(prop)()
        print(f"| parser: {name} | {examples:,} examples | {time.perf_counter() - started:.1f} s |")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith(VmRSS))) / 1024


USER, GROUP = "imrfuzz-web", "imrfuzz"  # its own, so parallel test runs cannot take them


def daemon_phase(examples: int, connections: int, seed: int) -> None:
    options = Options("nftables", tcp=True, blocker=USER, group=GROUP)
    with dedicated_user(USER, GROUP), running(options) as world:
        pid = world.pid()
        assert pid is not None
        rss_start = rss_mb(pid)
        protected = protected_addresses(world)
        ledger = Ledger()
        transports: list[tuple[str, Callable[[], Any], bool]] = [
            ("unix", unix_connector(world, USER), True),
            ("tcp", tcp_connector(world, FUZZ_TOKEN), True),
            ("tcp-unauthenticated", tcp_connector(world, None), False),
        ]
        for name, connect, identified in transports:
            serving = connect if identified else unix_connector(world, USER)
            for kind in ("hypothesis", "random bytes"):
                tally = Tally()
                started = time.perf_counter()
                if kind == "hypothesis":
                    hypothesis_fuzz(
                        connect, protected, ledger, tally, examples, identified=identified
                    )
                else:
                    random_bytes_fuzz(
                        connect, protected, ledger, tally, connections, seed, identified
                    )
                active = check_survived(world, "nftables", pid, protected, ledger, serving)
                print(
                    f"| {name}: {kind} | {tally.summary()}; {len(active)} active blocks"
                    f" | {time.perf_counter() - started:.1f} s |"
                )
        print(
            f"| daemon | same pid {pid} throughout; RSS {rss_start:.1f} MB at start,"
            f" {rss_mb(pid):.1f} MB at the end; {ledger.lines:,} complete lines sent by"
            " identified clients | |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parser-examples", type=int, default=10_000)
    parser.add_argument("--examples", type=int, default=2000, help="hypothesis, per listener")
    parser.add_argument("--random-connections", type=int, default=300, help="per listener")
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon changes the firewall of namespaces it creates")
    print(f"random-bytes seed {args.seed}\n")
    print("| phase | what happened | time |\n| --- | --- | --- |")
    parser_phase(args.parser_examples)
    daemon_phase(args.examples, args.random_connections, args.seed)


if __name__ == "__main__":
    main()
