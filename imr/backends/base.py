"""The one small interface every firewall backend implements.

Like the backends of CrowdSec's firewall bouncer, a backend knows nothing of
policy, clients or the state file: the broker tells it which addresses must be
blocked, and it makes the kernel agree. Everything a backend creates lives in
objects it owns (a chain, a table, a set); it never touches anything else.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from imr.core.addresses import Target


class BackendError(Exception):
    """The kernel or the firewall tool refused a change; the message says what and why."""


@dataclass(frozen=True, slots=True)  # slots: start-up makes 100,000 of them at once
class KernelBlock:
    address: Target  # one address, or a network (admin blocks)
    expires_at: float  # epoch seconds; set backends turn it into a kernel timeout
    # str(address), canonical. A caller that holds it already (the state file's text, checked
    # to be canonical) passes it: formatting 100,000 IPv6 addresses costs ~0.7 s at start.
    text: str = ""
    # Never blocked here before (no state row of it): imr's objects cannot hold it, so a
    # backend may add it without first taking it out (a fleet catch-up's new addresses).
    fresh: bool = False

    def __post_init__(self) -> None:
        if not self.text:
            object.__setattr__(self, "text", str(self.address))


# Where a block lives in the kernel: single addresses and networks of each family are kept
# apart (set backends use a hash set for addresses and an interval/net set for networks).
Slot = Literal["v4", "v6", "net4", "net6"]
SLOTS: tuple[Slot, ...] = ("v4", "v6", "net4", "net6")


def slot_of(target: Target) -> Slot:
    if isinstance(target, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return "net4" if target.version == 4 else "net6"
    return "v4" if target.version == 4 else "v6"


def port_range(spec: str) -> tuple[int, int]:
    """A config port spec ("80", "8000:8080") as (low, high), so each backend writes it
    the way its tool prints it (no leading zeros), which avoids needless rewrites."""
    low, _, high = spec.partition(":")
    return int(low), int(high or low)


@dataclass(frozen=True)
class Expected:
    """How many entries of a slot the broker expects in the kernel: at least `low`, at most
    `high`. The two differ by the blocks about to expire, which a kernel timeout may lift a
    moment before the broker does."""

    low: int
    high: int

    def __contains__(self, count: object) -> bool:
        return isinstance(count, int) and self.low <= count <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low} to {self.high}"


def slot_of_text(ip: str) -> Slot:
    """The slot of a target as the state file writes it ("192.0.2.7", "2001:db8::/48"): cheap
    enough for the drift check to run over 100,000 active blocks."""
    if "/" in ip:
        return "net6" if ":" in ip else "net4"
    return "v6" if ":" in ip else "v4"


def expected_counts(
    entries: Iterable[tuple[Slot, float]], now: float, margin: float = 5.0
) -> dict[Slot, Expected]:
    """Expected entries per slot for the (slot, expires_at) of every block in force.

    A block due within `margin` seconds (or overdue, not yet lifted) may already be gone
    from a set with kernel timeouts, so it counts only towards the upper bound.
    """
    low = dict.fromkeys(SLOTS, 0)
    high = dict.fromkeys(SLOTS, 0)
    for slot, expires_at in entries:
        high[slot] += 1
        if expires_at > now + margin:
            low[slot] += 1
    return {slot: Expected(low[slot], high[slot]) for slot in SLOTS}


@dataclass(frozen=True)
class Drift:
    """What `check()` found wrong with imr's kernel objects; empty when all is well.

    `structure`: objects missing or changed (a chain, a set, the jump from
    INPUT, imr's rules); `prepare()` restores them and keeps entries.
    `entries`: slots whose entry count is not what the broker expects (a
    flushed set or chain, a deleted table); `replace_all()` restores them.
    """

    structure: tuple[str, ...] = ()
    entries: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return bool(self.structure or self.entries)

    def describe(self) -> str:
        return "; ".join((*self.structure, *self.entries)) or "no drift"


def count_problems(
    counts: Mapping[Slot, int], expected: Mapping[Slot, Expected], where: Mapping[Slot, str]
) -> tuple[str, ...]:
    """One line per slot whose count is out of range, naming the kernel object (`where`)."""
    return tuple(
        f"{where[slot]} holds {counts[slot]} entries, expected {expected[slot]}"
        for slot in SLOTS
        if counts[slot] not in expected[slot]
    )


class Backend(ABC):
    name: str

    @abstractmethod
    def describe(self) -> str:
        """One line for `imr server status`: mechanism and why it was chosen."""

    @abstractmethod
    def prepare(self) -> None:
        """Create imr's own chains/tables and hook them into INPUT. Idempotent."""

    @abstractmethod
    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        """Add and remove blocks in one kernel transaction where the mechanism allows.

        Adding an address that is already blocked must not create a duplicate;
        removing an address that is not blocked is not an error. On failure
        nothing of the batch may be left half-applied, as far as the
        mechanism allows, and BackendError is raised.
        """

    @abstractmethod
    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        """Make imr's kernel state exactly `blocks` (start-up reconcile), atomically if possible."""

    @abstractmethod
    def installed(self) -> set[Target]:
        """The addresses and networks imr's objects in the kernel block now (for tests)."""

    @abstractmethod
    def check(self, expected: Mapping[Slot, Expected]) -> Drift:
        """Whether imr's objects are intact and hold the expected number of entries.

        Must stay cheap with 100,000 entries (the broker runs it every few
        seconds): it reads structure and entry counts, never every entry.
        """

    @abstractmethod
    def teardown(self) -> None:
        """Remove everything imr created (uninstall, tests). Never called on a normal stop."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles; the kernel state stays as it is."""
