"""Follow mode: tail logs like `tail -F` and act on each new line at once.

inotify (through ctypes; the standard library has no binding) wakes us when
anything in a log's directory changes, so a line reaches the daemon within
milliseconds; a timeout poll covers file systems without inotify. Rotation is
checked on every wake-up: a new inode at the path means rename rotation (the
old file is read to its end first), a file shorter than our position means
copytruncate.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from imr.client import ClientError
from imr.logscan.engine import BlockStats, Decision, Scanner, Thresholds, decide
from imr.logscan.httpbl import HttpBLScan
from imr.logscan.runner import BlockClient, Outcome, send, send_verdict
from imr.reputation.httpbl import Verdict

_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
)
_READ_LIMIT = 8 << 20  # per file per wake-up, so one busy log cannot starve the others


class Inotify:
    """Just enough inotify: watch directories, wait for any event."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def watch(self, directory: Path) -> None:
        if self._add(self.fd, os.fsencode(directory), _MASK) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify on {directory}: {os.strerror(err)}")

    def wait(self, timeout: float) -> bool:
        """True if something happened (events are drained, not parsed: we re-check all files)."""
        if not self._poll.poll(max(0, int(timeout * 1000))):
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 65536):
                pass
        return True

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Tail:
    path: Path
    f: IO[bytes] | None = None
    ident: tuple[int, int] = (0, 0)
    pos: int = 0
    pending: bytes = b""

    def open(self, at_end: bool) -> bool:
        try:
            f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed on rotation/close
        except OSError:
            return False
        st = os.fstat(f.fileno())
        self.f, self.ident, self.pending = f, (st.st_dev, st.st_ino), b""
        self.pos = st.st_size if at_end else 0
        f.seek(self.pos)
        return True

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def read_lines(self, max_line: int) -> tuple[bytes, int]:
        """New whole lines since last time (bytes), and how many overlong lines were dropped."""
        if self.f is None:
            return b"", 0
        size = os.fstat(self.f.fileno()).st_size
        if size < self.pos:  # copytruncate: start over at the top
            self.f.seek(0)
            self.pos, self.pending = 0, b""
        data = self.f.read(_READ_LIMIT) or b""
        self.pos += len(data)
        data = self.pending + data
        cut = data.rfind(b"\n")
        block, self.pending = (data[: cut + 1], data[cut + 1 :]) if cut != -1 else (b"", data)
        overlong = 0
        if len(self.pending) > max_line:
            self.pending, overlong = b"", 1
        return block, overlong

    def rotated(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return False  # gone for now: keep reading the old descriptor
        return (st.st_dev, st.st_ino) != self.ident


@dataclass
class Follower:
    paths: Sequence[Path]
    scanner: Scanner
    client: BlockClient | None
    report: Callable[[Outcome], None]
    max_line: int = 65536
    clock: Callable[[], float] = time.time
    poll_interval: float = 1.0
    start_at_end: bool = True
    stats: BlockStats = field(default_factory=BlockStats)
    # Lookups run in its worker thread; verdicts are collected on each wake-up.
    httpbl: HttpBLScan | None = None
    _thresholds: Thresholds = field(default_factory=Thresholds)
    _retry: deque[Decision | Verdict] = field(default_factory=lambda: deque(maxlen=10_000))
    _retry_at: float = 0.0

    def run(self, should_stop: Callable[[], bool]) -> None:
        tails = [_Tail(p) for p in self.paths]
        for tail in tails:
            tail.open(self.start_at_end)
        notify: Inotify | None
        try:
            notify = Inotify()
            for directory in {p.absolute().parent for p in self.paths}:
                notify.watch(directory)
        except OSError as exc:
            print(f"imr watch: inotify unavailable ({exc}); polling every 50 ms", file=sys.stderr)
            notify, self.poll_interval = None, 0.05
        if self.httpbl is not None:
            self.httpbl.start()
        try:
            while not should_stop():
                self._drain(tails)
                if notify is not None:
                    notify.wait(self.poll_interval)
                else:
                    time.sleep(self.poll_interval)
        finally:
            for tail in tails:
                tail.close()
            if notify is not None:
                notify.close()
            if self.httpbl is not None:
                self.httpbl.stop()

    def _drain(self, tails: list[_Tail]) -> None:
        for tail in tails:
            if tail.f is None:
                tail.open(False)  # appeared after we started: read it all
            self._consume(tail)
            if tail.rotated():
                self._consume(tail)  # the old file's last lines first
                tail.close()
                tail.open(False)
                self._consume(tail)
        if self.httpbl is not None:
            for warning in self.httpbl.take_warnings():
                print(f"imr watch: {warning}", file=sys.stderr)
            for verdict in self.httpbl.ready():
                self._send(verdict)
        if self._retry and self.clock() >= self._retry_at:
            self._flush_retries()

    def _consume(self, tail: _Tail) -> None:
        for _ in range(64):  # bounded: at most 64 x 8 MiB per wake-up
            block, overlong = tail.read_lines(self.max_line)
            self.stats.bad += overlong
            if not block:
                return
            hits, stats = self.scanner.scan_block(block)
            self.stats.add(stats)
            for decision in decide(hits, self._thresholds, self.clock()):
                self._send(decision)
                if self.httpbl is not None:
                    self.httpbl.skip(decision.ip)
            if self.httpbl is not None:
                self.httpbl.submit_block(block)  # never waits: a worker looks them up

    def _deliver(self, item: Decision | Verdict) -> Outcome:
        if isinstance(item, Decision):
            return send(item, self.client)
        return send_verdict(item, self.client)

    def _send(self, decision: Decision | Verdict) -> None:
        try:
            self.report(self._deliver(decision))
        except ClientError as exc:  # daemon down or socket unusable: keep it for later
            print(f"imr watch: {exc}; will retry", file=sys.stderr)
            self._retry.append(decision)
            self._retry_at = self.clock() + 5.0

    def _flush_retries(self) -> None:
        while self._retry:
            decision = self._retry.popleft()
            try:
                self.report(self._deliver(decision))
            except ClientError:
                self._retry.appendleft(decision)
                self._retry_at = self.clock() + 5.0
                return
