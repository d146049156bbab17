"""A throwaway Debian 12 with systemd as PID 1, for the package test (tests/test_package.py).

The *tree* is a minimal bookworm made by `debootstrap`; it is cached as a tar file under
CACHE_DIR, keyed by the package list, so only the first run pays for the download. A
*machine* is one boot of a fresh copy of the tree under `systemd-nspawn --private-network`:
its own network namespace (the firewall rules imr makes live there and die with it), its own
PID 1 and its own units. Nothing the container does reaches the host's services or firewall.
Commands run inside with `nsenter` into every namespace of the container's PID 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What imr's package needs at run time (debian/control), plus what the test itself uses.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "nftables",
    "iptables",
    "ipset",
    "logrotate",
    "procps",
    "libcap2-bin",
)
CACHE_DIR = Path(os.environ.get("IMR_TEST_CACHE", "/var/cache/imr-test"))
BOOT_TIMEOUT = 60.0


def tools_missing(also: Sequence[str] = ()) -> list[str]:
    tools = ("debootstrap", "systemd-nspawn", "nsenter", *also)
    return [tool for tool in tools if not shutil.which(tool)]


def tree_key(packages: Sequence[str] = PACKAGES) -> str:
    text = "\n".join([SUITE, MIRROR, *sorted(packages)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_tree(packages: Sequence[str] = PACKAGES) -> Path:
    """The tar of a bootstrapped tree; made once (about 30 s) and then reused."""
    tar = CACHE_DIR / f"{SUITE}-{tree_key(packages)}.tar"
    if tar.exists():
        return tar
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as work:
        root = Path(work) / "root"
        include = ",".join(packages)
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={include}", SUITE, str(root), MIRROR],
            check=True,
            capture_output=True,
            timeout=900,
        )
        # The apt lists and .deb cache are not needed to boot; they would double the tar.
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        partial = tar.with_suffix(".partial")
        subprocess.run(
            ["tar", "--numeric-owner", "-cf", str(partial), "-C", str(root), "."],
            check=True,
            timeout=300,
        )
        partial.rename(tar)  # atomic: a concurrent or killed run never sees half a tar
    for stale in CACHE_DIR.glob(f"{SUITE}-*.tar"):
        if stale != tar:
            stale.unlink()  # an older package list: keep the cache at one tree
    return tar


@dataclass
class Machine:
    """One booted container: `nspawn` is the systemd-nspawn process, `leader` its PID 1."""

    root: Path
    nspawn: subprocess.Popen[bytes]
    leader: int

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (every namespace of its PID 1)."""
        nsenter = ["nsenter", "-t", str(self.leader), "-a", "--", *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        result = subprocess.run(
            nsenter, capture_output=True, text=True, timeout=timeout, input=input, env=env
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def wait_running(self, timeout: float = BOOT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"container did not finish booting: {state!r}")


def _descendants(pid: int) -> Iterator[int]:
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                yield int(child)
                yield from _descendants(int(child))


def _container_leader(nspawn: int, timeout: float = 30) -> int:
    """The host PID of the container's PID 1: the descendant whose innermost NSpid is 1."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _descendants(nspawn):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    fields = line.split()
                    if fields[:1] == ["NSpid:"] and len(fields) > 2 and fields[-1] == "1":
                        return pid
        time.sleep(0.2)
    raise AssertionError("systemd-nspawn did not start the container's PID 1")


@contextlib.contextmanager
def booted(tar: Path, workdir: Path) -> Iterator[Machine]:
    """Unpack a fresh copy of the tree and boot it; power it off (then kill) on the way out."""
    root = workdir / "root"
    root.mkdir()
    subprocess.run(
        ["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(root)], check=True, timeout=300
    )
    (root / "etc/hostname").write_text("imr-test\n")
    nspawn = subprocess.Popen(
        [
            "systemd-nspawn", "-q", "-D", str(root), "--register=no", "--private-network",
            "--keep-unit", "-b",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        machine = Machine(root, nspawn, _container_leader(nspawn.pid))
        machine.wait_running()
        yield machine
    finally:
        _power_off(nspawn, root)


def _power_off(nspawn: subprocess.Popen[bytes], root: Path) -> None:
    with contextlib.suppress(Exception):
        leader = _container_leader(nspawn.pid, timeout=1)
        subprocess.run(
            ["nsenter", "-t", str(leader), "-a", "--", "systemctl", "poweroff"],
            capture_output=True,
            timeout=10,
        )
    try:
        nspawn.wait(timeout=30)
    except subprocess.TimeoutExpired:
        nspawn.kill()  # our own process, by its pid; the container dies with it
        nspawn.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)
