"""The broker: turns authorised requests into policy decisions, state rows and kernel changes.

Flow of a block request (see docs/architecture.md):
  admission (admission.py: role, address, protection, quota) -> queue for the writer
  -> writer batches whatever is queued: one state transaction + one backend
     apply -> commit (fsync) (transaction.py) -> every request in the batch hears
     its outcome (replies.py builds what it hears).

Only the writer thread touches the Store and the Backend (or the event loop, for a
small batch while that thread is idle: commit_place.py; never both at once), and only
the event loop changes the in-memory index of active blocks, after a batch committed;
so list/show/status answer from memory without locks. The Broker itself owns the
life cycle (start-up reconcile, the loops, stop) and routes each request: the reads
to reads.py, block_many to block_many.py, a fast-lane block with a LaneReply
(lane_reply.py); start-up's rows come from restore.py, the change log is change_log.py.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast, overload

from imr.backends.base import (
    Backend,
    Drift,
)
from imr.config import Config
from imr.core.addresses import (
    IPAddress,
    ProtectionIndex,
    Refusal,
    parse_target,
)
from imr.core.clock import Clock
from imr.core.policy import Ladder
from imr.core.prefixes import Level
from imr.core.quota import QuotaLedger
from imr.protocol import (
    BlockManyRequest,
    BlockManyResult,
    BlockRequest,
    BlockResult,
    ExportPage,
    ExportRequest,
    ListRequest,
    ListResult,
    PingRequest,
    PongResult,
    Request,
    Result,
    ShowRequest,
    ShowResult,
    StatusRequest,
    StatusResult,
    UnblockRequest,
    UnblockResult,
)
from imr.server import replies
from imr.server.access import Peer
from imr.server.admission import AddressView, Gatekeeper
from imr.server.block_answer import BlockAnswer
from imr.server.block_many import block_many
from imr.server.change_log import ChangeLog
from imr.server.changes import (
    Answer,
    AnyChange,
    BatchResult,
    BlockChange,
    BrokerError,
    ChangeQueue,
    ExpireChange,
    Outcome,
    Queued,
    RemoteBatch,
    RemoteChange,
    Reply,
    UnblockChange,
    internal_error,
    stored_address,
    stored_target,
)
from imr.server.commit_place import ON_LOOP_BACKENDS, CommitPlace
from imr.server.lane_reply import LaneReply
from imr.server.metrics import Metrics
from imr.server.prefix_blocks import PrefixBlocks, guard_of
from imr.server.reads import Reads
from imr.server.restore import release_free_heap, rows_to_restore
from imr.server.state_health import STATE_UNWRITABLE, StateHealth
from imr.server.transaction import BatchCommitter
from imr.server.upkeep import Upkeep
from imr.store import BlockRecord, Store
from imr.wire_codes import WireCode

__all__ = ["AddressView", "Broker", "BrokerError", "stored_address", "stored_target"]

log = logging.getLogger("imr.broker")

MAX_BATCH = 512
EXPIRY_TICK = 0.25  # seconds between expiry checks: blocks lift within a second


# Backends whose entries are not re-armed on a report: iptables rules never time out.
_NO_REARM = frozenset({"iptables"})


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
        self._store = store
        self._backend = backend
        self._clock = clock
        self._local = local
        # Filled in place (reconcile, _publish): admission and the committer read this dict.
        self._active: dict[str, BlockRecord] = {}
        self._expiry: list[tuple[float, str]] = []  # heap; stale entries are skipped
        self._queue: ChangeQueue | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imr-writer")
        # Small batches commit on the loop while the thread is idle (commit_place.py); not in
        # fleet mode, whose publisher writes the state file from a connection of its own.
        on_loop = backend.name in ON_LOOP_BACKENDS and not config.fleet.enabled
        self._place = CommitPlace(self._writer, on_loop)
        # Held by the writer loop from a batch's start until it is published, and by the drift
        # check: so the check compares the kernel with an index that matches it.
        self._turn = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = time.time()
        self.metrics = metrics or Metrics()  # counted always; served only if configured
        # Quotas run on a monotonic clock: a wall-clock step must not lock clients out.
        self._monotonic = monotonic
        self._quota = QuotaLedger(config.quota.to_limits())
        self._gate = self._make_gate(config)
        self._change_log = ChangeLog(config.server.log_changes_per_second, monotonic)
        # Re-arm a block's kernel entry on every report of it; not for iptables, whose
        # rules never time out and whose apply reads the whole chain.
        rearm = backend.name not in _NO_REARM
        health = StateHealth(store.path, monotonic)  # the writer thread's
        self._committer = BatchCommitter(
            store, backend, clock, health, self._active, config.policy.to_ladder(), rearm
        )
        self._committer.prefix = self._prefix = self._prefix_blocks(config)
        # Fleet mode (docs/fleet.md): this member's name, or None (then nothing below runs).
        self.fleet_name: str | None = config.fleet.name if config.fleet.enabled else None
        self._committer.fleet_name = self.fleet_name
        self._fleet: Any = None  # imr.fleet.member.FleetMember, made by start()
        self._upkeep = self._make_upkeep(config, store)
        self._reads = Reads(config, self._active, store, clock, self._prefix, self._in_writer)

    def _make_gate(self, config: Config) -> Gatekeeper:
        """Admission: roles, address checks, protection and quotas, before anything queues."""
        return Gatekeeper(
            (config.guarded, config.quota),
            self._local,
            self._active,
            self._quota,
            self._clock,
            self._monotonic,
            self.metrics,
        )

    def _make_upkeep(self, config: Config, store: Store) -> Upkeep:
        """Clock steps, hit retention and the drift check, between the writer's batches."""
        return Upkeep(
            (config.state, config.firewall),
            (self._clock, self._monotonic),
            store,
            self._committer,
            self.metrics,
            self._turn,
            self._in_writer,
        )

    def _prefix_blocks(self, config: Config) -> PrefixBlocks:
        """Per-prefix offences and network escalation (issue #16), the writer thread's. Its
        guard reads the configuration in force, so a reload's allowlist applies."""
        return PrefixBlocks(
            *_prefix_settings(config),
            guard_of(
                lambda: self._config.protect.network_min_prefix,
                lambda: self._local.own,
                lambda: self._local.broadcast,
                # Fleet mode: members' addresses too (Config.guarded); a network holding one
                # is refused by every other member as protected_target (docs/fleet.md).
                lambda: self._config.guarded.allowlist,
                # A trusted proxy inside a prefix speaks for everyone behind it.
                lambda: [
                    *self._config.escalation.never_aggregate,
                    *self._config.logscan.trusted_proxies,
                ],
            ),
        )

    # Life cycle -------------------------------------------------------------------

    def apply_config(self, config: Config) -> None:
        """A reloaded configuration (reload.py keeps the fixed sections as they were):
        the allowlist, ladder, quotas and log budget apply to the next requests."""
        if config.guarded.allowlist != self._config.guarded.allowlist:
            self._gate.recheck_all = True
        self._config = self._reads.config = config
        self._committer.ladder = config.policy.to_ladder()
        self._gate.protect, self._gate.quota_config = config.guarded, config.quota
        self._quota.limits = config.quota.to_limits()
        self._change_log.configure(config.server.log_changes_per_second)
        self._prefix.configure(*_prefix_settings(config))

    def reconcile(self) -> None:
        """At start: lift what expired while we were down and make the kernel match the state.

        Also lifts blocks of addresses that became protected (allowlist or own
        address) since they were blocked. Runs before any client is served.
        """
        now = self._clock.now()
        protection = ProtectionIndex.build(
            self._local.own, self._local.broadcast, self._config.guarded.allowlist
        )
        keep, kernel = rows_to_restore(
            self._store, now, protection.plain, self._gate.protected, self.metrics
        )
        # The kernel load, then the index: nothing is published if the load fails. (The
        # index in a thread beside the load gained nothing measurable: it competed with the
        # load's own Python work for the GIL, not with the kernel's; docs/performance.md.)
        self._prefix.restore(kernel, keep, now)
        self._backend.prepare()
        self._backend.replace_all(self._prefix.kernel_blocks(kernel))
        del kernel
        self._active.update((r.ip, r) for r in keep)
        self._expiry = [(r.expires_at, r.ip) for r in keep]
        heapq.heapify(self._expiry)
        # Who made each block counts against its quota again (Peer.principal of a Unix
        # client; blocks from other listeners count only in the global total after a restart).
        # One principal string per uid, shared by all its blocks (not one per block).
        principals = {uid: f"uid:{uid}" for uid in {r.uid for r in keep} if uid is not None}
        self._quota.restore({r.ip: principals[r.uid] for r in keep if r.uid is not None})
        self.metrics.set_active(self._backend.name, len(self._active))
        del keep
        release_free_heap()
        log.info("restored %d active blocks into %s", len(self._active), self._backend.describe())
        self._warn_if_too_many_rules()

    async def start(self) -> None:
        self._queue = ChangeQueue()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="imr-writer"),
            asyncio.create_task(self._expiry_loop(), name="imr-expiry"),
            asyncio.create_task(self._upkeep.prune_loop(), name="imr-prune"),
        ]
        if self._config.firewall.drift_check:
            self._tasks.append(asyncio.create_task(self._upkeep.drift_loop(), name="imr-drift"))
        if self.fleet_name is not None:
            from imr.fleet.member import FleetMember  # redis and cryptography: fleet mode only

            positions = await self._in_writer(self._store.positions)
            self._fleet = FleetMember(self._config, self, positions, self.metrics.fleet)
            self._tasks += self._fleet.tasks()

    # Fleet mode: the two entries imr/fleet/member.py uses --------------------------

    def protection_view(self) -> tuple[frozenset[IPAddress], frozenset[IPAddress], Config]:
        """The own and broadcast addresses now, and the configuration (a reload's allowlist)."""
        return self._local.own, self._local.broadcast, self._config

    def submit_remote(self, events: list[RemoteChange]) -> asyncio.Future[Answer]:
        """Queue remote events for the writer as one change (the same queue as local changes):
        a catch-up hands over thousands at a time (imr/fleet/member.py)."""
        return cast("asyncio.Future[Answer]", self._enqueue(RemoteBatch(events)))  # a dict

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writer.shutdown(wait=True)

    # Requests ---------------------------------------------------------------------

    @overload
    async def handle(self, request: BlockRequest, peer: Peer) -> BlockResult: ...
    @overload
    async def handle(self, request: BlockManyRequest, peer: Peer) -> BlockManyResult: ...
    @overload
    async def handle(self, request: UnblockRequest, peer: Peer) -> UnblockResult: ...
    @overload
    async def handle(self, request: ListRequest, peer: Peer) -> ListResult: ...
    @overload
    async def handle(self, request: ShowRequest, peer: Peer) -> ShowResult: ...
    @overload
    async def handle(self, request: StatusRequest, peer: Peer) -> StatusResult: ...
    @overload
    async def handle(self, request: ExportRequest, peer: Peer) -> ExportPage: ...
    @overload
    async def handle(self, request: PingRequest, peer: Peer) -> PongResult: ...
    @overload
    async def handle(self, request: Request, peer: Peer) -> Result: ...
    async def handle(self, request: Request, peer: Peer) -> Result:
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
            result = WireCode.INTERNAL_ERROR
            raise
        finally:
            self.metrics.request_done(request.op, peer, result, time.monotonic() - started)

    def submit_block(
        self,
        request: BlockRequest,
        peer: Peer,
        answered: Callable[[Reply | None, BaseException | None], object],
    ) -> None:
        """handle() of a `block` without a coroutine, for the Unix socket's fast lane
        (fast_lane.py): the checks now (BrokerError for a refusal), then `answered` with
        the outcome (a result, or the error), called by the writer loop as it settles the
        batch: no future, no loop turn a request. Counted in the metrics as handle() counts."""
        started = time.monotonic()
        try:
            self._gate.check_role(request, peer)
            change = self._gate.block_change(request.ip, request, peer)
        except Exception as exc:
            result = exc.code if isinstance(exc, BrokerError) else WireCode.INTERNAL_ERROR
            self.metrics.request_done(request.op, peer, result, time.monotonic() - started)
            raise
        self._put(Queued(change, LaneReply(self.metrics, peer, started, answered)))

    async def _dispatch(self, request: Request, peer: Peer) -> Result:
        self._gate.check_role(request, peer)
        match request:
            case BlockRequest():
                change = self._gate.block_change(request.ip, request, peer)
                answer = await self._enqueue(change)  # the writer's row and decision
                if isinstance(answer, BlockAnswer):
                    return answer.result()
                return cast(BlockResult, answer)
            case BlockManyRequest():
                return await block_many(request, peer, self._gate, self._enqueue)
            case UnblockRequest():
                return await self._request_unblock(request, peer)
            case ListRequest():
                return self._reads.list(request)
            case ShowRequest():
                return await self._reads.show(request)
            case StatusRequest():
                return self.status()
            case ExportRequest():
                return await self._reads.export(request)
            case PingRequest():
                return replies.pong()
        raise BrokerError(WireCode.BAD_REQUEST, f"unsupported op {request.op}")  # pragma: no cover

    async def _request_unblock(self, request: UnblockRequest, peer: Peer) -> UnblockResult:
        parsed = parse_target(request.ip)
        if isinstance(parsed, Refusal):
            raise BrokerError(WireCode(parsed.code), parsed.message)
        return cast(UnblockResult, await self._enqueue(UnblockChange(parsed, request, peer)))

    def _enqueue(self, change: AnyChange) -> asyncio.Future[Reply]:
        """Queue a change for the writer; the future gets its outcome."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._put(Queued(change, future))
        return future

    def _put(self, queued: Queued) -> None:
        if self._queue is None:
            raise RuntimeError("the broker has not been started")
        self._queue.put_nowait(queued)  # unbounded: admission (quotas, connections) bounds it

    def status(self) -> StatusResult:
        backend = self._backend.name, self._backend.describe(), self._backend_choice
        return replies.status_reply(
            self.started_at,
            backend,
            str(self._config.server.socket),
            str(self._config.state.path),
            len(self._active),
            self.metrics.fleet.describe(self.fleet_name) if self.fleet_name else None,
        )

    async def _in_writer(self, function: Callable[..., Any], *args: Any) -> Any:
        return await self._place.in_thread(function, *args)

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
        remembered = self._gate.remember_local()
        protected = self._gate.newly_protected()
        if not due and not protected:
            return
        try:
            await self._enqueue(ExpireChange(due, protected))
        except BrokerError as exc:
            # Not lifted: due again at the next tick (the state file may be full for a while),
            # and the newly protected addresses are looked for again then.
            self._gate.restore_local(remembered)
            for ip in due:
                if (record := self._active.get(ip)) is not None:
                    heapq.heappush(self._expiry, (record.expires_at, ip))
            if exc.code != STATE_UNWRITABLE:  # that one is logged once, by the writer
                raise

    async def _expiry_loop(self) -> None:
        while True:
            try:
                await self.check_clock()
                await self.expire_due()
                self._change_log.report_held_back()  # a flood's last second, once it is over
            except Exception:
                log.exception("expiry failed; retrying")
            await asyncio.sleep(EXPIRY_TICK)

    # Upkeep -----------------------------------------------------------------------

    async def check_clock(self) -> float | None:
        """See Upkeep.check_clock (the expiry loop calls it every tick; tests call it)."""
        return await self._upkeep.check_clock()

    async def prune_hits(self) -> int:
        """See Upkeep.prune_hits (its loop calls it every PRUNE_INTERVAL; tests call it)."""
        return await self._upkeep.prune_hits()

    async def check_drift(self) -> Drift:
        """See Upkeep.check_drift (its loop calls it every firewall.drift_interval)."""
        return await self._upkeep.check_drift()

    # The writer -------------------------------------------------------------------

    async def _write_loop(self) -> None:
        queue = self._queue
        if queue is None:
            raise RuntimeError("the broker has not been started")
        size = 0
        while True:
            batch = await queue.batch(MAX_BATCH, size)
            size = len(batch)
            changes = [queued.change for queued in batch]
            async with self._turn:  # the drift check waits until this batch is published
                try:
                    result = await self._place.commit(self._committer.commit_isolated, changes)
                except Exception as exc:  # never lose the waiting clients: tell them
                    log.exception("writer failed")
                    result = BatchResult([Outcome(error=internal_error(exc)) for _ in batch])
                self.metrics.batch(len(batch))
                self.metrics.expired(result.expired)
                self._publish(result)
                if self._fleet is not None:
                    self._fleet.publisher.wake()
            self._change_log.write(result.log_lines)
            # Settle every reservation before any readmission, so none counts twice.
            for queued, outcome in zip(batch, result.outcomes, strict=True):
                self._gate.settle(queued.change, outcome)
            for queued, outcome in zip(batch, result.outcomes, strict=True):
                if outcome.readmit and isinstance(queued.change, BlockChange):
                    self._readmit(queued, queued.change, queue)
                    continue
                future = queued.future
                if future.done():  # the client went away
                    continue
                if outcome.error is not None:
                    future.set_exception(outcome.error)
                else:
                    future.set_result(outcome.result or cast(Answer, {}))
            self.metrics.flush_requests()  # the fast lane's replies just written (LaneReply)

    def _readmit(self, queued: Queued, change: BlockChange, queue: ChangeQueue) -> None:
        """A hit whose block was lifted before the writer got to it: a new block, if the quota
        allows; so no request makes a block without passing the quota."""
        try:
            self._gate.reserve_block(change)
        except BrokerError as exc:
            if not queued.future.done():
                queued.future.set_exception(exc)
            return
        queue.put_nowait(queued)

    def _publish(self, result: BatchResult) -> None:
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

    def _warn_if_too_many_rules(self) -> None:
        limit = self._config.firewall.per_address_warning
        if self._backend.name == "iptables" and not self._warned_size and len(self._active) > limit:
            self._warned_size = True
            log.warning(
                "%d active blocks with per-address iptables rules: every packet walks them all;"
                ' use backend = "nftables" or "ipset" (hash sets) at this scale',
                len(self._active),
            )


def _prefix_settings(config: Config) -> tuple[Ladder, list[Level], int]:
    """The prefix ladder, the escalation levels and the IPv6 offence unit (issue #16)."""
    policy = config.policy
    steps = tuple(config.escalation.ladder)
    ladder = Ladder(steps, policy.repeat_window, policy.escalate_after)
    return ladder, config.escalation.to_levels(), policy.ipv6_offence_prefix
