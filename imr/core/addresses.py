"""Which addresses may be blocked, and why not.

Pure functions: the caller passes in the host's own addresses and the allowlist,
so the rules can be tested without a network stack.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# What one block covers: a single address (anyone with the block role), or a network (admins).
Target = IPAddress | IPNetwork

# Longest textual IPv6 address with an embedded IPv4 tail is 45 characters.
MAX_ADDRESS_TEXT = 64
_ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f.:/%]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]+")
_PREFIX = re.compile(r"0|[1-9][0-9]{0,2}")  # decimal, no leading zeros, no netmask form
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")  # made once: not per check
# IPv6 forms that carry an IPv4 address, and how far above the low bit it sits: through a
# translator (NAT64, SIIT) or a tunnel (6to4) a packet from one of them may stand for the
# IPv4 host, so each is refused when the IPv4 address inside it would be (issue #12).
_EMBEDDINGS: tuple[tuple[ipaddress.IPv6Network, int, str], ...] = (
    (ipaddress.IPv6Network("64:ff9b::/96"), 0, "NAT64, RFC 6052"),
    (ipaddress.IPv6Network("::ffff:0:0:0/96"), 0, "SIIT IPv4-translated, RFC 2765"),
    (ipaddress.IPv6Network("::/96"), 0, "IPv4-compatible, RFC 4291"),
    (_MAPPED, 0, "IPv4-mapped"),
    (ipaddress.IPv6Network("2002::/16"), 80, "6to4, RFC 3056"),
)


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
    TOO_WIDE = "network_too_wide"


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
    # The family is known from the text (only IPv6 has ":"): ip_address() would try IPv4
    # first and pay for its exception on every IPv6 address.
    try:
        if ":" not in text:
            return ipaddress.IPv4Address(text)
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return Refusal(RefusalCode.INVALID, f"{_show(text)} is not an IP address")
    mapped = address.ipv4_mapped
    return address if mapped is None else mapped


def intrinsic_refusal(address: IPAddress) -> Refusal | None:
    """Addresses that can never belong to a remote attacker."""
    if address.is_unspecified:
        return Refusal(RefusalCode.UNSPECIFIED, f"{address} is the unspecified address")
    if isinstance(address, ipaddress.IPv4Address) and address.packed[0] == 0:
        # 0.0.0.0/8, "this network" (RFC 1122): never a packet's source on the wire.
        return Refusal(RefusalCode.UNSPECIFIED, f"{address} is in 0.0.0.0/8 (this network)")
    if address.is_loopback:
        return Refusal(RefusalCode.LOOPBACK, f"{address} is a loopback address")
    if address.is_multicast:
        return Refusal(RefusalCode.MULTICAST, f"{address} is a multicast address")
    if isinstance(address, ipaddress.IPv4Address) and address == _LIMITED_BROADCAST:
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
    """Refuse the host's own addresses, its subnets' broadcast addresses and the allowlist,
    and an IPv6 address that embeds an IPv4 address refused for any reason."""
    found = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if found is not None:
        form, inner = found
        refusal = intrinsic_refusal(inner) or protection_refusal(
            inner, own_addresses, broadcast_addresses, allowlist
        )
        if refusal is not None:
            return Refusal(refusal.code, f"{address} embeds {inner} ({form}): {refusal.message}")
    if address in own_addresses:
        return Refusal(RefusalCode.OWN, f"{address} is an address of this host")
    if address in broadcast_addresses:
        return Refusal(RefusalCode.BROADCAST, f"{address} is a broadcast address of this host")
    for network in allowlist:
        if address.version == network.version and address in network:
            return Refusal(RefusalCode.ALLOWLISTED, f"{address} is in the allowlist ({network})")
    return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, with the name of its form; None if none.

    Teredo (2001::/32) counts too: its client's address, obfuscated in the low bits.
    """
    for prefix, shift, form in _EMBEDDINGS:
        if address in prefix:
            return form, ipaddress.IPv4Address((int(address) >> shift) & 0xFFFFFFFF)
    teredo = address.teredo
    return None if teredo is None else ("Teredo client, RFC 4380", teredo[1])


