"""Per-request cost of the ModSecurity hooks, against the real web servers (run as root).

For each setup the attacker namespace sends N matching requests over one
keep-alive connection. The server reads the next request only after the
previous one's phase 5 (where the hook runs) is done, so each request's time
includes the hook's work. The attacker's address is on the daemon's
allowlist: every hook makes the full round trip, the daemon refuses, and the
attacker stays able to connect.

    .venv/bin/python bench/modsecurity.py [--requests 200]
    .venv/bin/python bench/modsecurity.py --breakdown [--runs 40]   # no root needed

--breakdown splits the exec hook's cost without a web server: /bin/sh, the
interpreter's start-up, the hook's imports and the round trip to a fake daemon
(a Unix socket answering like imr), each run N times; wall and CPU medians.

Setups: plain deny (no hook), imr-hook through exec (Apache; as the console
script, as `python3 -I -S hook.py` and as the contrib/modsecurity/imr-hook
launcher), imr.lua in
Apache (ModSecurity v2) and in nginx (libmodsecurity v3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "modsecurity")]

from daemon_harness import ATTACKER_V4, SERVER_V4, Daemon  # noqa: E402
from modsec_harness import apache_missing, nginx_missing, web_server, world  # noqa: E402

SETUPS = [
    ("apache", "none"),
    ("apache", "exec"),
    ("apache", "exec-direct"),
    ("apache", "exec-launcher"),
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


@contextlib.contextmanager
def fake_daemon(path: Path) -> Iterator[None]:
    """Answers every connection like the daemon answers a block (refusals cost the same)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b'{"v":1,"id":null,"ok":true,"result":{"action":"block"}}\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        server.close()


def _run_times(cmd: list[str], env: dict[str, str], runs: int) -> tuple[float, float, str]:
    """Median wall ms, median CPU ms (user + system of the child) and the last output."""
    walls, cpus, out = [], [], ""
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, check=False)
        walls.append((time.perf_counter() - t0) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        cpus.append(cpu * 1000)
        out = done.stdout.strip()
    return statistics.median(walls), statistics.median(cpus), out


def breakdown(runs: int, rows: Path | None) -> None:
    import imr.hook

    # The hook of the imr on the path: PYTHONPATH may name another build (bench/round_two.py),
    # which its console script then imports too; -I ignores PYTHONPATH.
    repo = Path(imr.hook.__file__).resolve().parent.parent
    hook = str(repo / "imr" / "hook.py")
    launcher = str(repo / "contrib" / "modsecurity" / "imr-hook")
    console = str(Path(sys.executable).parent / "imr-hook")
    py = "/usr/bin/python3"
    with tempfile.TemporaryDirectory(prefix="imr-hook-bench-") as tmp:
        sock = Path(tmp) / "imr.sock"
        env = {"PATH": "/usr/bin:/bin", "IMR_IP": "192.0.2.7", "IMR_RULE": "99901"}
        env["IMR_SOCKET"] = str(sock)
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        cases = [
            ("/bin/true (fork + exec)", ["/bin/true"]),
            ("sh -c /bin/true", ["/bin/sh", "-c", "/bin/true"]),
            ("python3 -I -S -c pass", [py, "-I", "-S", "-c", "pass"]),
            ("python3 -c pass (site)", [py, "-c", "pass"]),
            ("venv python -c pass", [sys.executable, "-c", "pass"]),
            ("python3 -I -S hook.py", [py, "-I", "-S", hook]),
            ("launcher contrib/modsecurity/imr-hook", [launcher]),
            ("sh -c launcher (what exec runs)", ["/bin/sh", "-c", launcher]),
            ("console script (venv imr-hook)", [console]),
            ("sh -c console script", ["/bin/sh", "-c", console]),
            ("sh -c python3 -I -S hook.py", ["/bin/sh", "-c", f"{py} -I -S {hook}"]),
        ]
        if not Path(launcher).exists():  # an older build has none
            cases = [c for c in cases if launcher not in c[1]]
        with fake_daemon(sock):
            from imr.hook import build_request, send

            line = build_request(env)
            t0 = time.perf_counter()
            for _ in range(200):
                send(str(sock), line, 1.0)
            trip = (time.perf_counter() - t0) / 200 * 1000
            print(f"{runs} runs each; wall and CPU (child user+sys) medians in ms")
            print(f"{'round trip in process (send)':<40} {trip:>7.2f}")
            figures = [{"case": "round trip in process (send)", "wall_ms": trip}]
            for name, cmd in cases:
                wall, cpu, out = _run_times(cmd, env, runs)
                print(f"{name:<40} {wall:>7.2f} {cpu:>7.2f}  {out[:32]}")
                figures.append({"case": name, "wall_ms": wall, "cpu_ms": cpu})
    if rows is not None:
        with rows.open("a") as file:
            for row in figures:
                file.write(json.dumps({"bench": "modsecurity", "hook": hook, **row}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="per setup (at most 2000)")
    parser.add_argument("--breakdown", action="store_true", help="the hook's parts, no root")
    parser.add_argument("--runs", type=int, default=40, help="with --breakdown")
    parser.add_argument("--rows", type=Path, help="with --breakdown: JSON lines appended here")
    args = parser.parse_args()
    if args.breakdown:
        breakdown(max(5, min(args.runs, 500)), args.rows)
        return
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
