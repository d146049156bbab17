"""Run the real daemon (root, real backend) inside throwaway namespaces, and real clients.

The topology: namespace `server` runs imr and a TCP listener; namespace
`attacker` (203.0.113.66, 2001:db8::66) and namespace `innocent`
(192.0.2.77, 2001:db8:1::77) connect to it over veth pairs. Clients run as
real unprivileged users (created with useradd) over the Unix socket, which
lives on the file system and needs no namespace.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from netns import Netns, connect, create_netns

REPO = Path(__file__).resolve().parent.parent
IMR = str(Path(sys.executable).parent / "imr")
PYTHON = sys.executable
TESTS = Path(__file__).resolve().parent

GROUP = "imrtest"
BLOCKER = "imrtest-web"  # role: block
READER = "imrtest-reader"  # role: read
NOBODY = "imrtest-nobody"  # in the socket group, but no role

SERVER_V4, SERVER_V6 = "203.0.113.1", "2001:db8::1"
ATTACKER_V4, ATTACKER_V6 = "203.0.113.66", "2001:db8::66"
# The innocent client reaches the server over a second link.
SERVER_SIDE_V4, SERVER_SIDE_V6 = "192.0.2.1", "2001:db8:1::1"
INNOCENT_V4, INNOCENT_V6 = "192.0.2.77", "2001:db8:1::77"


def ensure_test_users() -> list[str]:
    """Create the test group and users if missing; return the names created (to delete)."""
    created = []
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        created.append(f"group:{GROUP}")
    for user in (BLOCKER, READER, NOBODY):
        try:
            pwd.getpwnam(user)
            # Left over from an interrupted run, perhaps without the group: repair it.
            subprocess.run(["usermod", "--append", "--groups", GROUP, user], check=True)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--groups",
                    GROUP,
                    user,
                ],
                check=True,
            )
            created.append(user)
    return created


def remove_test_users(created: list[str]) -> None:
    for name in created:
        if name.startswith("group:"):
            subprocess.run(["groupdel", name.removeprefix("group:")], check=False)
        else:
            subprocess.run(["userdel", name], check=False)


@dataclass
class Daemon:
    server: Netns
    attacker: Netns
    innocent: Netns
    root: Path  # world-traversable directory with config, socket, state
    listener: subprocess.Popen[str] | None = None
    extra_config: str = ""
    flavour: str = "nft"
    ports: tuple[int, ...] = (80,)
    ladder: str = '["1d", "7d"]'
    # Network escalation (issue #16): off unless a test is about it, as the tests block
    # many addresses of one /24 and read one kernel entry per address.
    escalation: bool = False
    started: list[int] = field(default_factory=list)

    @property
    def config_file(self) -> Path:
        return self.root / "imr.toml"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "imr.sock"

    @property
    def state_file(self) -> Path:
        return self.root / "state" / "state.db"

    @property
    def log_file(self) -> Path:
        return self.root / "imr.log"

    def write_config(self) -> None:
        ports = ", ".join(str(p) for p in self.ports)
        self.config_file.write_text(f"""
[server]
socket = "{self.socket}"
socket_group = "{GROUP}"
socket_mode = "0660"
pid_file = "{self.root / "run" / "imr.pid"}"
log_file = "{self.log_file}"

[state]
path = "{self.state_file}"

[policy]
ladder = {self.ladder}

[firewall]
backend = "iptables"
iptables_flavour = "{self.flavour}"
protocol = "tcp"
ports = [{ports}]

[access.users]
"{BLOCKER}" = "block"
"{READER}" = "read"

[protect]
allowlist = ["198.51.100.0/24"]

[escalation]
enabled = {"true" if self.escalation else "false"}
{self.extra_config}
""")
        self.config_file.chmod(0o644)

    # The daemon -------------------------------------------------------------------

    def imr_argv(self, *args: str) -> list[str]:
        return [IMR, "--config", str(self.config_file), *args]

    def start(self) -> subprocess.CompletedProcess[str]:
        result = self.server.run(*self.imr_argv("server", "start"), check=False, timeout=60)
        if result.returncode == 0 and (pid := self.pid()) is not None:
            self.started.append(pid)
        return result

    def stop(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.imr_argv("server", "stop"), capture_output=True, text=True, timeout=30, check=False
        )

    def pid(self) -> int | None:
        try:
            return int((self.root / "run" / "imr.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill_everything(self) -> None:
        for pid in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.listener is not None:
            self.listener.kill()
            self.listener.wait(5)

    # Clients ------------------------------------------------------------------------

    def as_user(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the imr CLI as an unprivileged user (a real uid, checked by SO_PEERCRED)."""
        argv = ["runuser", "-u", user, "--", *self.imr_argv(*args)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    def as_root(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.imr_argv(*args), capture_output=True, text=True, timeout=30, check=False
        )

    # The kernel and the state file ------------------------------------------------

    def rules(self, family: int = 4) -> str:
        tool = {4: "iptables", 6: "ip6tables"}[family]
        binary = f"{tool}-{self.flavour}"
        return self.server.run(binary, "-S", check=False).stdout

    def state_rows(self, query: str) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(self.state_file)) as db:
            return db.execute(query).fetchall()

    def probe(self, client: Netns, host: str, port: int) -> str:
        return client.run(
            PYTHON, str(TESTS / "tcp_probe.py"), host, str(port), "2", check=False
        ).stdout.strip()

    def listen(self, *ports: int) -> None:
        self.listener = subprocess.Popen(
            self.server.argv(PYTHON, str(TESTS / "tcp_listen.py"), *map(str, ports)),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.listener.stdout is not None
        assert self.listener.stdout.readline().strip() == "listening"

    def wait_for(self, predicate: object, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return True
            time.sleep(0.1)
        return False


def require_unprivileged_access() -> None:
    """Skip, saying why, when unprivileged users cannot run this checkout's imr.

    The clients under test run as real users (runuser): they need every
    directory above the checkout to be world-traversable.
    """
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", IMR, "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        import pytest

        pytest.skip(
            f"unprivileged users cannot run {IMR} ({probe.stderr.strip()[:120]}):"
            " put the checkout under a world-readable directory"
        )


@contextlib.contextmanager
def daemon_world(flavour: str = "nft") -> Iterator[Daemon]:
    """Three namespaces, a world-readable work directory, and cleanup whatever happens."""
    require_unprivileged_access()
    namespaces: list[Netns] = []
    root = Path(tempfile.mkdtemp(prefix="imrtest-", dir="/tmp"))
    root.chmod(0o755)
    daemon: Daemon | None = None
    try:
        server, attacker, innocent = (create_netns(p) for p in ("imrsrv", "imratk", "imrinn"))
        namespaces += [server, attacker, innocent]
        connect(
            server,
            attacker,
            [f"{SERVER_V4}/24", f"{SERVER_V6}/64"],
            [f"{ATTACKER_V4}/24", f"{ATTACKER_V6}/64"],
        )
        connect(
            server,
            innocent,
            [f"{SERVER_SIDE_V4}/24", f"{SERVER_SIDE_V6}/64"],
            [f"{INNOCENT_V4}/24", f"{INNOCENT_V6}/64"],
        )
        # REJECT answers are ICMP errors, which the kernel rate-limits per peer:
        # tests probe the same peer several times in a second.
        server.run("sysctl", "-qw", "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0")
        daemon = Daemon(server, attacker, innocent, root, flavour=flavour)
        yield daemon
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.kill_everything()
        for ns in namespaces:
            ns.delete()
        shutil.rmtree(root, ignore_errors=True)
