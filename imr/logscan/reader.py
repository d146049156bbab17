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

A *rule set* is what one pass looks for: the built-in signatures ("builtin")
or one fail2ban filter ("fail2ban:<name>"). Offsets and pending threshold
counts are kept per (file, rule set), so a scan with one rule set never
consumes the lines another one has not seen yet.

The state file keeps its owner: when root runs `imr scan` on the scanner
user's state directory, the new state.json (and the lock) are given to the
directory's owner, so the next unprivileged run can still read them.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import pwd
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

FP_BYTES = 4096
BLOCK_SIZE = 1 << 20
STATE_VERSION = 1
BUILTIN = "builtin"  # the rule set of the built-in signatures (and [[logscan.rules]])


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


@dataclass
class RuleSetState:
    """What one rule set remembers: an offset per file and its pending hits."""

    files: dict[str, FileState] = field(default_factory=dict)
    pending: Any = field(default_factory=list)


class StateStore:
    """state.json in the state directory, guarded by an exclusive lock so two
    cron runs never interleave. Use as a context manager.

    The built-in rule set is stored in the top-level "files" and "pending"
    (as before rule sets existed, so older state files read the same); every
    other rule set under "rule_sets"."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self._lock: IO[bytes] | None = None
        self.sets: dict[str, RuleSetState] = {BUILTIN: RuleSetState()}
        # Logs found missing, so that a cron job naming a log this host does not
        # have warns once, not on every run (and mails once).
        self.missing: set[str] = set()

    def rule_set(self, name: str) -> RuleSetState:
        return self.sets.setdefault(name, RuleSetState())

    @property
    def files(self) -> dict[str, FileState]:
        return self.sets[BUILTIN].files

    @property
    def pending(self) -> Any:
        return self.sets[BUILTIN].pending

    @pending.setter
    def pending(self, value: Any) -> None:
        self.sets[BUILTIN].pending = value

    def __enter__(self) -> StateStore:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._lock = open(self.directory / "lock", "ab")
        except PermissionError:
            raise StateError(_not_ours(self.directory, "cannot use state directory")) from None
        except OSError as exc:
            raise StateError(
                f"cannot use state directory {self.directory}: {exc.strerror}"
            ) from None
        self._keep_owner(self._lock.fileno())
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
        except PermissionError:
            raise StateError(_not_ours(self.directory, f"{self.path}: cannot read")) from None
        except (OSError, ValueError) as exc:
            raise StateError(
                f"{self.path}: unreadable state ({exc}); move it away to start over"
            ) from None
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise StateError(f"{self.path}: not an imr logscan state file (version 1)")
        self.sets[BUILTIN] = _rule_set_of(raw)
        missing = raw.get("missing")
        self.missing = {str(m) for m in missing} if isinstance(missing, list) else set()
        extra = raw.get("rule_sets")
        for name, item in (extra if isinstance(extra, dict) else {}).items():
            if isinstance(item, dict) and name != BUILTIN:
                self.sets[str(name)] = _rule_set_of(item)

    def save(self) -> None:
        data = {
            "version": STATE_VERSION,
            **_rule_set_json(self.sets[BUILTIN]),
            "rule_sets": {
                name: _rule_set_json(rs) for name, rs in self.sets.items() if name != BUILTIN
            },
            "missing": sorted(self.missing),
        }
        try:
            fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self.directory)
        except PermissionError:
            raise StateError(_not_ours(self.directory, "cannot save state")) from None
        try:
            self._keep_owner(fd)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _keep_owner(self, fd: int) -> None:
        """Root writing the scanner user's state gives the file to that user: a
        root-owned 0600 state.json would lock the next cron run out."""
        if os.geteuid() != 0:
            return
        try:
            owner = os.stat(self.path)
        except FileNotFoundError:
            owner = os.stat(self.directory)
        if owner.st_uid != 0 or owner.st_gid != 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)


def _not_ours(directory: Path, what: str) -> str:
    """The message for a state directory another user (usually root) took over."""
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = str(os.geteuid())
    return (
        f"{what}: permission denied in {directory}; it was written by another user."
        f" As root, run: chown -R {me}: {directory}"
    )


def _rule_set_of(raw: dict[str, Any]) -> RuleSetState:
    state = RuleSetState()
    files = raw.get("files")
    for name, item in (files if isinstance(files, dict) else {}).items():
        with contextlib.suppress(TypeError, ValueError, KeyError):
            state.files[name] = FileState(
                int(item["dev"]),
                int(item["inode"]),
                int(item["offset"]),
                item.get("fingerprint"),
            )
    state.pending = raw.get("pending") or []
    return state


def _rule_set_json(state: RuleSetState) -> dict[str, Any]:
    return {
        "files": {name: asdict(fs) for name, fs in state.files.items()},
        "pending": state.pending,
    }


def state_of_open(f: IO[bytes], offset: int) -> FileState:
    """State of the file we actually read (by descriptor, not by name: the name
    may already point at a newer file)."""
    st = os.fstat(f.fileno())
    head = os.pread(f.fileno(), FP_BYTES, 0)
    return FileState(st.st_dev, st.st_ino, offset, fingerprint(head))
