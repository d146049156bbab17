"""Test doubles for the broker's collaborators: a clock we move, a backend we can break."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from imr.backends.base import (
    SLOTS,
    Backend,
    BackendError,
    Drift,
    Expected,
    KernelBlock,
    Slot,
    count_problems,
    slot_of,
)
from imr.config import Role
from imr.core.addresses import Target
from imr.server.access import Peer

ROOT = Peer(uid=0, gid=0, pid=1, user="root", roles=frozenset({Role.ADMIN}))
WEB = Peer(uid=33, gid=33, pid=4242, user="www-data", roles=frozenset({Role.BLOCK}))
READER = Peer(uid=1000, gid=1000, pid=7, user="alice", roles=frozenset({Role.READ}))
NOBODY = Peer(uid=65534, gid=65534, pid=8, user="nobody", roles=frozenset())


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds


class FixedAddresses:
    def __init__(self, *own: str, broadcast: Sequence[str] = ()) -> None:
        self.own = frozenset(ipaddress.ip_address(a) for a in own)
        self.broadcast = frozenset(ipaddress.ip_address(a) for a in broadcast)


class RecordingBackend(Backend):
    """Keeps the 'kernel' in a dict and counts transactions; can refuse chosen addresses."""

    name = "recording"

    def __init__(self) -> None:
        self.kernel: dict[Target, float] = {}
        self.applies: list[tuple[list[KernelBlock], list[Target]]] = []
        self.refuse: set[Target] = set()
        self.prepared = 0
        self.unhooked = False  # drift tests: "someone removed the jump from INPUT"
        self.checks = 0

    def describe(self) -> str:
        return "recording (test double)"

    def prepare(self) -> None:
        self.prepared += 1
        self.unhooked = False

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        for block in add:
            if block.address in self.refuse:
                raise BackendError(f"refused {block.address}")
        self.applies.append((list(add), list(remove)))
        for address in remove:
            self.kernel.pop(address, None)
        for block in add:
            self.kernel[block.address] = block.expires_at

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        self.kernel = {b.address: b.expires_at for b in blocks}

    def installed(self) -> set[Target]:
        return set(self.kernel)

    def check(self, expected: Mapping[Slot, Expected]) -> Drift:
        self.checks += 1
        counts = dict.fromkeys(SLOTS, 0)
        for target in self.kernel:
            counts[slot_of(target)] += 1
        where = {slot: f"recording {slot}" for slot in SLOTS}
        structure = ("the jump is missing",) if self.unhooked else ()
        return Drift(structure, count_problems(counts, expected, where))

    def teardown(self) -> None:
        self.kernel.clear()
