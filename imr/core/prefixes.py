"""When blocks of many addresses of one prefix become a block of the prefix (issue #16).

Pure: every method takes `now` from the caller and the protection check is passed in,
so thresholds, windows and caps are tested without a clock or a network stack.

Vocabulary:
- a *level* is one rule of aggregation: "`count` distinct *members* (addresses, or
  /`member_prefix` networks) of one /`prefix` blocked within `window` seconds make the
  /`prefix` a network block". The defaults are two levels: 3 addresses of an IPv6 /64
  and 8 addresses of an IPv4 /24; wider ones (4 /64s of one /48) are opt-in;
- a *member* is what a level counts: the blocked address masked to `member_prefix`
  (the address itself at /128 or /32), so rotation across the /64s of one /48 counts
  each /64 once however many addresses it used;
- an *escalation* is the index's answer: this prefix reached its level's count, with
  the members that made it (the log line and the block's reason name them);
- a *guard* refuses a prefix that must never be blocked as a whole: wider than the
  cap, holding a protected address, or inside the never-aggregate list. A guarded
  prefix is never escalated, whatever the count;
- a *pardon* (an admin's unblock of an escalated prefix) forgets the prefix's members:
  the next escalation needs `count` fresh blocks, and the prefix ladder starts again.
  The member addresses keep their own blocks and history.
- the *offence unit* of an IPv6 address is its /`ipv6_offence_prefix` (default /64): a
  new address of a unit that offended within the repeat window is a repeat of the unit
  for the ladder (`unit_previous`), though the block itself stays on the address.

Cost: `observe` is O(levels x count) per block: each prefix keeps at most `count`
members (the newest), so the index is bounded by count x prefixes seen, and a sweep
drops prefixes whose members all left the window.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from imr.core.addresses import IPAddress, IPNetwork, network_refusal
from imr.core.policy import PreviousBlock

# A refusal message for a prefix that must not be blocked as a whole, or None.
Guard = Callable[[IPNetwork], str | None]
SWEEP_EVERY = 4096  # observations between sweeps of prefixes whose members all left the window


@dataclass(frozen=True)
class Level:
    version: int  # 4 or 6
    prefix: int  # the network blocked when the level is reached
    member_prefix: int  # what is counted: addresses (32/128) or networks (e.g. /64s)
    count: int  # distinct members within the window
    window: float  # seconds

    def __post_init__(self) -> None:
        bits = 32 if self.version == 4 else 128
        if self.version not in (4, 6):
            raise ValueError("a level's family is 4 or 6")
        if not 0 < self.prefix < self.member_prefix <= bits:
            raise ValueError(
                f"a level's prefix must be shorter than its member prefix (/{self.prefix}"
                f" of /{self.member_prefix}s)"
            )
        if self.count < 2 or self.window <= 0:
            raise ValueError("a level needs a count of at least 2 and a positive window")

    def key(self, value: int) -> tuple[int, int]:
        """The (prefix, member) integers of an address's integer value."""
        bits = 32 if self.version == 4 else 128
        return (value >> (bits - self.prefix), value >> (bits - self.member_prefix))

    def network(self, prefix_key: int) -> IPNetwork:
        bits = 32 if self.version == 4 else 128
        return network_of(self.version, prefix_key << (bits - self.prefix), self.prefix)

    def member(self, member_key: int) -> IPAddress | IPNetwork:
        bits = 32 if self.version == 4 else 128
        value = member_key << (bits - self.member_prefix)
        if self.member_prefix < bits:
            return network_of(self.version, value, self.member_prefix)
        return ipaddress.IPv4Address(value) if self.version == 4 else ipaddress.IPv6Address(value)


