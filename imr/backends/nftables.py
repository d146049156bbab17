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

This module is the backend: locking, the choice between the paths above, the retry
and the drift check's kernel reads. The table's names and the nft script text live
in imr/backends/nftables_script.py, the packed netlink elements of the two fast
paths in imr/backends/nftables_packed.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
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
    slot_of,
    slot_of_text,
)
from imr.backends.libnftables import LibNftables, NftCommand, Transport
from imr.backends.nftables_packed import encoded_sets, packed_steps
from imr.backends.nftables_script import (
    CHAIN,
    FAMILY,
    MARKERS,
    NETWORK_SLOTS,
    SETS,
    TABLE,
    element_command,
    element_text,
    latest_blocks,
    marker_commands,
    reject_rules,
    replaced_networks,
    structure_script,
    targets_in,
)
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress, Target

log = logging.getLogger("imr.backend")

# The drift check counts an address set's elements (a dump, read in the writer thread) at
# every check while the broker expects at most COUNT_ALWAYS of them, and at most every
# COUNT_INTERVAL seconds beyond; between counts only the marker tells a flush. Measured
# (operations.md, Drift): ~10 ms at 2,000, ~1 s at 100,000, mostly Python reading the dump.
COUNT_ALWAYS = 2_000
COUNT_INTERVAL = 300.0
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


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
        self._rules = reject_rules(config)
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
        return structure_script(self._rules)

    def prepare(self) -> None:
        with self._lock:
            self._transport.run(self._structure())

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        now = time.time()
        if self._writer is not None and self._apply_addresses(self._writer, add, remove, now):
            return
        latest = latest_blocks(add)
        # A block that has already expired is not put in; it is taken out if still there.
        expired = [target for target, block in latest.items() if block.expires_at <= now]
        adding = {target: block for target, block in latest.items() if block.expires_at > now}
        removing = [a for a in dict.fromkeys([*remove, *expired]) if a not in adding]
        if not adding and not removing:
            return
        replaced = replaced_networks(adding, removing)
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
                script += element_command(set_name, touched)
                script += element_command(set_name, touched, "delete")
            if new:
                script += element_command(
                    set_name, [element_text(b.text, b.expires_at, now) for b in new]
                )
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
        steps = packed_steps(latest, [key for key in gone if key not in latest], now)
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
                    nfnetlink.replace_elements(FAMILY, TABLE, encoded_sets(latest, now))
                    return
                except (OSError, ValueError, nfnetlink.NetlinkWriteError) as exc:
                    log.warning(
                        "loading the sets over netlink failed (%s); loading them with nft", exc
                    )
            elements: dict[Slot, list[str]] = {slot: [] for slot in SETS}
            for text, expires_at in latest.items():
                elements[slot_of_text(text)].append(element_text(text, expires_at, now))
            script = self._structure()
            for slot, set_name in SETS.items():
                script += f"flush set {FAMILY} {TABLE} {set_name}\n"
                if elements[slot]:
                    script += element_command(set_name, elements[slot])
            script += marker_commands()
            self._transport.run(script)  # one transaction: the old and new sets never mix

    def installed(self) -> set[Target]:
        with self._lock:
            if not self._has_table():
                return set()
            found: set[Target] = set()
            for slot, set_name in SETS.items():
                listing = self._list(f"list set {FAMILY} {TABLE} {set_name}", missing_ok=True)
                found.update(
                    a for a in targets_in(listing) if slot_of(a) == slot and a != MARKERS.get(slot)
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
