"""The broker: turns authorised requests into policy decisions, state rows and kernel changes.

Flow of a block request (see docs/architecture.md):
  validate address (pure) -> refuse protected addresses -> queue for the writer
  -> writer batches whatever is queued: one state transaction + one backend
     apply -> commit (fsync) -> every request in the batch hears its outcome.

Only the writer thread touches the Store and the Backend, and only the event
loop changes the in-memory index of active blocks, after a batch committed;
so list/show/status answer from memory without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import heapq
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from imr import __version__
from imr.backends.base import (
    Backend,
    BackendError,
    Drift,
    KernelBlock,
    expected_counts,
    slot_of_text,
)
from imr.config import Config
from imr.core.addresses import (
    IPAddress,
    IPNetwork,
    ProtectionIndex,
    Refusal,
    RefusalCode,
    Target,
    address_of_packed,
    canonical_packed,
    canonical_target,
    intrinsic_refusal,
    network_refusal,
    parse_target,
    protection_refusal,
)
from imr.core.clock import Clock
from imr.core.clock_steps import StepDetector
from imr.core.durations import format_duration
from imr.core.fleet import may_lift, merged
from imr.core.listing import ListQuery, select_blocks
from imr.core.log_budget import LineBudget
from imr.core.policy import Action, Decision, decide
from imr.core.quota import LogThrottle, QuotaLedger, QuotaRefusal, Reservation
from imr.fleet.events import Event, outbox_body
from imr.protocol import (
    BlockManyRequest,
    BlockRequest,
    ExportRequest,
    ListRequest,
    PingRequest,
    Request,
    ShowRequest,
    StatusRequest,
    UnblockRequest,
    timestamp,
)
from imr.server.access import Peer
from imr.server.metrics import Metrics
from imr.server.state_health import MESSAGE as UNWRITABLE_MESSAGE
from imr.server.state_health import STATE_UNWRITABLE, StateHealth
from imr.store import SCHEMA_VERSION, BlockRecord, HitRecord, Offences, Store, unwritable

log = logging.getLogger("imr.broker")

MAX_BATCH = 512
# Canonical-text beginnings of IPv6 forms that may carry an IPv4 address.
_CARRIERS = ("64:ff9b::", "2002:", "2001:0:", "2001::", "::")
EXPIRY_TICK = 0.25  # seconds between expiry checks: blocks lift within a second
# Seconds: at most one refusal line per client and limit (quotas) or code (addresses).
REFUSAL_LOG_INTERVAL = 10.0


# Backends whose entries are not re-armed on a report: iptables rules never time out.
_NO_REARM = frozenset({"iptables"})

# Hit retention: old hits go every PRUNE_INTERVAL seconds (the first time PRUNE_FIRST after
# start), PRUNE_ROWS per writer turn with PRUNE_PAUSE between turns, so a backlog of
# millions never holds the writer for long.
PRUNE_INTERVAL = 3600.0
PRUNE_FIRST = 60.0
PRUNE_ROWS = 5000
PRUNE_PAUSE = 0.05


class _StateUnwritable(Exception):
    """A batch failed because the state file cannot be written; its kernel change is undone."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class BrokerError(Exception):
    """A request that fails for a reason the client should hear; `code` goes on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AddressView(Protocol):
    """The host's own addresses, kept current (LocalAddresses, or a fixed set in tests)."""

    @property
    def own(self) -> frozenset[IPAddress]: ...

    @property
    def broadcast(self) -> frozenset[IPAddress]: ...


@dataclass
class _BlockChange:
    address: Target  # a network only from an admin
    ip: str  # str(address): the index key and the state file's text (formatting is slow)
    reason: str
    source: str
    severity: int
    peer: Peer
    compact: bool = False  # answer with block_many's short per-address result
    # Quotas: may this change make a new block (admitted, or exempt)? The reservation
    # is given back unless it does. A hit on an active block is admitted without one.
    may_create: bool = False
    reservation: Reservation | None = None


@dataclass
class _UnblockChange:
    address: Target
    request: UnblockRequest
    peer: Peer


@dataclass
class _ExpireChange:
    due: Sequence[str]
    # Blocks of addresses that became protected while blocked (a VIP moved to this host),
    # lifted at once: index key -> why.
    protected: dict[str, str] = field(default_factory=dict)


@dataclass
class _RemoteChange:
    """A fleet event that passed the checks on the loop (imr/fleet/member.py), or None for
    a refused one: either way its stream position is stored with the batch."""

    stream: str
    position: str
    seq: int
    event: Event | None
    admin: bool  # signed by an admin key: may lift blocks other members made

    @property
    def ip(self) -> str:
        return self.event.ip if self.event is not None else ""


@dataclass
class _Queued:
    """One change waiting for the writer, and the client waiting for its outcome."""

    change: _BlockChange | _UnblockChange | _ExpireChange | _RemoteChange
    future: asyncio.Future[dict[str, Any]]


_AnyChange = _BlockChange | _UnblockChange | _ExpireChange | _RemoteChange


@dataclass
class _Outcome:
    result: dict[str, Any] | None = None
    error: BrokerError | None = None
    readmit: bool = False  # a hit turned into a new block: pass the quota first, then retry


@dataclass
class _BatchResult:
    outcomes: list[_Outcome]
    changed: dict[str, BlockRecord | None] = field(default_factory=dict)  # None: lifted
    expired: int = 0  # blocks lifted because their time came (metrics)
    # One per change, for the operator; formatted only if logged (a flood logs few of them).
    log_lines: list[Callable[[], str]] = field(default_factory=list)


