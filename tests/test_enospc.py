"""A full disk under the state file: changes are refused cleanly, reads go on, and it recovers.

The real daemon (nftables backend, in a throwaway namespace) keeps its state file on a small
tmpfs the test mounts and then fills. A block refused because the state file cannot be
written must leave nothing in the kernel (the kernel change is taken out again before the
reply), must be answered with `state_unwritable`, and must not stop reads; once space is
freed, blocks work again without a restart.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import READER, Daemon, daemon_world

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and mount")

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
