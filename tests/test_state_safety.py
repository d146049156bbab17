"""The state file and the kernel disagree, or the state file is damaged (issue #12 item 6).

A real daemon (tests/daemon_harness.py) with iptables in a namespace: blocks
are made, the daemon stopped, the state file lost or damaged, and the daemon
started again. It must refuse (one line naming the file and the way out, no
traceback) and leave the kernel's blocks in place; `--adopt-kernel` keeps them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon_harness import BLOCKER, Daemon, daemon_world

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]

BLOCKED = [f"203.0.113.{n}" for n in range(100, 150)] + ["2001:db8::66"]


@pytest.fixture
def world() -> Iterator[Daemon]:
    with daemon_world() as daemon:
        daemon.write_config()
        yield daemon


def _with_blocks(world: Daemon) -> str:
    """Start, block BLOCKED (long reasons: a state file of several pages), stop; the rules."""
    assert world.start().returncode == 0
    result = world.as_user(BLOCKER, "block", *BLOCKED, "--reason", "scan " + "x" * 190)
    assert result.returncode == 0, result.stderr
    assert world.stop().returncode == 0
    rules = world.rules(4) + world.rules(6)
    assert all(f"-s {ip}/" in rules for ip in BLOCKED)
    for suffix in ("-wal", "-shm"):
        Path(f"{world.state_file}{suffix}").unlink(missing_ok=True)
    return rules


def _kernel(world: Daemon) -> str:
    return world.rules(4) + world.rules(6)


def _start_foreground(world: Daemon, *extra: str) -> subprocess.CompletedProcess[str]:
    """`imr server start --foreground`: its errors and any traceback go to stderr."""
    argv = world.imr_argv("server", "start", "--foreground", *extra)
    return world.server.run(*argv, check=False, timeout=60)


def _refused_cleanly(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("imr: ")]
    for word in words:
        assert word in line


@pytest.mark.parametrize("loss", ["empty", "missing"])
def test_a_lost_state_file_beside_kernel_blocks_is_refused_then_adopted(
    world: Daemon, loss: str
) -> None:
    rules = _with_blocks(world)
    if loss == "empty":
        world.state_file.write_bytes(b"")
    else:
        world.state_file.unlink()
    for _ in range(2):  # the refusal holds on a second try: the first made the file
        result = world.start()
        _refused_cleanly(
            result, str(world.state_file), "--adopt-kernel", f"{len(BLOCKED)} imr block"
        )
        assert _kernel(world) == rules  # nothing lifted
    result = world.server.run(
        *world.imr_argv("server", "start", "--adopt-kernel"), check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    world.started.append(world.pid() or 0)
    assert _kernel(world) == rules
    listed = world.as_root("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(b["ip"] for b in json.loads(listed.stdout)) == sorted(BLOCKED)
    assert f"adopted {len(BLOCKED)} block(s)" in world.log_file.read_text()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 8192  # several pages: the cut loses rows
    path.write_bytes(data[: len(data) // 2])


def _overwritten(path: Path) -> None:
    """The schema pages intact, the rows' pages scribbled over (size unchanged)."""
    data = bytearray(path.read_bytes())
    data[8192:] = b"\xa5" * (len(data) - 8192)
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _text(path: Path) -> None:
    path.write_text("not a database at all\n")


def _wrong_schema(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE blocks (id INTEGER PRIMARY KEY, address TEXT)")
        db.execute("PRAGMA user_version=1")
    db.close()


def _foreign(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    db.close()


def _bad_address(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE blocks SET ip = 'not-an-address' WHERE ip = '203.0.113.120'")
    db.close()


@pytest.mark.parametrize("damage", [_overwritten, _wrong_schema, _foreign, _bad_address])
def test_a_damaged_state_file_is_named_without_traceback_and_the_kernel_kept(
    world: Daemon, damage: Callable[[Path], None]
) -> None:
    _refuses_and_keeps_the_kernel(world, damage)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _text])
def test_a_state_file_that_does_not_open_is_named_and_the_kernel_kept(
    world: Daemon, damage: Callable[[Path], None]
) -> None:
    """A guard: these were refused cleanly before issue #12 too (SQLite refuses them at open)."""
    _refuses_and_keeps_the_kernel(world, damage)


def _refuses_and_keeps_the_kernel(world: Daemon, damage: Callable[[Path], None]) -> None:
    rules = _with_blocks(world)
    damage(world.state_file)
    for result in (world.start(), _start_foreground(world)):
        _refused_cleanly(result, str(world.state_file))
        assert _kernel(world) == rules
    assert world.pid() is None
