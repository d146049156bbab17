"""Abuse contacts from DNS: PTR, the walk up to an MX, and abuse-contact TXT services."""

from __future__ import annotations

from collections.abc import Iterator

import dns.reversename
import pytest

from imr.reputation.contacts import ContactFinder
from imr.reputation.dns_client import make_resolver
from imr.reputation.settings import DnsSettings, NotifySettings

from reputation_servers import BlackHole, ZoneServer


def ptr(ip: str, host: str) -> str:
    return f"{dns.reversename.from_address(ip).to_text()} 300 IN PTR {host}"


RECORDS = [
    # Several labels; only the provider's domain takes mail.
    ptr("192.0.2.20", "host7.dyn.pool.isp.example.net."),
    "host7.dyn.pool.isp.example.net. 300 IN A 192.0.2.20",
    "isp.example.net. 300 IN MX 10 mx1.isp.example.net.",
    "example.net. 300 IN MX 10 mx.example.net.",
    # Nothing takes mail anywhere up the name.
    ptr("192.0.2.21", "a.b.nomail.example."),
    # A null MX (RFC 7505) is skipped on the way up.
    ptr("198.51.100.30", "web.shop.example.org."),
    "shop.example.org. 300 IN MX 0 .",
    "example.org. 300 IN MX 5 mail.example.org.",
    # The IP abuse-contact service knows this one; its name also has an MX.
    ptr("203.0.113.40", "srv.hosting.example.com."),
    "hosting.example.com. 300 IN MX 10 mx.hosting.example.com.",
    '40.113.0.203.abuse-contacts.test. 300 IN TXT "noc@hosting.example.com"',
    # IPv6, reverse name in nibbles; the domain service (abuse.net style) knows the domain.
    ptr("2001:db8::5", "v6.example.info."),
    "example.info. 300 IN MX 10 mx.example.info.",
    'example.info.contacts.test. 300 IN TXT "security@example.info" "abuse@example.info"',
]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[ZoneServer]:
    server = ZoneServer(RECORDS).start()
    try:
        yield server
    finally:
        server.stop()


def finder(address: str, **overrides: object) -> ContactFinder:
    settings = NotifySettings.model_validate(
        {"ip_contact_zone": "abuse-contacts.test", "domain_contact_zone": "", **overrides}
    )
    return ContactFinder(settings, make_resolver(DnsSettings(nameservers=[address], timeout=1.0)))


def test_walks_up_the_labels_to_the_first_domain_with_mx(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address).find("192.0.2.20")
    assert found.recipients == ["abuse@isp.example.net"]  # not example.net: the first MX wins
    assert found.ptr == "host7.dyn.pool.isp.example.net"
    assert "MX isp.example.net: mx1.isp.example.net" in found.trail
    assert not found.temporary
    assert dns_server.count("example.net.") == 0


def test_no_mx_anywhere_gives_nobody(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address).find("192.0.2.21")
    assert found.recipients == []
    assert not found.temporary
    assert "MX nomail.example: none" in found.trail
    assert dns_server.count("example.") == 0  # never asks a bare top-level name


def test_no_ptr_gives_nobody(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address).find("192.0.2.22")
    assert found.recipients == [] and found.ptr is None and not found.temporary
    assert any(step.startswith("PTR 22.2.0.192.in-addr.arpa.: none") for step in found.trail)


def test_null_mx_is_skipped(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address).find("198.51.100.30")
    assert found.recipients == ["abuse@example.org"]


def test_ip_contact_service_and_mx_are_merged(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address, mx_local_parts=["abuse", "postmaster"]).find("203.0.113.40")
    assert found.recipients == [
        "noc@hosting.example.com",
        "abuse@hosting.example.com",
        "postmaster@hosting.example.com",
    ]


def test_ipv6_and_domain_contact_service(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address, domain_contact_zone="contacts.test").find("2001:db8::5")
    assert found.ptr == "v6.example.info"
    assert found.recipients == ["security@example.info", "abuse@example.info"]


def test_mx_walk_can_be_turned_off(dns_server: ZoneServer) -> None:
    assert finder(dns_server.address, mx_walk=False).find("192.0.2.20").recipients == []


def test_timeout_is_temporary() -> None:
    hole = BlackHole("udp")
    try:
        settings = NotifySettings(ip_contact_zone="abuse-contacts.test")
        resolver = make_resolver(DnsSettings(nameservers=[hole.address], timeout=0.3))
        found = ContactFinder(settings, resolver).find("192.0.2.20")
    finally:
        hole.close()
    assert found.recipients == [] and found.temporary
    assert any("DNS timeout" in step for step in found.trail)
