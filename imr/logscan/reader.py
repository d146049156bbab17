"""Reading logs incrementally: where we stopped, where the rest went, whole lines only.

Per file the state keeps (device, inode, offset, fingerprint of the first line).
The offset only ever covers complete lines, so a line being written while we
read is read next time, whole. On the next run:

* same inode, same first line, not shorter: read on from the offset;
* otherwise the file was rotated. The old content is found among the rotated
  siblings (log.1, log.1.gz, log.2.gz, log-20240101 ...) by its first-line
  fingerprint, read from the saved offset, every newer rotated file is read
  whole, then the live file from the start. This covers rename rotation
  (the inode moved to log.1), copytruncate (a copy in log.1, the live file
  truncated) and compression (log.1.gz) alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

FP_BYTES = 4096
BLOCK_SIZE = 1 << 20
STATE_VERSION = 1


class StateError(Exception):
    """The state directory cannot be used; the message says why."""


@dataclass(frozen=True)
class FileState:
    dev: int
    inode: int
    offset: int
    fingerprint: str | None


@dataclass(frozen=True)
class Source:
    path: Path
    start: int
    compressed: bool
    live: bool  # the file named on the command line; may still grow


def fingerprint(head: bytes) -> str | None:
    """Hash of the first line (or the first FP_BYTES); None while there is no whole line."""
    nl = head.find(b"\n", 0, FP_BYTES)
    if nl != -1:
        head = head[: nl + 1]
    elif len(head) >= FP_BYTES:
        head = head[:FP_BYTES]
    else:
        return None
    return hashlib.sha256(head).hexdigest()[:32]


def open_log(path: Path, compressed: bool) -> IO[bytes]:
    if compressed:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=0)


def file_fingerprint(path: Path, compressed: bool) -> str | None:
    try:
        with open_log(path, compressed) as f:
            return fingerprint(f.read(FP_BYTES))
    except (OSError, EOFError, gzip.BadGzipFile):
        return None


def rotated_siblings(path: Path) -> list[Path]:
    """Rotated copies of `path`, newest first: log.0, log.1, log.1.gz ... then dated ones."""
    found: list[tuple[tuple[int, int, str], Path]] = []
    numbered = re.compile(re.escape(path.name) + r"\.(\d{1,3})(\.gz)?$")
    dated = re.compile(re.escape(path.name) + r"-(\d{8,10})(\.gz)?$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        if m := numbered.match(entry.name):
            found.append(((0, int(m.group(1)), ""), entry))
        elif m := dated.match(entry.name):
            # Dated names sort newest first by inverting nothing: we sort the text descending.
            found.append(((1, 0, m.group(1)), entry))
    numbered_part = sorted((k, p) for k, p in found if k[0] == 0)
    dated_part = sorted(((k, p) for k, p in found if k[0] == 1), reverse=True)
    return [p for _, p in numbered_part + dated_part]


def plan_reads(
    path: Path, saved: FileState | None, start_at_end: bool = False
) -> tuple[list[Source], list[str]]:
    """Which files to read, from where, to see every line once. Returns (sources, warnings)."""
    warnings: list[str] = []
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if path.name.endswith(".gz"):
        # A compressed log named on the command line is read whole; it never grows.
        return ([Source(path, 0, True, False)] if st else []), (
            [] if st else [f"{path}: no such file"]
        )
    if saved is None:
        if st is None:
            return [], [f"{path}: no such file"]
        return [Source(path, st.st_size if start_at_end else 0, False, True)], warnings
    if (
        st is not None
        and (st.st_dev, st.st_ino) == (saved.dev, saved.inode)
        and st.st_size >= saved.offset
        and file_fingerprint(path, False) == saved.fingerprint
    ):
        return [Source(path, saved.offset, False, True)], warnings
    live = [Source(path, 0, False, True)] if st is not None else []
    if saved.offset == 0:
        return live, warnings  # nothing was read from the old file
    siblings = rotated_siblings(path)
    for index, sibling in enumerate(siblings):
        compressed = sibling.name.endswith(".gz")
        if file_fingerprint(sibling, compressed) == saved.fingerprint:
            newer = [
                Source(p, 0, p.name.endswith(".gz"), False) for p in reversed(siblings[:index])
            ]
            return [Source(sibling, saved.offset, compressed, False), *newer, *live], warnings
    warnings.append(
        f"{path}: rotated, and the rest of the old file was not found among "
        f"{len(siblings)} rotated copies; lines written after the last run may be missed"
    )
    return live, warnings


@dataclass
class Chunk:
    data: bytes  # whole lines only
    end: int  # offset in the (uncompressed) file just after `data`
    overlong: int  # lines skipped because they exceed max_line


def iter_chunks(f: IO[bytes], start: int, max_line: int, live: bool) -> Iterator[Chunk]:
    """Blocks of whole lines from `start`. A live file's unterminated last line is
    left for next time; a rotated file's is complete and is returned.

    `end` of each chunk is the offset to save: it never points into a line.
    """
    if start:
        f.seek(start)
    pos = start  # offset just after the last whole line handed out (= start of `pending`)
    pending = b""
    skipped = -1  # >= 0 while inside an overlong line: bytes of it dropped so far
    while True:
        chunk = f.read(BLOCK_SIZE)
        if not chunk:
            break
        overlong = 0
        if skipped >= 0:
            nl = chunk.find(b"\n")
            if nl == -1:
                skipped += len(chunk)
                continue
            pos += skipped + nl + 1
            chunk = chunk[nl + 1 :]
            skipped, overlong = -1, 1
        data = pending + chunk if pending else chunk
        cut = data.rfind(b"\n")
        if cut == -1:
            block, pending = b"", data
        else:
            block, pending = data[: cut + 1], data[cut + 1 :]
            pos += cut + 1
        if block or overlong:
            yield Chunk(block, pos, overlong)
        if len(pending) > max_line:
            skipped, pending = len(pending), b""
    if skipped >= 0:
        if not live:
            yield Chunk(b"", pos + skipped, 1)
        # live: the offset stays before the unfinished line; the next run skips it whole.
    elif pending and not live:
        yield Chunk(pending + b"\n", pos + len(pending), 0)


# --- the state file ------------------------------------------------------------


class StateStore:
    """state.json in the state directory, guarded by an exclusive lock so two
    cron runs never interleave. Use as a context manager."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self._lock: IO[bytes] | None = None
        self.files: dict[str, FileState] = {}
        self.pending: Any = []

    def __enter__(self) -> StateStore:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._lock = open(self.directory / "lock", "ab")
        except OSError as exc:
            raise StateError(
                f"cannot use state directory {self.directory}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StateError(
                f"another imr scan holds {self.directory}/lock; try again later"
            ) from None
        self._load()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise StateError(
                f"{self.path}: unreadable state ({exc}); move it away to start over"
            ) from None
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise StateError(f"{self.path}: not an imr logscan state file (version 1)")
        for name, item in (raw.get("files") or {}).items():
            with contextlib.suppress(TypeError, ValueError):
                self.files[name] = FileState(
                    int(item["dev"]),
                    int(item["inode"]),
                    int(item["offset"]),
                    item.get("fingerprint"),
                )
        self.pending = raw.get("pending") or []

    def save(self) -> None:
        data = {
            "version": STATE_VERSION,
            "files": {name: asdict(state) for name, state in self.files.items()},
            "pending": self.pending,
        }
        fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def state_of_open(f: IO[bytes], offset: int) -> FileState:
    """State of the file we actually read (by descriptor, not by name: the name
    may already point at a newer file)."""
    st = os.fstat(f.fileno())
    head = os.pread(f.fileno(), FP_BYTES, 0)
    return FileState(st.st_dev, st.st_ino, offset, fingerprint(head))
