"""The pure part of fleet mode: what a remote event may do here, and how it merges.

A remote event passes the checks a local request passes (the target is parsed and
refused if it is loopback, an own address, allowlisted, or a too-wide network; see
addresses.py), and more: the other members' addresses are protected too, an origin
has a quota of events a minute, and only an admin key lifts blocks another member made.

Merging: a remote block for an address that is blocked here already keeps the higher
rung and the later expiry. Both are maxima, so members that see two escalations of one
address in either order end with the same block (docs/fleet.md, "One ladder").

Networks (an escalation, source `imr:escalation`, or an admin's network block): a remote
network passes this host's own network rules (the cap, its protected addresses and every
member's), and, unless its origin holds an admin key, the guard of an escalation here too
(`escalation.never_aggregate`, `logscan.trusted_proxies`). A network in force here that
meets another one ends up the same whatever the order (`network_plan`): the widest wins,
the narrower ones end (`superseded`) or are kept as history only (`covered`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from imr.core.addresses import (
    IPAddress,
    IPNetwork,
    ProtectionIndex,
    Refusal,
    RefusalCode,
    canonical_packed,
    canonical_target,
    intrinsic_refusal,
    network_refusal,
    protection_refusal,
)
from imr.core.prefixes import Coverage

WINDOW = 60.0


@dataclass(frozen=True)
class Protection:
    """What no fleet event may block here."""

    own: frozenset[IPAddress]
    broadcast: frozenset[IPAddress]
    allowlist: tuple[IPNetwork, ...]  # the local allowlist plus every member's addresses
    min_prefix: Mapping[int, int]
    # Never blocked as a whole by a non-admin origin: escalation.never_aggregate and the
    # trusted proxies, the guard of this host's own escalations.
    never_aggregate: tuple[IPNetwork, ...] = ()
    # The same checks on packed bytes, for the common case: a catch-up checks 100,000 events.
    index: ProtectionIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = ProtectionIndex.build(self.own, self.broadcast, self.allowlist)
        object.__setattr__(self, "index", index)


def target_refusal(
    ip: str, protection: Protection, admin: bool = False
) -> tuple[str, Refusal] | None:
    """('protected_target' | 'too_wide' | 'never_aggregate' | 'malformed', why) if a remote
    event may not block `ip` (`admin`: its origin holds an admin key)."""
    # A single address in canonical text that no check can refuse (ProtectionIndex.plain):
    # ~0.5 µs against ~2 µs through ipaddress objects (bench/fleet.py's catch-up profile).
    packed = canonical_packed(ip)
    if packed is not None and protection.index.plain(packed):
        return None
    parsed = canonical_target(ip)
    if isinstance(parsed, Refusal):
        return "malformed", parsed
    target, text = parsed
    if text != ip:
        return "malformed", Refusal(RefusalCode.INVALID, f"{ip!r} is not in canonical form")
    if isinstance(target, IPNetwork):
        refusal = network_refusal(
            target,
            protection.min_prefix,
            protection.own,
            protection.broadcast,
            protection.allowlist,
        )
        if refusal is not None:
            code = "too_wide" if refusal.code is RefusalCode.TOO_WIDE else "protected_target"
            return code, refusal
        for listed in () if admin else protection.never_aggregate:
            if listed.version == target.version and target.overlaps(listed):
                why = f"{target} overlaps {listed}, never aggregated here"
                return "never_aggregate", Refusal(RefusalCode.ALLOWLISTED, why)
        return None
    refusal = intrinsic_refusal(target) or protection_refusal(
        target, protection.own, protection.broadcast, protection.allowlist
    )
    return None if refusal is None else ("protected_target", refusal)


# An entry stamped further ahead of this host's clock is refused (EventRefusal.FUTURE): its
# stamp is the quota's clock, which an origin must not be able to run ahead.
FUTURE_SLACK = 60.0


def entry_time(position: str) -> float | None:
    """The time Redis stamped a stream entry with (its id is milliseconds-sequence)."""
    milliseconds, _, _ = position.partition("-")
    return int(milliseconds) / 1000 if milliseconds.isdigit() else None


class OriginQuota:
    """At most `per_minute` events from one origin in any 60 s window (exact sliding
    window); refused events do not count. The clock is the stream entries' own time (when
    Redis appended them), so a member catching up on hours of events is not refused for
    reading them fast, while a flood is refused wherever it is read."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, deque[float]] = {}

    def admit(self, origin: str, now: float) -> bool:
        times = self._seen.get(origin)
        if times is None:  # not setdefault: a catch-up calls this 100,000 times
            times = self._seen[origin] = deque()
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if len(times) >= self.per_minute:
            return False
        times.append(now)
        return True


def merged(current: tuple[int, float], rung: int, expires_at: float) -> tuple[int, float]:
    """The block after a remote block or escalation met a block in force here: the higher
    rung, the later expiry (commutative and idempotent: the order of events does not matter)."""
    return max(current[0], rung), max(current[1], expires_at)


def may_lift(event_origin: str, block_origin: str | None, origin_is_admin: bool) -> bool:
    """A member lifts only the blocks it made itself (as they were applied here); an admin
    key lifts any. A block this host made (origin None) is lifted only by an admin key."""
    return origin_is_admin or block_origin == event_origin


@dataclass(frozen=True)
class NetworkPlan:
    """What a remote network block does to the networks in force here."""

    covered_by: IPNetwork | None  # a wider network here covers it: history only
    supersedes: tuple[IPNetwork, ...]  # narrower networks here that it ends


def network_plan(network: IPNetwork, coverage: Coverage) -> NetworkPlan:
    """A remote network meets the networks in force here (the same network is `merged`).

    The widest wins whatever the order: a network under a wider one adds nothing (it is
    kept as history for the ladder), and a wider one ends the narrower ones inside it
    (nftables interval sets refuse overlapping elements). So members that see two
    overlapping networks in either order end with the same kernel and active rows."""
    wider = coverage.wider(network)
    if wider is not None:
        return NetworkPlan(wider, ())
    return NetworkPlan(None, tuple(coverage.inside(network)))
