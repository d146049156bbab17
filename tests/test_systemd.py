"""systemd integration: the unit files, sd_notify, the watchdog and socket activation.

There is no running systemd here: the units are checked with `systemd-analyze
--offline`, and the daemon is run by hand with the variables systemd would
set (NOTIFY_SOCKET, WATCHDOG_USEC, LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES), the
socket either made by `systemd-socket-activate` or bound by the test exactly
as imr.socket would (mode 0660, a group).
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imr.config import ServerConfig
from imr.server.systemd import (
    ActivationError,
    Notifier,
    PassedSocket,
    listen_fds,
    unix_listener_for,
    watchdog_interval,
)

from daemon_harness import (
    ATTACKER_V4,
    BLOCKER,
    GROUP,
    IMR,
    Daemon,
    daemon_world,
)

UNITS_DIR = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
UNITS = ("imr.service", "imr.socket", "imr-watch.service", "imr-scan.service", "imr-scan.timer")
SERVICES = ("imr.service", "imr-watch.service", "imr-scan.service")
INSTALLED_IMR = "/usr/local/bin/imr"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)"
)


# The unit files -------------------------------------------------------------------


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units with ExecStart= pointing at this checkout's imr (verify wants a real binary)."""
    for name in UNITS:
        text = (UNITS_DIR / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED_IMR, IMR))
    return tmp_path


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(units: Path, name: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(units / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and unparsable values: any output is a finding.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


def exposure(units: Path, name: str) -> tuple[float, str]:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(units / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    return float(match.group(1)), match.group(2)


@needs_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_service_exposure_is_ok_or_better(units: Path, name: str) -> None:
    # systemd's scale: < 1.0 SAFE (0 PERFECT), < 5.0 OK, then MEDIUM, EXPOSED, UNSAFE.
    value, level = exposure(units, name)
    assert level in {"PERFECT", "SAFE", "OK"}, (value, level)
    assert value < 5.0


@needs_analyze
def test_a_weakened_service_is_caught(units: Path) -> None:
    """The exposure check can fail: the same unit without its sandbox is not OK."""
    text = (units / "imr.service").read_text()
    kept = [
        line
        for line in text.splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    ]
    (units / "weak.service").write_text("\n".join(kept) + "\n")
    value, level = exposure(units, "weak.service")
    assert value >= 5.0 and level not in {"PERFECT", "SAFE", "OK"}


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS_DIR / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_socket_unit_matches_the_default_config_and_the_documented_group() -> None:
    socket_unit = unit_settings("imr.socket")
    defaults = ServerConfig()
    assert socket_unit["ListenStream"] == [str(defaults.socket)]
    assert socket_unit["SocketMode"] == [defaults.socket_mode]
    assert socket_unit["SocketGroup"] == ["imr"]
    assert "g imr -" in (UNITS_DIR / "imr.sysusers.conf").read_text()
    docs = (UNITS_DIR.parent.parent / "docs" / "operations.md").read_text()
    assert 'socket_group = "imr"' in docs


def test_daemon_unit_essentials() -> None:
    service = unit_settings("imr.service")
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]  # keeps imr.socket's file
    assert "User" not in service  # netfilter needs root's CAP_NET_ADMIN in the host namespace
    assert str(ServerConfig().pid_file).startswith("/run/imr/")
    for name in ("imr-watch.service", "imr-scan.service"):
        follower = unit_settings(name)
        assert follower["User"] == ["imr-logscan"]
        assert follower["SupplementaryGroups"] == ["adm imr"]
        assert follower["CapabilityBoundingSet"] == [""]


# The protocol pieces, without a daemon --------------------------------------------


def test_notifier_sends_datagrams_to_a_path_and_an_abstract_name(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(2)
        assert Notifier.from_environ({"NOTIFY_SOCKET": str(path)}).ready("serving: x\ny")
        assert receiver.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=serving: x y"]
    name = f"imrtest-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(2)
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert receiver.recv(4096) == b"WATCHDOG=1"


def test_notifier_without_or_with_a_dead_socket_does_nothing(tmp_path: Path) -> None:
    assert not Notifier.from_environ({}).enabled
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "relative"}).enabled
    assert Notifier.from_environ({}).ready("x") is False
    assert Notifier(str(tmp_path / "nobody-listens")).stopping() is False  # no exception


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "42"}, 42) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "41"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval({}, 42) is None


