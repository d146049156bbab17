"""http:BL for the log scanner: look up every client seen in the logs, block the listed ones.

Opt-in (`imr scan --httpbl`, `imr watch --httpbl` or `logscan.httpbl = true`). Every
line's client address is checked, not only signature hits; the verdict and the
score are imr/reputation/httpbl.py's, the block goes through the scanner's own
client path with source "httpbl".

The cost is bounded, because a busy log has many addresses and DNS is slow:
- each address is looked up at most once per run (`imr watch`: per hour), and an
  address a signature already blocked is not looked up at all;
- at most `logscan.httpbl_max_lookups` lookups per run (per hour), with a warning
  when the cap is reached; HttpBL's TTL cache answers repeats;
- after FAILURES_IN_A_ROW failed lookups in a row, lookups stop for the rest of
  the run (`imr watch`: for PAUSE_AFTER_FAILURES seconds), so a dead resolver
  costs a few timeouts, not one per address;
- internal addresses (RFC 1918, loopback, ...) and IPv6 are never sent out.

A failed lookup is a warning, never an error: signature blocks do not depend on it.
In cron mode the lookups run after each block's signature decisions were sent; in
follow mode a worker thread does them and the follow loop only collects verdicts,
so following never waits on DNS.
"""

from __future__ import annotations

import ipaddress
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from imr.core.addresses import IPNetwork
from imr.logscan.engine import resolve_client
from imr.logscan.formats import LogFormat, parse_line
from imr.reputation.dns_client import DnsUnavailable, make_resolver
from imr.reputation.httpbl import LOCAL_NETWORKS, HttpBL, Verdict
from imr.reputation.settings import ReputationSettings, SecretError

FAILURES_IN_A_ROW = 3
PAUSE_AFTER_FAILURES = 300.0  # follow mode
PERIOD = 3600.0  # follow mode: the "run" that the dedupe and the cap apply to
_QUEUE = 1000  # follow mode: addresses waiting for the worker
_TOKENS = 100_000  # bound on the parse-skipping set below


class HttpBLUnavailable(Exception):
    """http:BL was asked for but is not configured; the message is for the user."""


@dataclass
class ClientAddresses:
    """The blockable IPv4 client address of each line, as the signatures see it
    (peer, or the last untrusted X-Forwarded-For hop behind a trusted proxy).

    Every line must be looked at, not only the prefilter's candidates; to keep
    that cheap, a line whose first token was already found to be a line's own
    client is not parsed again (access logs start with the client address).
    """

    fmt: LogFormat = LogFormat.AUTO
    trusted: Sequence[IPNetwork] = ()
    max_line: int = 65536
    _known_tokens: set[bytes] = field(default_factory=set)

    def forget(self) -> None:
        self._known_tokens.clear()

    def new_in(self, block: bytes) -> list[str]:
        """Distinct addresses in `block`, in file order, except those found before."""
        found: dict[str, None] = {}
        for raw in block.splitlines():
            space = raw.find(b" ")
            token = raw[:space] if space > 0 else b""
            if token and token in self._known_tokens:
                continue
            client = self._client(raw, token)
            if client is not None:
                found[client] = None
        return list(found)

    def _client(self, raw: bytes, token: bytes) -> str | None:
        raw = raw.rstrip(b"\r")
        if not raw or b"\x00" in raw or len(raw) > self.max_line:
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        record = parse_line(text, self.fmt)
        if record is None:
            return None
        client = resolve_client(record, self.trusted)
        if not isinstance(client, ipaddress.IPv4Address):
            return None  # none, or IPv6: http:BL lists IPv4 only
        if token and record.peer.encode() == token and str(client) == record.peer:
            if len(self._known_tokens) >= _TOKENS:
                self._known_tokens.clear()
            self._known_tokens.add(token)
        if any(client in net for net in LOCAL_NETWORKS):
            return None  # never sent to a public DNS list (reputation/httpbl.py)
        return str(client)


@dataclass
class Budget:
    """At most one lookup per address and `max_lookups` lookups per period
    (None: the whole run). Used from one thread only."""

    max_lookups: int
    period: float | None = None
    clock: Callable[[], float] = time.monotonic
    lookups: int = 0
    over_cap: int = 0  # addresses not looked up because of the cap
    _seen: set[str] = field(default_factory=set)
    _period_end: float | None = None

    def admit(self, ip: str) -> tuple[bool, str | None]:
        """Whether to look `ip` up now, and a warning when the cap is first reached."""
        if ip in self._seen:
            return False, None
        self._seen.add(ip)
        if self.lookups >= self.max_lookups:
            self.over_cap += 1
            if self.over_cap == 1:
                per = "this run" if self.period is None else "this hour"
                return False, (
                    f"http:BL: {self.max_lookups} lookups, the cap for {per}"
                    " (logscan.httpbl_max_lookups): further addresses are not looked up"
                )
            return False, None
        self.lookups += 1
        return True, None

    def skip(self, ip: str) -> None:
        self._seen.add(ip)

    def roll(self) -> bool:
        """Start a new period if the last one is over; True if it did."""
        if self.period is None:
            return False
        now = self.clock()
        if self._period_end is not None and now < self._period_end:
            return False
        self._period_end = now + self.period
        self._seen.clear()
        self.lookups = 0
        self.over_cap = 0
        return True


