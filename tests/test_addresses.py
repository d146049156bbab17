"""Address validation: what may be blocked, and the reason when not."""

from __future__ import annotations

import ipaddress
import random

import pytest

from imr.core.addresses import (
    IPAddress,
    IPNetwork,
    ProtectionIndex,
    Refusal,
    RefusalCode,
    address_of_packed,
    canonical_packed,
    canonical_target,
    intrinsic_refusal,
    network_refusal,
    parse_address,
    parse_network,
    parse_target,
    protection_refusal,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::bad", "2001:db8::bad"),
        ("2001:DB8:0:0::BAD", "2001:db8::bad"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4-mapped is normalised
    ],
)
def test_valid_addresses_are_normalised(text: str, expected: str) -> None:
    assert str(parse_address(text)) == expected


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", RefusalCode.INVALID),
        ("127.1", RefusalCode.INVALID),
        ("203.0.113.07", RefusalCode.INVALID),
        ("1.2.3.4; rm -rf /", RefusalCode.INVALID),
        ("evil.example.com", RefusalCode.INVALID),
        ("203.0.113.0/24", RefusalCode.NETWORK),
        ("0.0.0.0/0", RefusalCode.NETWORK),
        ("fe80::1%eth0", RefusalCode.INVALID),
        ("203.0.113.7\n", RefusalCode.INVALID),
        ("x" * 500, RefusalCode.INVALID),
    ],
)
def test_malformed_input_is_refused(text: str, code: RefusalCode) -> None:
    result = parse_address(text)
    assert isinstance(result, Refusal)
    assert result.code is code
    assert "\n" not in result.message


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("0.0.0.0", RefusalCode.UNSPECIFIED),
        ("::", RefusalCode.UNSPECIFIED),
        ("127.0.0.1", RefusalCode.LOOPBACK),
        ("127.200.0.1", RefusalCode.LOOPBACK),
        ("::1", RefusalCode.LOOPBACK),
        ("::ffff:127.0.0.1", RefusalCode.LOOPBACK),
        ("224.0.0.1", RefusalCode.MULTICAST),
        ("ff02::1", RefusalCode.MULTICAST),
        ("255.255.255.255", RefusalCode.BROADCAST),
        ("169.254.1.1", RefusalCode.LINK_LOCAL),
        ("fe80::1", RefusalCode.LINK_LOCAL),
    ],
)
def test_addresses_that_are_never_attackers(text: str, code: RefusalCode) -> None:
    address = parse_address(text)
    assert not isinstance(address, Refusal)
    refusal = intrinsic_refusal(address)
    assert refusal is not None and refusal.code is code


def test_documentation_addresses_are_blockable() -> None:
    for text in ("192.0.2.1", "198.51.100.23", "203.0.113.50", "2001:db8::bad"):
        address = parse_address(text)
        assert not isinstance(address, Refusal)
        assert intrinsic_refusal(address) is None


