"""A backend that changes nothing: it keeps the blocked set in memory and logs each change.

For trying imr out, for demos without root, and for tests of everything above
the backend. It honours the same contract as the real backends (no duplicates,
removing an absent address is fine), so callers behave the same against it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from imr.backends.base import (
    SLOTS,
    Backend,
    Drift,
    Expected,
    KernelBlock,
    Slot,
    count_problems,
    slot_of,
)
from imr.config import FirewallConfig
from imr.core.addresses import Target

log = logging.getLogger("imr.backend")


class DryRunBackend(Backend):
    name = "dryrun"

    def __init__(self, config: FirewallConfig | None = None) -> None:
        self.chain = config.chain if config is not None else "IMR"
        self._blocked: set[Target] = set()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return "dryrun (changes nothing in the kernel; logs what it would do)"

    def prepare(self) -> None:
        log.info("dryrun: would create chain %s and jump to it from INPUT", self.chain)

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        # Same rule as the real backends: an address in both lists ends up blocked.
        adding = {block.address: block for block in add}
        with self._lock:
            for address in dict.fromkeys(remove):
                if address in self._blocked and address not in adding:
                    self._blocked.discard(address)
                    log.info("dryrun: would unblock %s", address)
            for address, block in adding.items():
                if address not in self._blocked:
                    self._blocked.add(address)
                    log.info("dryrun: would block %s until %s", address, _when(block.expires_at))

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        with self._lock:
            self._blocked = {block.address for block in blocks}
            log.info("dryrun: would replace all blocks with %d addresses", len(self._blocked))

    def installed(self) -> set[Target]:
        with self._lock:
            return set(self._blocked)

    def check(self, expected: Mapping[Slot, Expected]) -> Drift:
        counts = dict.fromkeys(SLOTS, 0)
        with self._lock:
            for target in self._blocked:
                counts[slot_of(target)] += 1
        where = {slot: f"dryrun {slot} entries" for slot in SLOTS}
        return Drift(entries=count_problems(counts, expected, where))

    def teardown(self) -> None:
        with self._lock:
            self._blocked.clear()
            log.info("dryrun: would remove chain %s and its jump from INPUT", self.chain)


def _when(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