def test_listen_fds_reads_and_removes_the_variables() -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": "7", "LISTEN_FDNAMES": "imr.socket", "X": "1"}
    assert listen_fds(environ, 8) == []  # another process's sockets
    assert environ == {"X": "1"}
    assert listen_fds({}, 8) == []
    with pytest.raises(ActivationError):
        listen_fds({"LISTEN_FDS": "one", "LISTEN_PID": "8"}, 8)


def test_a_passed_socket_at_another_path_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(tmp_path / "other.sock"))
        listening.listen()
        fd = os.dup(listening.fileno())
        with pytest.raises(ActivationError, match="ListenStream"):
            unix_listener_for([PassedSocket(fd, "imr.socket")], tmp_path / "imr.sock")
        with pytest.raises(OSError):
            os.fstat(fd)  # the unusable socket was closed
        fd = os.dup(listening.fileno())
        chosen = unix_listener_for([PassedSocket(fd, "imr.socket")], tmp_path / "other.sock")
        assert chosen is not None and chosen.fileno() == fd
        chosen.close()


# The real daemon under a fake service manager --------------------------------------


@pytest.fixture
def world(test_users: None) -> Iterator[Daemon]:
    with daemon_world() as daemon:
        daemon.write_config()
        yield daemon


class Notifications:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.log: list[tuple[float, list[str]]] = []

    def wait_for(self, field: str, timeout: float) -> float:
        """Receive until a message holds `field`; return when it arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = data.decode().split("\n")
            now = time.monotonic()
            self.log.append((now, fields))
            if field in fields:
                return now
        raise AssertionError(f"no {field} within {timeout}s; got {self.log}")

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def foreground(
    argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()
) -> Iterator[subprocess.Popen[str]]:
    """The daemon in the foreground, as systemd runs it; killed by its pid if a test fails."""
    process = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        pass_fds=pass_fds,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def ping(path: Path, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        client.sendall(b'{"op": "ping", "id": "1"}\n')
        return client.recv(4096)


@needs_root
def test_ready_after_the_socket_serves_then_watchdog_pings_then_stopping(world: Daemon) -> None:
    notifications = Notifications(world.root / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(notifications.path), WATCHDOG_USEC="400000")
    try:
        argv = world.server.argv(*world.imr_argv("server", "start", "--foreground"))
        with foreground(argv, env) as daemon:
            ready_at = notifications.wait_for("READY=1", 60)
            # The moment READY=1 is out, a client must be served: no retry here.
            assert b'"ok":true' in ping(world.socket)
            ready = next(fields for _, fields in notifications.log if "READY=1" in fields)
            assert any(f.startswith("STATUS=serving:") for f in ready)
            assert f"MAINPID={daemon.pid}" in ready
            assert any("STATUS=starting" in f for _, fields in notifications.log for f in fields)

            pings = [notifications.wait_for("WATCHDOG=1", 2) for _ in range(5)]
            gaps = [b - a for a, b in zip([ready_at, *pings], pings, strict=False)]
            assert all(gap < 0.4 for gap in gaps), gaps  # at least every WATCHDOG_USEC
            assert sum(gaps) / len(gaps) > 0.1, gaps  # about every half of it, not a flood

            daemon.send_signal(signal.SIGTERM)
            notifications.wait_for("STOPPING=1", 20)
            assert daemon.wait(20) == 0
    finally:
        notifications.close()


@needs_root
def test_socket_activation_with_systemd_socket_activate(world: Daemon) -> None:
    tool = shutil.which("systemd-socket-activate") or "/lib/systemd/systemd-socket-activate"
    if not os.access(tool, os.X_OK):
        pytest.skip("systemd-socket-activate not installed (apt: systemd)")
    world.socket.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        tool,
        "--listen",
        str(world.socket),
        "--fdname=imr.socket",
        *world.server.argv(*world.imr_argv("server", "start", "--foreground")),
    ]
    with foreground(argv, dict(os.environ)) as daemon:
        # The tool listens, and starts the daemon on the first connection, which
        # waits in the socket's queue and is answered once the daemon is up.
        assert world.wait_for(world.socket.exists, 10)
        assert b'"ok":true' in ping(world.socket, timeout=60)
        assert world.pid() == daemon.pid  # exec'd in place: LISTEN_PID was right
        status = world.as_root("server", "status")
        assert status.returncode == 0, status.stderr
        inode = world.socket.stat().st_ino
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        output = daemon.stdout.read() if daemon.stdout else ""
    assert "passed by systemd" in output, output
    # The socket belongs to the socket manager: the daemon leaves it where it was.
    assert world.socket.is_socket() and world.socket.stat().st_ino == inode


def _pings(path: Path) -> bool:
    try:
        return b'"ok":true' in ping(path)
    except OSError:
        return False


ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="imr.socket")
os.execvp(sys.argv[2], sys.argv[2:])
"""


