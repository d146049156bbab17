"""Admission: whether a request may go to the writer at all, decided on the event loop.

Three checks, in this order, before anything is queued:
- *role*: the peer's roles allow the op (access.py says which roles allow what);
- *target*: the text is an address (or, for an admin, a network that overlaps no other
  network block) that nothing *protects* (the host's own and broadcast addresses, the
  allowlist, addresses that are never blocked; core/addresses.py);
- *quota*: a change that may make a new block *reserves* its share of the client's quota
  (core/quota.py); a report on an active block only counts against hits_per_minute.

A refusal raises BrokerError, and its log line is throttled per client and code, so a
loop of bad requests cannot flood the log.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from imr.config import ProtectConfig, QuotaConfig
from imr.core.addresses import (
    IPAddress,
    IPNetwork,
    ProtectionIndex,
    Refusal,
    RefusalCode,
    Target,
    address_of_packed,
    canonical_packed,
    canonical_target,
    intrinsic_refusal,
    network_refusal,
    protection_refusal,
)
from imr.core.clock import Clock
from imr.core.quota import LogThrottle, QuotaLedger, QuotaRefusal, Reservation
from imr.protocol import BlockManyRequest, BlockRequest, Request
from imr.server.access import Peer
from imr.server.block_answer import BlockAnswer
from imr.server.changes import AnyChange, BlockChange, BrokerError, Outcome, stored_address
from imr.server.metrics import Metrics
from imr.store import BlockRecord
from imr.wire_codes import WireCode

log = logging.getLogger("imr.broker")

# Canonical-text beginnings of IPv6 forms that may carry an IPv4 address.
_CARRIERS = ("64:ff9b::", "2002:", "2001:0:", "2001::", "::")
# Seconds: at most one refusal line per client and limit (quotas) or code (addresses).
REFUSAL_LOG_INTERVAL = 10.0


class AddressView(Protocol):
    """The host's own addresses, kept current (LocalAddresses, or a fixed set in tests)."""

    @property
    def own(self) -> frozenset[IPAddress]: ...

    @property
    def broadcast(self) -> frozenset[IPAddress]: ...


# The host's own addresses and its broadcast addresses.
LocalView = tuple[frozenset[IPAddress], frozenset[IPAddress]]


