"""Per-request cost of the ModSecurity hooks, against the real web servers (run as root).

For each setup the attacker namespace sends N matching requests over one
keep-alive connection. The server reads the next request only after the
previous one's phase 5 (where the hook runs) is done, so each request's time
includes the hook's work. The attacker's address is on the daemon's
allowlist: every hook makes the full round trip, the daemon refuses, and the
attacker stays able to connect.

    .venv/bin/python bench/modsecurity.py [--requests 200]

Setups: plain deny (no hook), imr-hook through exec (Apache; as the console
script and as `python3 -I -S hook.py`), imr.lua in
Apache (ModSecurity v2) and in nginx (libmodsecurity v3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "modsecurity")]

from daemon_harness import ATTACKER_V4, SERVER_V4, Daemon  # noqa: E402
from modsec_harness import apache_missing, nginx_missing, web_server, world  # noqa: E402

SETUPS = [
    ("apache", "none"),
    ("apache", "exec"),
    ("apache", "exec-direct"),
    ("apache", "lua"),
    ("nginx", "none"),
    ("nginx", "lua"),
]
MAX_REQUESTS = 2000


def measure(daemon: Daemon, kind: str, hook: str, requests: int) -> list[float]:
    """Seconds per request, as seen by the client, on one keep-alive connection."""
    with web_server(daemon, kind, hook):
        url = f"http://{SERVER_V4}/mail/bin/msgimport?n=[1-{requests}]"
        result = daemon.attacker.run(
            "curl",
            "-s",
            "--noproxy",
            "*",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}\n",
            url,
            timeout=150,
        )
    lines = [line.split() for line in result.stdout.splitlines()]
    codes = {code for code, _ in lines}
    if codes != {"403"} or len(lines) != requests:
        raise SystemExit(f"{kind}/{hook}: unexpected answers {sorted(codes)} ({len(lines)})")
    return [float(seconds) for _, seconds in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="per setup (at most 2000)")
    args = parser.parse_args()
    requests = max(10, min(args.requests, MAX_REQUESTS))
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench builds network namespaces")
    results: dict[str, list[float]] = {}
    with world(allowlist=(f"{ATTACKER_V4}/32",)) as daemon:
        started = daemon.start()
        if started.returncode != 0:
            raise SystemExit(f"the imr daemon did not start: {started.stderr}")
        for kind, hook in SETUPS:
            missing = apache_missing() if kind == "apache" else nginx_missing()
            if missing:
                print(f"skipping {kind}: {missing}", file=sys.stderr)
                continue
            begun = time.monotonic()
            times = measure(daemon, kind, hook, requests)
            print(
                f"measured {kind}/{hook}: {requests} requests in {time.monotonic() - begun:.1f}s",
                file=sys.stderr,
            )
            results[f"{kind}/{hook}"] = times
    print(f"{requests} matching requests per setup, one keep-alive connection, times in ms")
    print(f"{'setup':<19} {'median':>8} {'p90':>8} {'mean':>8} {'hook cost':>10}")
    for name, times in results.items():
        base = results.get(name.split("/")[0] + "/none")
        median = statistics.median(times) * 1000
        p90 = statistics.quantiles(times, n=10)[-1] * 1000
        mean = statistics.fmean(times) * 1000
        extra = f"{median - statistics.median(base) * 1000:+.2f}" if base else "-"
        print(f"{name:<19} {median:>8.2f} {p90:>8.2f} {mean:>8.2f} {extra:>10}")


if __name__ == "__main__":
    main()
