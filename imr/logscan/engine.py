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
from imr.logscan.settings import LogscanConfig, UserRule
from imr.logscan.signatures import (
    BUILTIN,
    PLAIN_REQUEST,
    Signature,
    field_test,
    user_agent_of,
)

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


@dataclass
class Scanner:
    signatures: Sequence[Signature]
    fmt: LogFormat = LogFormat.AUTO
    trusted: Sequence[IPNetwork] = ()
    max_line: int = 65536
    _needles: tuple[bytes, ...] = field(init=False)
    _prefilters: tuple[re.Pattern[bytes], ...] = field(init=False)
    _every_line: bool = field(init=False)
    _gated: bool = field(init=False)
    _gate_path: re.Pattern[bytes] | None = field(init=False)
    _gate_agent: tuple[bytes, ...] = field(init=False)
    _gate_odd: bool = field(init=False)

    def __post_init__(self) -> None:
        self._needles = tuple(sorted({n for s in self.signatures for n in s.needles}))
        self._prefilters = tuple({s.prefilter for s in self.signatures if s.prefilter is not None})
        self._every_line = any(s.every_line for s in self.signatures)
        gates = [s.access_gate for s in self.signatures if s.line_test is None]
        access = self.fmt is LogFormat.AUTO or self.fmt in _ACCESS_FORMATS
        self._gated = access and len(gates) == len(self.signatures) and None not in gates
        paths = sorted({n for g in gates if g is not None for n in g.path})
        self._gate_path = re.compile(b"|".join(map(re.escape, paths))) if paths else None
        self._gate_agent = tuple(sorted({n for g in gates if g is not None for n in g.user_agent}))
        self._gate_odd = any(g is not None and g.odd_request for g in gates)

    def candidate_lines(self, block: bytes) -> list[bytes]:
        """The lines of `block` that may match some signature, in file order."""
        if self._every_line:
            return block.splitlines()
        lowered = block.lower() if self._needles else b""
        return [block[start:end] for start, end in self._candidates(block, lowered)]

    def _candidates(self, block: bytes, lowered: bytes) -> list[tuple[int, int]]:
        """(start, end) of each line with a needle or a prefilter match, in file order."""
        starts: set[int] = set()
        for needle in self._needles:
            pos = lowered.find(needle)
            while pos != -1:
                start = block.rfind(b"\n", 0, pos) + 1
                starts.add(start)
                end = block.find(b"\n", pos)
                if end == -1:
                    break
                pos = lowered.find(needle, end)
        for prefilter in self._prefilters:
            for m in prefilter.finditer(block):
                starts.add(block.rfind(b"\n", 0, m.start()) + 1)
        spans = []
        for start in sorted(starts):
            end = block.find(b"\n", start)
            spans.append((start, end if end != -1 else len(block)))
        return spans

    def scan_block(self, block: bytes) -> tuple[list[Hit], BlockStats]:
        stats = BlockStats(lines=block.count(b"\n") + (0 if block.endswith(b"\n") else 1))
        if not block:
            stats.lines = 0
        hits: list[Hit] = []
        if self._every_line or not self._gated:
            for raw in self.candidate_lines(block):
                stats.candidates += 1
                self._scan_line(raw, hits, stats)
            return hits, stats
        lowered = block.lower()
        # Checked once for the block, so most lines need no check of their own.
        clean = block.isascii() and b"\\" not in block and b"\x00" not in block
        for start, end in self._candidates(block, lowered):
            stats.candidates += 1
            if not self._gated_out(block, lowered, start, end, clean):
                self._scan_line(block[start:end], hits, stats)
        return hits, stats

    def _gated_out(self, block: bytes, lowered: bytes, start: int, end: int, clean: bool) -> bool:
        """True when no signature can match the line block[start:end], known without
        the full parse (see signatures.AccessGate). Offsets, not slices: this runs for
        every candidate of a hostile log.

        Every doubt (not ASCII, a backslash, a NUL, overlong, not an access line, no
        clear request) answers False, and the full path decides as it always did.
        Lines skipped here are not counted as bad: none of them could have matched."""
        while end > start and block[end - 1] == 13:  # the full path strips b"\r" too
            end -= 1
        if end - start > self.max_line:
            return False
        if not clean:
            raw = block[start:end]
            if b"\\" in raw or b"\x00" in raw or not raw.isascii():
                return False
        if self.fmt is LogFormat.AUTO and (
            block[start : start + 1] in (b"{", b"[")
            or (block[start : start + 4].isdigit() and block[start + 4 : start + 5] == b"/")
        ):
            return False  # JSON or error-log line: parse_access never sees it
        q0 = block.find(b'"', start, end)
        q1 = block.find(b'"', q0 + 1, end)
        if q0 < 0 or q1 <= q0 + 1:  # no request, or '""' (an empty user, maybe)
            return False
        if self._gate_odd and PLAIN_REQUEST.match(block, q0 + 1, q1) is None:
            return False
        space = block.find(b" ", q0 + 1, q1)
        query = block.find(b"?", space + 1 if space >= 0 else q0 + 1, q1)
        if self._gate_path is not None and self._gate_path.search(
            lowered, q0 + 1, query if query >= 0 else q1
        ):
            return False
        for needle in self._gate_agent:
            if lowered.find(needle, q1 + 1, end) >= 0 and needle in user_agent_of(
                lowered[q1 + 1 : end]
            ):
                return False
        return True

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
