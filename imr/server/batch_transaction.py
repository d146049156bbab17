"""One batch's changes applied inside its state transaction (the writer thread).

The BatchCommitter (transaction.py) opens the transaction and commits it; a
BatchTransaction *applies* each change of the batch: for a block request the policy
decides and the hit and block rows are collected, for an unblock, an expiry or a fleet
event the row is lifted, escalated or added; every change collects the kernel additions
and removals that the committer then hands the backend in one apply. New block rows and
hits are written together by flush(), one statement each. In fleet mode a local decision
also gets an outbox row, and a fleet event's stream position is stored with the batch.

Hot path (docs/performance.md "Speed round two"): the committer calls apply() once per
change, and _apply_block inlines what it reads.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any

from imr.backends.base import KernelBlock
from imr.core.addresses import Target
from imr.core.durations import format_duration
from imr.core.fleet import may_lift, merged
from imr.core.policy import Action, Decision, decide
from imr.fleet.events import Event, outbox_body
from imr.protocol import timestamp
from imr.server.block_answer import BlockAnswer
from imr.server.changes import (
    AnyChange,
    BlockChange,
    BrokerError,
    ExpireChange,
    Outcome,
    RemoteBatch,
    RemoteChange,
    UnblockChange,
    stored_address,
    stored_target,
)
from imr.server.replies import compact_block_item
from imr.store import BlockRecord, Offences
from imr.wire_codes import WireCode

if TYPE_CHECKING:
    from imr.server.transaction import BatchCommitter

log = logging.getLogger("imr.broker")

_VALUES = {action: action.value for action in Action}


class BatchTransaction:
    """The state and kernel changes of one batch, built inside its transaction."""

    def __init__(
        self, committer: BatchCommitter, now: float, earlier: dict[str, BlockRecord | None]
    ) -> None:
        self.committer = committer
        self.store = committer.store
        self.ladder = committer.ladder
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
        self.positions: dict[str, tuple[str, int]] = {}  # fleet: stream -> (position, seq)

    def prefetch(self, batch: Sequence[AnyChange]) -> None:
        current = self.committer.current
        new = [
            change.ip
            for change in batch
            if isinstance(change, BlockChange) and current(change.ip, self.changed) is None
        ]
        for change in batch:
            if isinstance(change, RemoteBatch):  # thousands: spelled out
                events = [item.event for item in change.items]
                new += [
                    e.ip for e in events if e is not None and current(e.ip, self.changed) is None
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
        for stream, (position, seq) in self.positions.items():  # the last of each stream
            self.store.set_position(stream, position, seq)
        self.positions.clear()

    def _insert_pending(self) -> None:
        if self.new_blocks:
            self.store.insert_blocks(self.new_blocks)
            self.new_blocks.clear()

    def _lift(self, record: BlockRecord, reason: str, by: str) -> None:
        self._insert_pending()
        self.store.lift(record.id, self.now, reason, by)
        self.offences.pop(record.ip, None)

    lift_record = _lift  # for PrefixBlocks (a superseded network block)

    def announce(self, kind: str, record: BlockRecord) -> None:
        """For PrefixBlocks: an escalation is published like a local block (fleet mode)."""
        if self.committer.fleet_name is not None:
            self._announce(kind, record)

    def new_record(
        self,
        ip: str,
        decision: Decision,
        offence: int,
        reason: str,
        source: str,
        uid: int | None = None,
        pid: int | None = None,
    ) -> BlockRecord:
        """A new block row, written with the batch's others (uid None: the daemon's own)."""
        if self.next_id is None:
            self.next_id = self.store.next_block_id()
        record = BlockRecord(
            self.next_id,
            ip,
            self.now,
            decision.expires_at,
            decision.rung,
            offence,
            reason,
            source,
            uid,
            pid,
        )
        self.next_id += 1
        self.new_blocks.append(record)
        return record

    def current(self, ip: str) -> BlockRecord | None:
        return self.committer.current(ip, self.changed)

    def previous_of(self, ip: str) -> tuple[int, BlockRecord | None]:
        """How many blocks `ip` had, and the last that counts for the ladder."""
        found = self._offences(ip)
        return found.count, found.last

    def _kernel_entry(
        self, address: Target, expires_at: float, ip: str, fresh: bool = False
    ) -> None:
        """An address's kernel entry, unless a network block holds it out (issue #16).
        `fresh`: never blocked here (KernelBlock.fresh: the backend need not take it out)."""
        if self.committer.prefix.needs_entry(ip):
            self.kernel_add.append(KernelBlock(address, expires_at, ip, fresh))

    def _offences(self, ip: str) -> Offences:
        """The address's history: from the batch's query, or read afresh (with this batch's
        pending rows written first) if the batch has written for it since."""
        found = self.offences.pop(ip, None)
        if found is None:
            self._insert_pending()
            found = self.store.offences([ip])[ip]
        return found

    def apply(self, change: AnyChange) -> Outcome:
        match change:
            case BlockChange():
                return self._apply_block(change)
            case UnblockChange():
                return self._apply_unblock(change)
            case ExpireChange():
                return self._apply_expiry(change)
            case RemoteBatch():
                return self._apply_remote_batch(change)

    def _apply_block(self, change: BlockChange) -> Outcome:
        peer, ip, changed = change.peer, change.ip, self.changed
        # BatchCommitter.current, inlined (every block request; bench/lane_inproc.py)
        current = changed[ip] if ip in changed else self.committer.active.get(ip)
        if current is not None and current.expires_at <= self.now:
            # Due but not yet lifted by the expiry loop: lift it now, then decide afresh.
            self._lift(current, "expired", "imr")
            current = replace(current, lifted_at=self.now, lift_reason="expired")
            self.changed[ip] = None
            self.committer.prefix.lifted(self, ip, change.address, by_admin=False)
            self.expired += 1
        previous: BlockRecord | None
        offences: Offences | None = None
        if current is not None and current.lifted_at is None:
            previous = current
        else:
            offences = self._offences(ip)
            previous = offences.last
        prior = previous.as_previous() if previous else None
        if offences is not None:  # a new block: its IPv6 /64 may have offended (issue #16)
            prior = self.committer.prefix.previous(change.address, prior, self.now)
        decision = decide(self.ladder, prior, self.now, change.severity)
        if change.duration is not None:
            decision = _chosen_duration(decision, change.duration, self.now)
        reason, source = change.reason, change.source
        if decision.action is Action.BLOCK and not change.may_create:
            return Outcome(readmit=True)  # admitted as a hit; a new block must pass the quota
        if decision.action is Action.BLOCK:  # so previous was no active block: offences read
            offence = (offences or self._offences(ip)).count + 1
            record = self.new_record(ip, decision, offence, reason, source, peer.uid, peer.pid)
            self.changed[ip] = record  # before the escalation, which may hold it out
            self.committer.prefix.blocked(self, change.address, record)
            # Offence 1: no row of it ever, so no kernel entry of imr's either (as a fleet
            # catch-up's, _remote_block): nftables only adds it, without a delete first.
            self._kernel_entry(change.address, record.expires_at, ip, offence == 1)
        elif current is None:  # the policy only escalates or records an active block
            raise RuntimeError(f"policy said {decision.action} for {ip} without an active block")
        else:
            record = current
            if decision.action is Action.ESCALATE:
                self._insert_pending()
                self.store.escalate(record.id, decision.rung, decision.expires_at)
                record = replace(record, rung=decision.rung, expires_at=decision.expires_at)
                # Re-adding updates kernel timeouts (set backends); never duplicates.
                self._kernel_entry(change.address, record.expires_at, ip)
            elif self.committer.rearm:
                # Re-armed in the batch's own kernel transaction: if the kernel lifted the
                # block early (its timeout ran on a clock that stepped, or someone deleted
                # the entry), the report that shows the attacker is back puts it in again.
                self._kernel_entry(change.address, record.expires_at, ip)
        action = _VALUES[decision.action]  # a dict read: the enum's `value` is a property
        self.hits.append((ip, self.now, action, reason, source, peer.uid, peer.pid, record.id))
        if decision.action is not Action.RECORD:
            self.changed[ip] = record
            if self.committer.fleet_name is not None:
                self._announce(action, record)
        self.log_lines.append(functools.partial(_change_line, decision, record, change))
        if change.compact:
            return Outcome(compact_block_item(ip, record, decision))
        return Outcome(BlockAnswer(record, decision, self.now))  # the dict only if asked

    def _apply_unblock(self, change: UnblockChange) -> Outcome:
        ip = str(change.address)
        current = self.committer.current(ip, self.changed)
        if current is None:
            return Outcome(error=BrokerError(WireCode.NOT_BLOCKED, f"{ip} is not blocked"))
        self._lift(current, "unblocked", change.peer.describe())
        self.changed[ip] = None
        self.kernel_remove.append(change.address)
        self.committer.prefix.lifted(self, ip, change.address, by_admin=True)
        if self.committer.fleet_name is not None:
            self._announce("lift", current)
        by, reason = change.peer.describe(), change.request.reason
        self.log_lines.append(lambda: f"unblocked {ip} by {by} reason={reason!r}")
        return Outcome({"kind": "unblock", "ip": ip})

    def _announce(self, kind: str, record: BlockRecord) -> None:
        """An outbox row for a local decision (fleet mode; docs/fleet.md)."""
        expires_at = 0.0 if kind == "lift" else record.expires_at
        self.outbox.append(
            outbox_body(
                self.committer.fleet_name or "",
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

    def _apply_remote_batch(self, change: RemoteBatch) -> Outcome:
        """Fleet events (whole stream entries, thousands in a catch-up): one outcome that
        names the ones refused here. If the batch fails, see _split_remote."""
        refused: list[tuple[int, str, str]] = []
        for index, item in enumerate(change.items):
            error = self._apply_remote(item)
            if error is not None:
                refused.append((index, error.code, error.message))
        return Outcome({"kind": "remote", "refused": refused})

    def _apply_remote(self, change: RemoteChange) -> BrokerError | None:
        """A fleet event: a lift its origin may make, a block merged into one in force here
        (imr/core/fleet.py), or a new block with its origin (history only if it is over
        already: it still counts for the ladder). Never announced again."""
        self.positions[change.stream] = (change.position, change.seq)  # written by flush()
        event = change.event
        if event is None:
            return None  # refused on the loop: only its position
        # The text passed the checks on the loop; stored_target parses it cheaply.
        ip, target = event.ip, stored_target(event.ip)[0]
        current = self.committer.current(ip, self.changed)
        if current is not None and current.expires_at <= self.now:
            self._lift(current, "expired", "imr")
            self.changed[ip], current = None, None
            self.committer.prefix.lifted(self, ip, target, by_admin=False)
            self.expired += 1
        if event.kind == "lift":
            if current is None:
                return None
            if not may_lift(event.origin, current.origin, change.admin):
                maker = current.origin or "this host"
                why = f"{event.origin} may not lift the block of {ip} made by {maker}"
                return BrokerError(WireCode.LIFT_NOT_ALLOWED, why)
            self._lift(current, "unblocked", f"fleet:{event.origin}")
            self.changed[ip] = None
            self.kernel_remove.append(target)
            # A network's held-out addresses go back in; an unblock is a pardon everywhere.
            self.committer.prefix.lifted(self, ip, target, by_admin=True)
            self.log_lines.append(lambda: f"unblocked {ip} by fleet member {event.origin}")
            return None
        if current is not None:
            now = current.rung, current.expires_at
            rung, expires_at = merged(now, event.rung, event.expires_at)
            if (rung, expires_at) != now:
                self._insert_pending()
                self.store.escalate(current.id, rung, expires_at)
                self.changed[ip] = replace(current, rung=rung, expires_at=expires_at)
                self._kernel_entry(target, expires_at, ip)  # not if a network holds it out
            return None
        self._remote_block(event, target)
        return None

    def _remote_block(self, event: Event, target: Target) -> None:
        if self.next_id is None:
            self.next_id = self.store.next_block_id()
        ip, offence = event.ip, self._offences(event.ip).count + 1
        over = event.expires_at <= self.now  # over already: only the ladder needs it
        record = BlockRecord(
            self.next_id,
            ip,
            event.at,
            event.expires_at,
            event.rung,
            offence,
            event.reason,
            event.source,
            None,
            None,
            event.expires_at if over else None,
            "expired" if over else None,
            "imr" if over else None,
            event.origin,
        )
        self.next_id += 1
        prefix = self.committer.prefix
        if (
            not over
            and isinstance(target, IPv4Network | IPv6Network)
            and not prefix.remote_network(self, target, ip)
        ):  # a wider network here covers it: it counts for the ladder, nothing more
            self.new_blocks.append(
                replace(record, lifted_at=self.now, lift_reason="covered", lifted_by="imr")
            )
            return
        self.new_blocks.append(record)
        if over:
            return
        self.changed[ip] = record
        # Counted fleet-wide for escalation (at the origin's time), held out under a network.
        prefix.blocked(self, target, record, at=event.at)
        if prefix.needs_entry(ip):
            # Offence 1: no row of it before, so no kernel entry either (a catch-up's usual
            # case): the kernel change is a plain add.
            self.kernel_add.append(KernelBlock(target, record.expires_at, ip, offence == 1))
        self.log_lines.append(functools.partial(_remote_line, record))

    def _apply_expiry(self, change: ExpireChange) -> Outcome:
        lifted = []
        for ip in change.due:
            current = self.committer.current(ip, self.changed)
            if current is None or current.expires_at > self.now:
                continue  # escalated or unblocked since it was found due
            self._lift(current, "expired", "imr")
            self.changed[ip] = None
            target = stored_address(ip)
            self.kernel_remove.append(target)
            self.committer.prefix.lifted(self, ip, target, by_admin=False)
            lifted.append(ip)
            self.expired += 1
            self.log_lines.append(functools.partial(_expiry_line, current))
        for ip, why in change.protected.items():
            current = self.committer.current(ip, self.changed)
            if current is None:
                continue
            self._lift(current, "protected", "imr")
            self.changed[ip] = None
            target = stored_address(ip)
            self.kernel_remove.append(target)
            self.committer.prefix.lifted(self, ip, target, by_admin=False)
            lifted.append(ip)
            log.warning("lifted %s: %s", ip, why)  # rare and important: outside the budget
        return Outcome({"kind": "expire", "lifted": lifted})


def _remote_line(record: BlockRecord) -> str:
    """Formatted only if logged: a catch-up of 100,000 events logs few of them."""
    until = timestamp(record.expires_at)
    return f"blocked {record.ip} until {until} rung={record.rung} by fleet member {record.origin}"


def _expiry_line(record: BlockRecord) -> str:
    return f"expired {record.ip} (blocked {timestamp(record.blocked_at)}, rung {record.rung})"


def _chosen_duration(decision: Decision, duration: float, now: float) -> Decision:
    """An admin's duration: the block (new, or the active one) ends `duration` from now."""
    why = f"{decision.why}; admin chose {format_duration(duration)}".lstrip("; ")
    action = Action.ESCALATE if decision.action is Action.RECORD else decision.action
    return replace(decision, action=action, expires_at=now + duration, why=why)


def _change_line(decision: Decision, record: BlockRecord, change: BlockChange) -> str:
    """The log line of a block request's outcome (the request's own reason and source)."""
    return (
        f"{decision.action.logged} {record.ip} until {timestamp(record.expires_at)}"
        f" rung={record.rung} offence={record.offence} ({decision.why})"
        f" by {change.peer.describe()} source={change.source or '-'} reason={change.reason!r}"
    )
