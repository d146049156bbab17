"""Per-address REJECT rules in imr's own iptables chain, for IPv4 and IPv6.

Layout (the same for both address families):

    -A INPUT -j IMR                      inserted once, at position 1, by prepare()
    -A IMR -m conntrack ! --ctstate NEW -j RETURN            the guard, always first
    -A IMR -s 192.0.2.7/32 -p tcp -m multiport --dports 80,443 -j REJECT --reject-with ...
    -A IMR -s 203.0.113.0/24 -p tcp ...  a network block (admin only): one rule as well

The guard: a block refuses new connections only, never a reply to one of the
host's own outbound connections or a connection already open (as the nftables
and ipset backends do), and such packets leave the chain at its first rule
instead of walking every per-address rule. It is there from prepare() on, so
the kernel tracks connections before the first block: a connection first seen
mid-stream counts as new, and its packets would be refused.

A host runs one of two iptables flavours and mixing them is never right:

* nft: the Debian 12 default (iptables-nft). Every change is one
  `iptables-nft-restore --noflush` batch on stdin, which the kernel applies as
  one nf_tables transaction: all of it or nothing.
* legacy: the old x_tables kernel interface. Per-address changes are one
  `iptables-legacy-restore -w --noflush` batch (one commit of the table under
  the xtables lock); structure (prepare, replace_all, teardown) goes through
  python-iptables (libiptc), one handle and one commit under the same lock.
  python-iptables built a Python object for every rule of the chain on each
  change: 0.5 s a change at 500 rules.

A change reads the chain only when it must: after a change the driver keeps
the chain as that change left it (in that network namespace), so the next
change is one process. A rule deleted behind its back makes the batch's delete
fail, and the whole batch is refused, so the chain is read and the change made
again; a chain flushed behind its back is drift, which the check finds.

IPv4 and IPv6 are separate tables, so a batch touching both is two commits;
if the second fails, the first is undone (best effort, logged if that fails too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence

from imr.backends.base import Backend, BackendError, Drift, Expected, KernelBlock, Slot
from imr.backends.iptables_drivers import _Driver, _LegacyDriver, _NftDriver
from imr.backends.iptables_rules import FAMILIES, GUARD_TEXT, Family, RuleShape, _Change
from imr.backends.xtables import FLAVOUR_LABELS, Flavour, resolve_flavour
from imr.config import FirewallConfig
from imr.core.addresses import Target

log = logging.getLogger("imr.backend")

_SLOTS_OF: dict[Family, tuple[Slot, Slot]] = {4: ("v4", "net4"), 6: ("v6", "net6")}


# ---------------------------------------------------------------------------
# The backend


class IptablesBackend(Backend):
    name = "iptables"

    def __init__(self, config: FirewallConfig, flavour: str | None = None) -> None:
        """`flavour` overrides config.iptables_flavour: "auto", "nft" or "legacy"."""
        chosen, self._origin = resolve_flavour(config, flavour)
        self.config = config
        shape = RuleShape.from_config(config)
        self._driver: _Driver = (
            _NftDriver(config.chain, shape)
            if chosen == "nft"
            else _LegacyDriver(config.chain, shape)
        )
        # One change at a time: each is read, plan, write, which must not interleave.
        self._lock = threading.Lock()

    @property
    def flavour(self) -> Flavour:
        return self._driver.flavour

    def describe(self) -> str:
        return f"iptables ({FLAVOUR_LABELS[self.flavour]} flavour: {self._origin})"

    def prepare(self) -> None:
        with self._lock:
            for family in FAMILIES:
                self._driver.prepare(family)

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[Target]) -> None:
        adds = _by_family(block.address for block in add)
        removes = _by_family(remove)
        with self._lock:
            done: list[tuple[Family, _Change]] = []
            try:
                for family in FAMILIES:
                    if adds[family] or removes[family]:
                        change = self._driver.apply(family, adds[family], removes[family])
                        done.append((family, change))
            except BackendError:
                for family, change in done:
                    try:
                        self._driver.apply(family, change.removed, change.added)
                    except BackendError as exc:
                        log.error(
                            "could not undo the IPv%d half of a failed change: %s", family, exc
                        )
                raise

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        wanted = _by_family(block.address for block in blocks)
        with self._lock:
            done: list[tuple[Family, list[Target]]] = []
            try:
                for family in FAMILIES:
                    done.append((family, self._driver.replace_all(family, wanted[family])))
            except BackendError:
                for family, previous in done:
                    try:
                        self._driver.replace_all(family, previous)
                    except BackendError as exc:
                        log.error(
                            "could not undo the IPv%d half of a failed change: %s", family, exc
                        )
                raise

    def installed(self) -> set[Target]:
        with self._lock:
            return {address for family in FAMILIES for address in self._driver.installed(family)}

    def teardown(self) -> None:
        with self._lock:
            for family in FAMILIES:
                self._driver.teardown(family)

    def check(self, expected: Mapping[Slot, Expected]) -> Drift:
        """Chain, jump and rule count per family (one rule per address or network)."""
        structure: list[str] = []
        entries: list[str] = []
        with self._lock:
            for family in FAMILIES:
                tool = f"{'iptables' if family == 4 else 'ip6tables'}-{self.flavour}"
                survey = self._driver.survey(family)
                single, network = (expected[slot] for slot in _SLOTS_OF[family])
                wanted = Expected(single.low + network.low, single.high + network.high)
                if not survey.chain:
                    structure.append(f"chain {self._driver.chain} is missing ({tool})")
                elif survey.jumps == 0:
                    structure.append(
                        f"the jump from INPUT to {self._driver.chain} is missing ({tool})"
                    )
                if survey.chain and not survey.guard:
                    # Lost with the rules (a flush, say): replace_all puts both back.
                    entries.append(
                        f"chain {self._driver.chain} ({tool}) lost its first rule "
                        f"({GUARD_TEXT}: new connections only)"
                    )
                if survey.rules not in wanted:
                    entries.append(
                        f"chain {self._driver.chain} ({tool}) holds {survey.rules} rules, "
                        f"expected {wanted}"
                    )
        return Drift(tuple(structure), tuple(entries))


def _by_family(addresses: Iterable[Target]) -> dict[Family, list[Target]]:
    split: dict[Family, list[Target]] = {4: [], 6: []}
    for address in addresses:
        split[4 if address.version == 4 else 6].append(address)
    return split