class Broker:
    def __init__(
        self,
        config: Config,
        store: Store,
        backend: Backend,
        clock: Clock,
        local: AddressView,
        backend_choice: str = "",
        *,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._backend_choice = backend_choice
        self._warned_size = False
        self._ladder = config.policy.to_ladder()
        self._store = store
        self._backend = backend
        self._clock = clock
        self._local = local
        self._active: dict[str, BlockRecord] = {}
        self._expiry: list[tuple[float, str]] = []  # heap; stale entries are skipped
        self._queue: asyncio.Queue[_Queued] | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imr-writer")
        # Held by the writer loop from a batch's start until it is published, and by the drift
        # check: so the check compares the kernel with an index that matches it.
        self._turn = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = time.time()
        self.metrics = metrics or Metrics()  # counted always; served only if configured
        # Quotas run on a monotonic clock: a wall-clock step must not lock clients out.
        self._monotonic = monotonic
        self._quota = QuotaLedger(config.quota.to_limits())
        self._quota_log = LogThrottle(REFUSAL_LOG_INTERVAL)
        # The own and broadcast addresses the last look for newly protected blocks saw.
        self._seen_local: tuple[frozenset[IPAddress], frozenset[IPAddress]] = (
            frozenset(),
            frozenset(),
        )
        # Set by a reload that changed the allowlist: every active block is looked at once.
        self._recheck_all_protection = False
        self._refusal_log = LogThrottle(REFUSAL_LOG_INTERVAL)
        self._change_log = LineBudget(config.server.log_changes_per_second)
        self._health = StateHealth(store.path, monotonic)  # the writer thread's
        self._steps = StepDetector()
        # Re-arm a block's kernel entry on every report of it (see _Work._block); not for
        # iptables, whose rules never time out and whose apply reads the whole chain.
        self._rearm = backend.name not in _NO_REARM
        # Fleet mode (docs/fleet.md): this member's name, or None (then nothing below runs).
        self.fleet_name: str | None = config.fleet.name if config.fleet.enabled else None
        self._fleet: Any = None  # imr.fleet.member.FleetMember, made by start()

    # Life cycle -------------------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """A reloaded configuration (reload.py keeps the fixed sections as they were):
        the allowlist, ladder, quotas and log budget apply to the next requests."""
        if config.protect.allowlist != self._config.protect.allowlist:
            self._recheck_all_protection = True
        self._config = config
        self._ladder = config.policy.to_ladder()
        self._quota.limits = config.quota.to_limits()
        self._change_log = LineBudget(config.server.log_changes_per_second)

    def reconcile(self) -> None:
        """At start: lift what expired while we were down and make the kernel match the state.

        Also lifts blocks of addresses that became protected (allowlist or own
        address) since they were blocked. Runs before any client is served.
        """
        now = self._clock.now()
        protection = ProtectionIndex.build(
            self._local.own, self._local.broadcast, self._config.protect.allowlist
        )
        plain = protection.plain
        keep: list[BlockRecord] = []
        kernel: list[KernelBlock] = []  # parsed once here: 100,000 parses cost seconds
        with self._store.transaction():
            for record in self._store.active_blocks():
                # Nearly every row: the canonical text of an address that is still due and
                # that nothing protects, checked on its packed bytes (~0.1 s for 100,000
                # rows; ~0.3 s through ipaddress objects). The rest: the full checks below.
                ip, expires_at = record.ip, record.expires_at
                packed = canonical_packed(ip)
                if packed is not None and expires_at > now and plain(packed):
                    keep.append(record)
                    kernel.append(KernelBlock(address_of_packed(packed), expires_at, ip))
                    continue
                address, text = stored_target(record.ip)
                refusal = self._protected(address)
                if record.expires_at <= now:
                    self._store.lift(record.id, now, "expired", "imr")
                    self.metrics.expired(1)
                    log.info(
                        "expired %s while the daemon was down (due %s)",
                        record.ip,
                        timestamp(record.expires_at),
                    )
                elif refusal is not None:
                    self._store.lift(record.id, now, "protected", "imr")
                    log.warning("lifted %s at start: %s", record.ip, refusal.message)
                else:
                    keep.append(record)
                    kernel.append(KernelBlock(address, record.expires_at, text))
        # The kernel load, then the index: nothing is published if the load fails. (The
        # index in a thread beside the load gained nothing measurable: it competed with the
        # load's own Python work for the GIL, not with the kernel's; docs/performance.md.)
        self._backend.prepare()
        self._backend.replace_all(kernel)
        del kernel
        self._active = {r.ip: r for r in keep}
        self._expiry = [(r.expires_at, r.ip) for r in keep]
        heapq.heapify(self._expiry)
        # Who made each block counts against its quota again (Peer.principal of a Unix
        # client; blocks from other listeners count only in the global total after a restart).
        # One principal string per uid, shared by all its blocks (not one per block).
        principals = {uid: f"uid:{uid}" for uid in {r.uid for r in keep} if uid is not None}
        self._quota.restore({r.ip: principals[r.uid] for r in keep if r.uid is not None})
        self.metrics.set_active(self._backend.name, len(self._active))
        del keep
        _release_free_heap()
        log.info("restored %d active blocks into %s", len(self._active), self._backend.describe())
        self._warn_if_too_many_rules()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="imr-writer"),
            asyncio.create_task(self._expiry_loop(), name="imr-expiry"),
            asyncio.create_task(self._prune_loop(), name="imr-prune"),
        ]
        if self._config.firewall.drift_check:
            self._tasks.append(asyncio.create_task(self._drift_loop(), name="imr-drift"))
        if self.fleet_name is not None:
            from imr.fleet.member import FleetMember  # redis and cryptography: fleet mode only

            positions = await self._in_writer(self._store.positions)
            self._fleet = FleetMember(self._config, self, positions, self.metrics.fleet)
            self._tasks += self._fleet.tasks()

    # Fleet mode: the two entries imr/fleet/member.py uses --------------------------

    def protection_view(self) -> tuple[frozenset[IPAddress], frozenset[IPAddress]]:
        return self._local.own, self._local.broadcast

    def submit_remote(
        self, stream: str, position: str, seq: int, event: Event | None, admin: bool
    ) -> asyncio.Future[dict[str, Any]]:
        """Queue a remote event for the writer (the same queue as local changes)."""
        return self._enqueue(_RemoteChange(stream, position, seq, event, admin))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writer.shutdown(wait=True)

    # Requests ---------------------------------------------------------------------

    async def handle(self, request: Request, peer: Peer) -> dict[str, Any]:
        """Run one request for an identified peer; raise BrokerError for a refusal."""
        started, result = time.monotonic(), "cancelled"  # the client went away, or we stop
        try:
            reply = await self._dispatch(request, peer)
            result = "ok"
            return reply
        except BrokerError as exc:
            result = exc.code
            raise
        except Exception:
            result = "internal_error"
            raise
        finally:
            self.metrics.request_done(request.op, peer, result, time.monotonic() - started)

    async def _dispatch(self, request: Request, peer: Peer) -> dict[str, Any]:
        if not peer.may(request.op):
            # One line per client every 10 s (with a count): a no-role loop cannot flood the log.
            suppressed = self._refusal_log.allow((peer.principal, "forbidden"), self._monotonic())
            if suppressed is not None:
                log.warning(
                    "refused %s by %s: role %s may not %s%s",
                    request.op,
                    peer.describe(),
                    ",".join(sorted(peer.roles)) or "none",
                    request.op,
                    f"; {suppressed} more like it since the last such line" if suppressed else "",
                )
            raise BrokerError("forbidden", f"user {peer.user} is not allowed to {request.op}")
        match request:
            case BlockRequest():
                return await self._block(request, peer)
            case BlockManyRequest():
                return await self._block_many(request, peer)
            case UnblockRequest():
                return await self._unblock(request, peer)
            case ListRequest():
                return self._list(request)
            case ShowRequest():
                return await self._show(request)
            case StatusRequest():
                return self.status()
            case ExportRequest():
                return await self._export(request)
            case PingRequest():
                return {"kind": "pong", "version": __version__}
        raise BrokerError("bad_request", f"unsupported op {request.op}")  # pragma: no cover

    async def _block(self, request: BlockRequest, peer: Peer) -> dict[str, Any]:
        change = self._block_change(request.ip, request, peer)
        return await self._enqueue(change)

    async def _block_many(self, request: BlockManyRequest, peer: Peer) -> dict[str, Any]:
        """Each address as its own block request: own checks, own quota share, own outcome.

        All the admitted ones are queued at once, so they usually share one batch (one
        state transaction, one kernel transaction); a refusal or failure of one address
        answers only that address.
        """
        results: list[dict[str, Any] | None] = [None] * len(request.ips)
        waiting: list[tuple[int, asyncio.Future[dict[str, Any]]]] = []
        # Spellings of one address ("2001:db8::7", "2001:DB8:0::7", "::ffff:192.0.2.7") are
        # one change, admitted and counted once; the others share its answer.
        first: dict[str, int] = {}
        spelling: dict[int, int] = {}
        for index, text in enumerate(request.ips):
            parsed = canonical_target(text)
            if not isinstance(parsed, Refusal):
                spelling[index] = first.setdefault(parsed[1], index)
                if spelling[index] != index:
                    continue
            try:
                change = self._block_change(text, request, peer, compact=True)
            except BrokerError as exc:
                results[index] = _refused_item(text, exc)
                continue
            waiting.append((index, self._enqueue(change)))
        for index, future in waiting:
            try:
                results[index] = await future
            except BrokerError as exc:
                results[index] = _refused_item(request.ips[index], exc)
        for index, original in spelling.items():
            answer = results[original]
            if index != original and answer is not None:
                results[index] = answer if answer["ok"] else {**answer, "ip": request.ips[index]}
        items = [item for item in results if item is not None]
        counts = dict.fromkeys(("blocked", "escalated", "recorded", "refused"), 0)
        for item in items:
            counts[_COUNTED.get(item.get("action", ""), "refused")] += 1
        return {"kind": "block_many", "results": items, "counts": counts}

    def _block_change(
        self, text: str, request: BlockRequest | BlockManyRequest, peer: Peer, compact: bool = False
    ) -> _BlockChange:
        """Check and admit one address; raise BrokerError for a refusal."""
        address, ip = self._blockable(text, request.op, peer)
        change = _BlockChange(
            address, ip, request.reason, request.source, request.severity, peer, compact
        )
        active = self._active.get(ip)
        if active is None or active.expires_at <= self._clock.now():
            self._admit(change)  # may make a new block: the quota decides, before queueing
        else:
            self._admit_hit(change)  # a hit row only; bounded too, or hits could fill the disk
        return change

    def _admit_hit(self, change: _BlockChange) -> None:
        peer = change.peer
        if self._config.quota.admin_exempt and peer.is_admin:
            return
        now = self._monotonic()
        refusal = self._quota.admit_hit(peer.principal, now)
        if refusal is not None:
            self._refuse_quota(change, refusal, now)

    def _admit(self, change: _BlockChange) -> None:
        """Reserve the change's share of its client's quota, or refuse it (docs: Quotas)."""
        peer = change.peer
        if self._config.quota.admin_exempt and peer.is_admin:
            change.may_create = True
            return
        now = self._monotonic()
        admitted = self._quota.admit(peer.principal, now, len(self._active))
        if isinstance(admitted, Reservation):
            change.may_create, change.reservation = True, admitted
            return
        self._refuse_quota(change, admitted, now)

    def _refuse_quota(self, change: _BlockChange, refusal: QuotaRefusal, now: float) -> None:
        peer = change.peer
        self.metrics.quota_refused(refusal.limit)
        suppressed = self._quota_log.allow((peer.principal, refusal.limit), now)
        if suppressed is not None:
            log.warning(
                "refused block %s by %s (%s): %s%s",
                change.address,
                peer.describe(),
                peer.principal,
                refusal.message,
                f"; {suppressed} more refused since the last such line" if suppressed else "",
                extra={
                    "event": "quota_refused",
                    "principal": peer.principal,
                    "code": refusal.code,
                    "limit": refusal.limit,
                    "ip": str(change.address),
                    "suppressed": suppressed,
                },
            )
        raise BrokerError(refusal.code, refusal.message)

    async def _unblock(self, request: UnblockRequest, peer: Peer) -> dict[str, Any]:
        parsed = parse_target(request.ip)
        if isinstance(parsed, Refusal):
            raise BrokerError(parsed.code, parsed.message)
        return await self._enqueue(_UnblockChange(parsed, request, peer))

    def _blockable(self, text: str, op: str, peer: Peer) -> tuple[Target, str]:
        """The target to block and its canonical text; BrokerError if it may not be."""
        parsed = canonical_target(text)
        target = parsed if isinstance(parsed, Refusal) else parsed[0]
        if isinstance(target, IPNetwork):
            self._network_allowed(target, op, peer)
        refusal = self._protected(target)
        if refusal is not None or isinstance(parsed, Refusal):
            refusal = refusal or Refusal(RefusalCode.INVALID, "not an address")
            # One line per client and refusal code every 10 s: a block_many of 1,000 bad
            # addresses, or a loop of them, cannot flood the log.
            suppressed = self._refusal_log.allow((peer.principal, refusal.code), self._monotonic())
            if suppressed is not None:
                log.warning(
                    "refused %s %r by %s: %s%s",
                    op,
                    text[:64],
                    peer.describe(),
                    refusal.message,
                    f"; {suppressed} more like it since the last such line" if suppressed else "",
                )
            raise BrokerError(refusal.code, refusal.message)
        return parsed

    def _network_allowed(self, network: IPNetwork, op: str, peer: Peer) -> None:
        """Networks are for admins, and may not overlap another active network block (nftables
        interval sets refuse overlaps; one block per address keeps the history clear too)."""
        if not peer.is_admin:
            suppressed = self._refusal_log.allow(
                (peer.principal, RefusalCode.NETWORK), self._monotonic()
            )
            if suppressed is not None:
                log.warning(
                    "refused %s %s by %s: networks need the admin role%s",
                    op,
                    network,
                    peer.describe(),
                    f"; {suppressed} more like it since the last such line" if suppressed else "",
                )
            raise BrokerError(
                RefusalCode.NETWORK,
                f"{network} is a network; user {peer.user} may block single addresses only"
                " (network blocks need the admin role)",
            )
        key = str(network)
        for ip in self._active:
            if "/" in ip and ip != key and network.overlaps(ipaddress.ip_network(ip)):
                log.warning("refused %s %s by %s: overlaps %s", op, network, peer.describe(), ip)
                raise BrokerError(
                    "network_overlaps",
                    f"{network} overlaps the blocked network {ip}; unblock that first",
                )

    def _protected(self, parsed: Target | Refusal) -> Refusal | None:
        if isinstance(parsed, Refusal):
            return parsed
        if isinstance(parsed, IPNetwork):
            return network_refusal(
                parsed,
                self._config.protect.network_min_prefix,
                self._local.own,
                self._local.broadcast,
                self._config.protect.allowlist,
            )
        return intrinsic_refusal(parsed) or protection_refusal(
            parsed,
            self._local.own,
            self._local.broadcast,
            self._config.protect.allowlist,
        )

    def _enqueue(self, change: _AnyChange) -> asyncio.Future[dict[str, Any]]:
        """Queue a change for the writer; the future gets its outcome."""
        if self._queue is None:
            raise RuntimeError("the broker has not been started")
        queued = _Queued(change, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(queued)  # unbounded: admission (quotas, connections) bounds it
        return queued.future

    def _list(self, request: ListRequest) -> dict[str, Any]:
        now = self._clock.now()
        query = ListQuery(
            request.since, request.reason, request.source, request.limit, request.origin
        )
        listing = select_blocks(self._active.values(), query, now)
        return {
            "kind": "list",
            "blocks": [block_info(r, now) for r in listing.rows],
            "matched": listing.matched,
            "active": len(self._active),
        }

    async def _show(self, request: ShowRequest) -> dict[str, Any]:
        """The address's history, newest first: one page of at most state.page_rows blocks
        and hits; `next_before` asks for the hits before this page."""
        parsed = parse_target(request.ip)
        if isinstance(parsed, Refusal):
            raise BrokerError(parsed.code, parsed.message)
        ip = str(parsed)
        rows = min(request.limit or self._config.state.page_rows, self._config.state.page_rows)
        # One row more than the page, to know whether there is another.
        blocks, hits = await self._in_writer(self._store.history_page, ip, rows + 1, request.before)
        now = self._clock.now()
        active = self._active.get(ip)
        return {
            "kind": "show",
            "ip": ip,
            "active": block_info(active, now) if active else None,
            "blocks": [block_info(b, now) for b in blocks[:rows]],
            "hits": [hit_info(h) for h in hits[:rows]],
            "more_blocks": len(blocks) > rows,
            "next_before": hits[rows - 1].id if len(hits) > rows else None,
        }

    def status(self) -> dict[str, Any]:
        return {
            "kind": "status",
            "version": __version__,
            "pid": os.getpid(),
            "started_at": timestamp(self.started_at),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "backend": self._backend.name,
            "backend_detail": self._backend.describe(),
            "backend_choice": self._backend_choice,
            "socket": str(self._config.server.socket),
            "state_file": str(self._config.state.path),
            "active_blocks": len(self._active),
            **({"fleet": self.metrics.fleet.describe(self.fleet_name)} if self.fleet_name else {}),
        }

    async def _export(self, request: ExportRequest) -> dict[str, Any]:
        """One page of the whole state, blocks then hits, each by id; `next` is the cursor
        of the following page (None after the last). A page costs the daemon its own rows
        (at most state.page_rows), so an export of any size never holds more than that."""
        rows = min(request.limit or self._config.state.page_rows, self._config.state.page_rows)
        table, _, after = (request.after or "blocks:0").partition(":")
        last = int(after)
        blocks: list[dict[str, Any]] = []
        hits: list[dict[str, Any]] = []
        following: str | None
        now = self._clock.now()
        if table == "blocks":
            found = await self._in_writer(self._store.blocks_after, last, rows)
            blocks = [block_info(b, now) for b in found]
            more = len(found) == rows
            following = f"blocks:{found[-1].id}" if more else "hits:0"
        else:
            found_hits = await self._in_writer(self._store.hits_after, last, rows)
            hits = [hit_info(h) for h in found_hits]
            more = len(found_hits) == rows
            following = f"hits:{found_hits[-1].id}" if more else None
        return {
            "kind": "export",
            "schema_version": SCHEMA_VERSION,
            "blocks": blocks,
            "hits": hits,
            "next": following,
        }

    async def _in_writer(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer, function, *args)

    # Expiry -----------------------------------------------------------------------

    async def expire_due(self) -> None:
        """Lift every block whose time has come (called by the expiry loop; tests call it)."""
        now = self._clock.now()
        due: list[str] = []
        while self._expiry and self._expiry[0][0] <= now:
            expires_at, ip = heapq.heappop(self._expiry)
            record = self._active.get(ip)
            if record is not None and record.expires_at == expires_at:
                due.append(ip)
        seen_before, recheck_before = self._seen_local, self._recheck_all_protection
        protected = self._newly_protected()
        if not due and not protected:
            return
        try:
            await self._enqueue(_ExpireChange(due, protected))
        except BrokerError as exc:
            # Not lifted: due again at the next tick (the state file may be full for a while),
            # and the newly protected addresses are looked for again then.
            self._seen_local, self._recheck_all_protection = seen_before, recheck_before
            for ip in due:
                if (record := self._active.get(ip)) is not None:
                    heapq.heappush(self._expiry, (record.expires_at, ip))
            if exc.code != STATE_UNWRITABLE:  # that one is logged once, by the writer
                raise

    def _newly_protected(self) -> dict[str, str]:
        """Active blocks that the host's current own and broadcast addresses now protect,
        looked for only when those changed (LocalAddresses follows them over netlink): an
        address blocked before it became the host's (a VIP failover) must not stay blocked.
        After a reload that changed the allowlist, every active block is looked at once."""
        local = (self._local.own, self._local.broadcast)
        if self._recheck_all_protection:
            self._recheck_all_protection = False
            self._seen_local = local
            return {
                key: refusal.message
                for key in list(self._active)
                if (refusal := self._protected(stored_address(key)))
            }
        if local == self._seen_local:
            return {}
        added = (local[0] | local[1]) - (self._seen_local[0] | self._seen_local[1])
        self._seen_local = local
        found: dict[str, str] = {}
        # The new addresses themselves, and the few blocks that may hold one: networks and
        # the IPv6 forms that carry an IPv4 address (NAT64, 6to4, Teredo, ::/64's).
        holders = [k for k in self._active if "/" in k or k.startswith(_CARRIERS)]
        for key in [str(a) for a in added] + holders:
            if key in self._active and (refusal := self._protected(stored_address(key))):
                found[key] = refusal.message
        return found

    async def _expiry_loop(self) -> None:
        while True:
            try:
                await self.check_clock()
                await self.expire_due()
                self._report_held_back()  # a flood's last second, once it is over
            except Exception:
                log.exception("expiry failed; retrying")
            await asyncio.sleep(EXPIRY_TICK)

    # Clock steps ------------------------------------------------------------------

    async def check_clock(self) -> float | None:
        """Notice a step of the wall clock (the expiry loop calls it every tick; tests call
        it) and make the kernel agree with the state again; return the step in seconds.

        Kernel timeouts count down on their own, but the daemon's expiries are wall-clock
        times: after a step back the kernel would lift blocks early (by the step), and
        after a step forward the expiry loop lifts them early in both. So on a step the
        kernel's entries are all written again from the index, with their remaining time
        as the wall clock now counts it (imr.core.clock_steps tells a step from time passing).
        """
        step = self._steps.step(self._clock.now(), self._monotonic())
        if step is None:
            return None
        log.warning(
            "the wall clock stepped %s by %.0f s; writing every active block's timeout to"
            " the kernel again",
            "forward" if step > 0 else "back",
            abs(step),
            extra={"event": "clock_step", "seconds": step},
        )
        async with self._turn:  # between batches: the index matches what the writer applied
            await self._in_writer(self._rearm_all)
        return step

    def _rearm_all(self) -> None:
        now = self._clock.now()
        live = [self._kernel_block(r) for r in self._active.values() if r.expires_at > now]
        self._backend.replace_all(live)

    # Hit retention ----------------------------------------------------------------

    async def prune_hits(self) -> int:
        """Delete the hits older than state.hit_retention, looking at PRUNE_ROWS at a time,
        each step its own turn of the writer thread (batches go in between); return how
        many (the prune loop calls it every PRUNE_INTERVAL; tests call it)."""
        retention = self._config.state.hit_retention
        now = self._clock.now()
        total, after = 0, 0
        while True:
            step = self._store.prune_hits, now - retention, now, PRUNE_ROWS, after
            deleted: int
            going_on: int | None
            deleted, going_on = await self._in_writer(*step)
            total += deleted
            if going_on is None:
                break
            after = going_on
            await asyncio.sleep(PRUNE_PAUSE)
        if total:
            log.info(
                "deleted %d reports older than %s (state.hit_retention)",
                total,
                format_duration(retention),
                extra={"event": "hits_pruned", "count": total},
            )
        return total

    async def _prune_loop(self) -> None:
        await asyncio.sleep(PRUNE_FIRST)
        while True:
            try:
                await self.prune_hits()
            except Exception as exc:  # a full disk, say: the next round tries again
                log.warning("deleting old reports failed: %s; trying again later", exc)
            await asyncio.sleep(PRUNE_INTERVAL)

    # Drift ------------------------------------------------------------------------

    async def _drift_loop(self) -> None:
        interval = self._config.firewall.drift_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_drift()
            except BackendError as exc:  # the tool's own message says enough
                log.error("drift check failed: %s; trying again in %d s", exc, interval)
            except Exception:
                log.exception("drift check failed; trying again in %d s", interval)

    async def check_drift(self) -> Drift:
        """Check imr's kernel objects against the index and repair them (the drift loop calls
        it every firewall.drift_interval; tests call it). Returns what was found."""
        async with self._turn:  # between batches: the index matches what the writer applied
            drift: Drift = await self._in_writer(self._check_and_repair)
            return drift

    def _check_and_repair(self) -> Drift:
        """In the writer thread, so it never runs beside a batch's kernel change."""
        now = self._clock.now()
        records = list(self._active.values())  # not changed while the turn is held
        expected = expected_counts(((slot_of_text(r.ip), r.expires_at) for r in records), now)
        drift = self._backend.check(expected)
        if not drift.found:
            return drift
        log.warning("drift in %s: %s; repairing", self._backend.name, drift.describe())
        done = []
        if drift.structure:
            self._backend.prepare()  # imr's chains/sets/rules and the jump; entries are kept
            self.metrics.drift_repaired("structure")
            done.append("re-created imr's kernel objects")
        if drift.entries:
            live = [self._kernel_block(r) for r in records if r.expires_at > now]
            self._backend.replace_all(live)
            self.metrics.drift_repaired("entries")
            done.append(f"restored {len(live)} blocks from the state")
        after = self._backend.check(expected)
        if after.found:
            log.error("drift remains after the repair: %s", after.describe())
        else:
            log.warning("drift repaired: %s", "; ".join(done))
        return drift

    # The writer -------------------------------------------------------------------

    async def _write_loop(self) -> None:
        queue = self._queue
        if queue is None:
            raise RuntimeError("the broker has not been started")
        while True:
            batch = [await queue.get()]
            while len(batch) < MAX_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            changes = [queued.change for queued in batch]
            async with self._turn:  # the drift check waits until this batch is published
                try:
                    result = await self._in_writer(self._commit_isolated, changes)
                except Exception as exc:  # never lose the waiting clients: tell them
                    log.exception("writer failed")
                    result = _BatchResult([_Outcome(error=_internal(exc)) for _ in batch])
                self.metrics.batch(len(batch))
                self.metrics.expired(result.expired)
                self._publish(result)
                if self._fleet is not None:
                    self._fleet.publisher.wake()
            self._log_changes(result.log_lines)
            # Settle every reservation before any readmission, so none counts twice.
            for queued, outcome in zip(batch, result.outcomes, strict=True):
                self._settle_quota(queued.change, outcome)
            for queued, outcome in zip(batch, result.outcomes, strict=True):
                if outcome.readmit and isinstance(queued.change, _BlockChange):
                    self._readmit(queued, queued.change, queue)
                    continue
                future = queued.future
                if future.done():  # the client went away
                    continue
                if outcome.error is not None:
                    future.set_exception(outcome.error)
                else:
                    future.set_result(outcome.result or {})

    def _readmit(
        self, queued: _Queued, change: _BlockChange, queue: asyncio.Queue[_Queued]
    ) -> None:
        """A hit whose block was lifted before the writer got to it: a new block, if the quota
        allows; so no request makes a block without passing the quota."""
        try:
            self._admit(change)
        except BrokerError as exc:
            if not queued.future.done():
                queued.future.set_exception(exc)
            return
        queue.put_nowait(queued)

    def _settle_quota(self, change: _AnyChange, outcome: _Outcome) -> None:
        if not isinstance(change, _BlockChange) or change.reservation is None:
            return  # nothing reserved (or a readmission without one, settled already)
        action = (outcome.result or {}).get("action") if outcome.error is None else None
        if action == "block":
            self._quota.commit(change.reservation, str(change.address))
            return
        self._quota.release(change.reservation)  # refused, failed, or a hit after all
        if action is not None and not (self._config.quota.admin_exempt and change.peer.is_admin):
            # A hit after all (two requests for one new address in one batch): it wrote a
            # hit row, so it counts against hits_per_minute like any other report.
            self._quota.admit_hit(change.peer.principal, self._monotonic())

    def _publish(self, result: _BatchResult) -> None:
        for ip, record in result.changed.items():
            previous = self._active.get(ip)
            if record is None or (previous is not None and previous.id != record.id):
                self._quota.lifted(ip)  # this block no longer counts against its client
            if record is None:
                self._active.pop(ip, None)
            else:
                self._active[ip] = record
                heapq.heappush(self._expiry, (record.expires_at, ip))
        self.metrics.set_active(self._backend.name, len(self._active))
        self._warn_if_too_many_rules()

    def _log_changes(self, lines: list[Callable[[], str]]) -> None:
        """One line per change, up to server.log_changes_per_second (the state file has
        every change; under a flood the log says how many it left out)."""
        self._report_held_back()
        for line in lines[: self._change_log.admit(len(lines), self._monotonic())]:
            log.info("%s", line())

    def _report_held_back(self) -> None:
        held = self._change_log.held_back(self._monotonic())
        if held:
            log.info(
                "%d more changes in the last second not logged one by one"
                " (server.log_changes_per_second = %d); `imr list --since 1m` and"
                " `imr show IP` have them all",
                held,
                self._change_log.per_second,
                extra={"event": "changes_not_logged", "count": held},
            )

    def _warn_if_too_many_rules(self) -> None:
        limit = self._config.firewall.per_address_warning
        if self._backend.name == "iptables" and not self._warned_size and len(self._active) > limit:
            self._warned_size = True
            log.warning(
                "%d active blocks with per-address iptables rules: every packet walks them all;"
                ' use backend = "nftables" or "ipset" (hash sets) at this scale',
                len(self._active),
            )

    def _commit_isolated(
        self, batch: list[_AnyChange], earlier: dict[str, BlockRecord | None] | None = None
    ) -> _BatchResult:
        """Commit the batch at once; if that fails, split it in halves and retry each.

        So one bad change (a kernel refusal, say) fails only its own client,
        nobody hears "ok" for a change that was rolled back, and the good
        changes still go in a few transactions. `earlier` holds what earlier
        parts of the same batch committed, which the event loop has not
        published yet.
        """
        if self._health.holding_off():
            return self._state_unwritable(len(batch), None)
        try:
            return self._commit(batch, earlier or {})
        except _StateUnwritable as exc:
            return self._state_unwritable(len(batch), exc)
        except Exception as exc:
            if len(batch) == 1:
                log.error("change failed: %s", exc)
                return _BatchResult([_Outcome(error=_internal(exc))])
            log.warning("batch of %d failed (%s); splitting it", len(batch), exc)
        merged = _BatchResult([], dict(earlier or {}))
        middle = len(batch) // 2
        for part in (batch[:middle], batch[middle:]):
            result = self._commit_isolated(part, merged.changed)
            merged.outcomes.extend(result.outcomes)
            merged.changed.update(result.changed)
            merged.expired += result.expired
            merged.log_lines += result.log_lines
        return merged

    def _commit(
        self, batch: list[_AnyChange], earlier: dict[str, BlockRecord | None]
    ) -> _BatchResult:
        """The batch's state rows, then its kernel change, then the commit (fsync): so a
        client hears "ok" only for a change that is in both. If the commit fails after
        the kernel change (a full disk shows up at the commit), the change is taken out
        of the kernel again before anyone hears of the failure."""
        work = _Work(self, self._clock.now(), earlier)
        applied = False
        try:
            with self._store.transaction():
                work.prefetch(batch)
                outcomes = [work.run(change) for change in batch]
                work.flush()
                self._backend.apply(work.kernel_add, work.kernel_remove)
                applied = True
        except Exception as exc:
            if applied:
                self._undo_kernel(work, earlier)
            if unwritable(exc):
                raise _StateUnwritable(exc) from exc
            raise
        self._health.succeeded()
        return _BatchResult(outcomes, work.changed, work.expired, work.log_lines)

    def _undo_kernel(self, work: _Work, earlier: dict[str, BlockRecord | None]) -> None:
        """Put every target the failed batch touched back as it was before the batch."""
        targets = {b.text: b.address for b in work.kernel_add}
        targets.update((str(t), t) for t in work.kernel_remove)
        restore: list[KernelBlock] = []
        remove: list[Target] = []
        for ip, target in targets.items():
            before = self.current(ip, earlier)
            if before is not None and before.expires_at > work.now:
                restore.append(KernelBlock(target, before.expires_at, ip))
            else:
                remove.append(target)
        try:
            self._backend.apply(restore, remove)
        except Exception as exc:  # the index still says what the kernel must hold
            log.error("could not take a failed batch out of the kernel (%s); rebuilding it", exc)
            live = {**self._active, **earlier}
            try:
                self._backend.replace_all(
                    [self._kernel_block(r) for r in live.values() if r and r.expires_at > work.now]
                )
            except Exception:
                log.exception("could not rebuild the kernel; the drift check tries again")

    def _state_unwritable(self, count: int, exc: _StateUnwritable | None) -> _BatchResult:
        """Refuse a whole batch: the state file takes no writes (no split: every part would
        fail the same way)."""
        if exc is not None:
            self._health.failed(exc.cause)
        self._health.refused(count)
        error = BrokerError(STATE_UNWRITABLE, UNWRITABLE_MESSAGE)
        return _BatchResult([_Outcome(error=error) for _ in range(count)])

    def _kernel_block(self, record: BlockRecord) -> KernelBlock:
        address, text = stored_target(record.ip)
        return KernelBlock(address, record.expires_at, text)

    def current(self, ip: str, changed: dict[str, BlockRecord | None]) -> BlockRecord | None:
        if ip in changed:
            return changed[ip]
        return self._active.get(ip)


