"""Cron mode: read what is new in each log, decide, ask the daemon to block.

The imperative shell around engine.py. The state (offsets and pending
threshold counts) is saved only after a run succeeded; if the daemon is down
the run fails and the next run reads the same lines again, so a hit is never
lost (a block already sent may be sent again, which the daemon tolerates).
"""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from imr.client import ClientError, DaemonUnavailable, RequestFailed
from imr.logscan.engine import BlockStats, Decision, Scanner, Thresholds, decide
from imr.logscan.reader import (
    BUILTIN,
    FileState,
    Source,
    StateStore,
    iter_chunks,
    open_log,
    plan_reads,
    state_of_open,
)
from imr.reputation.httpbl import Verdict

if TYPE_CHECKING:
    from imr.logscan.httpbl import HttpBLScan
    from imr.protocol import BlockResult


class BlockClient(Protocol):
    def block(
        self, ip: str, reason: str = "", source: str = "", severity: int | None = None
    ) -> BlockResult: ...


@dataclass
class Outcome:
    ip: str
    signature: str
    severity: int
    count: int
    reason: str
    status: str  # "blocked", "dry-run", "refused"
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "signature": self.signature,
            "severity": self.severity,
            "hits": self.count,
            "reason": self.reason,
            "status": self.status,
            "detail": self.detail,
        }


@dataclass
class Report:
    stats: BlockStats = field(default_factory=BlockStats)
    outcomes: list[Outcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    httpbl: dict[str, int] | None = None  # lookup counts when --httpbl was on

    def merge(self, other: Report) -> None:
        """Add another rule set's pass over the same logs. Hits add up; lines and
        bytes are the logs' (each pass reads them), and a warning is kept once."""
        mine, theirs = self.stats, other.stats
        mine.lines, mine.bad = max(mine.lines, theirs.lines), max(mine.bad, theirs.bad)
        mine.unresolved = max(mine.unresolved, theirs.unresolved)
        mine.candidates += theirs.candidates
        mine.hits += theirs.hits
        self.outcomes.extend(other.outcomes)
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)
        self.files.extend(f for f in other.files if f not in self.files)
        self.bytes_read = max(self.bytes_read, other.bytes_read)
        self.seconds += other.seconds
        if other.httpbl is not None:
            self.httpbl = other.httpbl

    def as_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "lines": self.stats.lines,
            "candidates": self.stats.candidates,
            "bad_lines": self.stats.bad,
            "unresolved": self.stats.unresolved,
            "hits": self.stats.hits,
            "bytes": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "blocks": [o.as_json() for o in self.outcomes],
            "warnings": self.warnings,
            **({"httpbl": self.httpbl} if self.httpbl is not None else {}),
        }


def send(decision: Decision, client: BlockClient | None) -> Outcome:
    """Ask for one block. DaemonUnavailable propagates: the run must fail."""
    sig = decision.signature
    outcome = Outcome(
        decision.ip, sig.name, sig.severity, decision.count, decision.reason, "dry-run"
    )
    return _deliver(outcome, client, decision.source, sig.severity)


def send_verdict(verdict: Verdict, client: BlockClient | None) -> Outcome:
    """Ask for the block an http:BL verdict calls for (source "httpbl", as `imr check --block`)."""
    outcome = Outcome(
        verdict.ip, "httpbl", verdict.severity or 1, 1, verdict.reason(), "dry-run", verdict.why
    )
    # None lets the daemon apply its normal ladder (severity 1), as `imr check --block` does.
    return _deliver(outcome, client, "httpbl", verdict.severity)


def _deliver(
    outcome: Outcome, client: BlockClient | None, source: str, severity: int | None
) -> Outcome:
    if client is None:
        return outcome
    try:
        result = client.block(outcome.ip, reason=outcome.reason, source=source, severity=severity)
    except RequestFailed as exc:
        outcome.status, outcome.detail = "refused", f"{exc.code}: {exc.message}"
        return outcome
    outcome.status = "blocked"
    until = result.get("expires_at")  # the daemon's block reply (docs/protocol.md)
    outcome.detail = f"until {until}" if until else ""
    return outcome


