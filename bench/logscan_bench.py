"""Log-scanner figures: imr scan vs fail2ban-regex on the same generated log, peak
memory, and follow-mode latency (log write -> block request at a fake daemon).

    .venv/bin/python bench/logscan_bench.py [--lines 1000000] [--skip-fail2ban]
    .venv/bin/python bench/logscan_bench.py --hostile [--repeat 3]

--hostile scans a log where about half the lines carry signature look-alikes in
fields that do not count (referer, user agent, query strings of benign pages) and
~0.5 % are real attacks, instead of the ordinary one (~1 % attacks, no look-alikes).
Prints one figure per line; docs/performance.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A PYTHONPATH naming another checkout wins (bench/round_two.py's "before" build).
sys.path.insert(len(sys.path) if os.environ.get("PYTHONPATH") else 0, str(REPO))

from imr.client import Client  # noqa: E402
from imr.logscan.engine import Scanner  # noqa: E402
from imr.logscan.follow import Follower  # noqa: E402
from imr.logscan.reader import StateStore  # noqa: E402
from imr.logscan.runner import scan_files  # noqa: E402
from imr.logscan.signatures import BUILTIN  # noqa: E402

ATTACKS = [
    "/mail/bin/msgimport",
    "/w00tw00t.at.ISC.SANS.DFind:)",
    "/user/soapCaller.bs",
    "/scripts/root.exe?/c+dir",
    "/c/winnt/system32/cmd.exe?/c+dir",
    "/default.ida?" + "N" * 224 + "%u9090%u6858%ucbd3%u7801%u9090=a",
    "http://www.example.org/",
]
PATHS = ["/", "/index.html", "/blog/2024/01/{}", "/static/app.{}.js", "/img/{}.png", "/search?q={}"]
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",  # noqa: E501
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "curl/8.4.0",
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
]
# Signature look-alikes where they do not count: security blogs and scanners' referers,
# crawlers' user agents, search queries about the attacks.
LOOKALIKE_TEXT = [
    "cmd.exe",
    "root.exe",
    "w00tw00t.at.ISC.SANS.DFind:)",
    "bin/msgimport",
    "soapCaller.bs",
    "default.ida?NNNNNNNNNNNNNNNNNNNNNNNN%u9090",
    "Access denied with code 403",
    "pull-request",
]
LOOKALIKE_REFERERS = [
    "https://security.example/why-{}-matters",
    "https://search.example/?q={}",
    "http://scanner.example/report/{}",
]
LOOKALIKE_AGENTS = [
    "Mozilla/5.0 (compatible; {}-checker/1.0; +https://crawler.example/bot)",
    "SecurityBlogReader/2.0 ({})",
]
LOOKALIKE_QUERIES = ["/search?q={}", "/blog/attacks?topic={}&page=2", "/docs/view?file=/{}"]
# The same attacks as one fail2ban filter (failregex per signature, as an operator would write);
# like imr's tests, the path ones look at the path only (not the query string).
F2B_FILTER = r"""[Definition]
failregex = ^<HOST> \S+ \S+ \[\] "[A-Z]+ [^" ?]*/bin/msgimport[ ?]
            ^<HOST> \S+ \S+ \[\] "[A-Z]+ /(?i:w00tw00t\.at\.)
            ^<HOST> \S+ \S+ \[\] "[A-Z]+ [^" ?]*/(?i:soapcaller\.bs)[ ?]
            ^<HOST> \S+ \S+ \[\] "[A-Z]+ [^" ?]*(?i:cmd|root)\.exe[ ?]
            ^<HOST> \S+ \S+ \[\] "[A-Z]+ /default\.ida\?[NX]{20,}
            ^<HOST> \S+ \S+ \[\] "[A-Z]+ (?i:https?://)
            ^<HOST> \S+ \S+ \[\] "[^"]*" \d+ \S+ "[^"]*" "[^"]*(?i:morfeus)