class Gatekeeper:
    """The checks and quota reservations in front of the writer's queue. (Not the listener's
    `Admission`, which is a connection's identity.)"""

    def __init__(
        self,
        sections: tuple[ProtectConfig, QuotaConfig],
        local: AddressView,
        active: Mapping[str, BlockRecord],
        quota: QuotaLedger,
        clock: Clock,
        monotonic: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self.protect, self.quota_config = sections  # a reload replaces them
        self._local = local
        self._active = active  # the broker's index, read only
        self._quota = quota
        self._clock = clock
        self._monotonic = monotonic
        self._metrics = metrics
        self._quota_log = LogThrottle(REFUSAL_LOG_INTERVAL)
        self._refusal_log = LogThrottle(REFUSAL_LOG_INTERVAL)
        # The own and broadcast addresses the last look for newly protected blocks saw.
        self._seen_local: LocalView = (frozenset(), frozenset())
        # Set by a reload that changed the allowlist: every active block is looked at once.
        self.recheck_all = False
        # The protection checks on packed bytes, for what they were built from (by identity).
        self._index: tuple[object, object, object, ProtectionIndex] | None = None

    def check_role(self, request: Request, peer: Peer) -> None:
        """Refuse an op the peer's roles do not allow."""
        if peer.may(request.op):
            return
        # One line per client and op every 10 s (with a count): a no-role loop cannot flood
        # the log, and each kind of thing a client was refused still shows.
        suppressed = self._refusal_log.allow(
            (peer.principal, WireCode.FORBIDDEN, request.op), self._monotonic()
        )
        if suppressed is not None:
            log.warning(
                "refused %s by %s: role %s may not %s%s",
                request.op,
                peer.describe(),
                ",".join(sorted(peer.roles)) or "none",
                request.op,
                f"; {suppressed} more like it since the last such line" if suppressed else "",
            )
        raise BrokerError(WireCode.FORBIDDEN, f"user {peer.user} is not allowed to {request.op}")

    def block_change(
        self, text: str, request: BlockRequest | BlockManyRequest, peer: Peer, compact: bool = False
    ) -> BlockChange:
        """Check and admit one address; raise BrokerError for a refusal."""
        address, ip = self.target(text, request.op, peer)
        change = BlockChange(
            address, ip, request.reason, request.source, request.severity, peer, compact
        )
        if isinstance(request, BlockRequest) and request.duration is not None:
            if not peer.is_admin:  # the ladder decides for everyone else
                raise BrokerError(WireCode.FORBIDDEN, f"user {peer.user} may not choose a duration")
            change.duration = request.duration
        active = self._active.get(ip)
        if active is None or active.expires_at <= self._clock.now():
            self.reserve_block(change)  # may make a new block: the quota decides, before queueing
        else:
            self._admit_hit(change)  # a hit row only; bounded too, or hits could fill the disk
        return change

    def _admit_hit(self, change: BlockChange) -> None:
        peer = change.peer
        if self.quota_config.admin_exempt and peer.is_admin:
            return
        now = self._monotonic()
        refusal = self._quota.admit_hit(peer.principal, now)
        if refusal is not None:
            self._refuse_quota(change, refusal, now)

    def reserve_block(self, change: BlockChange) -> None:
        """Reserve the change's share of its client's quota, or refuse it (docs: Quotas)."""
        peer = change.peer
        if self.quota_config.admin_exempt and peer.is_admin:
            change.may_create = True
            return
        now = self._monotonic()
        admitted = self._quota.admit(peer.principal, now, len(self._active))
        if isinstance(admitted, Reservation):
            change.may_create, change.reservation = True, admitted
            return
        self._refuse_quota(change, admitted, now)

    def _refuse_quota(self, change: BlockChange, refusal: QuotaRefusal, now: float) -> None:
        peer = change.peer
        self._metrics.quota_refused(refusal.limit)
        suppressed = self._quota_log.allow((peer.principal, refusal.limit), now)
        if suppressed is not None:
            log.warning(
                "refused block %s by %s (%s): %s%s",
                change.address,
                peer.describe(),
                peer.principal,
                refusal.message,
                f"; {suppressed} more refused since the last such line" if suppressed else "",
                extra={
                    "event": "quota_refused",
                    "principal": peer.principal,
                    "code": refusal.code,
                    "limit": refusal.limit,
                    "ip": str(change.address),
                    "suppressed": suppressed,
                },
            )
        raise BrokerError(WireCode(refusal.code), refusal.message)

    def target(self, text: str, op: str, peer: Peer) -> tuple[Target, str]:
        """The target to block and its canonical text; BrokerError if it may not be."""
        packed = canonical_packed(text)
        if packed is not None and self._protection().plain(packed):
            # Nearly every request: a canonical address that nothing protects, checked on its
            # bytes as the start-up checks the state's rows (~4 µs less than the ipaddress
            # checks of `protected`; bench/one_address.py). Anything else: the full checks.
            return address_of_packed(packed), text
        parsed = canonical_target(text)
        target = parsed if isinstance(parsed, Refusal) else parsed[0]
        if isinstance(target, IPNetwork):
            self._network_allowed(target, op, peer)
        refusal = self.protected(target)
        if refusal is not None or isinstance(parsed, Refusal):
            refusal = refusal or Refusal(RefusalCode.INVALID, "not an address")
            # One line per client and refusal code every 10 s: a block_many of 1,000 bad
            # addresses, or a loop of them, cannot flood the log.
            suppressed = self._refusal_log.allow((peer.principal, refusal.code), self._monotonic())
            if suppressed is not None:
                log.warning(
                    "refused %s %r by %s: %s%s",
                    op,
                    text[:64],
                    peer.describe(),
                    refusal.message,
                    f"; {suppressed} more like it since the last such line" if suppressed else "",
                )
            raise BrokerError(WireCode(refusal.code), refusal.message)
        return parsed

    def _network_allowed(self, network: IPNetwork, op: str, peer: Peer) -> None:
        """Networks are for admins, and may not overlap another active network block (nftables
        interval sets refuse overlaps; one block per address keeps the history clear too)."""
        if not peer.is_admin:
            suppressed = self._refusal_log.allow(
                (peer.principal, RefusalCode.NETWORK), self._monotonic()
            )
            if suppressed is not None:
                log.warning(
                    "refused %s %s by %s: networks need the admin role%s",
                    op,
                    network,
                    peer.describe(),
                    f"; {suppressed} more like it since the last such line" if suppressed else "",
                )
            raise BrokerError(
                WireCode.NETWORK_NOT_ALLOWED,
                f"{network} is a network; user {peer.user} may block single addresses only"
                " (network blocks need the admin role)",
            )
        key = str(network)
        for ip in self._active:
            if "/" in ip and ip != key and network.overlaps(ipaddress.ip_network(ip)):
                log.warning("refused %s %s by %s: overlaps %s", op, network, peer.describe(), ip)
                raise BrokerError(
                    WireCode.NETWORK_OVERLAPS,
                    f"{network} overlaps the blocked network {ip}; unblock that first",
                )

    def _protection(self) -> ProtectionIndex:
        """The ProtectionIndex of the own and broadcast addresses and the allowlist now
        (the local-address watcher and a reload replace them; rebuilt when they change)."""
        own, broadcast, allowlist = self._local.own, self._local.broadcast, self.protect.allowlist
        index = self._index
        if (
            index is None
            or index[0] is not own
            or index[1] is not broadcast
            or (index[2] is not allowlist)
        ):
            index = own, broadcast, allowlist, ProtectionIndex.build(own, broadcast, allowlist)
            self._index = index
        return index[3]

    def protected(self, parsed: Target | Refusal) -> Refusal | None:
        """Why the target may not be blocked (or stay blocked), or None if it may."""
        if isinstance(parsed, Refusal):
            return parsed
        if isinstance(parsed, IPNetwork):
            return network_refusal(
                parsed,
                self.protect.network_min_prefix,
                self._local.own,
                self._local.broadcast,
                self.protect.allowlist,
            )
        return intrinsic_refusal(parsed) or protection_refusal(
            parsed,
            self._local.own,
            self._local.broadcast,
            self.protect.allowlist,
        )

    def settle(self, change: AnyChange, outcome: Outcome) -> None:
        """After the batch: commit the reservation if the change made a block, else release it."""
        if not isinstance(change, BlockChange) or change.reservation is None:
            return  # nothing reserved (or a readmission without one, settled already)
        result = outcome.result if outcome.error is None else None
        action: object = None
        if isinstance(result, BlockAnswer):
            action = result.action
        elif result is not None:
            action = result.get("action")
        if action == "block":
            self._quota.commit(change.reservation, str(change.address))
            return
        self._quota.release(change.reservation)  # refused, failed, or a hit after all
        if action is not None and not (self.quota_config.admin_exempt and change.peer.is_admin):
            # A hit after all (two requests for one new address in one batch): it wrote a
            # hit row, so it counts against hits_per_minute like any other report.
            self._quota.admit_hit(change.peer.principal, self._monotonic())

    def remember_local(self) -> tuple[LocalView, bool]:
        """What newly_protected() has seen, to look again if its lifts could not be written."""
        return self._seen_local, self.recheck_all

    def restore_local(self, remembered: tuple[LocalView, bool]) -> None:
        self._seen_local, self.recheck_all = remembered

    def newly_protected(self) -> dict[str, str]:
        """Active blocks that the host's current own and broadcast addresses now protect,
        looked for only when those changed (LocalAddresses follows them over netlink): an
        address blocked before it became the host's (a VIP failover) must not stay blocked.
        After a reload that changed the allowlist, every active block is looked at once."""
        local = (self._local.own, self._local.broadcast)
        if self.recheck_all:
            self.recheck_all = False
            self._seen_local = local
            return {
                key: refusal.message
                for key in list(self._active)
                if (refusal := self.protected(stored_address(key)))
            }
        if local == self._seen_local:
            return {}
        added = (local[0] | local[1]) - (self._seen_local[0] | self._seen_local[1])
        self._seen_local = local
        found: dict[str, str] = {}
        # The new addresses themselves, and the few blocks that may hold one: networks and
        # the IPv6 forms that carry an IPv4 address (NAT64, 6to4, Teredo, ::/64's).
        holders = [k for k in self._active if "/" in k or k.startswith(_CARRIERS)]
        for key in [str(a) for a in added] + holders:
            if key in self._active and (refusal := self.protected(stored_address(key))):
                found[key] = refusal.message
        return found