class _Work:
    """The state and kernel changes of one batch, built inside its transaction."""

    def __init__(self, broker: Broker, now: float, earlier: dict[str, BlockRecord | None]) -> None:
        self.broker = broker
        self.store = broker._store
        self.ladder = broker._ladder
        self.now = now
        self.changed: dict[str, BlockRecord | None] = dict(earlier)
        self.kernel_add: list[KernelBlock] = []
        self.kernel_remove: list[Target] = []
        self.log_lines: list[Callable[[], str]] = []
        self.expired = 0
        self.hits: list[tuple[Any, ...]] = []  # written together by flush()
        self.new_blocks: list[BlockRecord] = []  # likewise; before any UPDATE (it may be theirs)
        self.next_id: int | None = None
        # Block history of new addresses, read for the whole batch in one query; an address
        # this batch writes for is dropped from it (then read on its own, fresh).
        self.offences: dict[str, Offences] = {}
        self.outbox: list[bytes] = []  # fleet events of this batch's local decisions

    def prefetch(self, batch: Sequence[_AnyChange]) -> None:
        new = [
            change.ip
            for change in batch
            if isinstance(change, _BlockChange | _RemoteChange)
            and change.ip
            and self.broker.current(change.ip, self.changed) is None
        ]
        if new:
            self.offences = self.store.offences(new)

    def flush(self) -> None:
        """Write the batch's new blocks and hits (one statement each: ~2x faster per row)."""
        self._insert_pending()
        self.store.record_hits(self.hits)
        self.hits.clear()
        if self.outbox:  # fleet mode: in the same transaction as the changes
            self.store.add_outbox(self.outbox)
            self.outbox.clear()

    def _insert_pending(self) -> None:
        if self.new_blocks:
            self.store.insert_blocks(self.new_blocks)
            self.new_blocks.clear()

    def _lift(self, record: BlockRecord, reason: str, by: str) -> None:
        self._insert_pending()
        self.store.lift(record.id, self.now, reason, by)
        self.offences.pop(record.ip, None)

    def _new_block(
        self, ip: str, decision: Decision, change: _BlockChange, offence: int
    ) -> BlockRecord:
        if self.next_id is None:
            self.next_id = self.store.next_block_id()
        record = BlockRecord(
            self.next_id,
            ip,
            self.now,
            decision.expires_at,
            decision.rung,
            offence,
            change.reason,
            change.source,
            change.peer.uid,
            change.peer.pid,
        )
        self.next_id += 1
        self.new_blocks.append(record)
        return record

    def _offences(self, ip: str) -> Offences:
        """The address's history: from the batch's query, or read afresh (with this batch's
        pending rows written first) if the batch has written for it since."""
        found = self.offences.pop(ip, None)
        if found is None:
            self._insert_pending()
            found = self.store.offences([ip])[ip]
        return found

    def run(self, change: _AnyChange) -> _Outcome:
        match change:
            case _BlockChange():
                return self._block(change)
            case _UnblockChange():
                return self._unblock(change)
            case _ExpireChange():
                return self._expire(change)
            case _RemoteChange():
                return self._remote(change)

    def _block(self, change: _BlockChange) -> _Outcome:
        peer, ip = change.peer, change.ip
        current = self.broker.current(ip, self.changed)
        if current is not None and current.expires_at <= self.now:
            # Due but not yet lifted by the expiry loop: lift it now, then decide afresh.
            self._lift(current, "expired", "imr")
            current = replace(current, lifted_at=self.now, lift_reason="expired")
            self.changed[ip] = None
            self.expired += 1
        previous: BlockRecord | None
        offences: Offences | None = None
        if current is not None and current.lifted_at is None:
            previous = current
        else:
            offences = self._offences(ip)
            previous = offences.last
        decision = decide(
            self.ladder, previous.as_previous() if previous else None, self.now, change.severity
        )
        reason, source = change.reason, change.source
        if decision.action is Action.BLOCK and not change.may_create:
            return _Outcome(readmit=True)  # admitted as a hit; a new block must pass the quota
        if decision.action is Action.BLOCK:  # so previous was no active block: offences read
            offence = (offences or self._offences(ip)).count + 1
            record = self._new_block(ip, decision, change, offence)
            self.kernel_add.append(KernelBlock(change.address, record.expires_at, ip))
        elif current is None:  # the policy only escalates or records an active block
            raise RuntimeError(f"policy said {decision.action} for {ip} without an active block")
        else:
            record = current
            if decision.action is Action.ESCALATE:
                self._insert_pending()
                self.store.escalate(record.id, decision.rung, decision.expires_at)
                record = replace(record, rung=decision.rung, expires_at=decision.expires_at)
                # Re-adding updates kernel timeouts (set backends); never duplicates.
                self.kernel_add.append(KernelBlock(change.address, record.expires_at, ip))
            elif self.broker._rearm:
                # Re-armed in the batch's own kernel transaction: if the kernel lifted the
                # block early (its timeout ran on a clock that stepped, or someone deleted
                # the entry), the report that shows the attacker is back puts it in again.
                self.kernel_add.append(KernelBlock(change.address, record.expires_at, ip))
        self.hits.append(
            (ip, self.now, decision.action.value, reason, source, peer.uid, peer.pid, record.id)
        )
        if decision.action is not Action.RECORD:
            self.changed[ip] = record
            if self.broker.fleet_name is not None:
                self._announce(decision.action.value, record)
        self.log_lines.append(functools.partial(_change_line, decision, record, change))
        if change.compact:
            return _Outcome(
                {
                    "ip": ip,
                    "ok": True,
                    "action": decision.action.value,
                    "expires_at": timestamp(record.expires_at),
                    "rung": record.rung,
                    "offence": record.offence,
                }
            )
        result = block_info(record, self.now)
        result.update(kind="block", action=decision.action.value, why=decision.why)
        return _Outcome(result)

    def _unblock(self, change: _UnblockChange) -> _Outcome:
        ip = str(change.address)
        current = self.broker.current(ip, self.changed)
        if current is None:
            return _Outcome(error=BrokerError("not_blocked", f"{ip} is not blocked"))
        self._lift(current, "unblocked", change.peer.describe())
        self.changed[ip] = None
        self.kernel_remove.append(change.address)
        if self.broker.fleet_name is not None:
            self._announce("lift", current)
        by, reason = change.peer.describe(), change.request.reason
        self.log_lines.append(lambda: f"unblocked {ip} by {by} reason={reason!r}")
        return _Outcome({"kind": "unblock", "ip": ip})

    def _announce(self, kind: str, record: BlockRecord) -> None:
        """An outbox row for a local decision (fleet mode)."""
        expires_at = 0.0 if kind == "lift" else record.expires_at
        self.outbox.append(
            outbox_body(
                self.broker.fleet_name or "",
                kind,
                record.ip,
                self.now,
                expires_at,
                record.rung,
                record.offence,
                record.reason,
                record.source,
            )
        )

    def _remote(self, change: _RemoteChange) -> _Outcome:
        """A fleet event: a block merged into one in force here (the higher rung, the later
        expiry), a new block with its origin (already over: history only, for the ladder),
        or a lift its origin may make. Never announced again."""
        self.store.set_position(change.stream, change.position, change.seq)
        event = change.event
        if event is None:
            return _Outcome({"kind": "position"})
        ip = event.ip
        target = stored_address(ip)
        current = self.broker.current(ip, self.changed)
        if current is not None and current.expires_at <= self.now:
            self._lift(current, "expired", "imr")
            self.changed[ip], current = None, None
            self.expired += 1
        if event.kind == "lift":
            if current is None:
                return _Outcome({"kind": "lift", "ip": ip, "action": "none"})
            if not may_lift(event.origin, current.origin, change.admin):
                maker = current.origin or "this host"
                why = f"{event.origin} may not lift the block of {ip} made by {maker}"
                return _Outcome(error=BrokerError("lift_not_allowed", why))
            self._lift(current, "unblocked", f"fleet:{event.origin}")
            self.changed[ip] = None
            self.kernel_remove.append(target)
            self.log_lines.append(lambda: f"unblocked {ip} by fleet member {event.origin}")
            return _Outcome({"kind": "lift", "ip": ip, "action": "lift"})
        if current is not None:
            rung, expires_at = merged(
                (current.rung, current.expires_at), event.rung, event.expires_at
            )
            if (rung, expires_at) != (current.rung, current.expires_at):
                self._insert_pending()
                self.store.escalate(current.id, rung, expires_at)
                current = replace(current, rung=rung, expires_at=expires_at)
                self.changed[ip] = current
                self.kernel_add.append(KernelBlock(target, expires_at, ip))
            return _Outcome({"kind": "block", "ip": ip, "action": "merge"})
        if self.next_id is None:
            self.next_id = self.store.next_block_id()
        record = BlockRecord(
            self.next_id,
            ip,
            event.at,
            event.expires_at,
            event.rung,
            self._offences(ip).count + 1,
            event.reason,
            event.source,
            None,
            None,
            origin=event.origin,
        )
        self.next_id += 1
        if event.expires_at <= self.now:  # over already: only the ladder needs it
            record = replace(
                record, lifted_at=event.expires_at, lift_reason="expired", lifted_by="imr"
            )
            self.new_blocks.append(record)
            return _Outcome({"kind": "block", "ip": ip, "action": "history"})
        self.new_blocks.append(record)
        self.changed[ip] = record
        self.kernel_add.append(KernelBlock(target, record.expires_at, ip))
        origin, until = event.origin, timestamp(record.expires_at)
        self.log_lines.append(
            lambda: f"blocked {ip} until {until} rung={record.rung} from fleet member {origin}"
        )
        return _Outcome({"kind": "block", "ip": ip, "action": "block"})

    def _expire(self, change: _ExpireChange) -> _Outcome:
        lifted = []
        for ip in change.due:
            current = self.broker.current(ip, self.changed)
            if current is None or current.expires_at > self.now:
                continue  # escalated or unblocked since it was found due
            self._lift(current, "expired", "imr")
            self.changed[ip] = None
            self.kernel_remove.append(stored_address(ip))
            lifted.append(ip)
            self.expired += 1
            self.log_lines.append(functools.partial(_expiry_line, current))
        for ip, why in change.protected.items():
            current = self.broker.current(ip, self.changed)
            if current is None:
                continue
            self._lift(current, "protected", "imr")
            self.changed[ip] = None
            self.kernel_remove.append(stored_address(ip))
            lifted.append(ip)
            log.warning("lifted %s: %s", ip, why)  # rare and important: outside the budget
        return _Outcome({"kind": "expire", "lifted": lifted})


