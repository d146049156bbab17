"""Follow mode: an attacker written to a growing file reaches the (fake) daemon fast,
also after rename rotation and copytruncate."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imr.client import Client
from imr.logscan.engine import Scanner
from imr.logscan.follow import Follower
from imr.logscan.runner import Outcome
from imr.logscan.signatures import BUILTIN

from logscan_helpers import FakeDaemon, benign, combined


class Running:
    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=follower.run, args=(self.stop.is_set,), daemon=True)


@pytest.fixture
def follow(tmp_path: Path, fake_daemon: FakeDaemon) -> Iterator[tuple[Path, Running]]:
    log = tmp_path / "access.log"
    log.write_text(combined("203.0.113.1", "/bin/msgimport") + benign(1))  # before start: ignored
    running = Running(
        Follower(
            [log], Scanner(BUILTIN), Client(fake_daemon.path, 5), lambda o: None, poll_interval=0.2
        )
    )
    running.follower.report = running.outcomes.append
    running.thread.start()
    time.sleep(0.2)  # let it open the file and set up inotify
    try:
        yield log, running
    finally:
        running.stop.set()
        running.thread.join(5)
        assert not running.thread.is_alive()


def _append(path: Path, text: str) -> float:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        return time.monotonic()


def test_attacker_in_growing_file_is_blocked_fast(
    follow: tuple[Path, Running], fake_daemon: FakeDaemon
) -> None:
    log, running = follow
    _append(log, benign(2) * 50)
    written = _append(log, combined("203.0.113.77", "/w00tw00t.at.ISC.SANS.DFind:)"))
    assert fake_daemon.wait_for(1, timeout=5)
    arrived, request = fake_daemon.requests[0]
    assert request["ip"] == "203.0.113.77" and request["source"] == "logscan:dfind"
    # The target is 50 ms; allow slack on a loaded CI machine but catch a fallback to slow polling.
    assert arrived - written < 0.5
    # The outcome is recorded once the reply is read, a moment after the request arrived.
    deadline = time.monotonic() + 5
    while not running.outcomes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [o.status for o in running.outcomes] == ["blocked"]


def test_rename_rotation_and_copytruncate(
    follow: tuple[Path, Running], fake_daemon: FakeDaemon
) -> None:
    log, _ = follow
    _append(log, combined("203.0.113.10", "/bin/msgimport"))
    assert fake_daemon.wait_for(1)
    os.rename(log, log.with_name("access.log.1"))
    _append(
        log.with_name("access.log.1"), combined("203.0.113.11", "/bin/msgimport")
    )  # late write to old
    _append(log, combined("203.0.113.12", "/bin/msgimport"))  # the new file
    assert fake_daemon.wait_for(3)
    with open(log, "r+") as f:  # copytruncate
        f.truncate(0)
    time.sleep(0.1)
    _append(log, combined("203.0.113.13", "/bin/msgimport"))
    assert fake_daemon.wait_for(4)
    time.sleep(0.1)
    assert [r["ip"] for _, r in fake_daemon.requests] == [
        "203.0.113.10",
        "203.0.113.11",
        "203.0.113.12",
        "203.0.113.13",
    ]


def test_half_written_line_waits_for_its_end(
    follow: tuple[Path, Running], fake_daemon: FakeDaemon
) -> None:
    log, _ = follow
    line = combined("203.0.113.20", "/soapCaller.bs")
    _append(log, line[:25])
    time.sleep(0.2)
    assert fake_daemon.requests == []
    _append(log, line[25:])
    assert fake_daemon.wait_for(1)
    assert fake_daemon.requests[0][1]["ip"] == "203.0.113.20"
