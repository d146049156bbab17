"""The writer thread's side: one batch of changes in one state transaction and one kernel apply.

A *batch* is whatever the broker's queue held when the writer got to it (at most
MAX_BATCH changes). The BatchCommitter *commits* it: a BatchTransaction
(batch_transaction.py) *applies* each change inside one state transaction (the policy
decides, rows are written, kernel additions and removals are collected), then the backend
applies the kernel change, then the transaction commits (fsync). If that fails the batch
is split in halves and each is tried again, so one bad change fails only its own client.
The committer also re-arms every kernel entry after a clock step and runs the drift
check-and-repair, both in the writer thread so they never run beside a batch.

Only the writer thread runs this code; it reads the broker's index of active blocks,
which the event loop changes only between batches (see broker.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import cast

from imr.backends.base import Backend, Drift, KernelBlock, expected_counts, slot_of_text
from imr.core.addresses import Target
from imr.core.clock import Clock
from imr.core.policy import Ladder
from imr.server.batch_transaction import BatchTransaction
from imr.server.changes import (
    AnyChange,
    BatchResult,
    BrokerError,
    Outcome,
    RemoteBatch,
    RemoteBatchResult,
    StateUnwritable,
    internal_error,
    stored_target,
)
from imr.server.metrics import Metrics
from imr.server.prefix_blocks import PrefixBlocks
from imr.server.state_health import MESSAGE as UNWRITABLE_MESSAGE
from imr.server.state_health import STATE_UNWRITABLE, StateHealth
from imr.store import BlockRecord, Store, unwritable

log = logging.getLogger("imr.broker")


class BatchCommitter:
    """Commits batches in the writer thread; the broker publishes what they changed."""

    def __init__(
        self,
        store: Store,
        backend: Backend,
        clock: Clock,
        health: StateHealth,
        active: Mapping[str, BlockRecord],
        ladder: Ladder,
        rearm: bool,
    ) -> None:
        self.store = store
        self.backend = backend
        self.clock = clock
        self.health = health
        self.active = active  # the broker's index, read only
        self.ladder = ladder  # a reload replaces it
        # Re-arm a block's kernel entry on every report of it (see _apply_block).
        self.rearm = rearm
        # Per-prefix offences and escalation (issue #16); the broker sets its own. This one,
        # without levels, only holds addresses under an admin's network out of the kernel.
        self.prefix = PrefixBlocks(ladder, [], 128, lambda: lambda network: None)
        self.fleet_name: str | None = None  # fleet mode: local decisions get outbox rows
        self._next_id: int | None = None  # see _commit

    def commit_isolated(
        self, batch: list[AnyChange], earlier: dict[str, BlockRecord | None] | None = None
    ) -> BatchResult:
        """Commit the batch at once; if that fails, split it in halves and retry each.

        So one bad change (a kernel refusal, say) fails only its own client,
        nobody hears "ok" for a change that was rolled back, and the good
        changes still go in a few transactions. `earlier` holds what earlier
        parts of the same batch committed, which the event loop has not
        published yet.
        """
        if self.health.holding_off():
            return self._state_unwritable(len(batch), None)
        try:
            return self._commit(batch, earlier or {})
        except StateUnwritable as exc:
            return self._state_unwritable(len(batch), exc)
        except Exception as exc:
            if len(batch) == 1 and isinstance(batch[0], RemoteBatch) and len(batch[0].items) > 1:
                return self._split_remote(batch[0], earlier or {}, exc)
            if len(batch) == 1:
                log.error("change failed: %s", exc)
                return BatchResult([Outcome(error=internal_error(exc))])
            log.warning("batch of %d failed (%s); splitting it", len(batch), exc)
        merged = BatchResult([], dict(earlier or {}))
        middle = len(batch) // 2
        for part in (batch[:middle], batch[middle:]):
            result = self.commit_isolated(part, merged.changed)
            merged.outcomes.extend(result.outcomes)
            merged.changed.update(result.changed)
            merged.expired += result.expired
            merged.log_lines += result.log_lines
        return merged

    def _split_remote(
        self, change: RemoteBatch, earlier: dict[str, BlockRecord | None], exc: Exception
    ) -> BatchResult:
        """A batch of fleet events that failed: its halves, each committed on its own, so one
        bad event fails alone. Here, not by the member: the parts commit in order, before
        anything queued after them, so the stored positions never move back."""
        log.warning("%d fleet events failed (%s); splitting them", len(change.items), exc)
        merged = BatchResult([], dict(earlier))
        refused: list[tuple[int, str, str]] = []
        middle = len(change.items) // 2
        for offset, part in ((0, change.items[:middle]), (middle, change.items[middle:])):
            result = self.commit_isolated([RemoteBatch(part)], merged.changed)
            outcome = result.outcomes[0]
            if outcome.error is not None:  # one event, or the state file (then every one)
                error = outcome.error
                refused += [(offset + i, error.code, error.message) for i in range(len(part))]
            else:  # a RemoteBatch's outcome
                found = cast(RemoteBatchResult, outcome.result)["refused"]
                refused += [(offset + i, code, why) for i, code, why in found]
            merged.changed.update(result.changed)
            merged.expired += result.expired
            merged.log_lines += result.log_lines
        merged.outcomes.append(Outcome({"kind": "remote", "refused": refused}))
        return merged

    def _commit(
        self, batch: list[AnyChange], earlier: dict[str, BlockRecord | None]
    ) -> BatchResult:
        """The batch's state rows, then its kernel change, then the commit (fsync): so a
        client hears "ok" only for a change that is in both. If the commit fails after
        the kernel change (a full disk shows up at the commit), the change is taken out
        of the kernel again before anyone hears of the failure."""
        transaction = BatchTransaction(self, self.clock.now(), earlier)
        # The next block id, as the last batch left it: one query (MAX(id)) less a batch.
        # Only this writer adds blocks while the broker runs; any failure forgets it.
        transaction.next_id = self._next_id
        applied = False
        prefix_changes = self.prefix.changes
        try:
            with self.store.transaction():
                transaction.prefetch(batch)
                outcomes = [transaction.apply(change) for change in batch]
                transaction.flush()
                self.backend.apply(transaction.kernel_add, transaction.kernel_remove)
                applied = True
        except Exception as exc:
            self._next_id = None
            self.prefix.committed(False)
            if self.prefix.changes != prefix_changes:  # the batch's holds are undone too
                live = {**self.active, **earlier}
                self.prefix.rebuild(kernel_block(r) for r in live.values() if r)
            if applied:
                self._undo_kernel(transaction, earlier)
            if unwritable(exc):
                raise StateUnwritable(exc) from exc
            raise
        self._next_id = transaction.next_id
        self.health.succeeded()
        self.prefix.committed(True)
        return BatchResult(
            outcomes, transaction.changed, transaction.expired, transaction.log_lines
        )

    def _undo_kernel(
        self, transaction: BatchTransaction, earlier: dict[str, BlockRecord | None]
    ) -> None:
        """Put every target the failed batch touched back as it was before the batch."""
        now = transaction.now
        targets = {b.text: b.address for b in transaction.kernel_add}
        targets.update((str(t), t) for t in transaction.kernel_remove)
        restore: list[KernelBlock] = []
        remove: list[Target] = []
        for ip, target in targets.items():
            before = self.current(ip, earlier)
            if before is not None and before.expires_at > now:
                restore.append(KernelBlock(target, before.expires_at, ip))
            else:
                remove.append(target)
        try:
            self.backend.apply(restore, remove)
        except Exception as exc:  # the index still says what the kernel must hold
            log.error("could not take a failed batch out of the kernel (%s); rebuilding it", exc)
            live = {**self.active, **earlier}
            try:
                self.backend.replace_all(
                    self.prefix.kernel_blocks(
                        kernel_block(r) for r in live.values() if r and r.expires_at > now
                    )
                )
            except Exception:
                log.exception("could not rebuild the kernel; the drift check tries again")

    def _state_unwritable(self, count: int, exc: StateUnwritable | None) -> BatchResult:
        """Refuse a whole batch: the state file takes no writes (no split: every part would
        fail the same way)."""
        if exc is not None:
            self.health.failed(exc.cause)
        self.health.refused(count)
        error = BrokerError(STATE_UNWRITABLE, UNWRITABLE_MESSAGE)
        return BatchResult([Outcome(error=error) for _ in range(count)])

    def current(self, ip: str, changed: dict[str, BlockRecord | None]) -> BlockRecord | None:
        if ip in changed:
            return changed[ip]
        return self.active.get(ip)

    def rearm_all(self) -> None:
        """Write every active block's kernel entry again, with its remaining time now."""
        now = self.clock.now()
        live = [kernel_block(r) for r in self.active.values() if r.expires_at > now]
        self.backend.replace_all(self.prefix.kernel_blocks(live))

    def check_and_repair(self, metrics: Metrics) -> Drift:
        """Check imr's kernel objects against the index and repair them. In the writer thread,
        so it never runs beside a batch's kernel change."""
        now = self.clock.now()
        # Not changed while the turn is held; without the addresses a network holds out.
        records = [r for r in self.active.values() if self.prefix.needs_entry(r.ip)]
        expected = expected_counts(((slot_of_text(r.ip), r.expires_at) for r in records), now)
        drift = self.backend.check(expected)
        if not drift.found:
            return drift
        log.warning("drift in %s: %s; repairing", self.backend.name, drift.describe())
        done = []
        if drift.structure:
            self.backend.prepare()  # imr's chains/sets/rules and the jump; entries are kept
            metrics.drift_repaired("structure")
            done.append("re-created imr's kernel objects")
        if drift.entries:
            live = [kernel_block(r) for r in records if r.expires_at > now]
            self.backend.replace_all(live)
            metrics.drift_repaired("entries")
            done.append(f"restored {len(live)} blocks from the state")
        after = self.backend.check(expected)
        if after.found:
            log.error("drift remains after the repair: %s", after.describe())
        else:
            log.warning("drift repaired: %s", "; ".join(done))
        return drift


def kernel_block(record: BlockRecord) -> KernelBlock:
    """The kernel entry of an active block, from its state row."""
    address, text = stored_target(record.ip)
    return KernelBlock(address, record.expires_at, text)