@needs_root
def test_socket_activation_keeps_mode_and_group_and_serves_unprivileged_clients(
    world: Daemon,
) -> None:
    """As imr.socket does it: bound by the manager, mode 0660, group imrtest, fd 3."""
    world.socket.parent.mkdir(parents=True, exist_ok=True)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(world.socket))
    os.chown(world.socket, 0, grp.getgrnam(GROUP).gr_gid)
    world.socket.chmod(0o660)
    listening.listen()
    inode = world.socket.stat().st_ino
    argv = [
        sys.executable,
        "-c",
        ACTIVATE,
        str(listening.fileno()),
        *world.server.argv(*world.imr_argv("server", "start", "--foreground")),
    ]
    try:
        with foreground(argv, dict(os.environ), pass_fds=(listening.fileno(),)) as daemon:
            assert world.wait_for(lambda: _pings(world.socket), 60), "daemon did not serve"
            result = world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "activated")
            assert result.returncode == 0, result.stderr
            assert f"-s {ATTACKER_V4}/32" in world.rules(4)
            assert world.state_rows("SELECT ip FROM blocks") == [(ATTACKER_V4,)]
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(20) == 0
            output = daemon.stdout.read() if daemon.stdout else ""
        assert "passed by systemd" in output and "make SocketMode" not in output, output
        info = world.socket.stat()
        assert stat.S_ISSOCK(info.st_mode) and info.st_ino == inode  # not unlinked, not remade
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == grp.getgrnam(GROUP).gr_gid
    finally:
        listening.close()


@needs_root
def test_socket_activation_at_the_wrong_path_is_refused_clearly(world: Daemon) -> None:
    world.socket.parent.mkdir(parents=True, exist_ok=True)
    elsewhere = world.root / "run" / "elsewhere.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(elsewhere))
    listening.listen()
    argv = [
        sys.executable,
        "-c",
        ACTIVATE,
        str(listening.fileno()),
        *world.server.argv(*world.imr_argv("server", "start", "--foreground")),
    ]
    try:
        with foreground(argv, dict(os.environ), pass_fds=(listening.fileno(),)) as daemon:
            assert daemon.wait(60) == 1
            output = daemon.stdout.read() if daemon.stdout else ""
        assert "ListenStream=" in output and str(world.socket) in output, output
        assert "Traceback" not in output
        assert not world.socket.exists()
    finally:
        listening.close()


# The daemon inside imr.service's sandbox -----------------------------------------------
#
# Without systemd, the restrictions that could break the firewall tools are
# applied by hand, from the unit file's own settings, right before exec:
# CapabilityBoundingSet=, NoNewPrivileges=, MemoryDenyWriteExecute= (the
# kernel's PR_SET_MDWE, which systemd also uses where it exists),
# RestrictAddressFamilies= and SystemCallFilter= (a seccomp filter built with
# libseccomp from `systemd-analyze syscall-filter`, EPERM for the rest, as
# SystemCallErrorNumber=EPERM says).

