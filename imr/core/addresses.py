"""Which addresses may be blocked, and why not.

Pure functions: the caller passes in the host's own addresses and the allowlist,
so the rules can be tested without a network stack.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Longest textual IPv6 address with an embedded IPv4 tail is 45 characters.
MAX_ADDRESS_TEXT = 64
_ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f.:/%]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]+")


class RefusalCode(StrEnum):
    INVALID = "invalid_address"
    NETWORK = "network_not_allowed"
    UNSPECIFIED = "unspecified_address"
    MULTICAST = "multicast_address"
    BROADCAST = "broadcast_address"
    LOOPBACK = "loopback_address"
    LINK_LOCAL = "link_local_address"
    OWN = "own_address"
    ALLOWLISTED = "allowlisted"


@dataclass(frozen=True)
class Refusal:
    code: RefusalCode
    message: str


def parse_address(text: str) -> IPAddress | Refusal:
    """Parse one IPv4 or IPv6 address; IPv4-mapped IPv6 becomes plain IPv4.

    Only the canonical forms Python's ipaddress accepts are taken: no
    "127.1", no leading zeros, no zone index, no hostnames.
    """
    if not text or len(text) > MAX_ADDRESS_TEXT or not text.isascii() or not text.isprintable():
        return Refusal(RefusalCode.INVALID, f"{_show(text)} is not an IP address")
    if not _ADDRESS_CHARS.fullmatch(text):
        if _HOSTNAME.fullmatch(text):
            return Refusal(
                RefusalCode.INVALID, f"{_show(text)} looks like a host name; give an IP address"
            )
        return Refusal(RefusalCode.INVALID, f"{_show(text)} is not an IP address")
    if "/" in text:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            return Refusal(RefusalCode.INVALID, f"{_show(text)} is not an IP address")
        return Refusal(
            RefusalCode.NETWORK,
            f"{_show(text)} is a network; only single addresses can be blocked",
        )
    if "%" in text:
        return Refusal(RefusalCode.INVALID, f"{_show(text)}: zone indexes are not accepted")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return Refusal(RefusalCode.INVALID, f"{_show(text)} is not an IP address")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address


def intrinsic_refusal(address: IPAddress) -> Refusal | None:
    """Addresses that can never belong to a remote attacker."""
    if address.is_unspecified:
        return Refusal(RefusalCode.UNSPECIFIED, f"{address} is the unspecified address")
    if address.is_loopback:
        return Refusal(RefusalCode.LOOPBACK, f"{address} is a loopback address")
    if address.is_multicast:
        return Refusal(RefusalCode.MULTICAST, f"{address} is a multicast address")
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return Refusal(RefusalCode.BROADCAST, f"{address} is the broadcast address")
    if address.is_link_local:
        # Link-local peers are on our own segment (routers, neighbours): blocking
        # them by mistake can cut the host off, and scanners do not come from there.
        return Refusal(RefusalCode.LINK_LOCAL, f"{address} is a link-local address")
    return None


def protection_refusal(
    address: IPAddress,
    own_addresses: frozenset[IPAddress],
    broadcast_addresses: frozenset[IPAddress],
    allowlist: Iterable[IPNetwork],
) -> Refusal | None:
    """Refuse the host's own addresses, its subnets' broadcast addresses and the allowlist."""
    if address in own_addresses:
        return Refusal(RefusalCode.OWN, f"{address} is an address of this host")
    if address in broadcast_addresses:
        return Refusal(RefusalCode.BROADCAST, f"{address} is a broadcast address of this host")
    for network in allowlist:
        if address.version == network.version and address in network:
            return Refusal(RefusalCode.ALLOWLISTED, f"{address} is in the allowlist ({network})")
    return None


def _show(text: str) -> str:
    """Quote untrusted text for a message without letting it forge log lines."""
    shown = text[:MAX_ADDRESS_TEXT]
    suffix = "..." if len(text) > MAX_ADDRESS_TEXT else ""
    return repr(shown + suffix)
