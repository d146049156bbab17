"""Blocked addresses as elements of nftables hash sets, with kernel-side timeouts.

imr owns one table and nothing else:

    table inet imr {
        set blocked_v4 { type ipv4_addr; flags timeout; }
        set blocked_v6 { type ipv6_addr; flags timeout; }
        set blocked_net_v4 { type ipv4_addr; flags interval, timeout; }
        set blocked_net_v6 { type ipv6_addr; flags interval, timeout; }
        chain input {
            type filter hook input priority -10; policy accept;
            ip saddr @blocked_v4 ct state new tcp dport { 80, 443 } reject with icmp ...
            ip6 saddr @blocked_v6 ct state new tcp dport { 80, 443 } reject with icmpv6 ...
            ip saddr @blocked_net_v4 ct state new tcp dport { 80, 443 } reject ...
            ip6 saddr @blocked_net_v6 ct state new tcp dport { 80, 443 } reject ...
        }
    }

`ct state new`: a block refuses new connections from the address only. Replies to
the host's own outbound connections (to a database, a resolver, a mail relay a
block-role client named) and connections already open are left alone, as on
every backend (docs/security.md, "Blocking the host's own peers").

A packet costs one hash lookup per family however many addresses are blocked,
and each element carries the block's remaining time as its timeout, so the
kernel lifts a block on time even while the daemon is down. Network blocks
(admin only) live in separate interval sets, so inserting a single address
never pays for interval bookkeeping. Each address set also holds one marker
element (MARKERS) that the drift check looks up: if it is gone, someone
flushed the set. The check also counts the elements (strays: entries no block
accounts for), at every check while the sets are small (see check()).

Priority -10 runs the chain before every filter-priority (0) chain: iptables'
INPUT in both flavours and the usual `inet filter` table. An accept elsewhere
never overrides a reject here anyway (a drop is final in nftables); running
first only means a blocked packet is refused before other rulesets spend time
on it, as the iptables backend's jump at INPUT position 1 does.

Every change is one nftables transaction (all or nothing), run in-process
through libnftables (the library behind `nft`) via ctypes, or through
`nft -f -` if the library cannot be loaded. The libnftables context (and its
netlink socket) is kept between calls: closing an nfnetlink socket waits for
the kernel's deferred release of deleted set elements (an RCU grace period,
~15 ms), so a context per call made every transaction that removed an element
cost that much. The socket belongs to the network namespace it was opened in,
so the context is remade when the calling thread is in another namespace.

Single-address changes (`apply` without networks: every block, hit and expiry)
skip the script: they go as one raw nfnetlink batch on a kept socket
(nfnetlink.ElementWriter), the same add/delete/add steps in one transaction;
if the kernel refuses it (imr's table deleted, say) the script makes the change.

`replace_all` (start-up, drift repair) is the other exception: after the structure
through libnftables, the sets are flushed and filled in one raw nfnetlink batch
(nfnetlink.replace_elements), still one transaction; libnftables took ~0.6 s
to parse and evaluate 100,000 elements as text. If the batch fails, the same
change is made with the nft script, and the log says why.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

from imr.backends import nfnetlink
from imr.backends.base import (
    Backend,
    BackendError,
    Drift,
    Expected,
    KernelBlock,
    Slot,
    port_range,
    slot_of,
    slot_of_text,
)
from imr.backends.libnftables import LibNftables, NftCommand, Transport
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress, IPNetwork, Target

log = logging.getLogger("imr.backend")

TABLE = "imr"
FAMILY = "inet"
CHAIN = "input"
PRIORITY = -10
SETS: dict[Slot, str] = {
    "v4": "blocked_v4",
    "v6": "blocked_v6",
    "net4": "blocked_net_v4",
    "net6": "blocked_net_v6",
}
# Never a real block (the broker refuses broadcast and multicast addresses) and never a
# packet's source (the kernel drops such packets before the input hook): the drift check's
# sign that an address set still holds what imr put there.
NETWORK_SLOTS: tuple[Slot, ...] = ("net4", "net6")
MARKERS: dict[Slot, IPAddress] = {
    "v4": ipaddress.IPv4Address("255.255.255.255"),
    "v6": ipaddress.IPv6Address("ff00::"),
}
# The drift check counts an address set's elements (a dump, read in the writer thread) at
# every check while the broker expects at most COUNT_ALWAYS of them, and at most every
# COUNT_INTERVAL seconds beyond; between counts only the marker tells a flush. Measured
# (operations.md, Drift): ~10 ms at 2,000, ~1 s at 100,000, mostly Python reading the dump.
COUNT_ALWAYS = 2_000
COUNT_INTERVAL = 300.0
# The kernel keeps timeouts in milliseconds in 64 bits; a longer block gets no timeout
# (the broker lifts it) rather than a wrapped or refused one.
MAX_TIMEOUT = (2**64 - 1) // 1000 // 1000
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)

_REJECT_V4 = {
    "icmp-host-unreachable": "reject with icmp type host-unreachable",
    "icmp-port-unreachable": "reject with icmp type port-unreachable",
    "icmp-net-unreachable": "reject with icmp type net-unreachable",
    "icmp-admin-prohibited": "reject with icmp type admin-prohibited",
    "tcp-reset": "reject with tcp reset",
}
_REJECT_V6 = {
    "icmp6-addr-unreachable": "reject with icmpv6 type addr-unreachable",
    "icmp6-port-unreachable": "reject with icmpv6 type port-unreachable",
    "icmp6-adm-prohibited": "reject with icmpv6 type admin-prohibited",
    "icmp6-no-route": "reject with icmpv6 type no-route",
    "tcp-reset": "reject with tcp reset",
}


# ---------------------------------------------------------------------------
# The script pieces

_SET_KINDS: tuple[tuple[Slot, str, str], ...] = (
    ("v4", "ipv4_addr", "timeout"),
    ("v6", "ipv6_addr", "timeout"),
    # No auto-merge: with it, nft merges neighbouring intervals and their timeouts
    # into one element. The broker never lets two network blocks overlap instead
    # (the kernel refuses overlapping intervals without it).
    ("net4", "ipv4_addr", "interval, timeout"),
    ("net6", "ipv6_addr", "interval, timeout"),
)


def _rules(config: FirewallConfig) -> list[str]:
    """One reject rule per set, from the same settings as the iptables backend."""
    protocol = None if config.protocol == "all" else config.protocol
    match = " ct state new"  # new connections only: never a reply to the host's own
    if config.ports:
        ports = ", ".join(_port(spec) for spec in config.ports)
        match += f" {protocol} dport {{ {ports} }}"
    elif protocol:
        match += f" meta l4proto {protocol}"
    v4 = _REJECT_V4[config.reject_with_ipv4]
    v6 = _REJECT_V6[config.reject_with_ipv6]
    return [
        f"ip saddr @{SETS['v4']}{match} {v4}",
        f"ip6 saddr @{SETS['v6']}{match} {v6}",
        f"ip saddr @{SETS['net4']}{match} {v4}",
        f"ip6 saddr @{SETS['net6']}{match} {v6}",
    ]


def _port(spec: str) -> str:
    low, high = port_range(spec)
    return str(low) if low == high else f"{low}-{high}"  # nft writes a range low-high


def _timeout(seconds: int) -> str:
    # nft's parser refuses a number of more than 8 digits in one unit ("value too large"),
    # so far expiries are written as days plus seconds.
    return f" timeout {seconds // 86400}d{seconds % 86400}s"


def _element(text: str, expires_at: float, now: float) -> str:
    remaining = math.ceil(expires_at - now)
    return f"{text}{_timeout(remaining) if remaining <= MAX_TIMEOUT else ''}"


def _elements(set_name: str, elements: Sequence[str], verb: str = "add") -> str:
    return f"{verb} element {FAMILY} {TABLE} {set_name} {{ {', '.join(elements)} }}\n"


def _markers() -> str:
    """Puts the marker elements back (adding a present element is a no-op)."""
    return "".join(_elements(SETS[slot], [str(marker)]) for slot, marker in MARKERS.items())


def _targets_in(listing: Any) -> list[Target]:
    """Addresses and networks of every set element in `nft -j list ...` output."""
    found: list[Target] = []
    for item in listing.get("nftables", []):
        for entry in item.get("set", {}).get("elem", []):
            value = entry["elem"]["val"] if isinstance(entry, dict) else entry
            if isinstance(value, str):
                found.append(ipaddress.ip_address(value))
            elif isinstance(value, dict) and "prefix" in value:
                prefix = value["prefix"]
                found.append(ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}"))
    return found


def _latest(blocks: Sequence[KernelBlock]) -> dict[Target, KernelBlock]:
    """Each target once, as its block with the latest expiry."""
    latest: dict[Target, KernelBlock] = {}
    for block in blocks:
        seen = latest.get(block.address)
        if seen is None or block.expires_at > seen.expires_at:
            latest[block.address] = block
    return latest


def _replaced_networks(
    adding: Mapping[Target, KernelBlock], removing: Sequence[Target]
) -> list[Target]:
    """The networks removed that overlap a network added (rare: checked only when both
    lists hold a network)."""
    gone = [t for t in removing if isinstance(t, IPNetwork)]
    if not gone:
        return []
    new = [t for t in adding if isinstance(t, IPNetwork)]
    return [t for t in gone if any(n.version == t.version and n.overlaps(t) for n in new)]


def _timeout_ms(expires_at: float, now: float) -> int | None:
    """A netlink element's timeout: the remaining time in whole seconds rounded up, as
    `_element` writes it; None (no timeout) beyond what the kernel can hold."""
    remaining = math.ceil(expires_at - now)
    return remaining * 1000 if remaining <= MAX_TIMEOUT else None


def _packed_steps(
    adding: Mapping[bytes, KernelBlock], removing: Sequence[bytes], now: float
) -> list[nfnetlink.Step]:
    """apply()'s change to the address sets as netlink batch steps, the same as its script:
    per set, every touched address added (a no-op if present) and deleted (so the delete
    is always valid: deleting an absent element aborts the whole transaction), then each
    new one added with its remaining time as the timeout (an escalation's new timeout).
    A fresh block (never blocked here) is only added: a third of the kernel's work. Keys
    are packed addresses: 4 bytes for IPv4, 16 for IPv6."""
    touched: dict[int, list[bytes]] = {4: [], 16: []}
    timed: dict[int, list[bytes]] = {4: [], 16: []}
    for key in removing:
        touched[len(key)].append(nfnetlink.address_element(key, None))
    for key, block in adding.items():
        if not block.fresh:
            touched[len(key)].append(nfnetlink.address_element(key, None))
        timed[len(key)].append(nfnetlink.address_element(key, _timeout_ms(block.expires_at, now)))
    steps: list[nfnetlink.Step] = []
    for size, set_name in ((4, SETS["v4"]), (16, SETS["v6"])):
        if touched[size]:
            steps.append((nfnetlink.ADD, set_name, touched[size]))
            steps.append((nfnetlink.DELETE, set_name, touched[size]))
        if timed[size]:
            steps.append((nfnetlink.ADD, set_name, timed[size]))
    return steps


def _encoded(latest: Mapping[str, float], now: float) -> dict[str, list[bytes]]:
    """Every set's elements for `nfnetlink.replace_elements`, markers included: each
    target (canonical text) with its remaining time as the timeout, as `_element` writes it.
    OSError or ValueError for a text that is not an address or network."""
    found: dict[Slot, list[bytes]] = {slot: [] for slot in SETS}
    intervals: dict[Slot, list[tuple[bytes, bytes | None, int | None]]] = {
        slot: [] for slot in NETWORK_SLOTS
    }
    v4, v6 = found["v4"], found["v6"]
    # The common case spelled out (100,000 addresses: a call per element doubles the time).
    head4, head6 = nfnetlink.element_head(4), nfnetlink.element_head(16)
    timeout_head = nfnetlink.TIMEOUT_HEAD
    pton, ceil = socket.inet_pton, math.ceil
    for text, expires_at in latest.items():
        remaining = ceil(expires_at - now)
        if remaining <= MAX_TIMEOUT and "/" not in text:
            ms = (remaining * 1000).to_bytes(8, "big")
            if ":" in text:
                v6.append(head6 + pton(socket.AF_INET6, text) + timeout_head + ms)
            else:
                v4.append(head4 + pton(socket.AF_INET, text) + timeout_head + ms)
            continue
        timeout = _timeout_ms(expires_at, now)
        if "/" not in text:
            family = socket.AF_INET6 if ":" in text else socket.AF_INET
            found[slot_of_text(text)].append(nfnetlink.address_element(pton(family, text), timeout))
            continue
        network = ipaddress.ip_network(text)  # admin blocks: a few
        after = int(network.broadcast_address) + 1
        end = (
            after.to_bytes(len(network.network_address.packed), "big")
            if after < (1 << network.max_prefixlen)
            else None
        )
        intervals[slot_of(network)].append((network.network_address.packed, end, timeout))
    for slot, marker in MARKERS.items():
        found[slot].append(nfnetlink.address_element(marker.packed, None))
    for slot, spans in intervals.items():
        found[slot] = nfnetlink.interval_elements(sorted(spans))
    return {SETS[slot]: found[slot] for slot in SETS}


# ---------------------------------------------------------------------------
# The backend


class NftablesBackend(Backend):
    name = "nftables"

    def __init__(
        self,
        config: FirewallConfig,
        use_library: bool = True,
        bulk_netlink: bool = True,
        element_netlink: bool = True,
    ) -> None:
        """`use_library=False` forces `nft -f -` (the fallback), `bulk_netlink=False` the
        script for `replace_all`, `element_netlink=False` the script for `apply`: for tests
        and comparison."""
        self.config = config
        self._bulk_netlink = bulk_netlink
        self._rules = _rules(config)
        self._transport: Transport
        why = ""
        if use_library:
            try:
                self._transport = LibNftables()
            except OSError as exc:
                why = f"; libnftables.so.1 not loadable: {exc}"
                self._transport = NftCommand()
        else:
            self._transport = NftCommand()
        self._via = self._transport.label + why
        # Single-address changes (every block, hit and expiry) as raw netlink batches on a
        # kept socket: one sendmsg, no script to parse, no cache to fetch (libnftables made
        # ~10 netlink round trips before each change). Networks and failures: the script.
        self._writer = nfnetlink.ElementWriter(FAMILY, TABLE) if element_netlink else None
        # One change at a time: the structure check and the retry must not interleave.
        self._lock = threading.Lock()
        self._counted: dict[Slot, float] = {}  # when check() last counted an address set

    def describe(self) -> str:
        return (
            f"nftables (table {FAMILY} {TABLE}: hash sets {SETS['v4']}/{SETS['v6']} with "
            f"kernel-side timeouts, one lookup per packet at any size, networks in interval "
            f"sets {SETS['net4']}/{SETS['net6']}; via {self._via})"
        )

    def _structure(self) -> str:
        """Creates what is missing and rewrites the rules; set elements are kept."""
        sets = "".join(
            f"add set {FAMILY} {TABLE} {SETS[slot]} {{ type {kind}; flags {flags}; }}\n"
            for slot, kind, flags in _SET_KINDS
        )
        rules = "".join(f"add rule {FAMILY} {TABLE} {CHAIN} {rule}\n" for rule in self._rules)
        return (
            f"add table {FAMILY} {TABLE}\n"
            + sets
            + _markers()
            + f"add chain {FAMILY} {TABLE} {CHAIN} "
            f"{{ type filter hook input priority {PRIORITY}; policy accept; }}\n"
            f"flush chain {FAMILY} {TABLE} {CHAIN}\n" + rules
        )

    def prepare(self) -> None:
        with self._lock:
            self._transport.run(self._structure())

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        now = time.time()
        if self._writer is not None and self._apply_addresses(self._writer, add, remove, now):
            return
        latest = _latest(add)
        # A block that has already expired is not put in; it is taken out if still there.
        expired = [target for target, block in latest.items() if block.expires_at <= now]
        adding = {target: block for target, block in latest.items() if block.expires_at > now}
        removing = [a for a in dict.fromkeys([*remove, *expired]) if a not in adding]
        if not adding and not removing:
            return
        replaced = _replaced_networks(adding, removing)
        if replaced:
            # nft refuses an interval overlapping one the set holds, even one deleted
            # earlier in the same transaction ("interval overlaps with an existing one",
            # nft 1.0.6): the networks a wider one replaces (a superseded escalation,
            # docs/policy.md) leave first, in a transaction of their own. Should the second
            # fail, the batch fails and the drift check puts them back from the state.
            self.apply([], replaced)
            removing = [t for t in removing if t not in replaced]
        script = ""
        for slot, set_name in SETS.items():
            gone = [str(a) for a in removing if slot_of(a) == slot]
            new = [block for a, block in adding.items() if slot_of(a) == slot]
            # Deleting an absent element aborts the whole transaction and nft 1.0.6 has no
            # `destroy`; adding first (a no-op for a present element) makes the delete always
            # valid. Re-adding does not change a present element's timeout either, so every
            # added address is deleted and added again with its own timeout (an escalation).
            # block.text, not str(): ipaddress's str() is slow.
            touched = gone + [block.text for block in new]
            if touched:
                script += _elements(set_name, touched)
                script += _elements(set_name, touched, "delete")
            if new:
                script += _elements(set_name, [_element(b.text, b.expires_at, now) for b in new])
        if not script:
            return
        with self._lock:
            try:
                self._transport.run(script)
            except BackendError:
                if self._complete():
                    raise
                # Someone deleted imr's table (or a part of it): build it again, then retry.
                log.warning("nftables table %s %s is incomplete; creating it again", FAMILY, TABLE)
                self._transport.run(self._structure() + script)

    def _apply_addresses(
        self,
        writer: nfnetlink.ElementWriter,
        add: Sequence[KernelBlock],
        remove: Sequence[Target],
        now: float,
    ) -> bool:
        """apply() of addresses only (every block, hit and expiry) as one netlink batch;
        False if a network is among them or the kernel refused the batch (then apply's
        general path, with the nft script). The same change as that path, keyed by the
        packed address: hashing ipaddress objects (a Python __hash__) and the general
        path's passes cost ~25 µs of a one-block batch (bench/one_address.py)."""
        if not all(isinstance(t, _ADDRESS_TYPES) for t in remove):
            return False
        latest: dict[bytes, KernelBlock] = {}  # 4 or 16 bytes: the families never collide
        for block in add:
            address = block.address
            if not isinstance(address, _ADDRESS_TYPES):
                return False
            key = address.packed
            seen = latest.get(key)
            if seen is None or block.expires_at > seen.expires_at:
                latest[key] = block
        gone = dict.fromkeys(cast(IPAddress, t).packed for t in remove)
        for key, block in list(latest.items()):
            if block.expires_at <= now:  # already expired: not put in, taken out if there
                del latest[key]
                gone[key] = None
        if not latest and not gone:
            return True
        steps = _packed_steps(latest, [key for key in gone if key not in latest], now)
        with self._lock:
            try:
                writer.commit(steps)
                return True
            except (OSError, nfnetlink.NetlinkWriteError) as exc:
                # Refused as a whole (imr's table deleted, say): apply's nft script makes the
                # same change, rebuilds what is missing, or says why not.
                log.info("nftables change over netlink failed (%s); using nft", exc)
                return False

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        now = time.time()
        # One pass over the blocks, by their canonical text (100,000 at start-up: hashing
        # and formatting ipaddress objects here cost a second).
        latest: dict[str, float] = {}
        for block in blocks:
            if block.expires_at > latest.get(block.text, now):
                latest[block.text] = block.expires_at
        with self._lock:
            if self._bulk_netlink:
                # The structure (which keeps elements) through nft, then every set flushed
                # and filled in one netlink batch: one kernel transaction, so the old and
                # new sets never mix. ~0.25 s at 100,000 against ~0.6 s for libnftables
                # parsing the same as a script.
                self._transport.run(self._structure())
                try:
                    nfnetlink.replace_elements(FAMILY, TABLE, _encoded(latest, now))
                    return
                except (OSError, ValueError, nfnetlink.NetlinkWriteError) as exc:
                    log.warning(
                        "loading the sets over netlink failed (%s); loading them with nft", exc
                    )
            elements: dict[Slot, list[str]] = {slot: [] for slot in SETS}
            for text, expires_at in latest.items():
                elements[slot_of_text(text)].append(_element(text, expires_at, now))
            script = self._structure()
            for slot, set_name in SETS.items():
                script += f"flush set {FAMILY} {TABLE} {set_name}\n"
                if elements[slot]:
                    script += _elements(set_name, elements[slot])
            script += _markers()
            self._transport.run(script)  # one transaction: the old and new sets never mix

    def installed(self) -> set[Target]:
        with self._lock:
            if not self._has_table():
                return set()
            found: set[Target] = set()
            for slot, set_name in SETS.items():
                listing = self._list(f"list set {FAMILY} {TABLE} {set_name}", missing_ok=True)
                found.update(
                    a for a in _targets_in(listing) if slot_of(a) == slot and a != MARKERS.get(slot)
                )
            return found

    def check(self, expected: Mapping[Slot, Expected]) -> Drift:
        """Structure and markers through raw netlink: a few lookups, at any set size.

        Counting a hash set's elements means dumping them all (0.2 s of kernel
        time at 100,000), so the address sets carry a marker element (MARKERS),
        looked up at every check: a flush or a deleted set takes it away. They
        are counted as well (strays, elements deleted by hand) at every check
        while small, at most every COUNT_INTERVAL once big. The network sets
        are small (admin blocks only) and are counted every time.
        """
        with self._lock:
            try:
                return self._check(expected)
            except (OSError, nfnetlink.NetlinkReadError) as exc:
                raise BackendError(f"cannot read table {FAMILY} {TABLE}: {exc}") from None

    def _check(self, expected: Mapping[Slot, Expected]) -> Drift:
        shape = nfnetlink.table_shape(FAMILY, TABLE)
        structure: list[str] = []
        entries: list[str] = []
        if not shape.sets and not shape.chains:
            structure.append(f"table {FAMILY} {TABLE} is missing")
        else:
            structure += [
                f"set {FAMILY} {TABLE} {name} is missing"
                for name in SETS.values()
                if name not in shape.sets
            ]
            if CHAIN not in shape.chains:
                structure.append(f"chain {FAMILY} {TABLE} {CHAIN} is missing")
            else:
                rules = nfnetlink.rule_count(FAMILY, TABLE, CHAIN)
                if rules != len(self._rules):
                    structure.append(
                        f"chain {FAMILY} {TABLE} {CHAIN} holds {rules} rules, "
                        f"expected {len(self._rules)}"
                    )
        for slot, marker in MARKERS.items():
            name = SETS[slot]
            if not nfnetlink.has_element(FAMILY, TABLE, name, marker.packed):
                entries.append(
                    f"set {FAMILY} {TABLE} {name} lost its marker element {marker} "
                    f"(flushed or deleted); expected {expected[slot]} entries"
                )
            elif self._count_due(slot, expected[slot]):
                # Less the marker. Finds strays (an element the state does not hold, say
                # left by a request the broker refused) and elements deleted by hand.
                count = max((nfnetlink.element_count(FAMILY, TABLE, name) or 0) - 1, 0)
                if count not in expected[slot]:
                    entries.append(
                        f"set {FAMILY} {TABLE} {name} holds {count} addresses, "
                        f"expected {expected[slot]}"
                    )
        counts: dict[Slot, int] = {
            slot: nfnetlink.element_count(FAMILY, TABLE, SETS[slot], intervals=True) or 0
            for slot in NETWORK_SLOTS
        }
        entries += [
            f"set {FAMILY} {TABLE} {SETS[slot]} holds {count} networks, expected {expected[slot]}"
            for slot, count in counts.items()
            if count not in expected[slot]
        ]
        return Drift(tuple(structure), tuple(entries))

    def _count_due(self, slot: Slot, expected: Expected) -> bool:
        """Whether to count an address set's elements in this check: always while it is
        small, at most every COUNT_INTERVAL once it is big (reading 100,000 elements
        takes over a second, most of it Python's)."""
        now = time.monotonic()
        if expected.high > COUNT_ALWAYS and now - self._counted.get(slot, -math.inf) < (
            COUNT_INTERVAL
        ):
            return False
        self._counted[slot] = now
        return True

    def close(self) -> None:
        with self._lock:
            self._transport.close()
            if self._writer is not None:
                self._writer.close()

    def teardown(self) -> None:
        with self._lock:
            # "add" first so that the delete is valid whether or not the table exists.
            self._transport.run(f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")

    # -- reading ---------------------------------------------------------------

    def _list(self, command: str, missing_ok: bool = False) -> Any:
        try:
            output = self._transport.run(command, json_output=True)
        except BackendError:
            if missing_ok:
                return {}
            raise
        try:
            return json.loads(output)
        except ValueError as exc:
            raise BackendError(f"unreadable nft JSON output: {exc}") from None

    def _has_table(self) -> bool:
        listing = self._list(f"list tables {FAMILY}")
        return any(
            item.get("table", {}).get("name") == TABLE for item in listing.get("nftables", [])
        )

    def _complete(self) -> bool:
        """Whether imr's table has its sets and its chain (read over netlink: nft would
        fetch every element first)."""
        try:
            shape = nfnetlink.table_shape(FAMILY, TABLE)
        except (OSError, nfnetlink.NetlinkReadError):
            return False  # the retry with the full structure decides
        return set(SETS.values()) <= shape.sets and CHAIN in shape.chains