def _address(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def network_of(version: int, value: int, length: int) -> IPNetwork:
    """The network from its integer base, of the family named (ip_network() would take a
    small IPv6 value for IPv4)."""
    if version == 4:
        return ipaddress.IPv4Network((value, length))
    return ipaddress.IPv6Network((value, length))


@dataclass(frozen=True)
class Escalation:
    network: IPNetwork
    level: Level
    members: tuple[str, ...]  # oldest first: the blocks that made the count
    addresses: tuple[str, ...] = ()  # the last blocked address of each member

    def describe(self) -> str:
        minutes = round(self.level.window / 60)
        return (
            f"{len(self.members)} blocked {'addresses' if self._addresses else 'networks'}"
            f" of {self.network} within {minutes} min: {', '.join(self.members)}"
        )

    @property
    def _addresses(self) -> bool:
        return self.level.member_prefix == (32 if self.level.version == 4 else 128)


@dataclass
class _Members:
    seen: dict[int, float] = field(default_factory=dict)  # member key -> last block time
    # Member key -> the address of its last block, where members are networks (the /64s of
    # a /48): the addresses the wider block takes out of the kernel.
    address: dict[int, int] = field(default_factory=dict)


class PrefixIndex:
    """The recent blocks of every prefix of every level, to decide escalations."""

    def __init__(self, levels: Iterable[Level]) -> None:
        self.levels = tuple(levels)
        self._prefixes: dict[tuple[int, int], _Members] = {}  # (level index, prefix key)
        self._observed = 0

    def __len__(self) -> int:
        return len(self._prefixes)

    def observe(
        self, address: IPAddress, now: float, guard: Guard, blocked: Callable[[IPNetwork], bool]
    ) -> list[Escalation]:
        """Count a new block of `address`; return the prefixes it makes escalate.

        `blocked(network)` tells whether a network covering the prefix is already blocked
        (then nothing escalates: the block would add nothing). The caller `forget`s an
        escalation once its block is committed. A prefix the guard refuses
        is not escalated; its count is kept, so the decision is made again with the
        guard of the day (an allowlist entry removed later).
        """
        self._observed += 1
        if self._observed % SWEEP_EVERY == 0:
            self.sweep(now)
        value = int(address)
        found: list[Escalation] = []
        for index, level in enumerate(self.levels):
            if level.version != address.version:
                continue
            prefix_key, member_key = level.key(value)
            members = self._prefixes.setdefault((index, prefix_key), _Members())
            _remember(members, member_key, now, level, value)
            if len(members.seen) < level.count:
                continue
            network = level.network(prefix_key)
            if blocked(network) or guard(network) is not None:
                continue
            ordered = list(members.seen)  # in the order of their last blocks
            names = tuple(str(level.member(m)) for m in ordered)
            addresses = names
            if members.address:
                bits = 32 if level.version == 4 else 128
                addresses = tuple(
                    str(network_of(level.version, members.address[m], bits)).split("/")[0]
                    for m in ordered
                )
            found.append(Escalation(network, level, names, addresses))
        return found

    def forget(self, escalation: Escalation) -> None:
        """The escalation's block was committed: its prefix starts a new count. (Not in
        observe: a batch that fails is tried again, and must find the count as it was.)"""
        level = escalation.level
        index = self.levels.index(level) if level in self.levels else -1
        prefix_key = level.key(int(escalation.network.network_address))[0]
        self._prefixes.pop((index, prefix_key), None)

    def note(self, address: IPAddress, at: float) -> None:
        """Count a block without deciding (at start, the blocks still inside a window)."""
        value = int(address)
        for index, level in enumerate(self.levels):
            if level.version == address.version:
                prefix_key, member_key = level.key(value)
                members = self._prefixes.setdefault((index, prefix_key), _Members())
                _remember(members, member_key, at, level, value)

    def refusal(self, address: IPAddress, guard: Guard) -> list[tuple[IPNetwork, str]]:
        """The prefixes of `address` that the guard refuses, with why (for `imr show`)."""
        found = []
        for level in self.levels:
            if level.version == address.version:
                network = level.network(level.key(int(address))[0])
                if (why := guard(network)) is not None:
                    found.append((network, why))
        return found

    def pardon(self, network: IPNetwork) -> None:
        """Forget the members of `network` and of every counted prefix inside it."""
        for index, level in enumerate(self.levels):
            if level.version != network.version or level.prefix < network.prefixlen:
                continue
            if level.prefix == network.prefixlen:
                prefix_key = level.key(int(network.network_address))[0]
                self._prefixes.pop((index, prefix_key), None)
                continue
            for key in [k for k in self._prefixes if k[0] == index]:  # rare: admins only
                if level.network(key[1]).subnet_of(network):  # type: ignore[arg-type]
                    del self._prefixes[key]

    def taken_over(self, network: IPNetwork) -> list[IPAddress]:
        """A network block from elsewhere (a fleet member's escalation) covers `network`:
        the addresses counted for it (by a level of its length), which need no kernel
        entry any more; its count starts again, as after a local escalation. O(levels):
        counts of narrower prefixes inside are left alone (a scan; they escalate nothing
        while the network covers them, and leave the window)."""
        found: list[IPAddress] = []
        bits = 32 if network.version == 4 else 128
        for index, level in enumerate(self.levels):
            if level.version != network.version or level.prefix != network.prefixlen:
                continue
            key = (index, level.key(int(network.network_address))[0])
            members = self._prefixes.pop(key, None)
            if members is None:
                continue
            for member in members.seen:
                value = members.address.get(member, member << (bits - level.member_prefix))
                found.append(_address(level.version, value))
        return found

    def sweep(self, now: float) -> None:
        """Drop the prefixes whose members have all left their level's window."""
        stale = [
            key
            for key, members in self._prefixes.items()
            if max(members.seen.values(), default=0.0) < now - self.levels[key[0]].window
        ]
        for key in stale:
            del self._prefixes[key]


def _remember(members: _Members, member_key: int, now: float, level: Level, value: int) -> None:
    """Record one member's block; keep only members within the window, at most `count`
    of them (the newest): enough to know whether `count` fell within the window."""
    seen = members.seen
    seen.pop(member_key, None)  # re-inserted last: dict order is the order of blocks
    seen[member_key] = now
    if level.member_prefix < (32 if level.version == 4 else 128):
        members.address[member_key] = value
    cutoff = now - level.window
    while seen:
        oldest = next(iter(seen))
        if seen[oldest] >= cutoff and len(seen) <= level.count:
            break
        del seen[oldest]
        members.address.pop(oldest, None)


def make_guard(
    min_prefix: Mapping[int, int],
    own: frozenset[IPAddress],
    broadcast: frozenset[IPAddress],
    allowlist: Iterable[IPNetwork],
    never_aggregate: Iterable[IPNetwork],
) -> Guard:
    """The guard of the day: the admin's network rules (the cap, own, broadcast, loopback
    and allowlisted addresses inside), and the never-aggregate list on top."""
    allowed = tuple(allowlist)
    never = tuple(never_aggregate)

    def guard(network: IPNetwork) -> str | None:
        for listed in never:
            if listed.version == network.version and network.overlaps(listed):
                return f"{network} overlaps {listed}, never aggregated"
        refusal = network_refusal(network, min_prefix, own, broadcast, allowed)
        return None if refusal is None else refusal.message

    return guard


# --- The offence unit (policy.ipv6_offence_prefix) ---


def offence_unit(address: IPAddress, ipv6_offence_prefix: int) -> int | None:
    """The key of the address's offence unit: the /ipv6_offence_prefix of an IPv6 address;
    None where the address is its own unit (IPv4, or a prefix of 128)."""
    if address.version != 6 or ipv6_offence_prefix >= 128:
        return None
    return int(address) >> (128 - ipv6_offence_prefix)


def unit_previous(
    own: PreviousBlock | None, unit: PreviousBlock | None, now: float
) -> PreviousBlock | None:
    """The block the ladder reads for a new block of an address: its own last block, or
    its unit's last block if that is more recent. The unit's block belongs to another
    address: still in force or not, for this address it is an offence that has ended,
    so the new block is a repeat (one rung up), never a hit."""
    if unit is None:
        return own
    if unit.active_at(now):  # as replace(unit, lifted_at=now), a third of its cost
        unit = PreviousBlock(unit.blocked_at, unit.rung, unit.expires_at, now)
    if own is None or unit.ended_at > own.ended_at:
        return unit
    return own


class UnitMemory:
    """The last block of every offence unit: what `unit_previous` needs, in memory.

    Entries older than the repeat window are dropped by `sweep`: they no longer make a
    repeat."""

    def __init__(self) -> None:
        self._last: dict[int, PreviousBlock] = {}
        self._remembered = 0

    def __len__(self) -> int:
        return len(self._last)

    def get(self, unit: int) -> PreviousBlock | None:
        return self._last.get(unit)

    def remember(self, unit: int, block: PreviousBlock, now: float, repeat_window: float) -> None:
        self._remembered += 1
        if self._remembered % SWEEP_EVERY == 0:
            self.sweep(now, repeat_window)
        known = self._last.get(unit)
        if known is None or block.blocked_at >= known.blocked_at:
            self._last[unit] = block

    def sweep(self, now: float, repeat_window: float) -> None:
        cutoff = now - repeat_window
        for unit in [u for u, b in self._last.items() if b.ended_at < cutoff]:
            del self._last[unit]


# --- Which blocks need a kernel entry ---


class Coverage:
    """The active network blocks, by prefix length: is an address under one of them?

    An address block under a network block needs no kernel entry of its own (issue #16
    rule 4); the lookup is one dict probe per prefix length in use (a handful), and gives
    the network's text as stored, so start-up checks 100,000 addresses in ~0.1 s."""

    def __init__(self) -> None:
        # (version, length) -> network base (an integer) -> the network's text
        self._by_length: dict[tuple[int, int], dict[int, str]] = {}

    def add(self, network: IPNetwork) -> None:
        key = (network.version, network.prefixlen)
        self._by_length.setdefault(key, {})[int(network.network_address)] = str(network)

    def remove(self, network: IPNetwork) -> None:
        key = (network.version, network.prefixlen)
        keys = self._by_length.get(key)
        if keys is not None:
            keys.pop(int(network.network_address), None)
            if not keys:
                del self._by_length[key]

    def covering_text(self, address: IPAddress) -> str | None:
        """The text of a network here that covers `address`, or None."""
        if not self._by_length:  # no network block: every new block asks
            return None
        value, version = int(address), address.version
        bits = 32 if version == 4 else 128
        for (family, length), keys in self._by_length.items():
            if family == version:
                found = keys.get((value >> (bits - length)) << (bits - length))
                if found is not None:
                    return found
        return None

    def covering(self, address: IPAddress) -> IPNetwork | None:
        text = self.covering_text(address)
        return None if text is None else ipaddress.ip_network(text)

    def wider(self, network: IPNetwork, or_same: bool = False) -> IPNetwork | None:
        """A network here wider than `network` (or the same one) that covers it."""
        value, version = int(network.network_address), network.version
        bits = 32 if version == 4 else 128
        for (family, length), keys in self._by_length.items():
            shorter = length <= network.prefixlen if or_same else length < network.prefixlen
            if family == version and shorter:
                found = keys.get((value >> (bits - length)) << (bits - length))
                if found is not None:
                    return ipaddress.ip_network(found)
        return None

    def inside(self, network: IPNetwork) -> list[IPNetwork]:
        """The networks here narrower than `network` and inside it (rare: a scan)."""
        bits = 32 if network.version == 4 else 128
        shift = bits - network.prefixlen
        base = int(network.network_address) >> shift
        return [
            network_of(version, key, length)
            for (version, length), keys in self._by_length.items()
            if version == network.version and length > network.prefixlen
            for key in keys
            if key >> shift == base
        ]

    def __bool__(self) -> bool:
        return bool(self._by_length)
