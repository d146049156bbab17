"""Address validation: what may be blocked, and the reason when not."""

from __future__ import annotations

import ipaddress

import pytest

from imr.core.addresses import (
    Refusal,
    RefusalCode,
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
