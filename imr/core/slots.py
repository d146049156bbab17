"""Who may hold how many of a listener's connections (pure; the caller passes the dice).

A *slot* is one open connection of an identified client. A listener has
`total` slots; the last `reserved_admin` of them are for admins only (root is
always admin), so clients without that role cannot lock the admin out, as
PostgreSQL's superuser_reserved_connections does. Any one other *principal*
(a uid, a certificate subject, a token) holds at most `per_client` slots, and
one with no role (it may only ping) at most `per_client_no_role`. Admins are
only bounded by `total`.

On TCP a client is identified only after its TLS handshake or its `auth`
line; until then its connection is a *startup*. At most `max_startups` are
open at once, and from `drop_from` on each new one is dropped at random with
a probability rising from 30% to 100% (sshd's MaxStartups "start:30:full"), so a
flood of silent connections cannot keep identified clients out. A *source*
(an IPv4 address, or an IPv6 /64) holds at most `per_source` connections,
startups and identified ones together (systemd's MaxConnectionsPerSource).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

EARLY_DROP_RATE = 0.3  # the drop probability at drop_from (sshd's default "10:30:100")


@dataclass(frozen=True)
class SlotLimits:
    total: int
    reserved_admin: int
    per_client: int
    per_client_no_role: int


class Slots:
    """The identified connections of one listener, counted per principal."""

    def __init__(self, limits: SlotLimits) -> None:
        self.limits = limits
        self.open = 0
        self._held = Counter[str]()

    def claim(self, principal: str, *, admin: bool, has_role: bool) -> str | None:
        """Take a slot for `principal`: None if taken, else why not (for the `busy` reply)."""
        limits = self.limits
        if self.open >= limits.total:
            return f"all {limits.total} connections are in use"
        if not admin:
            # At least one slot stays free for admins, whatever the config says.
            reserved = min(limits.reserved_admin, limits.total - 1)
            if self.open >= limits.total - reserved:
                return f"the last {reserved} connections are reserved for admins"
            cap = limits.per_client if has_role else limits.per_client_no_role
            if self._held[principal] >= cap:
                return f"{principal} already has {cap} connections open"
        self.open += 1
        self._held[principal] += 1
        return None

    def release(self, principal: str) -> None:
        self.open -= 1
        self._held[principal] -= 1
        if self._held[principal] <= 0:
            del self._held[principal]

    def held(self, principal: str) -> int:
        return self._held[principal]


@dataclass(frozen=True)
class StartupLimits:
    max_startups: int
    drop_from: int
    per_source: int


class Startups:
    """TCP connections by source, and those not identified yet (startups)."""

    def __init__(self, limits: StartupLimits) -> None:
        self.limits = limits
        self.startups = 0
        self._by_source = Counter[str]()

    def admit(self, source: str, dice: float) -> str | None:
        """Count a new connection from `source` as a startup: None if admitted, else why not.

        `dice` is a uniform random number in [0, 1) (random.random()).
        """
        limits = self.limits
        if self._by_source[source] >= limits.per_source:
            return f"{source} already has {limits.per_source} connections open"
        if self.startups >= limits.max_startups:
            return f"{limits.max_startups} connections are still authenticating"
        if self.startups >= limits.drop_from:
            span = max(1, limits.max_startups - limits.drop_from)
            chance = (
                EARLY_DROP_RATE + (1 - EARLY_DROP_RATE) * (self.startups - limits.drop_from) / span
            )
            if dice < chance:
                return f"{self.startups} connections are authenticating (random early drop)"
        self.startups += 1
        self._by_source[source] += 1
        return None

    def identified(self) -> None:
        """The startup's client is identified: it no longer counts as a startup."""
        self.startups -= 1

    def closed(self, source: str, *, identified: bool) -> None:
        if not identified:
            self.startups -= 1
        self._by_source[source] -= 1
        if self._by_source[source] <= 0:
            del self._by_source[source]


def source_of(host: str) -> str:
    """The source a TCP peer counts as: its IPv4 address, or its IPv6 /64 (one host's share)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
