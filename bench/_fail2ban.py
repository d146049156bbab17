"""fail2ban side by side: a fail2ban-server of its own inside a bench namespace.

Not a benchmark itself. The server runs in the foreground inside the
namespace (`ip netns exec` execs it, so the pid we hold is fail2ban's), with
its configuration, socket, pid file, database and log in a temporary
directory; it is stopped with `fail2ban-client stop` and, failing that,
killed by that pid. One jail, `imrbench`, with an nftables action (one
`nft add element` per ban, fail2ban's own mechanism) on ports 80 and 443,
like the imr bench daemon's configuration; or fail2ban's `iptables-multiport`
action (one `ip6tables -I f2b-imrbench 1 -s IP -j REJECT` per ban) with the
nft or the legacy iptables flavour (`action="iptables-nft"`/`"iptables-legacy"`).
Bans come from `fail2ban-client set imrbench banip ...`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

JAIL = "imrbench"
ETC = Path("/etc/fail2ban")


def available() -> bool:
    return shutil.which("fail2ban-server") is not None and (ETC / "action.d").is_dir()


def version() -> str:
    result = subprocess.run(
        ["fail2ban-server", "-V"], capture_output=True, text=True, timeout=30, check=False
    )
    return result.stdout.strip() or "?"


@dataclass
class Fail2ban:
    ns: str
    root: Path
    action: str = "nftables"  # or "iptables-nft", "iptables-legacy"
    process: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        return self.root / "f2b.sock"

    def client(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["fail2ban-client", "-c", str(self.root / "etc"), "-s", str(self.sock), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 60) -> float:
        """Start the server; seconds until the jail answers (its bans are not yet all back)."""
        t0 = time.perf_counter()
        self.process = subprocess.Popen(
            [
                *("ip", "netns", "exec", self.ns, "fail2ban-server", "-f", "-x"),
                *("-c", str(self.root / "etc"), "-s", str(self.sock)),
                *("-p", str(self.root / "f2b.pid"), "--logtarget", str(self.root / "f2b.log")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fail2ban-server exited: {self.log_tail()}")
            if self.client("status", JAIL, timeout=10).returncode == 0:
                return time.perf_counter() - t0
            time.sleep(0.05)
        raise RuntimeError(f"fail2ban-server not ready in {timeout} s: {self.log_tail()}")

    def stop(self, timeout: float = 120) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.client("stop", timeout=timeout)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def ban(self, ips: Sequence[str], chunk: int = 500) -> None:
        """Ask for bans: fail2ban-client takes many addresses per call."""
        for i in range(0, len(ips), chunk):
            result = self.client("set", JAIL, "banip", *ips[i : i + chunk])
            if result.returncode != 0:
                raise RuntimeError(f"fail2ban-client banip failed: {result.stderr.strip()}")

    def in_kernel(self) -> int:
        """Bans in the kernel: elements in fail2ban's IPv6 set (its nftables action's table
        f2b-table), or rules in its ip6tables chain f2b-imrbench."""
        if self.action.startswith("iptables-"):
            tool = f"ip6tables-{self.action.removeprefix('iptables-')}"
            listing = subprocess.run(
                ["ip", "netns", "exec", self.ns, tool, "-w", "10", "-S", f"f2b-{JAIL}"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            prefix = f"-A f2b-{JAIL} -s "
            return sum(1 for line in listing.stdout.splitlines() if line.startswith(prefix))
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                "nft",
                "-j",
                "list",
                "set",
                "inet",
                "f2b-table",
                f"addr6-set-{JAIL}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            return 0
        for item in json.loads(result.stdout)["nftables"]:
            if "set" in item:
                return len(item["set"].get("elem", []))
        return 0

    def wait_in_kernel(self, count: int, timeout: float, poll: float = 0.2) -> float | None:
        """Seconds until the kernel holds `count` bans (from now), or None on timeout."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.in_kernel() >= count:
                return time.perf_counter() - t0
            time.sleep(poll)
        return None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " / ".join((self.root / "f2b.log").read_text().splitlines()[-3:])
        return "(no log)"


@contextlib.contextmanager
def fail2ban(ns: str, action: str = "nftables") -> Iterator[Fail2ban]:
    """A configured fail2ban for namespace `ns`; stopped and its directory removed afterwards.
    `action`: "nftables", "iptables-nft" or "iptables-legacy" (see the module docstring)."""
    root = Path(tempfile.mkdtemp(prefix="imrbench-f2b-"))
    etc = root / "etc"
    shutil.copytree(ETC, etc, symlinks=True)
    # Only our jail: Debian's jail.d enables sshd.
    for extra in (etc / "jail.d").glob("*"):
        extra.unlink()
    for extra in (etc / "fail2ban.d").glob("*"):
        extra.unlink()
    (etc / "fail2ban.local").write_text(
        "[Definition]\n"
        f"loglevel = NOTICE\nlogtarget = {root}/f2b.log\n"
        f"socket = {root}/f2b.sock\npidfile = {root}/f2b.pid\n"
        f"dbfile = {root}/f2b.sqlite3\ndbpurgeage = 2d\n"
    )
    (etc / "filter.d" / f"{JAIL}.conf").write_text("[Definition]\nfailregex = ^never <HOST>$\n")
    (root / "empty.log").write_text("")
    banaction = "nftables"
    if action.startswith("iptables-"):
        banaction = "iptables"
        flavour = action.removeprefix("iptables-")
        # iptables.conf runs plain `iptables`/`ip6tables` (the host's alternative): name the
        # flavour's own tool instead.
        (etc / "action.d" / "iptables.local").write_text(
            f"[Init]\niptables = iptables-{flavour} <lockingopt>\n"
            f"[Init?family=inet6]\niptables = ip6tables-{flavour} <lockingopt>\n"
        )
    (etc / "jail.local").write_text(
        f"[DEFAULT]\nbanaction = {banaction}-multiport\n"
        f"banaction_allports = {banaction}-allports\n"
        f"[{JAIL}]\nenabled = true\nfilter = {JAIL}\nbackend = polling\n"
        f"logpath = {root}/empty.log\nport = 80,443\nprotocol = tcp\nmaxretry = 1\n"
        "bantime = 1d\n"
    )
    f2b = Fail2ban(ns, root, action)
    try:
        yield f2b
    finally:
        f2b.stop()
        shutil.rmtree(root, ignore_errors=True)