def parse_network(text: str) -> IPNetwork | Refusal:
    """Parse a network in CIDR form ("203.0.113.0/24"); IPv4-mapped IPv6 becomes IPv4.

    Strict: the prefix is a decimal number (no netmask form) and host bits must
    be zero, so the operator sees exactly what will be blocked.
    """
    if not text or len(text) > MAX_ADDRESS_TEXT or not text.isascii() or not text.isprintable():
        return Refusal(RefusalCode.INVALID, f"{_show(text)} is not a network")
    address_text, slash, prefix_text = text.partition("/")
    if not slash or not _ADDRESS_CHARS.fullmatch(text) or "%" in text:
        return Refusal(
            RefusalCode.INVALID, f"{_show(text)} is not an IP address or a network in CIDR form"
        )
    if not _PREFIX.fullmatch(prefix_text):
        return Refusal(
            RefusalCode.INVALID, f"{_show(text)}: the prefix length must be a decimal number"
        )
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return Refusal(
            RefusalCode.INVALID, f"{_show(text)} is not an IP address or a network in CIDR form"
        )
    if network.network_address != ipaddress.ip_address(address_text):
        return Refusal(
            RefusalCode.INVALID,
            f"{_show(text)} has host bits set; the network is {network}",
        )
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        # Inside ::ffff:0:0/96: the low 32 bits are the IPv4 network.
        mapped = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


def parse_target(text: str) -> Target | Refusal:
    """An address, or a network when the text has a prefix ("/24").

    A full-length prefix ("/32", "/128") is the single address it names.
    """
    if "/" not in text:
        return parse_address(text)
    network = parse_network(text)
    if isinstance(network, Refusal) or network.prefixlen < network.max_prefixlen:
        return network
    return network.network_address


def canonical_target(text: str) -> tuple[Target, str] | Refusal:
    """parse_target(text) and its canonical text (str() of it), cheaply when the text is
    canonical already, as nearly every request's and every state-file row's is.

    ipaddress parses and formats in Python (~5 µs each for IPv6; a flood or a start-up with
    100,000 rows pays that many times). A single address whose text inet_pton accepts and
    inet_ntop prints back unchanged is a bare literal in canonical form (no zone, prefix,
    leading zeros or upper case), so it is built from the packed bytes and the text is its
    str(). Networks, IPv6 with an IPv4 tail (C and Python print those differently, and
    IPv4-mapped ones become IPv4) and anything else take the full parse, with its refusals.
    """
    packed = canonical_packed(text)
    if packed is not None:
        return address_of_packed(packed), text
    parsed = parse_target(text)
    if isinstance(parsed, Refusal):
        return parsed
    return parsed, str(parsed)


def canonical_packed(text: str) -> bytes | None:
    """The packed bytes (4 or 16) of a single address whose text is canonical and has no
    IPv4 tail, so that parse_address(text) is address_of_packed(bytes) and str() of it is
    `text`; None for anything else (networks, other spellings, not an address), which
    needs the full parse."""
    if "/" in text or len(text) > 39:  # longest canonical IPv6 without an IPv4 tail
        return None
    if ":" in text:
        if "." in text:  # C and Python print IPv4 tails differently; mapped ones become IPv4
            return None
        family = socket.AF_INET6
    else:
        family = socket.AF_INET
    try:
        packed = socket.inet_pton(family, text)
    except (OSError, ValueError):  # not an address; NUL or non-ASCII inside
        return None
    return packed if socket.inet_ntop(family, packed) == text else None


def address_of_packed(packed: bytes) -> IPAddress:
    """The address object of 4 or 16 packed bytes."""
    return ipaddress.IPv6Address(packed) if len(packed) == 16 else ipaddress.IPv4Address(packed)


# ::/64 holds the IPv6 unspecified and loopback addresses and the IPv4-compatible,
# IPv4-mapped and SIIT ranges: ProtectionIndex leaves all of it to the full checks (newer
# Pythons' is_loopback & co. look at the IPv4 address inside a mapped one; no byte test to
# keep in step). So it does the other forms that embed an IPv4 address (_EMBEDDINGS, Teredo).
_ZERO_64 = bytes(8)
_NAT64_96 = bytes.fromhex("0064ff9b0000000000000000")
_TEREDO_32 = bytes.fromhex("20010000")


