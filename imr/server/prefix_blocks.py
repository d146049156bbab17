"""The broker's side of per-prefix offences and network escalation (issue #16, docs/policy.md).

The decision is imr.core.prefixes'; this module applies it inside a writer batch:
- an escalation becomes a network block row (source `imr:escalation`, the triggering
  members in its reason) on the prefix ladder, and its kernel interval entry;
- an address block *under* a network block has no kernel entry of its own while the
  network covers it: the members that triggered the escalation are taken out of the
  kernel, and later blocks under it never go in. Each network remembers the addresses it
  holds out (`under`); when it ends (expiry or unblock), the still-valid ones go back in;
- the offence unit: a new IPv6 address of a /64 that offended is a repeat for the ladder.

Only the writer thread uses a PrefixBlocks (reconcile runs before it starts), like the
Store; a batch that fails rebuilds its bookkeeping from the published index.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from imr.backends.base import KernelBlock
from imr.core.addresses import IPAddress, IPNetwork, Target
from imr.core.fleet import network_plan
from imr.core.policy import Action, Decision, Ladder, PreviousBlock, decide
from imr.core.prefixes import (
    Coverage,
    Escalation,
    Guard,
    Level,
    PrefixIndex,
    UnitMemory,
    make_guard,
    offence_unit,
    unit_previous,
)
from imr.protocol import timestamp
from imr.store import BlockRecord

log = logging.getLogger("imr.broker")

SOURCE = "imr:escalation"  # the source tag of a network block the daemon made
# isinstance with a tuple: `IPv4Network | IPv6Network` builds a union at every call (hot path).
_NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)
MAX_NAMED = 8  # members named in a block's reason (the hits of each are in `imr show`)


class BatchWork(Protocol):
    """What PrefixBlocks needs of a batch (batch_transaction.BatchTransaction)."""

    now: float
    changed: dict[str, BlockRecord | None]
    kernel_add: list[KernelBlock]
    kernel_remove: list[Target]
    log_lines: list[Callable[[], str]]

    def current(self, ip: str) -> BlockRecord | None: ...

    def previous_of(self, ip: str) -> tuple[int, BlockRecord | None]: ...

    def new_record(
        self, ip: str, decision: Decision, offence: int, reason: str, source: str
    ) -> BlockRecord: ...

    def lift_record(self, record: BlockRecord, reason: str, by: str) -> None: ...

    def announce(self, kind: str, record: BlockRecord) -> None: ...


class PrefixBlocks:
    def __init__(
        self,
        ladder: Ladder,
        levels: Sequence[Level],
        ipv6_offence_prefix: int,
        guard: Callable[[], Guard],
    ) -> None:
        self.ladder = ladder  # the prefix ladder (escalation.ladder)
        self.index = PrefixIndex(levels)
        self.units = UnitMemory()
        self.unit_prefix = ipv6_offence_prefix
        self._guard = guard
        self.coverage = Coverage()
        self.under: dict[str, set[str]] = {}  # network -> addresses it holds out of the kernel
        self.held_out: dict[str, str] = {}  # address -> the network holding it out
        self.changes = 0  # counts changes of the above: a failed batch rebuilds them if any
        self._made: list[Escalation] = []  # this batch's escalations, forgotten once committed
        # The offence unit `previous` worked out last, by the address object it was for:
        # a new block's `blocked` needs it again (~0.25 µs a new block; "Per request, round
        # three" in docs/performance.md).
        self._unit_of: tuple[Target | None, int | None] = (None, None)

    @property
    def _window(self) -> float:
        return max((level.window for level in self.index.levels), default=0.0)

    def configure(self, ladder: Ladder, levels: Sequence[Level], ipv6_offence_prefix: int) -> None:
        """A reloaded configuration; the counts start again only if the levels changed."""
        self.ladder, self.unit_prefix = ladder, ipv6_offence_prefix
        if tuple(levels) != self.index.levels:
            self.index = PrefixIndex(levels)

    def restore(
        self, blocks: Sequence[KernelBlock], records: Sequence[BlockRecord], now: float
    ) -> None:
        """At start, from the active blocks (`records` in the order of `blocks`): the held-out
        addresses, the offence units, and the counts of blocks still inside a level's window."""
        self.rebuild(blocks)
        window = self._window
        for block, record in zip(blocks, records, strict=True):
            address = block.address
            if "/" in block.text:
                continue
            unit = offence_unit(address, self.unit_prefix)  # type: ignore[arg-type]
            if unit is not None:
                previous = record.as_previous()
                self.units.remember(unit, previous, now, self.ladder.repeat_window)
            # A held-out address's prefix is blocked already: counting it would change nothing.
            if now - record.blocked_at < window and block.text not in self.held_out:
                self.index.note(address, record.blocked_at)  # type: ignore[arg-type]

    # --- Kernel entries ---

    def needs_entry(self, ip: str) -> bool:
        return ip not in self.held_out

    def kernel_blocks(self, blocks: Iterable[KernelBlock]) -> list[KernelBlock]:
        """The blocks that need a kernel entry (every one while no address is held out)."""
        if not self.held_out:
            return list(blocks)
        return [b for b in blocks if b.text not in self.held_out]

    def rebuild(self, blocks: Iterable[KernelBlock]) -> None:
        """From every active block (at start, or after a failed batch): the networks, and
        the addresses under them, held out of the kernel."""
        self.coverage, self.under, self.held_out = Coverage(), {}, {}
        addresses: list[KernelBlock] = []
        for block in blocks:  # the text tells a network ("/"): cheaper than isinstance
            if "/" in block.text:
                self.coverage.add(block.address)  # type: ignore[arg-type]
            else:
                addresses.append(block)
        if not self.coverage:
            return
        covering, held_out, under = self.coverage.covering_text, self.held_out, self.under
        for block in addresses:  # 100,000 at start: inlined _hold_if_covered
            key = covering(block.address)  # type: ignore[arg-type]
            if key is not None:
                under.setdefault(key, set()).add(block.text)
                held_out[block.text] = key

    def _hold_if_covered(self, address: IPAddress, ip: str) -> bool:
        key = self.coverage.covering_text(address)
        if key is None:
            return False
        self.changes += 1
        self.under.setdefault(key, set()).add(ip)
        self.held_out[ip] = key
        return True

    # --- The offence unit ---

    def previous(
        self, address: Target, own: PreviousBlock | None, now: float
    ) -> PreviousBlock | None:
        """The block the ladder reads for a new block of `address` (unit_previous)."""
        if isinstance(address, _NETWORKS):
            return own
        unit = offence_unit(address, self.unit_prefix)
        self._unit_of = (address, unit)  # `blocked` of the same change reads it again
        return own if unit is None else unit_previous(own, self.units.get(unit), now)

    # --- Hooks of the batch ---

    def blocked(
        self, work: BatchWork, address: Target, record: BlockRecord, at: float | None = None
    ) -> None:
        """A new or escalated block of `address` was written: remember it, hold it out of the
        kernel if a network covers it, and escalate the prefixes it completes. `at`: when
        it was decided (a fleet member's block counts at its own time, not when it came)."""
        if isinstance(address, _NETWORKS):
            self.coverage.add(address)  # an admin's network: later blocks under it stay out
            self.changes += 1
            return
        last_address, unit = self._unit_of
        if last_address is not address:  # not the change `previous` saw: worked out afresh
            unit = offence_unit(address, self.unit_prefix)
        if unit is not None:
            self.units.remember(unit, record.as_previous(), work.now, self.ladder.repeat_window)
        self._hold_if_covered(address, record.ip)
        when = work.now if at is None else min(at, work.now)
        if not self.index.levels or work.now - when >= self._window:
            return  # a member catching up: its old blocks escalate nothing now (cf. restore)
        covered = functools.partial(self._covered, work)
        for escalation in self.index.observe(address, when, self._guard(), covered):
            self._escalate(work, escalation)

    def _covered(self, work: BatchWork, network: IPNetwork) -> bool:
        """A network block covers the whole prefix already, or an admin's narrower one inside
        it would overlap (nftables interval sets refuse overlaps). Escalated ones inside are
        taken into the wider block instead (_escalate)."""
        if self.coverage.wider(network, or_same=True) is not None:
            return True
        return any(not self._escalated(work, inner) for inner in self.coverage.inside(network))

    @staticmethod
    def _escalated(work: BatchWork, network: IPNetwork) -> bool:
        record = work.current(str(network))
        return record is not None and record.source == SOURCE

    def _escalate(self, work: BatchWork, escalation: Escalation) -> None:
        key = str(escalation.network)
        for inner in self.coverage.inside(escalation.network):  # all escalated (_covered)
            self._supersede(work, inner, escalation.network)
        count, last = work.previous_of(key)  # admin unblocks are pardons (Store.offences)
        decision = decide(self.ladder, last.as_previous() if last else None, work.now)
        if decision.action is not Action.BLOCK:  # a stale row the index missed: leave it
            return
        record = work.new_record(key, decision, count + 1, _reason(escalation), SOURCE)
        work.kernel_add.append(KernelBlock(escalation.network, record.expires_at, key))
        work.changed[key] = record
        self.changes += 1
        self.coverage.add(escalation.network)
        held = self.under.setdefault(key, set())
        for member in escalation.addresses:
            if (current := work.current(member)) is not None:
                held.add(current.ip)
                self.held_out[current.ip] = key
                work.kernel_remove.append(ipaddress.ip_address(member))
        if held:  # an add wins over a remove in one apply: drop this batch's adds of them
            work.kernel_add[:] = [b for b in work.kernel_add if b.text not in held]
        self._made.append(escalation)
        work.announce("block", record)  # fleet mode: every member gets the network block
        log.warning(
            "escalated %s to a network block until %s (rung %d, %s): %s",
            key,
            _when(record.expires_at),
            record.rung,
            decision.why,
            escalation.describe(),
            extra={"event": "prefix_escalated", "ip": key, "members": list(escalation.members)},
        )

    def remote_network(self, work: BatchWork, network: IPNetwork, ip: str) -> bool:
        """A fleet member's network block is about to be written here (docs/fleet.md, "One
        ladder"): False if a wider network here covers it already (then it is history
        only); else the narrower networks inside it end (`superseded`), and the addresses
        counted here for it leave the kernel while it covers them, as after a local
        escalation. Later blocks under it never go in (`blocked`)."""
        plan = network_plan(network, self.coverage)
        if plan.covered_by is not None:
            return False
        for inner in plan.supersedes:
            self._supersede(work, inner, network)
        held = self.under.setdefault(ip, set())
        for address in self.index.taken_over(network):
            member = str(address)
            if work.current(member) is not None and member not in self.held_out:
                held.add(member)
                self.held_out[member] = ip
                work.kernel_remove.append(address)
        if held:  # an add wins over a remove in one apply: drop this batch's adds of them
            work.kernel_add[:] = [b for b in work.kernel_add if b.text not in held]
        self.changes += 1
        return True

    def committed(self, done: bool) -> None:
        """The batch committed (`done`) or failed: its escalations start new counts, or
        are decided again when the batch is tried again."""
        if done:
            for escalation in self._made:
                self.index.forget(escalation)
        self._made.clear()

    def _supersede(self, work: BatchWork, inner: IPNetwork, wider: IPNetwork) -> None:
        """An escalated network inside a wider escalation ends: the wider block holds its
        addresses out of the kernel from now on."""
        key, record = str(inner), work.current(str(inner))
        if record is not None:
            work.lift_record(record, "superseded", "imr")
            work.changed[key] = None
        work.kernel_remove.append(inner)
        self.coverage.remove(inner)
        moved = self.under.pop(key, set())
        self.under.setdefault(str(wider), set()).update(moved)
        for member in moved:
            self.held_out[member] = str(wider)
        self.changes += 1

    def lifted(self, work: BatchWork, ip: str, target: Target, by_admin: bool) -> None:
        """A block was lifted: a network's held-out addresses go back into the kernel; an
        admin's unblock of a network pardons it (its count starts again)."""
        if not isinstance(target, ipaddress.IPv4Network | ipaddress.IPv6Network):
            network = self.held_out.pop(ip, None)
            if network is not None:
                self.changes += 1
                self.under.get(network, set()).discard(ip)
            return
        self.changes += 1
        self.coverage.remove(target)
        if by_admin:
            self.index.pardon(target)
        for member in sorted(self.under.pop(ip, set())):
            self.held_out.pop(member, None)
            current = work.current(member)
            if current is None or current.expires_at <= work.now:
                continue
            address = ipaddress.ip_address(member)
            if not self._hold_if_covered(address, member):
                work.kernel_add.append(KernelBlock(address, current.expires_at, member))


def guard_of(
    min_prefix: Callable[[], Mapping[int, int]],
    own: Callable[[], frozenset[IPAddress]],
    broadcast: Callable[[], frozenset[IPAddress]],
    allowlist: Callable[[], Sequence[IPNetwork]],
    never: Callable[[], Sequence[IPNetwork]],
) -> Callable[[], Guard]:
    """The guard as of now (the host's addresses and the config change while running)."""
    return lambda: make_guard(min_prefix(), own(), broadcast(), allowlist(), never())


def _reason(escalation: Escalation) -> str:
    text = escalation.describe()
    if len(escalation.members) > MAX_NAMED:
        named = ", ".join(escalation.members[:MAX_NAMED])
        text = text.split(": ", 1)[0] + f": {named} and {len(escalation.members) - MAX_NAMED} more"
    return text


def _when(at: float) -> str:
    return timestamp(at) or "-"