@dataclass
class Lookups:
    """Runs lookups; after FAILURES_IN_A_ROW failures pauses them (`pause` seconds,
    None: for good). Used from one thread only (the worker in follow mode)."""

    lookup: Callable[[str], Verdict]
    pause: float | None = None
    clock: Callable[[], float] = time.monotonic
    listed: int = 0
    errors: int = 0
    _failures: int = 0
    _paused_until: float | None = None

    def run(self, ip: str) -> tuple[Verdict | None, list[str]]:
        """The verdict (None: paused, not looked up) and warnings."""
        if self._paused_until is not None and self.clock() < self._paused_until:
            return None, []
        try:
            verdict = self.lookup(ip)
        except Exception as exc:  # a lookup must never end the scan; say what happened
            verdict = Verdict(ip, "error", False, 0, f"lookup failed: {exc!r}")
        if verdict.status != "error":
            self._failures = 0
            self.listed += verdict.status == "listed"
            return verdict, []
        self.errors += 1
        self._failures += 1
        warnings = [f"http:BL: {ip}: {verdict.why}; not blocked by http:BL"]
        if self._failures >= FAILURES_IN_A_ROW:
            self._failures = 0
            if self.pause is None:
                self._paused_until = float("inf")
                warnings.append(
                    f"http:BL: {FAILURES_IN_A_ROW} lookups failed in a row:"
                    " no more lookups this run"
                )
            else:
                self._paused_until = self.clock() + self.pause
                warnings.append(
                    f"http:BL: {FAILURES_IN_A_ROW} lookups failed in a row:"
                    f" no lookups for {self.pause:.0f} s"
                )
        return verdict, warnings


class HttpBLScan:
    """The scanner's http:BL check: cron mode calls check_block(); follow mode
    calls start(), submit_block(), ready() and stop()."""

    def __init__(
        self,
        lookup: Callable[[str], Verdict],
        addresses: ClientAddresses,
        max_lookups: int,
        *,
        follow: bool = False,
        clock: Callable[[], float] = time.monotonic,
        join_timeout: float = 5.0,
    ) -> None:
        self.addresses = addresses
        self.budget = Budget(max_lookups, PERIOD if follow else None, clock)
        self.lookups = Lookups(lookup, PAUSE_AFTER_FAILURES if follow else None, clock)
        self.to_block = 0
        self._join_timeout = join_timeout
        self._warnings: list[str] = []
        self._lock = threading.Lock()  # warnings and counters, shared with the worker
        self._todo: queue.Queue[str] = queue.Queue(_QUEUE)
        self._done: queue.Queue[Verdict] = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._dropped = 0

    # Both modes ---------------------------------------------------------------------

    def skip(self, ip: str) -> None:
        """An address that needs no lookup (a signature blocked it)."""
        self.budget.skip(ip)

    def take_warnings(self) -> list[str]:
        with self._lock:
            taken, self._warnings = self._warnings, []
        return taken

    def counts(self) -> dict[str, int]:
        """For the cron report (in follow mode the worker updates some of these)."""
        with self._lock:
            return {
                "lookups": self.budget.lookups,
                "listed": self.lookups.listed,
                "to_block": self.to_block,
                "errors": self.lookups.errors,
                "over_cap": self.budget.over_cap,
            }

    def _admitted(self, block: bytes) -> list[str]:
        if self.budget.roll():
            self.addresses.forget()  # a new period: every address may be looked up again
        wanted = []
        for ip in self.addresses.new_in(block):
            go, warning = self.budget.admit(ip)
            if warning:
                self._warn([warning])
            if go:
                wanted.append(ip)
        return wanted

    def _look_up(self, ip: str) -> Verdict | None:
        verdict, warnings = self.lookups.run(ip)
        self._warn(warnings)
        if verdict is None or not verdict.block:
            return None
        with self._lock:
            self.to_block += 1
        return verdict

    def _warn(self, warnings: list[str]) -> None:
        if warnings:
            with self._lock:
                self._warnings.extend(warnings)

    # Cron mode ----------------------------------------------------------------------

    def check_block(self, block: bytes) -> list[Verdict]:
        """Look up the new addresses in `block` now; the verdicts that call for a block."""
        verdicts = []
        for ip in self._admitted(block):
            verdict = self._look_up(ip)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    # Follow mode: lookups in a worker thread ------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="imr-httpbl", daemon=True)
        self._worker.start()

    def submit_block(self, block: bytes) -> None:
        """Queue the new addresses in `block`; never waits (a full queue drops them)."""
        for ip in self._admitted(block):
            try:
                self._todo.put_nowait(ip)
            except queue.Full:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    self._warn(
                        [f"http:BL: lookups are behind; {self._dropped} address(es) skipped"]
                    )

    def ready(self) -> list[Verdict]:
        """Verdicts that call for a block, finished since the last call."""
        verdicts = []
        while True:
            try:
                verdicts.append(self._done.get_nowait())
            except queue.Empty:
                return verdicts

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            # A lookup in progress ends within the DNS timeout; the thread is a
            # daemon thread, so a longer one cannot keep the process alive.
            self._worker.join(self._join_timeout)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                ip = self._todo.get(timeout=0.2)
            except queue.Empty:
                continue
            verdict = self._look_up(ip)
            if verdict is not None:
                self._done.put(verdict)


def from_settings(
    settings: ReputationSettings,
    addresses: ClientAddresses,
    max_lookups: int,
    *,
    follow: bool = False,
) -> HttpBLScan:
    """The check from [reputation]; HttpBLUnavailable when http:BL has no key or no DNS."""
    try:
        key = settings.httpbl.access_key()
        resolver = make_resolver(settings.dns)
    except SecretError as exc:
        raise HttpBLUnavailable(
            f"{exc}; http:BL in the scanner needs [reputation.httpbl] with key or key_file"
        ) from None
    except DnsUnavailable as exc:
        raise HttpBLUnavailable(str(exc)) from None
    checker = HttpBL(settings.httpbl, resolver, key)
    return HttpBLScan(
        checker.check,
        addresses,
        max_lookups,
        follow=follow,
        join_timeout=settings.dns.timeout + 1.0,
    )