def _release_free_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim).

    Start-up with 100,000 blocks allocates and frees tens of MB (rows, the kernel script, its
    parsing); glibc would otherwise keep ~10 MB of it for the daemon's whole life.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def stored_address(ip: str) -> Target:
    """An address (or network, in CIDR form) read back from the state file, where only valid
    ones are written."""
    parsed = parse_target(ip)
    if isinstance(parsed, Refusal):
        raise ValueError(f"state file holds an invalid address {ip!r}")
    return parsed


def stored_target(ip: str) -> tuple[Target, str]:
    """stored_address(ip) and its canonical text, cheaply for the text the daemon writes
    (start-up reads 100,000 of these; see canonical_target)."""
    parsed = canonical_target(ip)
    if isinstance(parsed, Refusal):
        raise ValueError(f"state file holds an invalid address {ip!r}")
    return parsed


_COUNTED = {"block": "blocked", "escalate": "escalated", "record": "recorded"}


def _refused_item(ip: str, exc: BrokerError) -> dict[str, Any]:
    """block_many's answer for one address that was refused or failed."""
    return {"ip": ip, "ok": False, "error": {"code": exc.code, "message": exc.message}}


def _expiry_line(record: BlockRecord) -> str:
    return f"expired {record.ip} (blocked {timestamp(record.blocked_at)}, rung {record.rung})"