def test_own_broadcast_and_allowlisted_addresses_are_protected() -> None:
    own = frozenset({ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")})
    broadcast = frozenset({ipaddress.ip_address("192.0.2.255")})
    allow = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:1::/48")]

    def check(text: str) -> RefusalCode | None:
        address = parse_address(text)
        assert not isinstance(address, Refusal)
        refusal = protection_refusal(address, own, broadcast, allow)
        return refusal.code if refusal else None

    assert check("192.0.2.1") is RefusalCode.OWN
    assert check("2001:db8::1") is RefusalCode.OWN
    assert check("192.0.2.255") is RefusalCode.BROADCAST
    assert check("198.51.100.77") is RefusalCode.ALLOWLISTED
    assert check("2001:db8:1::5") is RefusalCode.ALLOWLISTED
    assert check("203.0.113.9") is None
    assert check("2001:db8:2::5") is None


# Networks (admin only; the broker checks the role) ----------------------------------

LIMITS = {4: 16, 6: 32}
OWN = frozenset({ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")})
BROADCAST = frozenset({ipaddress.ip_address("192.0.2.255")})
ALLOW = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:1::/48")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("203.0.0.0/16", "203.0.0.0/16"),
        ("2001:DB8:5::/48", "2001:db8:5::/48"),
        ("::ffff:203.0.113.0/120", "203.0.113.0/24"),  # IPv4-mapped is normalised
    ],
)
def test_networks_are_parsed_and_normalised(text: str, expected: str) -> None:
    assert str(parse_network(text)) == expected
    assert str(parse_target(text)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("203.0.113.7/24", "has host bits set; the network is 203.0.113.0/24"),
        ("203.0.113.0/024", "prefix length must be a decimal number"),
        ("203.0.113.0/255.255.255.0", "prefix length must be a decimal number"),
        ("203.0.113.0/33", "is not an IP address or a network in CIDR form"),
        ("203.0.113.0/", "prefix length must be a decimal number"),
        ("203.0.113.0", "is not an IP address or a network in CIDR form"),
        ("fe80::/64%eth0", "is not an IP address or a network in CIDR form"),
        ("203.0.113.0/24; rm -rf /", "is not an IP address or a network in CIDR form"),
        ("evil.example.com/24", "is not an IP address or a network in CIDR form"),
        ("203.0.113.0/24\n", "is not a network"),
    ],
)
def test_malformed_networks_are_refused(text: str, message: str) -> None:
    result = parse_network(text)
    assert isinstance(result, Refusal)
    assert result.code is RefusalCode.INVALID
    assert message in result.message
    assert "\n" not in result.message


def test_a_full_length_prefix_is_a_single_address() -> None:
    assert parse_target("203.0.113.7/32") == ipaddress.ip_address("203.0.113.7")
    assert parse_target("2001:db8::7/128") == ipaddress.ip_address("2001:db8::7")
    assert parse_target("203.0.113.7") == ipaddress.ip_address("203.0.113.7")
    assert isinstance(parse_target("127.1"), Refusal)


def network_check(text: str, limits: dict[int, int] = LIMITS) -> RefusalCode | None:
    network = parse_network(text)
    assert not isinstance(network, Refusal), network
    refusal = network_refusal(network, limits, OWN, BROADCAST, ALLOW)
    assert refusal is None or "\n" not in refusal.message
    return refusal.code if refusal else None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("203.0.113.0/24", None),
        ("203.0.0.0/16", None),
        ("2001:db8:5::/48", None),
        ("2001:db9::/32", None),
        ("203.0.0.0/15", RefusalCode.TOO_WIDE),
        ("0.0.0.0/0", RefusalCode.TOO_WIDE),
        ("::/0", RefusalCode.TOO_WIDE),
        ("2001:db8::/31", RefusalCode.TOO_WIDE),
        ("127.0.0.0/16", RefusalCode.LOOPBACK),
        ("0.0.0.0/16", RefusalCode.UNSPECIFIED),
        ("224.0.0.0/24", RefusalCode.MULTICAST),
        ("255.255.0.0/16", RefusalCode.BROADCAST),
        ("169.254.0.0/16", RefusalCode.LINK_LOCAL),
        ("::/32", RefusalCode.UNSPECIFIED),
        ("ff02::/32", RefusalCode.MULTICAST),
        ("fe80::/64", RefusalCode.LINK_LOCAL),
        ("::fffe:0:0/95", RefusalCode.INVALID),  # holds the IPv4-mapped range
        ("192.0.2.0/24", RefusalCode.OWN),  # holds 192.0.2.1
        ("2001:db8::/48", RefusalCode.OWN),
        ("192.0.2.128/25", RefusalCode.BROADCAST),  # holds 192.0.2.255, not .1
        ("198.51.100.128/25", RefusalCode.ALLOWLISTED),  # inside the allowlist
        ("198.51.0.0/16", RefusalCode.ALLOWLISTED),  # contains the allowlist
        ("2001:db8:1:5::/64", RefusalCode.ALLOWLISTED),
    ],
)
def test_network_refusals(text: str, code: RefusalCode | None) -> None:
    assert network_check(text) is code