@dataclass(frozen=True, slots=True)
class ProtectionIndex:
    """The checks of intrinsic_refusal and protection_refusal, made on packed bytes.

    Start-up checks every stored row (100,000 of them): through ipaddress objects that is
    1-1.5 µs a row (properties, hashing by hex(), network containment), on the bytes
    ~0.2 µs. `plain` only answers "nothing here can refuse it"; whatever might be refused
    (a special range, an own or broadcast address, the allowlist, ::/80) goes to the
    ipaddress checks in `refusal`, so the verdict and its message are theirs.
    """

    own: frozenset[IPAddress]
    broadcast: frozenset[IPAddress]
    allowlist: tuple[IPNetwork, ...]
    packed: frozenset[bytes]  # own and broadcast addresses, packed (the length is the family)
    # The allowlist as sorted, disjoint (merged) ranges of packed bytes per family: bytes of
    # one length compare as the big-endian numbers they are.
    firsts4: tuple[bytes, ...]
    lasts4: tuple[bytes, ...]
    firsts6: tuple[bytes, ...]
    lasts6: tuple[bytes, ...]

    @classmethod
    def build(
        cls,
        own_addresses: frozenset[IPAddress],
        broadcast_addresses: frozenset[IPAddress],
        allowlist: Iterable[IPNetwork],
    ) -> ProtectionIndex:
        networks = tuple(allowlist)
        firsts4, lasts4 = _merged_ranges((n for n in networks if n.version == 4), 4)
        firsts6, lasts6 = _merged_ranges((n for n in networks if n.version == 6), 16)
        return cls(
            own_addresses,
            broadcast_addresses,
            networks,
            frozenset(a.packed for a in own_addresses | broadcast_addresses),
            firsts4,
            lasts4,
            firsts6,
            lasts6,
        )

    def plain(self, packed: bytes) -> bool:
        """True if no check refuses the address of these 4 or 16 packed bytes; False if
        one may (then `refusal` decides)."""
        first = packed[0]
        if len(packed) == 4:
            # 0/8 (holds 0.0.0.0), 127/8, 224/3 (multicast 224/4 and 255.255.255.255),
            # 169.254/16: wider than the refused ranges where a byte test is simpler.
            if first == 0 or first == 127 or first >= 224 or (first == 169 and packed[1] == 254):
                return False
            firsts, lasts = self.firsts4, self.lasts4
        else:
            # ff00::/8 multicast, fe80::/10 link-local, ::/64 (unspecified, loopback, ...),
            # and the forms that embed an IPv4 address: 6to4, NAT64, Teredo.
            if first == 0xFF or (first == 0xFE and packed[1] & 0xC0 == 0x80):
                return False
            if first == 0 and (packed.startswith(_ZERO_64) or packed.startswith(_NAT64_96)):
                return False
            if first == 0x20 and (packed[1] == 0x02 or packed.startswith(_TEREDO_32)):
                return False
            firsts, lasts = self.firsts6, self.lasts6
        if packed in self.packed:
            return False
        if firsts:
            at = bisect_right(firsts, packed) - 1
            if at >= 0 and packed <= lasts[at]:
                return False
        return True

    def refusal(self, packed: bytes) -> Refusal | None:
        """intrinsic_refusal or protection_refusal of the address of these packed bytes."""
        if self.plain(packed):
            return None
        address = address_of_packed(packed)
        return intrinsic_refusal(address) or protection_refusal(
            address, self.own, self.broadcast, self.allowlist
        )