def _change_line(decision: Decision, record: BlockRecord, change: _BlockChange) -> str:
    """The log line of a block request's outcome (the request's own reason and source)."""
    verb = {"block": "blocked", "escalate": "escalated", "record": "hit on blocked"}
    return (
        f"{verb[decision.action.value]} {record.ip} until {timestamp(record.expires_at)}"
        f" rung={record.rung} offence={record.offence} ({decision.why})"
        f" by {change.peer.describe()} source={change.source or '-'} reason={change.reason!r}"
    )


def _internal(exc: Exception) -> BrokerError:
    return BrokerError("internal_error", f"the change could not be applied: {exc}")


def block_info(record: BlockRecord, now: float) -> dict[str, Any]:
    return {
        "ip": record.ip,
        "blocked_at": timestamp(record.blocked_at),
        "expires_at": timestamp(record.expires_at),
        "duration": format_duration(record.expires_at - record.blocked_at),
        "remaining_seconds": max(0, round(record.expires_at - now))
        if record.lifted_at is None
        else 0,
        "rung": record.rung,
        "offence": record.offence,
        "reason": record.reason,
        "source": record.source,
        "uid": record.uid,
        "pid": record.pid,
        "lifted_at": timestamp(record.lifted_at),
        "lift_reason": record.lift_reason,
        "lifted_by": record.lifted_by,
        "origin": record.origin,
    }


def hit_info(hit: HitRecord) -> dict[str, Any]:
    return {
        "id": hit.id,  # show's `before` cursor
        "ip": hit.ip,
        "at": timestamp(hit.at),
        "outcome": hit.outcome,
        "reason": hit.reason,
        "source": hit.source,
        "uid": hit.uid,
        "pid": hit.pid,
        "block_id": hit.block_id,
    }