def test_the_width_limit_comes_from_the_caller_but_never_allows_everything() -> None:
    assert network_check("203.0.0.0/16", {4: 24, 6: 64}) is RefusalCode.TOO_WIDE
    assert network_check("203.0.0.0/16", {4: 8, 6: 32}) is None
    assert network_check("0.0.0.0/0", {4: 0, 6: 0}) is RefusalCode.TOO_WIDE
    network = parse_network("203.0.0.0/15")
    assert not isinstance(network, Refusal)
    refusal = network_refusal(network, LIMITS, OWN, BROADCAST, ALLOW)
    assert refusal is not None
    assert refusal.message == "203.0.0.0/15 is too wide: IPv4 networks may be /16 or longer"


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "::",
        "255.255.255.255",
        "224.0.0.1",
        "ff02::1",
        "fe80::1",
        "fe80::1%eth0",
        "01.2.3.4",
        "127.1",
        "1.2.3.4; rm -rf /",
        "203.0.113.7\x00",
        "2001:db8::1::2",
        "2001:DB8::7",
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
        "203.0.113.0/24",
        "203.0.113.7/32",
        "example.org",
        "\uff12\uff10\uff13.0.113.7",  # full-width digits
    ],
)
def test_canonical_target_agrees_with_the_full_parse(text: str) -> None:
    """The C fast path for requests may only differ in speed: same target, same refusal."""
    parsed = parse_target(text)
    if isinstance(parsed, Refusal):
        assert canonical_target(text) == parsed
    else:
        assert canonical_target(text) == (parsed, str(parsed))


# ProtectionIndex: start-up's checks on packed bytes must give exactly the ipaddress checks'
# verdicts and messages. Own and allowlisted ranges nest, overlap and touch on purpose.
INDEX_OWN = frozenset(
    ipaddress.ip_address(a)
    for a in ("192.0.2.1", "203.0.113.5", "2001:db8::1", "2001:db8:3::ffff", "fe80::1")
)
INDEX_BROADCAST = frozenset(ipaddress.ip_address(a) for a in ("192.0.2.255", "203.0.113.255"))
INDEX_ALLOW = tuple(
    ipaddress.ip_network(n)
    for n in (
        "198.51.100.0/24",
        "198.51.100.128/25",  # inside the one above
        "203.0.113.64/26",
        "203.0.113.128/26",  # touches the one above
        "203.0.113.96/28",  # inside the first of the two
        "10.0.0.0/8",
        "2001:db8:1::/48",
        "2001:db8:1:5::/64",
        "2001:db8:2::/64",
        "2001:db8:1:ffff::/64",  # the last /64 of 2001:db8:1::/48
        "::ffff:0:0/96",
        "ffff:ffff:ffff:ffff::/64",  # the end of the address space
    )
)
# Every range the checks (or ProtectionIndex's byte tests) treat specially.
SPECIAL_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "0.0.0.0/32",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "::/80",
        "::/96",
        "::ffff:0:0/96",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)


def _edges(network: IPNetwork) -> list[int]:
    first, last = int(network.network_address), int(network.broadcast_address)
    top = (1 << network.max_prefixlen) - 1
    return [n for n in (first - 1, first, first + 1, last - 1, last, last + 1) if 0 <= n <= top]


def _index_corpus() -> list[IPAddress]:
    rng = random.Random(11)  # noqa: S311 - test data, repeatable
    values: list[tuple[int, int]] = []
    for network in SPECIAL_RANGES + INDEX_ALLOW:
        values += [(network.version, n) for n in _edges(network)]
        # Random addresses inside the range.
        host_bits = network.max_prefixlen - network.prefixlen
        base = int(network.network_address)
        values += [(network.version, base + rng.getrandbits(host_bits)) for _ in range(50)]
    for address in INDEX_OWN | INDEX_BROADCAST:
        values += [(address.version, int(address) + d) for d in (-1, 0, 1)]
    for version in (4, 6):
        top = 32 if version == 4 else 128
        values += [(version, 0), (version, (1 << top) - 1)]
        values += [(version, rng.getrandbits(top)) for _ in range(20000)]
        if version == 6:  # documentation and global unicast space, where blocks are
            values += [(6, (0x2001_0DB8 << 96) + rng.getrandbits(96)) for _ in range(5000)]
            values += [(6, (0x2 << 124) + rng.getrandbits(124)) for _ in range(5000)]
    return [ipaddress.IPv4Address(n) if v == 4 else ipaddress.IPv6Address(n) for v, n in values]


