"""The daemon's own files against a hostile neighbour (issue #12 items 7 and 10c).

A real daemon (tests/daemon_harness.py) in throwaway namespaces: links planted
where its pid and log files go, a state file another user made, a user racing
to swap its new socket, the modes of what it creates, and `imr server stop`
with a stale pid file that names an innocent process.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import BLOCKER, NOBODY, Daemon, daemon_world

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]

PRECIOUS = "precious root-only content\n"


@pytest.fixture
def world() -> Iterator[Daemon]:
    with daemon_world() as daemon:
        (daemon.root / "run").mkdir(mode=0o755)
        daemon.write_config()
        yield daemon


def _victim(world: Daemon) -> Path:
    victim = world.root / "victim"
    victim.write_text(PRECIOUS)
    victim.chmod(0o600)
    return victim


def _untouched(victim: Path) -> None:
    info = victim.stat()
    assert victim.read_text() == PRECIOUS
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 0, 0)


def test_a_symlink_as_pid_file_is_refused_and_its_target_untouched(world: Daemon) -> None:
    victim = _victim(world)
    (world.root / "run" / "imr.pid").symlink_to(victim)
    result = world.start()
    assert result.returncode == 1
    assert "imr.pid is a symbolic link" in result.stderr
    assert "Traceback" not in result.stderr
    _untouched(victim)


def test_a_symlink_as_log_file_is_refused_and_its_target_untouched(world: Daemon) -> None:
    victim = _victim(world)
    world.log_file.symlink_to(victim)
    result = world.start()
    assert result.returncode == 1
    assert "imr.log is a symbolic link" in result.stderr
    _untouched(victim)


def test_a_state_file_another_user_owns_is_refused(world: Daemon) -> None:
    world.state_file.parent.mkdir(mode=0o755)
    world.state_file.write_bytes(b"")
    os.chown(world.state_file, pwd.getpwnam(NOBODY).pw_uid, -1)
    result = world.start()
    assert result.returncode == 1
    assert f"{world.state_file} belongs to uid {pwd.getpwnam(NOBODY).pw_uid}" in result.stderr
    assert "Traceback" not in result.stderr
    assert world.state_file.read_bytes() == b""  # SQLite never wrote to it


def test_files_it_creates_started_by_hand_are_private(world: Daemon) -> None:
    old = os.umask(0o022)  # a root shell's usual umask, inherited by `imr server start`
    try:
        assert world.start().returncode == 0
    finally:
        os.umask(old)
    assert world.as_user(BLOCKER, "block", "203.0.113.66").returncode == 0
    modes = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{world.state_file}{suffix}")
        modes[suffix] = stat.S_IMODE(path.stat().st_mode)
    assert modes == {"": 0o640, "-wal": 0o640, "-shm": 0o640}
    log = world.log_file.stat()
    assert stat.S_IMODE(log.st_mode) == 0o640
    assert log.st_gid == grp.getgrnam("adm").gr_gid
    socket_mode = stat.S_IMODE(world.socket.lstat().st_mode)
    assert socket_mode == 0o660


RACER = """
import os, stat, sys, time
sock, victim, done = sys.argv[1], sys.argv[2], sys.argv[3]
spare = sock + ".swap"
print("ready", flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not os.path.exists(done):
    try:
        if stat.S_ISSOCK(os.lstat(sock).st_mode):
            os.symlink(victim, spare)
            os.rename(spare, sock)
            print("swapped", flush=True)
            break
    except OSError:
        pass
"""


def test_a_user_who_can_write_the_socket_directory_cannot_steer_its_chmod(world: Daemon) -> None:
    """The issue's race: swap the new socket for a link to a root-only file before the chmod.

    The socket directory belongs to an unprivileged user here (a mistake the daemon
    should survive); the old code lost this race in 8 of 10 tries (here: 10 starts).
    """
    run = world.root / "run"
    os.chown(run, pwd.getpwnam(BLOCKER).pw_uid, -1)
    victim = _victim(world)
    done = world.root / "done"
    swapped = 0
    for _ in range(10):
        racer = subprocess.Popen(
            [
                *("nice", "-n", "-10"),  # on a busy machine the racer must get the CPU
                *("runuser", "-u", BLOCKER, "--", sys.executable, "-c", RACER),
                *(str(world.socket), str(victim), str(done)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert racer.stdout is not None
            assert racer.stdout.readline().strip() == "ready"
            world.start()
            world.stop()
            done.touch()
            out, _ = racer.communicate(timeout=30)
        finally:
            if racer.poll() is None:
                racer.kill()
                racer.wait(5)
        swapped += "swapped" in out
        _untouched(victim)
        world.socket.unlink(missing_ok=True)
        done.unlink()
    assert swapped > 0  # the racer did get its swap in: after the chmod, where it is harmless


def test_stop_with_a_stale_pid_file_leaves_an_innocent_imr_process_alone(world: Daemon) -> None:
    innocent = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "imr", "server"]
    )
    try:
        cmdline = Path(f"/proc/{innocent.pid}/cmdline")
        assert world.wait_for(lambda: b"imr" in cmdline.read_bytes())  # once it has exec'd
        (world.root / "run" / "imr.pid").write_text(f"{innocent.pid}\n")
        result = world.stop()
        assert result.returncode == 3, result.stderr
        assert "not running" in result.stderr
        time.sleep(0.2)
        assert innocent.poll() is None  # not signalled
    finally:
        os.kill(innocent.pid, signal.SIGKILL)
        innocent.wait(5)


def test_stop_still_stops_the_real_daemon(world: Daemon) -> None:
    assert world.start().returncode == 0
    pid = world.pid()
    assert pid is not None
    result = world.stop()
    assert result.returncode == 0, result.stderr
    assert f"imr stopped (pid {pid})" in result.stdout
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
