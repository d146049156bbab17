"""The pure core of the scanner: blocks of log bytes in, hits and block decisions out.

No files, no clock, no sockets. A block is whole lines (the reader keeps a
partial last line for the next block). The prefilter works on the whole block:
lower-case it once, find each needle with bytes.find (C speed, no per-line
Python work), then parse only the lines around the needles. Benign lines cost
one byte copy and a few memchr-like scans.

On hostile logs (needles in referers, user agents, query strings) most
candidates are still benign. When every signature has an access gate, a
candidate access-log line is first cut at its quotes and parsed only if some
gate lets it through (signatures.AccessGate says when the cut is exact).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from imr.core.addresses import IPAddress, IPNetwork, parse_address
from imr.logscan.formats import LogFormat, Record, parse_line
from imr.logscan.gate import Gates
from imr.logscan.settings import LogscanConfig, UserRule
from imr.logscan.signatures import BUILTIN, Signature, field_test

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Formats whose lines all go to parse_access; AUTO sends the others elsewhere by their start.
_ACCESS_FORMATS = frozenset(
    {LogFormat.COMMON, LogFormat.COMBINED, LogFormat.VHOST_COMBINED, LogFormat.NGINX}
)


@dataclass(frozen=True, slots=True)
class Hit:
    signature: Signature
    ip: str
    time: float | None
    evidence: str
    line: str  # the line, for --json and "rules test"; truncated


@dataclass
class BlockStats:
    lines: int = 0
    candidates: int = 0
    bad: int = 0  # unparsable, undecodable, binary or overlong
    unresolved: int = 0  # parsed, but no blockable client (host names, proxies only)
    hits: int = 0

    def add(self, other: BlockStats) -> None:
        self.lines += other.lines
        self.candidates += other.candidates
        self.bad += other.bad
        self.unresolved += other.unresolved
        self.hits += other.hits


@dataclass(frozen=True)
class Decision:
    ip: str
    signature: Signature
    count: int
    evidence: str

    @property
    def source(self) -> str:
        return f"{self.signature.source_prefix}:{self.signature.name}"[:64]

    @property
    def reason(self) -> str:
        text = f"{self.signature.name}: {self.count} hit(s); {self.evidence}"
        return _CONTROL.sub("?", text)[:200]


def user_signature(rule: UserRule) -> Signature:
    flags = re.IGNORECASE if rule.ignore_case else 0
    pattern = re.compile(rule.pattern, flags)
    return Signature(
        name=rule.name,
        severity=rule.severity,
        description=rule.description or f"user rule on {rule.field}",
        hits=rule.hits,
        window=rule.window,
        test=field_test(rule.field, pattern),
        needles=tuple(n.lower().encode() for n in rule.needles),
    )


def signatures_from_config(config: LogscanConfig) -> list[Signature]:
    """Built-ins minus the disabled ones, with threshold overrides, plus user rules."""
    known = {s.name for s in BUILTIN} | {r.name for r in config.rules}
    unknown = (set(config.thresholds) | set(config.disabled)) - known
    if unknown:
        raise ValueError(f"logscan: unknown signature name(s): {', '.join(sorted(unknown))}")
    result = []
    for sig in [*BUILTIN, *(user_signature(r) for r in config.rules)]:
        if sig.name in config.disabled:
            continue
        override = config.thresholds.get(sig.name)
        if override is not None:
            sig = _with_threshold(sig, override.hits, override.window)
        result.append(sig)
    return result


def _with_threshold(sig: Signature, hits: int, window: int) -> Signature:
    from dataclasses import replace

    return replace(sig, hits=hits, window=window)


def resolve_client(record: Record, trusted: Sequence[IPNetwork]) -> IPAddress | None:
    """The address to block: the peer, or, behind a trusted proxy, the last
    untrusted hop of X-Forwarded-For. None when there is nothing safe to block."""
    peer = parse_address(record.peer)
    if not isinstance(peer, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return None
    if not _trusted(peer, trusted):
        return peer
    # Walk X-Forwarded-For from the right: each trusted hop vouches for the one before.
    for item in reversed(record.forwarded_for.split(",")):
        hop = parse_address(item.strip())
        if not isinstance(hop, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return None
        if not _trusted(hop, trusted):
            return hop
    return None


def _trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in trusted)


# CPython's bytes.find uses its two-way search on haystacks of 30,000 bytes and more, and
# its simpler default search below that; the latter found the needles of both benchmark
# logs in 0.48 s instead of 0.75 s (bench/logscan_bench.py, 1M lines). So each needle
# is looked for in windows under that size, overlapping by the needle's length.
_WINDOW = 29_000


def _needle_lines(lowered: bytes, needle: bytes, lines: dict[int, int], path: bool) -> None:
    """Add the start of every line of `lowered` that holds `needle` to `lines`, whose
    values are the first position of a path needle on the line (`path`), else len()."""
    size, find, rfind = len(lowered), lowered.find, lowered.rfind
    window = max(_WINDOW, 2 * len(needle))
    at, last = 0, -1
    while at < size:
        pos = find(needle, at, at + window)
        if pos == -1:
            at += window - len(needle) + 1  # a needle across the window's end is found next
            continue
        start = rfind(b"\n", 0, pos) + 1
        if start == last:  # a second one on the line: skip the rest of it
            at = find(b"\n", pos) + 1
            if at == 0:
                return
            continue
        last, at = start, pos + 1
        if not path:
            lines.setdefault(start, size)
        elif pos < lines.get(start, size):
            lines[start] = pos


def _line(block: bytes, start: int) -> bytes:
    end = block.find(b"\n", start)
    return block[start:end] if end != -1 else block[start:]


@dataclass
class Scanner:
    signatures: Sequence[Signature]
    fmt: LogFormat = LogFormat.AUTO
    trusted: Sequence[IPNetwork] = ()
    max_line: int = 65536
    _needles: tuple[bytes, ...] = field(init=False)
    _prefilters: tuple[re.Pattern[bytes], ...] = field(init=False)
    _every_line: bool = field(init=False)
    _gates: Gates | None = field(init=False)  # None: every candidate is parsed

    def __post_init__(self) -> None:
        self._needles = tuple(sorted({n for s in self.signatures for n in s.needles}))
        self._prefilters = tuple({s.prefilter for s in self.signatures if s.prefilter is not None})
        self._every_line = any(s.every_line for s in self.signatures)
        gates = [s.access_gate for s in self.signatures if s.line_test is None]
        known = [g for g in gates if g is not None]
        auto = self.fmt is LogFormat.AUTO
        access = auto or self.fmt in _ACCESS_FORMATS
        whole = len(known) == len(self.signatures)
        self._gates = Gates.of(known, self._needles, auto) if access and whole else None

    def candidate_lines(self, block: bytes) -> list[bytes]:
        """The lines of `block` that may match some signature, in file order."""
        if self._every_line:
            return block.splitlines()
        lowered = block.lower() if self._needles else b""
        return [_line(block, start) for start in sorted(self._candidates(block, lowered, {}))]

    def _candidates(
        self, block: bytes, lowered: bytes, agent_lines: dict[int, int]
    ) -> dict[int, int]:
        """The start of each line with a needle or a prefilter match -> the first
        position of a gate's path needle on it, or len(block); the starts of lines
        with a gate's agent needle go in `agent_lines` too (see gate.py)."""
        lines: dict[int, int] = {}
        gates = self._gates
        for needle in self._needles:
            if gates is not None and needle in gates.agents:
                _needle_lines(lowered, needle, agent_lines, False)
            else:
                _needle_lines(lowered, needle, lines, gates is not None and needle in gates.paths)
        for start in agent_lines.keys() - lines.keys():
            lines[start] = len(block)
        for prefilter in self._prefilters:
            for m in prefilter.finditer(block):
                lines.setdefault(block.rfind(b"\n", 0, m.start()) + 1, len(block))
        return lines

    def scan_block(self, block: bytes) -> tuple[list[Hit], BlockStats]:
        # split() is about twice as fast as count(b"\n") here (bench/logscan_bench.py).
        ends = len(block.split(b"\n")) - 1
        stats = BlockStats(lines=ends + (0 if not block or block.endswith(b"\n") else 1))
        hits: list[Hit] = []
        if self._every_line or self._gates is None:
            for raw in self.candidate_lines(block):
                stats.candidates += 1
                self._scan_line(raw, hits, stats)
            return hits, stats
        lowered = block.lower()
        agent_lines: dict[int, int] = {}
        lines = self._candidates(block, lowered, agent_lines)
        stats.candidates = len(lines)
        # Checked once for the block, so most lines need no check of their own.
        plain = block.isascii() and not any(c in block for c in (b"\\", b"\x00", b"\r"))
        # The others cannot match any signature: skipped, and not counted as bad.
        for start in self._gates.to_parse(
            lowered, sorted(lines), lines, agent_lines, plain_block=plain, max_line=self.max_line
        ):
            self._scan_line(_line(block, start), hits, stats)
        return hits, stats

    def scan_line(self, raw: bytes) -> tuple[list[Hit], BlockStats]:
        """One line, every signature, no prefilter (for `rules test`)."""
        stats = BlockStats(lines=1, candidates=1)
        hits: list[Hit] = []
        self._scan_line(raw, hits, stats)
        return hits, stats

    def _scan_line(self, raw: bytes, hits: list[Hit], stats: BlockStats) -> None:
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            return
        if b"\x00" in raw or len(raw) > self.max_line:
            stats.bad += 1
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.bad += 1
            return
        record: Record | None = None
        parsed = False
        for sig in self.signatures:
            if sig.line_test is not None:
                found = sig.line_test(text)
                if found is None:
                    continue
                host = parse_address(found[0])
                if not isinstance(host, ipaddress.IPv4Address | ipaddress.IPv6Address) or _trusted(
                    host, self.trusted
                ):
                    stats.unresolved += 1
                    continue
                stats.hits += 1
                hits.append(Hit(sig, str(host), None, found[1], text[:500]))
                continue
            if not parsed:
                parsed, record = True, parse_line(text, self.fmt)
                if record is None:
                    stats.bad += 1
            if record is None:
                continue
            why = sig.test(record)
            if not why:
                continue
            client = resolve_client(record, self.trusted)
            if client is None:
                stats.unresolved += 1
                continue
            stats.hits += 1
            hits.append(Hit(sig, str(client), record.time, why, text[:500]))