def test_protection_index_gives_the_ipaddress_checks_verdict_and_message() -> None:
    index = ProtectionIndex.build(INDEX_OWN, INDEX_BROADCAST, INDEX_ALLOW)
    corpus = _index_corpus()
    plain = 0
    refused: set[RefusalCode] = set()
    for address in corpus:
        expected = intrinsic_refusal(address) or protection_refusal(
            address, INDEX_OWN, INDEX_BROADCAST, INDEX_ALLOW
        )
        assert index.refusal(address.packed) == expected, address
        if index.plain(address.packed):
            assert expected is None, address
            plain += 1
        if expected is not None:
            refused.add(expected.code)
    # The corpus reaches every refusal, and the byte test clears nearly all random addresses.
    assert refused == {
        RefusalCode.UNSPECIFIED,
        RefusalCode.LOOPBACK,
        RefusalCode.MULTICAST,
        RefusalCode.BROADCAST,
        RefusalCode.LINK_LOCAL,
        RefusalCode.OWN,
        RefusalCode.ALLOWLISTED,
    }
    assert plain > 0.8 * len(corpus)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("0.0.0.0", RefusalCode.UNSPECIFIED),
        ("127.255.255.255", RefusalCode.LOOPBACK),
        ("239.255.255.255", RefusalCode.MULTICAST),
        ("255.255.255.255", RefusalCode.BROADCAST),
        ("169.254.0.0", RefusalCode.LINK_LOCAL),
        ("::", RefusalCode.UNSPECIFIED),
        ("::1", RefusalCode.LOOPBACK),
        ("ff00::", RefusalCode.MULTICAST),
        ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", RefusalCode.LINK_LOCAL),
        ("192.0.2.1", RefusalCode.OWN),
        ("192.0.2.255", RefusalCode.BROADCAST),
        ("203.0.113.127", RefusalCode.ALLOWLISTED),  # where two allowlisted ranges touch
        ("203.0.113.128", RefusalCode.ALLOWLISTED),
        ("2001:db8:1:ffff:ffff:ffff:ffff:ffff", RefusalCode.ALLOWLISTED),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", RefusalCode.MULTICAST),
        ("198.51.101.0", None),
        ("203.0.113.192", None),
        ("2001:db8:2:1::", None),
        ("fec0::1", None),
        ("240.0.0.1", None),  # reserved, but not refused: the byte test sends it to the checks
    ],
)
def test_protection_index_on_chosen_addresses(text: str, code: RefusalCode | None) -> None:
    index = ProtectionIndex.build(INDEX_OWN, INDEX_BROADCAST, INDEX_ALLOW)
    refusal = index.refusal(ipaddress.ip_address(text).packed)
    assert (refusal.code if refusal else None) is code


def test_protection_index_without_protections_still_refuses_special_addresses() -> None:
    index = ProtectionIndex.build(frozenset(), frozenset(), ())
    assert index.plain(ipaddress.ip_address("198.51.100.7").packed)
    assert index.plain(ipaddress.ip_address("2001:db8::7").packed)
    refusal = index.refusal(ipaddress.ip_address("fe80::7").packed)
    assert refusal == Refusal(RefusalCode.LINK_LOCAL, "fe80::7 is a link-local address")


@pytest.mark.parametrize(
    ("text", "packed"),
    [
        ("203.0.113.7", bytes([203, 0, 113, 7])),
        ("2001:db8::7", bytes.fromhex("20010db8000000000000000000000007")),
        ("::", bytes(16)),
        ("2001:DB8::7", None),  # not canonical
        ("2001:db8:0::7", None),
        ("::ffff:192.0.2.7", None),  # an IPv4 tail: parse_address makes it IPv4
        ("::192.0.2.7", None),
        ("::ffff:c000:207", None),  # C prints it with an IPv4 tail
        ("203.0.113.7/32", None),
        ("203.0.113.0/24", None),
        ("203.0.113.07", None),
        ("203.0.113.7\x00", None),
        ("fe80::1%eth0", None),
        ("example.org", None),
        ("", None),
    ],
)
def test_canonical_packed(text: str, packed: bytes | None) -> None:
    assert canonical_packed(text) == packed
    if packed is not None:
        address = address_of_packed(packed)
        assert address == parse_address(text) and str(address) == text


# IPv4 inside IPv6, and 0.0.0.0/8 (issue #12) ------------------------------------------

