"""A full disk under the state file: changes are refused cleanly, reads go on, and it recovers.

The broker part fails the state file's commits on demand (after the kernel change, where a
full disk shows up) and checks that every kind of change is put back in the kernel.

The real daemon (nftables backend, in a throwaway namespace) keeps its state file on a small
tmpfs the test mounts and then fills. A block refused because the state file cannot be
written must leave nothing in the kernel (the kernel change is taken out again before the
reply), must be answered with `state_unwritable`, and must not stop reads; once space is
freed, blocks work again without a restart.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_broker import block

from imr.config import Config
from imr.protocol import UnblockRequest
from imr.server.broker import Broker, BrokerError
from imr.store import Store

from daemon_harness import READER, Daemon, daemon_world
from fakes import ROOT, FakeClock, FixedAddresses, RecordingBackend

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and mount")
pytestmark = pytest.mark.anyio
DAY = 86400


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- the broker, with commits that fail on demand ---


class FullDisk(Store):
    """A state file whose commits fail like a full disk's while `full` is set."""

    full = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with super().transaction():
            yield
            if self.full:
                error = sqlite3.OperationalError("database or disk is full")
                error.sqlite_errorcode = 13  # SQLITE_FULL
                raise error


async def test_every_kind_of_change_is_taken_out_of_the_kernel_again(tmp_path: Path) -> None:
    wall, monotonic = FakeClock(), FakeClock(1000.0)
    backend, store = RecordingBackend(), FullDisk(tmp_path / "state.db")
    broker = Broker(
        Config(), store, backend, wall, FixedAddresses("192.0.2.1"), monotonic=monotonic.now
    )
    broker.reconcile()
    await broker.start()
    try:
        await block(broker, "203.0.113.1")
        await block(broker, "203.0.113.2")
        await block(broker, "203.0.113.3")
        wall.advance(60)
        kernel = dict(backend.kernel)
        store.full = True
        for change in (
            block(broker, "203.0.113.1", severity=2),  # an escalation
            block(broker, "203.0.113.2"),  # a report (re-arms the entry)
            broker.handle(UnblockRequest(op="unblock", ip="203.0.113.3"), ROOT),
            block(broker, "203.0.113.4"),  # a new block
        ):
            with pytest.raises(BrokerError) as refused:
                await change
            assert refused.value.code == "state_unwritable"
            assert backend.kernel == kernel
            monotonic.advance(1.5)  # past the hold-off: the next one is tried for real
        wall.advance(DAY)
        await broker.expire_due()  # refused too: the blocks stay due, not lost
        assert {r.ip for r in broker._active.values()} == {f"203.0.113.{n}" for n in (1, 2, 3)}

        store.full = False
        monotonic.advance(1.5)
        await broker.expire_due()
        assert broker._active == {} and backend.kernel == {}
        assert (await block(broker, "203.0.113.4"))["action"] == "block"
        assert backend.kernel == {ipaddress.ip_address("203.0.113.4"): wall.now() + DAY}
    finally:
        await broker.stop()
        store.close()


# --- the real daemon on a full tmpfs ---

BEFORE = "203.0.113.10"
REFUSED = [f"203.0.113.{n}" for n in range(100, 200)]
REFUSED += [f"2001:db8:7::{n:x}" for n in range(1, 400)]
LATER = "203.0.113.20"
LONG_REASON = "disk full test " + "x" * 180  # big rows: the batch must need new WAL pages


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "imrtest", str(path)])
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path) -> None:
    """Write zeros to `path` until the file system says it is full."""
    with open(path, "wb", buffering=0) as out:
        chunk = b"\0" * 4096
        with contextlib.suppress(OSError):
            for _ in range(1 << 20):  # bounded: far more than the tmpfs holds
                out.write(chunk)
    probe = path.with_name("probe")
    with pytest.raises(OSError) as full:
        probe.write_bytes(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC


def start(world: Daemon) -> None:
    world.write_config()
    text = world.config_file.read_text().replace('backend = "iptables"', 'backend = "nftables"')
    world.config_file.write_text(text)
    result = world.start()
    assert result.returncode == 0, result.stderr


def kernel_v4_v6(world: Daemon) -> set[str]:
    """Every element of imr's address sets (the drift marker 255.255.255.255 left out)."""
    found: set[str] = set()
    for name in ("blocked_v4", "blocked_v6"):
        result = world.server.run("nft", "-j", "list", "set", "inet", "imr", name)
        (item,) = [i for i in json.loads(result.stdout)["nftables"] if "set" in i]
        for element in item["set"].get("elem", []):
            found.add(element["elem"]["val"] if isinstance(element, dict) else element)
    return found - {"255.255.255.255", "ff00::"}


@needs_root
def test_a_full_disk_refuses_changes_leaves_no_kernel_entry_and_recovers(
    test_users: None,
) -> None:
    with daemon_world() as world, small_tmpfs(world.root / "state", "2m") as state:
        try:
            start(world)
            first = world.as_root("block", BEFORE, "--reason", "before the disk filled")
            assert first.returncode == 0, first.stderr
            assert kernel_v4_v6(world) == {BEFORE}

            fill(state / "filler")
            refused = world.as_root("block", *REFUSED, "--reason", LONG_REASON, "--json")
            assert refused.returncode != 0
            items = json.loads(refused.stdout)
            assert {item["error"]["code"] for item in items} == {"state_unwritable"}, items[:3]
            assert "state file cannot be written" in items[0]["error"]["message"]
            # Nothing of the refused request is left in the kernel, nor in the state file.
            assert kernel_v4_v6(world) == {BEFORE}
            assert world.state_rows("SELECT ip FROM blocks") == [(BEFORE,)]

            single = world.as_root("block", LATER)
            assert single.returncode != 0 and "[state_unwritable]" in single.stderr
            assert kernel_v4_v6(world) == {BEFORE}

            # Reads go on, for an unprivileged reader too.
            listing = world.as_user(READER, "list")
            assert listing.returncode == 0 and BEFORE in listing.stdout, listing.stderr
            shown = world.as_user(READER, "show", BEFORE)
            assert shown.returncode == 0 and "is blocked until" in shown.stdout, shown.stderr
            log = world.log_file.read_text()
            assert log.count("cannot be written") == 1, log[-2000:]

            (state / "filler").unlink()

            def blocks_again() -> bool:
                return world.as_root("block", LATER).returncode == 0

            assert world.wait_for(blocks_again, 10.0), world.log_file.read_text()[-2000:]
            assert kernel_v4_v6(world) == {BEFORE, LATER}
            assert "can be written again" in world.log_file.read_text()
        finally:
            world.stop()
            world.kill_everything()