@dataclass
class Thresholds:
    """N hits from one address within T seconds, per signature.

    Times come from the log lines (or the caller's clock when a line has none),
    so a cron run over an hour of log counts as the hour it was, and the state
    survives between runs via to_json/from_json.
    """

    max_keys: int = 200_000
    _seen: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, hit: Hit, now: float) -> int | None:
        """Record a hit; return the count when it reaches the threshold (then reset)."""
        sig = hit.signature
        when = hit.time if hit.time is not None else now
        key = (hit.ip, sig.name)
        if sig.hits <= 1:
            self._seen.pop(key, None)
            return 1
        times = [t for t in self._seen.get(key, ()) if when - sig.window < t <= when]
        times.append(when)
        if len(times) >= sig.hits:
            self._seen.pop(key, None)
            return len(times)
        self._seen[key] = times
        if len(self._seen) > self.max_keys:
            # Bounded memory under a flood of distinct addresses: forget the oldest.
            for old in list(self._seen)[: len(self._seen) - self.max_keys]:
                del self._seen[old]
        return None

    def prune(self, now: float, windows: dict[str, int]) -> None:
        for key in list(self._seen):
            window = windows.get(key[1], 0)
            kept = [t for t in self._seen[key] if t > now - window]
            if kept:
                self._seen[key] = kept
            else:
                del self._seen[key]

    def to_json(self) -> list[list[object]]:
        return [[ip, name, times] for (ip, name), times in self._seen.items()]

    @classmethod
    def from_json(cls, data: object) -> Thresholds:
        made = cls()
        if isinstance(data, list):
            for item in data:
                if (
                    isinstance(item, list)
                    and len(item) == 3
                    and isinstance(item[0], str)
                    and isinstance(item[1], str)
                    and isinstance(item[2], list)
                ):
                    times = [float(t) for t in item[2] if isinstance(t, int | float)]
                    made._seen[(item[0], item[1])] = times
        return made


def decide(hits: Iterable[Hit], thresholds: Thresholds, now: float) -> list[Decision]:
    """Feed hits through the thresholds; one decision per (address, signature) crossing."""
    decisions = []
    for hit in hits:
        count = thresholds.add(hit, now)
        if count is not None:
            decisions.append(Decision(hit.ip, hit.signature, count, hit.evidence))
    return decisions