SANDBOX = r"""
import ctypes, json, os, socket, sys
import seccomp

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)

def prctl(*args):
    if libc.prctl(*args) != 0:
        raise SystemExit(f"prctl{args}: {os.strerror(ctypes.get_errno())}")

keep = set(spec["capabilities"])
last = int(open("/proc/sys/kernel/cap_last_cap").read())
for cap in range(last + 1):
    if cap not in keep:
        prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
prctl(65, 1, 0, 0, 0)  # PR_SET_MDWE: PR_MDWE_REFUSE_EXEC_GAIN

f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(1))
for name in spec["allow"]:
    if name == "socket":
        continue
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError, OSError):
        pass  # not a system call on this architecture
for family in spec["families"]:
    f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, getattr(socket, family)))
f.load()
if spec["listen_fd"] is not None:  # what imr.socket hands over
    os.dup2(spec["listen_fd"], 3)
    os.close(spec["listen_fd"])
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="imr.socket")
os.execv(spec["argv"][0], spec["argv"])
"""


def syscall_group(name: str, seen: set[str] | None = None) -> set[str]:
    """A systemd system call group, nested groups expanded."""
    seen = seen if seen is not None else set()
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                calls |= syscall_group(item, seen)
        else:
            calls.add(item)
    return calls


def sandbox_spec(argv: list[str], listen_fd: int | None) -> str:
    """The unit's CapabilityBoundingSet=, RestrictAddressFamilies=, SystemCallFilter=."""
    import json

    unit = unit_settings("imr.service")
    allowed: set[str] = set()
    for entry in unit["SystemCallFilter"]:
        deny = entry.startswith("~")
        names: set[str] = set()
        for item in entry.lstrip("~").split():
            names |= syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    capabilities = []
    for name in unit["CapabilityBoundingSet"][0].split():
        number = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}[name]  # linux/capability.h
        capabilities.append(number)
    families = unit["RestrictAddressFamilies"][0].split()
    return json.dumps(
        {
            "allow": sorted(allowed),
            "capabilities": capabilities,
            "families": families,
            "argv": argv,
            "listen_fd": listen_fd,
        }
    )


SANDBOX_CASES = [
    ("iptables", "nft"),
    ("iptables", "legacy"),  # python-iptables: ctypes callbacks (libffi) under W^X
    ("nftables", "nft"),  # libnftables through ctypes
    ("ipset", "nft"),
]


@needs_root
@needs_analyze
@pytest.mark.parametrize(("backend", "flavour"), SANDBOX_CASES)
def test_the_daemon_works_inside_the_units_sandbox(
    world: Daemon, backend: str, flavour: str
) -> None:
    try:
        subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], check=True, timeout=30)
    except subprocess.CalledProcessError:
        pytest.skip("python3-seccomp not installed (apt: python3-seccomp)")
    world.flavour = flavour
    world.write_config()
    text = world.config_file.read_text().replace('backend = "iptables"', f'backend = "{backend}"')
    world.config_file.write_text(text)
    imr = [IMR, "--config", str(world.config_file), "server", "start", "--foreground"]
    world.socket.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as listening:
        listening.bind(str(world.socket))
        os.chown(world.socket, 0, grp.getgrnam(GROUP).gr_gid)
        world.socket.chmod(0o660)
        listening.listen()
        spec = sandbox_spec(imr, listening.fileno())
        argv = world.server.argv("/usr/bin/python3", "-c", SANDBOX, spec)
        with foreground(argv, dict(os.environ), pass_fds=(listening.fileno(),)) as daemon:
            output = _sandboxed_block(world, daemon, backend)
    assert "ERROR" not in output and "Traceback" not in output, output


def _sandboxed_block(world: Daemon, daemon: subprocess.Popen[str], backend: str) -> str:
    if not world.wait_for(lambda: _pings(world.socket), 60):
        daemon.kill()
        pytest.fail(f"daemon did not serve: {daemon.communicate(timeout=10)[0]}")
    status = Path(f"/proc/{daemon.pid}/status").read_text()
    assert re.search(r"CapBnd:\s+0000000000003000", status), status  # NET_ADMIN|NET_RAW
    assert re.search(r"Seccomp:\s+2", status) and re.search(r"NoNewPrivs:\s+1", status)
    result = world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "sandboxed")
    assert result.returncode == 0, result.stderr
    kernel = {
        "iptables": lambda: world.rules(4),
        "nftables": lambda: world.server.run("nft", "list", "table", "inet", "imr").stdout,
        "ipset": lambda: world.server.run("ipset", "list", "imr4").stdout,
    }[backend]()
    assert ATTACKER_V4 in kernel
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    return daemon.stdout.read() if daemon.stdout else ""
