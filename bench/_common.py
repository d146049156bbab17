"""What the bench scripts share: a daemon in a throwaway namespace, a load client, result rows.

Not a benchmark itself. Every script prints a markdown table and, with
`--rows FILE`, appends its figures as JSON lines for `bench/run-all`:
{"bench": ..., "measure": ..., "imr": ..., "fail2ban": ..., "ratio": ...}.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMR = str(Path(sys.executable).parent / "imr")


def v6_address(n: int) -> str:
    """The n-th address of 2001:db8::/32 (documentation), never ::0, in canonical text as
    real clients send it (a web server prints addresses that way)."""
    return str(ipaddress.IPv6Address(V6_BASE + n + 1))


V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))


def run(argv: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def load() -> str:
    """The 1-minute load average and what is running, for the record."""
    return f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the bench changes the firewall of namespaces it creates")


@dataclass
class Rows:
    """Figures for the printed table and for run-all."""

    bench: str
    rows: list[dict[str, str]] = field(default_factory=list)

    def add(self, measure: str, imr: str, fail2ban: str = "", ratio: str = "") -> None:
        self.rows.append(
            {
                "bench": self.bench,
                "measure": measure,
                "imr": imr,
                "fail2ban": fail2ban,
                "ratio": ratio,
            }
        )
        print(
            f"  {measure}: {imr}" + (f" | fail2ban {fail2ban} | {ratio}" if fail2ban else ""),
            file=sys.stderr,
            flush=True,
        )

    def print_table(self) -> None:
        with_f2b = any(r["fail2ban"] for r in self.rows)
        head = ["measure", "imr"] + (["fail2ban", "imr / fail2ban"] if with_f2b else [])
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in self.rows:
            cells = [r["measure"], r["imr"]] + ([r["fail2ban"], r["ratio"]] if with_f2b else [])
            print("| " + " | ".join(cells) + " |")

    def save(self, path: Path | None) -> None:
        if path is not None:
            with path.open("a") as out:
                for r in self.rows:
                    out.write(json.dumps(r) + "\n")


# -- the daemon ----------------------------------------------------------------------


@dataclass
class BenchDaemon:
    """The imr daemon, as root, in its own network namespace and work directory."""

    ns: str
    work: Path
    backend: str
    flavour: str = "nft"
    max_connections: int = 64
    escalation: bool = False

    @property
    def config(self) -> Path:
        return self.work / "imr.toml"

    @property
    def socket(self) -> Path:
        return self.work / "imr.sock"

    @property
    def state(self) -> Path:
        return self.work / "state.db"

    def write_config(self) -> None:
        self.config.write_text(
            f'[server]\nsocket = "{self.socket}"\npid_file = "{self.work}/imr.pid"\n'
            f'log_file = "{self.work}/imr.log"\nmax_connections = {self.max_connections}\n'
            f'[state]\npath = "{self.state}"\n'
            f'[firewall]\nbackend = "{self.backend}"\niptables_flavour = "{self.flavour}"\n'
            "ports = [80, 443]\n"
            # One kernel entry per address, as the benches count them; bench/prefixes.py
            # measures escalation. An older build on PYTHONPATH (bench/round_two.py's
            # "before") has no [escalation] and refuses unknown keys.
            + (
                f"[escalation]\nenabled = {'true' if self.escalation else 'false'}\n"
                if _knows("escalation")
                else ""
            )
        )

    def imr(self, *args: str) -> list[str]:
        return [IMR, "--config", str(self.config), *args]

    def start(self) -> float:
        """Start in the background; seconds until `imr server start` returned (socket ready)."""
        t0 = time.perf_counter()
        run(["ip", "netns", "exec", self.ns, *self.imr("server", "start")])
        took = time.perf_counter() - t0
        # Which build runs: the daemon inherits PYTHONPATH (bench/round_two.py checks this).
        with contextlib.suppress(OSError, ValueError):
            environ = Path(f"/proc/{self.pid()}/environ").read_bytes().split(b"\0")
            paths = [e[11:].decode() for e in environ if e.startswith(b"PYTHONPATH=")]
            print(f"daemon {self.pid()}: PYTHONPATH={paths[0] if paths else '-'}", file=sys.stderr)
        return took

    def stop(self) -> None:
        subprocess.run(self.imr("server", "stop"), capture_output=True, check=False, timeout=60)

    def status(self) -> dict[str, object]:
        result: dict[str, object] = json.loads(run(self.imr("server", "status", "--json")).stdout)
        return result

    def pid(self) -> int:
        return int((self.work / "imr.pid").read_text().strip())

    def in_ns(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.ns, *argv], timeout=timeout)


def _knows(section: str) -> bool:
    """Whether the imr on the path (PYTHONPATH may name another build) has this section."""
    from imr.config import Config

    return section in Config.model_fields


@contextlib.contextmanager
def bench_daemon(
    backend: str, flavour: str = "nft", prefix: str = "imrbench"
) -> Iterator[BenchDaemon]:
    """A namespace and a work directory; the daemon is stopped and both removed afterwards."""
    ns = f"{prefix}-{os.getpid()}-{next(_counter)}"
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    run(["ip", "netns", "add", ns])
    daemon = BenchDaemon(ns, work, backend, flavour)
    daemon.write_config()
    try:
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(work, ignore_errors=True)


_counter = itertools.count()


# -- the load client -------------------------------------------------------------------


async def _client(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ips: Sequence[str],
    latencies: list[float],
    per_request: int,
) -> None:
    """One connection: its next request when the reply came; every address must be blocked."""
    reader, writer = conn
    for start in range(0, len(ips), per_request):
        chunk = ips[start : start + per_request]
        if per_request == 1:
            line = b'{"v":1,"op":"block","ip":"' + chunk[0].encode() + b'"}\n'
        else:
            line = json.dumps({"v": 1, "op": "block_many", "ips": list(chunk)}).encode() + b"\n"
        t0 = time.perf_counter()
        writer.write(line)
        reply = await reader.readline()
        latencies.append(time.perf_counter() - t0)
        if b'"ok":true' not in reply or b'"ok":false' in reply:
            raise RuntimeError(f"block {chunk[0]}... failed: {reply[:200]!r}")


def block_load(
    path: Path, ips: Sequence[str], clients: int, per_request: int = 1
) -> tuple[float, list[float]]:
    """Block `ips` over `clients` connections, each sending its next request after the reply.

    `per_request` > 1 sends that many addresses per `block_many` request. Returns (seconds
    from the first request to the last reply, per-request latencies). One asyncio process
    is cheaper per request than threads, so the client takes as little as it can of the
    CPU it shares with the daemon.
    """
    shares = [ips[i::clients] for i in range(clients) if ips[i::clients]]
    latencies: list[float] = []

    async def main() -> float:
        conns = [await asyncio.open_unix_connection(str(path), limit=2**20) for _ in shares]
        try:
            t0 = time.perf_counter()
            await asyncio.gather(
                *(_client(c, s, latencies, per_request) for c, s in zip(conns, shares, strict=True))
            )
            return time.perf_counter() - t0
        finally:
            for _, writer in conns:
                writer.close()

    return asyncio.run(main()), latencies


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def wait_for_socket(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return True
        time.sleep(0.01)
    return False
