"""Address validation: what may be blocked, and the reason when not."""

from __future__ import annotations

import ipaddress

import pytest

from imr.core.addresses import (
    Refusal,
    RefusalCode,
    intrinsic_refusal,
    parse_address,
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