ignoreregex =
datepattern = ^[^\[]*\[({DATE})
"""


def generate(path: Path, lines: int) -> int:
    rng = random.Random(2009)
    attacks = 0
    with open(path, "w") as out:
        batch = []
        for i in range(lines):
            ip = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"  # noqa: E501
            if rng.random() < 0.01:
                target, status, attacks = rng.choice(ATTACKS), 404, attacks + 1
            else:
                target, status = rng.choice(PATHS).format(i), 200
            batch.append(
                f'{ip} - - [08/Jan/2009:04:52:45 -0500] "GET {target} HTTP/1.1" {status} '
                f'{rng.randint(100, 99999)} "https://example.org/ref" "{rng.choice(AGENTS)}"\n'
            )
            if len(batch) >= 10000:
                out.write("".join(batch))
                batch = []
        out.write("".join(batch))
    return attacks


def generate_hostile(path: Path, lines: int) -> int:
    """~50 % look-alike lines (referer, user agent or query string), ~0.5 % attacks."""
    rng = random.Random(2026)
    attacks = 0
    with open(path, "w") as out:
        batch = []
        for i in range(lines):
            ip = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"  # noqa: E501
            referer, agent = "https://example.org/ref", rng.choice(AGENTS)
            roll = rng.random()
            if roll < 0.005:
                target, status, attacks = rng.choice(ATTACKS), 404, attacks + 1
            else:
                target, status = rng.choice(PATHS).format(i), 200
                if roll < 0.5:
                    text = rng.choice(LOOKALIKE_TEXT)
                    where = rng.randrange(3)
                    if where == 0:
                        referer = rng.choice(LOOKALIKE_REFERERS).format(text)
                    elif where == 1:
                        agent = rng.choice(LOOKALIKE_AGENTS).format(text)
                    else:
                        target = rng.choice(LOOKALIKE_QUERIES).format(text)
            batch.append(
                f'{ip} - - [08/Jan/2009:04:52:45 -0500] "GET {target} HTTP/1.1" {status} '
                f'{rng.randint(100, 99999)} "{referer}" "{agent}"\n'
            )
            if len(batch) >= 10000:
                out.write("".join(batch))
                batch = []
        out.write("".join(batch))
    return attacks


def bench_imr(log: Path, state: Path) -> dict[str, float]:
    scanner = Scanner(BUILTIN)
    with StateStore(state) as store:
        t0, cpu0 = time.perf_counter(), time.process_time()
        report = scan_files([log], scanner, store, None, max_line=65536)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "lines": report.stats.lines,
        "hits": report.stats.hits,
        "seconds": seconds,
        "cpu": cpu,
        "lines_per_s": report.stats.lines / seconds,
        "cpu_lines_per_s": report.stats.lines / cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_fail2ban(log: Path, workdir: Path) -> dict[str, float] | None:
    exe = shutil.which("fail2ban-regex")
    if exe is None:
        return None
    flt = workdir / "imr-equivalent.conf"
    flt.write_text(F2B_FILTER)
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [exe, str(log), str(flt)], capture_output=True, text=True, timeout=1800, check=False
    )
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    matched = None
    for line in proc.stdout.splitlines():
        if line.startswith("Lines:"):
            # "Lines: 1000000 lines, 0 ignored, 9957 matched, 990043 missed"
            matched = int(line.split(",")[2].split()[0])
    return {"seconds": seconds, "cpu": cpu, "matched": float(matched or 0)}


def bench_follow(workdir: Path, samples: int = 50) -> list[float]:
    """Write -> request at a fake daemon (a Unix socket we serve), per attacker line."""
    sock_path = workdir / "fake.sock"
    arrivals: list[float] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(16)
    server.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                data = conn.recv(65536)
                arrivals.append(time.perf_counter())
                ip = json.loads(data).get("ip")
                conn.sendall(
                    json.dumps({"v": 1, "id": None, "ok": True, "result": {"ip": ip}}).encode()
                    + b"\n"
                )

    log = workdir / "follow.log"
    log.write_text("")
    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    follower = Follower(
        [log], Scanner(BUILTIN), Client(sock_path, 5), lambda o: None, poll_interval=1.0
    )
    follow_thread = threading.Thread(target=follower.run, args=(stop.is_set,), daemon=True)
    follow_thread.start()
    time.sleep(0.3)
    latencies = []
    with open(log, "a") as out:
        for i in range(samples):
            before = len(arrivals)
            written = time.perf_counter()
            out.write(
                f'203.0.113.{i + 1} - - [08/Jan/2009:04:52:45 -0500] "GET /bin/msgimport HTTP/1.1" 404 1 "-" "-"\n'  # noqa: E501
            )
            out.flush()
            deadline = time.perf_counter() + 5
            while len(arrivals) == before and time.perf_counter() < deadline:
                time.sleep(0.0005)
            if len(arrivals) > before:
                latencies.append(arrivals[-1] - written)
            time.sleep(0.02)
    stop.set()
    follow_thread.join(5)
    server_thread.join(5)
    server.close()
    return latencies


def save(path: Path | None, row: dict[str, object]) -> None:
    if path is not None:
        with path.open("a") as out:
            out.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--skip-fail2ban", action="store_true")
    parser.add_argument("--hostile", action="store_true", help="the look-alike corpus")
    parser.add_argument("--repeat", type=int, default=1, help="imr scans of the file")
    parser.add_argument("--skip-follow", action="store_true")
    parser.add_argument("--log", type=Path, help="scan this log, written first if missing")
    parser.add_argument("--rows", type=Path, help="append the figures here as JSON lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imr-logscan-bench-") as tmp:
        work = Path(tmp)
        log = args.log or work / "access.log"
        kind = "hostile" if args.hostile else "ordinary"
        if log.exists():
            print(f"{kind} log: {log} as written before")
        else:
            attacks = (generate_hostile if args.hostile else generate)(log, args.lines)
            size = os.path.getsize(log)
            print(f"{kind} log: {args.lines} lines, {size / 1e6:.0f} MB, {attacks} attack lines")
        # CPU seconds beside wall seconds: on a shared machine the wall clock also
        # counts the time other jobs held the CPU.
        for n in range(max(1, args.repeat)):
            imr = bench_imr(log, work / f"state{n}")
            print(
                f"imr scan: {imr['seconds']:.2f} s, {imr['lines_per_s']:,.0f} lines/s; "
                f"CPU {imr['cpu']:.2f} s, {imr['cpu_lines_per_s']:,.0f} lines/CPU-s; "
                f"{imr['hits']:.0f} hits, peak RSS {imr['peak_rss_mb']:.0f} MB"
            )
            row = {"bench": "logscan", "what": "imr", "log": kind, **imr}
            save(args.rows, {**row, "imr_file": sys.modules["imr"].__file__})
        if not args.skip_fail2ban:
            f2b = bench_fail2ban(log, work)
            if f2b is None:
                print("fail2ban-regex: not installed (apt-get install fail2ban)")
            else:
                lines = imr["lines"]
                save(args.rows, {"bench": "logscan", "what": "fail2ban", "log": kind, **f2b})
                rate, cpu_rate = lines / f2b["seconds"], lines / f2b["cpu"]
                print(
                    f"fail2ban-regex: {f2b['seconds']:.2f} s, {rate:,.0f} lines/s; "
                    f"CPU {f2b['cpu']:.2f} s, {cpu_rate:,.0f} lines/CPU-s; "
                    f"{f2b['matched']:.0f} matched"
                )
                print(
                    f"ratio imr/fail2ban: {imr['lines_per_s'] / rate:.1f}x (wall), "
                    f"{imr['cpu_lines_per_s'] / cpu_rate:.1f}x (CPU)"
                )
        lat = [] if args.skip_follow else bench_follow(work)
        if lat:
            lat_ms = sorted(x * 1000 for x in lat)
            print(
                f"follow latency (write -> request at daemon socket), {len(lat)} samples: "
                f"median {statistics.median(lat_ms):.2f} ms, "
                f"p95 {lat_ms[int(len(lat_ms) * 0.95) - 1]:.2f} ms, "
                f"max {lat_ms[-1]:.2f} ms"
            )


if __name__ == "__main__":
    main()