def _merged_ranges(
    networks: Iterable[IPNetwork], size: int
) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Networks of one family (`size` bytes an address) as sorted, disjoint ranges: (first
    addresses, last addresses), packed. Overlapping or nested networks are merged, so one
    bisect finds the only range an address can be in."""
    merged: list[list[int]] = []
    for first, last in sorted((int(n.network_address), int(n.broadcast_address)) for n in networks):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return (
        tuple(first.to_bytes(size, "big") for first, _ in merged),
        tuple(last.to_bytes(size, "big") for _, last in merged),
    )


# Ranges no network block may touch, with the same codes as single addresses get.
_SPECIAL_NETWORKS: tuple[tuple[IPNetwork, RefusalCode, str], ...] = (
    (ipaddress.IPv4Network("0.0.0.0/8"), RefusalCode.UNSPECIFIED, "0.0.0.0/8 (this network)"),
    (ipaddress.IPv4Network("127.0.0.0/8"), RefusalCode.LOOPBACK, "loopback addresses"),
    (ipaddress.IPv4Network("224.0.0.0/4"), RefusalCode.MULTICAST, "multicast addresses"),
    (ipaddress.IPv4Network("255.255.255.255/32"), RefusalCode.BROADCAST, "the broadcast address"),
    (ipaddress.IPv4Network("169.254.0.0/16"), RefusalCode.LINK_LOCAL, "link-local addresses"),
    (ipaddress.IPv6Network("::/128"), RefusalCode.UNSPECIFIED, "the unspecified address"),
    (ipaddress.IPv6Network("::1/128"), RefusalCode.LOOPBACK, "the loopback address"),
    (ipaddress.IPv6Network("ff00::/8"), RefusalCode.MULTICAST, "multicast addresses"),
    (ipaddress.IPv6Network("fe80::/10"), RefusalCode.LINK_LOCAL, "link-local addresses"),
    (_MAPPED, RefusalCode.INVALID, "IPv4-mapped addresses (block the IPv4 network instead)"),
)


def network_refusal(
    network: IPNetwork,
    min_prefix: Mapping[int, int],
    own_addresses: frozenset[IPAddress],
    broadcast_addresses: frozenset[IPAddress],
    allowlist: Iterable[IPNetwork],
) -> Refusal | None:
    """Refuse a network that is too wide or touches anything a single block may not.

    `min_prefix` maps the IP version to the shortest prefix allowed (the
    configuration's limit); /0 is refused whatever it says.
    """
    widest = max(1, min_prefix[network.version])
    if network.prefixlen < widest:
        return Refusal(
            RefusalCode.TOO_WIDE,
            f"{network} is too wide: IPv{network.version} networks may be /{widest} or longer",
        )
    refusal = _covered(network, own_addresses, broadcast_addresses, allowlist)
    if refusal is None and isinstance(network, ipaddress.IPv6Network):
        for form, inner in _embedded_networks(network):
            found = _covered(inner, own_addresses, broadcast_addresses, allowlist)
            if found is not None:
                return Refusal(found.code, f"{network} embeds {inner} ({form}): {found.message}")
    return refusal


def _embedded_networks(
    network: ipaddress.IPv6Network,
) -> list[tuple[str, ipaddress.IPv4Network]]:
    """The IPv4 networks whose embedded forms (_EMBEDDINGS) the IPv6 network covers: all of
    IPv4 for a network wider than the form's prefix. (Teredo's obfuscated form: not here.)"""
    found = []
    for prefix, shift, form in _EMBEDDINGS:
        if not network.overlaps(prefix):
            continue
        bits = max(0, min(network.prefixlen - prefix.prefixlen, 32))
        inner = (int(network.network_address) >> shift) & 0xFFFFFFFF
        found.append((form, ipaddress.IPv4Network((inner, bits), strict=False)))
    return found


def _covered(
    network: IPNetwork,
    own_addresses: frozenset[IPAddress],
    broadcast_addresses: frozenset[IPAddress],
    allowlist: Iterable[IPNetwork],
) -> Refusal | None:
    """Whether the network touches a special range, an own or broadcast address, or the
    allowlist."""
    for special, code, what in _SPECIAL_NETWORKS:
        if network.version == special.version and network.overlaps(special):
            return Refusal(code, f"{network} covers {what}")
    for address in sorted(own_addresses, key=str):
        if address.version == network.version and address in network:
            return Refusal(
                RefusalCode.OWN, f"{network} contains {address}, an address of this host"
            )
    for address in sorted(broadcast_addresses, key=str):
        if address.version == network.version and address in network:
            return Refusal(
                RefusalCode.BROADCAST,
                f"{network} contains {address}, a broadcast address of this host",
            )
    for allowed in allowlist:
        if allowed.version == network.version and network.overlaps(allowed):
            return Refusal(RefusalCode.ALLOWLISTED, f"{network} overlaps the allowlist ({allowed})")
    return None


def _show(text: str) -> str:
    """Quote untrusted text for a message without letting it forge log lines."""
    shown = text[:MAX_ADDRESS_TEXT]
    suffix = "..." if len(text) > MAX_ADDRESS_TEXT else ""
    return repr(shown + suffix)


def endpoint_text(host: str, port: int | str) -> str:
    """HOST:PORT, an IPv6 address in brackets (as a URL or a log line writes it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
