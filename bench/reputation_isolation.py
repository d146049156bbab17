"""Block latency and throughput while reputation work hangs on DNS, SMTP and HTTP.

imr keeps all reputation work out of the daemon: `imr check`, `imr reports
send` and `imr report --submit` are processes of their own that read the state
file (read-only) and wait on the network there. This bench shows it: the real
daemon runs as root inside a network namespace it creates (and deletes), and
block latency and throughput are measured in alternating rounds:
  - quiet: nothing else runs;
  - silent: three reputation commands wait on local servers that never answer
    (a UDP "DNS server" that drops every query, a TCP "SMTP relay" and a TCP
    "HTTP API" that accept and never speak) for the whole round; the bench
    checks that each was still waiting when the round ended.
Addresses come from documentation ranges. Prints a markdown table.

    .venv/bin/python bench/reputation_isolation.py --backend nftables --count 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "reputation"))

from reputation_servers import BlackHole, ZoneServer

IMR = str(Path(sys.executable).parent / "imr")
# The reputation commands, whether or not imr/cli.py registers them yet.
REP = [sys.executable, "-m", "imr.reputation"]
SUBMIT_ARGS = ["--format", "abuseipdb", "--since", "1h", "--submit", "--from", "state"]
HTTPBL_KEY = "abcdefghijkl"


def addresses(start: int) -> Iterator[str]:
    n = start
    while True:
        yield f"2001:db8:{(n >> 32) & 0xFFFF:x}:{(n >> 16) & 0xFFFF:x}::{n & 0xFFFF:x}"
        n += 1


class Connection:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def block(self, ip: str) -> None:
        self.sock.sendall(json.dumps({"v": 1, "op": "block", "ip": ip}).encode() + b"\n")
        reply = json.loads(self.file.readline())
        if not reply["ok"]:
            raise RuntimeError(reply["error"])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)


def measure(socket_path: Path, source: Iterator[str], count: int, clients: int) -> dict[str, float]:
    conn = Connection(socket_path)
    latencies = []
    for _ in range(count):
        ip = next(source)
        t0 = time.perf_counter()
        conn.block(ip)
        latencies.append(time.perf_counter() - t0)
    conn.close()
    latencies.sort()

    per_client = max(1, count // clients)
    batches = [[next(source) for _ in range(per_client)] for _ in range(clients)]
    connections = [Connection(socket_path) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def worker(c: Connection, ips: list[str]) -> None:
        barrier.wait()
        for ip in ips:
            c.block(ip)

    threads = [
        threading.Thread(target=worker, args=(c, b))
        for c, b in zip(connections, batches, strict=True)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in connections:
        c.close()
    return {
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "max": latencies[-1] * 1000,
        "single": count / sum(latencies),
        "many": per_client * clients / elapsed,
    }


class Hanger:
    """One reputation command, started before the measurement and waiting on a silent server."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.started = time.monotonic()
        self.waited: float | None = None  # seconds it had been waiting when the measurement ended

    def cpu_seconds(self) -> float:
        """CPU time the command has used so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def still_waiting(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="nftables")
    parser.add_argument("--count", type=int, default=2000, help="blocks per measurement")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each kind")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="network timeout of the commands (<= 30)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon changes the firewall of a namespace it creates")

    ns = f"imrbench-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="imrbench-"))
    dns_hole, smtp_hole, http_hole = BlackHole("udp"), BlackHole("tcp"), BlackHole("tcp")
    # DNS that answers (for the contact lookups, so that the mail reaches the hanging relay).
    attackers = [f"192.0.2.{n}" for n in range(1, 6)]
    zone = ZoneServer(
        [f"{n}.2.0.192.in-addr.arpa. 300 IN PTR host{n}.isp.example.net." for n in range(1, 6)]
        + ["isp.example.net. 300 IN MX 10 mx.isp.example.net."]
    ).start()
    base = (
        f'[server]\nsocket = "{work}/imr.sock"\npid_file = "{work}/imr.pid"\n'
        f'log_file = "{work}/imr.log"\nmax_connections = {args.clients + 16}\n'
        f'[state]\npath = "{work}/state.db"\n'
        f'[firewall]\nbackend = "{args.backend}"\nports = [80, 443]\n'
        f'[reputation]\nstate_dir = "{work}/reputation"\nhttp_timeout = {args.timeout}\n'
        f"http_interval = 0\n"
    )
    hang_dns = work / "hang-dns.toml"
    hang_dns.write_text(
        base + f'[reputation.dns]\nnameservers = ["{dns_hole.address}"]\ntimeout = {args.timeout}\n'
        f'[reputation.httpbl]\nenabled = true\nkey = "{HTTPBL_KEY}"\n'
    )
    hang_smtp = work / "hang-smtp.toml"
    hang_smtp.write_text(
        base + f'[reputation.dns]\nnameservers = ["{zone.address}"]\n'
        '[reputation.notify]\nenabled = true\nsender = "bench@reporter.example"\n'
        f'ip_contact_zone = ""\nsmtp_host = "127.0.0.1"\nsmtp_port = {smtp_hole.port}\n'
        f'smtp_timeout = {args.timeout}\nretry_after = "1s"\nmax_attempts = 100\n'
    )
    hang_http = work / "hang-http.toml"
    hang_http.write_text(
        base + f'[reputation.abuseipdb]\nkey = "k"\nurl = "http://{http_hole.address}/"\n'
    )
    config = hang_dns
    imr = [IMR, "--config", str(config)]
    run(["ip", "netns", "add", ns])
    rows: list[tuple[str, str, str, str]] = []
    hangers: list[Hanger] = []
    waits: dict[str, list[float | None]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        run(["ip", "netns", "exec", ns, *imr, "server", "start"])
        socket_path = work / "imr.sock"
        for ip in attackers:
            run([*imr, "block", ip, "--reason", "bench", "--source", "bench"])
        run([*REP, "--config", str(hang_smtp), "reports", "collect", "--from", "state"])
        source = addresses(1)
        measure(socket_path, source, 200, args.clients)  # warm up

        def silent_round() -> dict[str, float]:
            # Each command waits on its silent server for up to --timeout seconds, longer
            # than the round: DNS, SMTP and HTTP hang from its first block to its last.
            hangers[:] = [
                Hanger(
                    "imr check (DNS silent)",
                    [*REP, "--config", str(hang_dns), "check", "192.0.2.1"],
                ),
                Hanger(
                    "imr reports send (SMTP relay silent)",
                    [*REP, "--config", str(hang_smtp), "reports", "send"],
                ),
                Hanger(
                    "imr report --submit (HTTP API silent)",
                    [*REP, "--config", str(hang_http), "report", *SUBMIT_ARGS],
                ),
            ]
            time.sleep(4.0)  # past start-up (imports): every command is now inside its wait
            early = [h.name for h in hangers if not h.still_waiting()]
            if early:
                raise RuntimeError(f"ended before the measurement: {early}")
            cpu_before = [h.cpu_seconds() for h in hangers]
            result = measure(socket_path, source, per_round, args.clients)
            for h, before in zip(hangers, cpu_before, strict=True):
                h.waited = time.monotonic() - h.started if h.still_waiting() else None
                waits.setdefault(h.name, []).append(h.waited)
                cpu.setdefault(h.name, []).append(h.cpu_seconds() - before)
                h.stop()
            return result

        # Rounds in the order quiet, silent, silent, quiet, ... so that drift (the state
        # growing, other load on the machine) falls on both sides alike.
        per_round = max(args.clients, args.count // args.rounds)
        quiet_runs: list[dict[str, float]] = []
        silent_runs: list[dict[str, float]] = []
        for n in range(args.rounds * 2):
            if n % 4 in (1, 2):
                silent_runs.append(silent_round())
            else:
                time.sleep(4.0)  # the same pause as a silent round, without the commands
                quiet_runs.append(measure(socket_path, source, per_round, args.clients))

        for label, key, unit in (
            ("latency p50, 1 client", "p50", "ms"),
            ("latency p99, 1 client", "p99", "ms"),
            ("throughput, 1 client", "single", "blocks/s"),
            (f"throughput, {args.clients} clients", "many", "blocks/s"),
        ):
            fmt = "{:,.2f} " if unit == "ms" else "{:,.0f} "
            q = statistics.median(r[key] for r in quiet_runs)
            s = statistics.median(r[key] for r in silent_runs)
            rows.append((label, fmt.format(q) + unit, fmt.format(s) + unit, f"{s / q:.2f}"))
        backend = json.loads(run([*imr, "server", "status", "--json"]).stdout)["backend_detail"]
    finally:
        for h in hangers:
            h.stop()
        subprocess.run([*imr, "server", "stop"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        zone.stop()
        for hole in (dns_hole, smtp_hole, http_hole):
            hole.close()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"backend: {backend}; {args.rounds} rounds of each kind, {per_round} blocks each;"
        " medians over the rounds\n"
    )
    print("| measure | quiet | DNS, SMTP and HTTP silent | ratio |\n| --- | --- | --- | --- |")
    for name, a, b, c in rows:
        print(f"| {name} | {a} | {b} | {c} |")
    print("\nreputation commands during the silent rounds (each started anew per round):\n")
    print("| command | still waiting at the round's end | had waited | CPU used in the round |")
    print("| --- | --- | --- | --- |")
    for name, waited in waits.items():
        done = [w for w in waited if w is not None]
        span = f"{min(done):.1f}-{max(done):.1f} s" if done else "-"
        used = f"{max(cpu[name]):.2f} s at most"
        print(f"| {name} | {len(done)} of {len(waited)} rounds | {span} | {used} |")


if __name__ == "__main__":
    main()