def scan_files(
    paths: Sequence[Path],
    scanner: Scanner,
    store: StateStore,
    client: BlockClient | None,
    *,
    max_line: int,
    clock: Callable[[], float] = time.time,
    progress: Callable[[int], None] | None = None,
    start_at_end: bool = False,
    httpbl: HttpBLScan | None = None,
    rule_set: str = BUILTIN,
) -> Report:
    """Scan every path from where `rule_set` last stopped. Raises DaemonUnavailable
    (state untouched); otherwise updates `store` (the caller saves it).

    With `httpbl`, every client address is also looked up (after the block's
    signature decisions were sent, so a slow resolver delays no signature block)."""
    started = time.monotonic()
    report = Report()
    state = store.rule_set(rule_set)
    thresholds = Thresholds.from_json(state.pending)
    new_states: dict[str, FileState] = {}
    for path in paths:
        key = str(path.absolute())
        if key not in state.files and not path.exists():
            if key not in store.missing:
                report.warnings.append(f"{path}: no such file (said once, until it appears)")
            store.missing.add(key)
            continue
        sources, warnings = plan_reads(path, state.files.get(key), start_at_end)
        report.warnings.extend(warnings)
        if path.exists():
            store.missing.discard(key)
        else:  # gone since the last run: its rest was read from a rotated copy, if any
            state.files.pop(key, None)
            store.missing.add(key)
        for source in sources:
            read = _scan_source(
                source, scanner, thresholds, client, report, max_line, clock, progress, httpbl
            )
            if read is not None:
                new_states[key] = read
    state.files.update(new_states)
    now = clock()
    thresholds.prune(now, {s.name: s.window for s in scanner.signatures})
    state.pending = thresholds.to_json()
    if httpbl is not None:
        report.warnings.extend(httpbl.take_warnings())
        report.httpbl = httpbl.counts()
    report.seconds = time.monotonic() - started
    return report


def _scan_source(
    source: Source,
    scanner: Scanner,
    thresholds: Thresholds,
    client: BlockClient | None,
    report: Report,
    max_line: int,
    clock: Callable[[], float],
    progress: Callable[[int], None] | None,
    httpbl: HttpBLScan | None = None,
) -> FileState | None:
    try:
        f = open_log(source.path, source.compressed)
    except OSError as exc:
        report.warnings.append(f"{source.path}: cannot read: {exc.strerror}")
        if source.live:
            raise ScanError(f"{source.path}: cannot read: {exc.strerror}") from None
        return None
    report.files.append(str(source.path))
    offset = source.start
    with f:
        try:
            for chunk in iter_chunks(f, source.start, max_line, source.live):
                report.bytes_read += chunk.end - offset
                if progress is not None:
                    progress(chunk.end - offset)
                offset = chunk.end
                report.stats.bad += chunk.overlong
                if not chunk.data:
                    continue
                hits, stats = scanner.scan_block(chunk.data)
                report.stats.add(stats)
                for decision in decide(hits, thresholds, clock()):
                    report.outcomes.append(send(decision, client))
                    if httpbl is not None:
                        httpbl.skip(decision.ip)  # blocked already: no lookup needed
                if httpbl is not None:
                    for verdict in httpbl.check_block(chunk.data):
                        report.outcomes.append(send_verdict(verdict, client))
        except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            # A damaged rotated .gz must not stop the live file from being read.
            report.warnings.append(f"{source.path}: read error after byte {offset}: {exc}")
            if source.live:
                raise ScanError(f"{source.path}: read error: {exc}") from None
        if source.live:
            return state_of_open(f, offset)
    return None


class ScanError(Exception):
    """A log that cannot be read; the message is for the user."""


__all__ = [
    "ClientError",
    "DaemonUnavailable",
    "Outcome",
    "Report",
    "ScanError",
    "scan_files",
    "send",
    "send_verdict",
]
