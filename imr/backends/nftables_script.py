"""imr's nftables table as nft script text: its names and marker elements, the
structure (sets, chain, reject rules), element commands, and `nft -j` listings read back.

The nftables backend (imr/backends/nftables.py) runs these scripts through a transport
(imr/backends/libnftables.py); this module only writes and reads the text. The names
and the markers are the table's vocabulary for the other nftables modules too: the
packed element steps (imr/backends/nftables_packed.py) and the drift check use them.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from typing import Any

from imr.backends.base import KernelBlock, Slot, port_range
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress, IPNetwork, Target

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
NETWORK_SLOTS: tuple[Slot, ...] = ("net4", "net6")
# Never a real block (the broker refuses broadcast and multicast addresses) and never a
# packet's source (the kernel drops such packets before the input hook): the drift check's
# sign that an address set still holds what imr put there.
MARKERS: dict[Slot, IPAddress] = {
    "v4": ipaddress.IPv4Address("255.255.255.255"),
    "v6": ipaddress.IPv6Address("ff00::"),
}
# The kernel keeps timeouts in milliseconds in 64 bits; a longer block gets no timeout
# (the broker lifts it) rather than a wrapped or refused one.
MAX_TIMEOUT = (2**64 - 1) // 1000 // 1000

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
# The script pieces (apply's network path, replace_all's fallback, the structure)

_SET_KINDS: tuple[tuple[Slot, str, str], ...] = (
    ("v4", "ipv4_addr", "timeout"),
    ("v6", "ipv6_addr", "timeout"),
    # No auto-merge: with it, nft merges neighbouring intervals and their timeouts
    # into one element. The broker never lets two network blocks overlap instead
    # (the kernel refuses overlapping intervals without it).
    ("net4", "ipv4_addr", "interval, timeout"),
    ("net6", "ipv6_addr", "interval, timeout"),
)


def reject_rules(config: FirewallConfig) -> list[str]:
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


def element_text(text: str, expires_at: float, now: float) -> str:
    remaining = math.ceil(expires_at - now)
    return f"{text}{_timeout(remaining) if remaining <= MAX_TIMEOUT else ''}"


def element_command(set_name: str, elements: Sequence[str], verb: str = "add") -> str:
    return f"{verb} element {FAMILY} {TABLE} {set_name} {{ {', '.join(elements)} }}\n"


def marker_commands() -> str:
    """Puts the marker elements back (adding a present element is a no-op)."""
    return "".join(element_command(SETS[slot], [str(marker)]) for slot, marker in MARKERS.items())


def targets_in(listing: Any) -> list[Target]:
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


def latest_blocks(blocks: Sequence[KernelBlock]) -> dict[Target, KernelBlock]:
    """Each target once, as its block with the latest expiry."""
    latest: dict[Target, KernelBlock] = {}
    for block in blocks:
        seen = latest.get(block.address)
        if seen is None or block.expires_at > seen.expires_at:
            latest[block.address] = block
    return latest


def replaced_networks(
    adding: Mapping[Target, KernelBlock], removing: Sequence[Target]
) -> list[Target]:
    """The networks removed that overlap a network added (rare: checked only when both
    lists hold a network)."""
    gone = [t for t in removing if isinstance(t, IPNetwork)]
    if not gone:
        return []
    new = [t for t in adding if isinstance(t, IPNetwork)]
    return [t for t in gone if any(n.version == t.version and n.overlaps(t) for n in new)]


def structure_script(rules: Sequence[str]) -> str:
    """Creates what is missing and rewrites the rules; set elements are kept."""
    sets = "".join(
        f"add set {FAMILY} {TABLE} {SETS[slot]} {{ type {kind}; flags {flags}; }}\n"
        for slot, kind, flags in _SET_KINDS
    )
    rules_text = "".join(f"add rule {FAMILY} {TABLE} {CHAIN} {rule}\n" for rule in rules)
    return (
        f"add table {FAMILY} {TABLE}\n"
        + sets
        + marker_commands()
        + f"add chain {FAMILY} {TABLE} {CHAIN} "
        f"{{ type filter hook input priority {PRIORITY}; policy accept; }}\n"
        f"flush chain {FAMILY} {TABLE} {CHAIN}\n" + rules_text
    )
