"""Throwaway network namespaces for tests: every firewall change happens in one of these.

Never touches the host's own namespace: commands run through `ip netns exec`,
and in-process backend tests enter a namespace only for the calling thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), check=check, capture_output=True, text=True, timeout=timeout, input=input
    )


@dataclass
class Netns:
    name: str

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*argv), check=check, timeout=timeout, input=input)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the calling thread (and the processes it starts) inside this namespace."""
        with open("/proc/thread-self/ns/net") as home:
            with open(f"/run/netns/{self.name}") as target:
                _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def delete(self) -> None:
        run(["ip", "netns", "delete", self.name], check=False)


def create_netns(prefix: str = "imrt") -> Netns:
    name = f"{prefix}-{os.getpid()}-{next(_counter)}"
    run(["ip", "netns", "add", name])
    ns = Netns(name)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


@contextlib.contextmanager
def netns(prefix: str = "imrt") -> Iterator[Netns]:
    ns = create_netns(prefix)
    try:
        yield ns
    finally:
        ns.delete()


def connect(a: Netns, b: Netns, a_addrs: Sequence[str], b_addrs: Sequence[str]) -> None:
    """A veth pair between two namespaces, with addresses in CIDR form ("192.0.2.1/24").

    IPv6 addresses are added with nodad so they are usable at once.
    """
    index = next(_counter)
    left, right = f"imrva{os.getpid() % 10000}x{index}", f"imrvb{os.getpid() % 10000}x{index}"
    run(
        [
            "ip",
            "link",
            "add",
            left,
            "netns",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            right,
            "netns",
            b.name,
        ]
    )
    for ns, dev, addrs in ((a, left, a_addrs), (b, right, b_addrs)):
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            ns.run("ip", "addr", "add", addr, "dev", dev, *extra)
        ns.run("ip", "link", "set", dev, "up")
