"""What imr's per-address iptables rules look like, and how a change is planned.

Shared by both flavours (see backends/iptables.py for the chain's layout):

* rule shape: the match and verdict every per-address rule has, from the
  configuration, in the `iptables -S` form a chain listing shows;
* guard: the chain's first rule, which lets every packet that is not a new
  connection leave the chain at once;
* plan: the deletes and appends that make the chain block the wanted addresses,
  computed against the rules the kernel has now.
"""

from __future__ import annotations

import functools
import ipaddress
import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from imr.backends import base
from imr.config import FirewallConfig
from imr.core.addresses import Target

Family = Literal[4, 6]
FAMILIES: tuple[Family, ...] = (4, 6)


# ---------------------------------------------------------------------------
# What a rule looks like, shared by both flavours


@dataclass(frozen=True)
class RuleShape:
    """The match and verdict of every per-address rule, from the configuration."""

    protocol: str | None  # None: every protocol
    dports: str | None  # multiport list as iptables prints it, e.g. "80,25,8000:8080"
    reject_with: dict[int, str]  # by address family

    @classmethod
    def from_config(cls, config: FirewallConfig) -> RuleShape:
        protocol = None if config.protocol == "all" else config.protocol
        dports = ",".join(_canonical_port(spec) for spec in config.ports) or None
        return cls(protocol, dports, {4: config.reject_with_ipv4, 6: config.reject_with_ipv6})

    def tokens(self, address: Target) -> list[str]:
        """The rule in `iptables -S` form (without "-A CHAIN"), so it compares with a listing."""
        tokens = ["-s", _cidr(address)]
        if self.protocol:
            tokens += ["-p", self.protocol]
        if self.dports:
            tokens += ["-m", "multiport", "--dports", self.dports]
        return [*tokens, "-j", "REJECT", "--reject-with", self.reject_with[address.version]]


# The first rule of imr's chain: whatever is not a new connection leaves it at once.
GUARD = ["-m", "conntrack", "!", "--ctstate", "NEW", "-j", "RETURN"]
GUARD_TEXT = " ".join(GUARD)


def _canonical_port(spec: str) -> str:
    low, high = base.port_range(spec)
    return str(low) if low == high else f"{low}:{high}"  # as `iptables -S` prints it


def _cidr(target: Target) -> str:
    """A source as `iptables -S` prints it: an address with its full prefix, or the network."""
    if isinstance(target, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return f"{target}/{target.max_prefixlen}"
    return str(target)


@functools.lru_cache(maxsize=1 << 17)  # every change reads every rule's source again
def host_address(text: str) -> Target | None:
    """What a rule's source blocks: an address ("192.0.2.7/32", "192.0.2.7/255.255.255.255")
    or a network ("203.0.113.0/24", "2001:db8::/ffff:ffff::" from python-iptables); None for
    anything else (no source at all, a negated one, a mask with holes)."""
    address_text, _, mask = text.partition("/")
    try:
        address = ipaddress.ip_address(address_text)
        prefix: int
        if not mask:
            prefix = address.max_prefixlen
        elif mask.isdigit():
            prefix = int(mask)
        else:
            bits = int(ipaddress.ip_address(mask))
            prefix = bin(bits).count("1")
            if bits != ((1 << prefix) - 1) << (address.max_prefixlen - prefix):
                return None  # not a prefix
        network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    except ValueError:  # also "!192.0.2.7/32": a negated source is no block
        return None
    if network.prefixlen == network.max_prefixlen:
        return network.network_address
    return network if network.prefixlen > 0 else None  # "0.0.0.0/0": no source given


def _tokens(text: str) -> list[str]:
    """A rule's words. shlex only for quoting: it costs ~1 ms a rule, and every change
    reads the whole chain (with 500 rules shlex took most of a change's time)."""
    if not any(quote in text for quote in _QUOTING):
        return text.split()
    try:
        return shlex.split(text)
    except ValueError:  # quoting we do not understand: not one of ours
        return []


_QUOTING = ('"', "'", "\\")


def _source_of(tokens: Sequence[str]) -> Target | None:
    for index, token in enumerate(tokens[:-1]):
        if token in ("-s", "--source"):
            if index and tokens[index - 1] == "!":
                return None
            return host_address(tokens[index + 1])
    return None


# ---------------------------------------------------------------------------
# Planning a change against the rules the kernel has now

R = TypeVar("R")  # a flavour's handle on one kernel rule


@dataclass
class _Change:
    """What one family's commit changed, so that a failure in the other family can undo it."""

    added: list[Target] = field(default_factory=list)
    removed: list[Target] = field(default_factory=list)


@dataclass
class _Plan(Generic[R]):
    delete: list[R] = field(default_factory=list)
    append: list[Target] = field(default_factory=list)
    change: _Change = field(default_factory=_Change)


def _plan(
    existing: Sequence[tuple[Target | None, R]],
    add: Sequence[Target],
    remove: Sequence[Target],
    is_wanted: Callable[[R, Target], bool],
) -> _Plan[R]:
    """Deletes and appends that make the chain block `add` and not `remove`.

    Only rules the kernel really has are deleted (deleting a missing rule would
    abort the whole batch). An address already blocked by a rule of the wanted
    shape keeps it; rules of another shape (ports changed in the configuration)
    and duplicates are replaced. An address in both lists ends up blocked.
    """
    by_source: dict[Target, list[R]] = {}
    for source, rule in existing:
        if source is not None:
            by_source.setdefault(source, []).append(rule)
    plan: _Plan[R] = _Plan()
    adding = dict.fromkeys(add)  # ordered and without repeats
    for address in dict.fromkeys(remove):
        if address in adding:
            continue
        if rules := by_source.get(address):
            plan.delete += rules
            plan.change.removed.append(address)
    for address in adding:
        rules = by_source.get(address, [])
        keep = next((rule for rule in rules if is_wanted(rule, address)), None)
        plan.delete += [rule for rule in rules if rule is not keep]
        if keep is None:
            plan.append.append(address)
            if not rules:
                plan.change.added.append(address)
    return plan


def _unique(addresses: Iterable[Target]) -> list[Target]:
    return list(dict.fromkeys(addresses))