# Each form that carries an IPv4 address, spelling the IPv4 address `v4` (dotted quad).
EMBEDDED_FORMS = {
    "NAT64": lambda v4: f"64:ff9b::{v4}",
    "6to4": lambda v4: str(
        ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 1)
    ),
    "IPv4-compatible": lambda v4: f"::{v4}",
    "SIIT": lambda v4: f"::ffff:0:{v4}",
    "IPv4-mapped": lambda v4: f"::ffff:{v4}",
    "Teredo": lambda v4: str(
        ipaddress.IPv6Address(
            (0x2001_0000_4136_E378 << 64)
            | (0x8000 << 48)
            | (0xFFFF << 32)
            | (int(ipaddress.IPv4Address(v4)) ^ 0xFFFFFFFF)
        )
    ),
}
PROTECTED_V4 = {
    "192.0.2.1": RefusalCode.OWN,
    "192.0.2.255": RefusalCode.BROADCAST,
    "198.51.100.77": RefusalCode.ALLOWLISTED,
    "127.0.0.1": RefusalCode.LOOPBACK,
    "0.0.0.5": RefusalCode.UNSPECIFIED,
}


def _verdict(text: str) -> Refusal | None:
    """What the broker decides for a single address (parse, then both checks)."""
    address = parse_address(text)
    if isinstance(address, Refusal):
        return address
    return intrinsic_refusal(address) or protection_refusal(address, OWN, BROADCAST, ALLOW)


@pytest.mark.parametrize("form", sorted(EMBEDDED_FORMS))
@pytest.mark.parametrize(("v4", "code"), sorted(PROTECTED_V4.items()))
def test_ipv6_forms_embedding_a_protected_ipv4_address_are_refused(
    form: str, v4: str, code: RefusalCode
) -> None:
    text = EMBEDDED_FORMS[form](v4)
    refusal = _verdict(text)
    assert refusal is not None and refusal.code is code, (text, refusal)
    assert v4 in refusal.message
    # The same verdict for a stored row (an IPv6 object, never folded) and the start-up index.
    six = ipaddress.IPv6Address(text)
    stored = intrinsic_refusal(six) or protection_refusal(six, OWN, BROADCAST, ALLOW)
    assert stored is not None and stored.code is code, (text, stored)
    index = ProtectionIndex.build(OWN, BROADCAST, ALLOW)
    assert not index.plain(six.packed)
    assert index.refusal(six.packed) == stored


@pytest.mark.parametrize("form", sorted(set(EMBEDDED_FORMS) - {"IPv4-mapped"}))
def test_ipv6_forms_embedding_an_ordinary_ipv4_address_may_be_blocked(form: str) -> None:
    text = EMBEDDED_FORMS[form]("203.0.113.9")
    assert _verdict(text) is None, text
    index = ProtectionIndex.build(OWN, BROADCAST, ALLOW)
    assert index.refusal(ipaddress.IPv6Address(text).packed) is None


@pytest.mark.parametrize("text", ["0.0.0.1", "0.1.2.3", "0.255.255.255"])
def test_this_network_0_slash_8_is_refused(text: str) -> None:
    refusal = _verdict(text)
    assert refusal is not None and refusal.code is RefusalCode.UNSPECIFIED, refusal
    assert "0.0.0.0/8" in refusal.message
    index = ProtectionIndex.build(frozenset(), frozenset(), ())
    assert index.refusal(ipaddress.ip_address(text).packed) == refusal
    assert _verdict("1.0.0.0") is None  # the next /8 is ordinary


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("0.1.0.0/16", RefusalCode.UNSPECIFIED),
        ("64:ff9b::c000:200/120", RefusalCode.OWN),  # NAT64 of 192.0.2.0/24
        ("2002:c000:200::/40", RefusalCode.OWN),  # 6to4 of 192.0.2.0/24
        ("2002:c633:6400::/40", RefusalCode.ALLOWLISTED),  # 6to4 of 198.51.100.0/24
        ("2002:7f00::/32", RefusalCode.LOOPBACK),  # 6to4 of 127.0.0.0/16
        ("64:ff9b::/96", RefusalCode.UNSPECIFIED),  # every NAT64 address: 0.0.0.0/8 too
        ("2002:cb00:7100::/40", None),  # 6to4 of 203.0.113.0/24: blockable
        ("64:ff9b::cb00:7100/120", None),
    ],
)
def test_networks_embedding_protected_ipv4_ranges_are_refused(
    text: str, code: RefusalCode | None
) -> None:
    network = parse_network(text)
    assert not isinstance(network, Refusal)
    refusal = network_refusal(network, LIMITS, OWN, BROADCAST, ALLOW)
    assert (refusal.code if refusal else None) is code, refusal
