"""Abuse contacts from DNS: the published contact first, then only forward-confirmed
reverse names, the walk up to an MX, and the lookups' deadline."""

from __future__ import annotations

import time
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
    "a.b.nomail.example. 300 IN A 192.0.2.21",
    # A null MX (RFC 7505) ends the walk: its parent is not asked in its place.
    ptr("198.51.100.30", "web.shop.example.org."),
    "web.shop.example.org. 300 IN A 198.51.100.30",
    "shop.example.org. 300 IN MX 0 .",
    "example.org. 300 IN MX 5 mail.example.org.",
    # The IP abuse-contact service knows this one; its name also has an MX.
    ptr("203.0.113.40", "srv.hosting.example.com."),
    "srv.hosting.example.com. 300 IN A 203.0.113.40",
    "hosting.example.com. 300 IN MX 10 mx.hosting.example.com.",
    '40.113.0.203.abuse-contacts.test. 300 IN TXT "noc@hosting.example.com"',
    # IPv6, reverse name in nibbles; the domain service (abuse.net style) knows the domain.
    ptr("2001:db8::5", "v6.example.info."),
    "v6.example.info. 300 IN AAAA 2001:db8::5",
    "example.info. 300 IN MX 10 mx.example.info.",
    'example.info.contacts.test. 300 IN TXT "security@example.info" "abuse@example.info"',
    # The attacker's PTR names someone else's web server, which resolves elsewhere.
    ptr("198.51.100.8", "www.victim.example.org."),
    "www.victim.example.org. 300 IN A 192.0.2.200",
    "victim.example.org. 300 IN MX 10 mx.victim.example.org.",
    # The attacking host takes mail itself; nothing above it does.
    ptr("192.0.2.23", "mail.attacker.example."),
    "mail.attacker.example. 300 IN A 192.0.2.23",
    "mail.attacker.example. 300 IN MX 10 mail.attacker.example.",
    # Not host names: a single label, an underscore, an address.
    ptr("192.0.2.24", "localhost."),
    ptr("192.0.2.25", "bad_name.example.com."),
    "bad_name.example.com. 300 IN A 192.0.2.25",
    "example.com. 300 IN MX 10 mx.example.com.",
    # A contact service answer with junk beside the one valid address.
    '26.2.0.192.abuse-contacts.test. 300 IN TXT "x@-bad-.example" "y@nodot" "abuse@net.example"',
    # A 120-label reverse name (valid: 240 characters) that resolves back.
    ptr("192.0.2.27", "a." * 119 + "deep.example."),
    "a." * 119 + "deep.example. 300 IN A 192.0.2.27",
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


def test_null_mx_ends_the_walk(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address).find("198.51.100.30")
    assert found.recipients == [] and not found.temporary
    assert "MX shop.example.org: null MX (takes no mail): stop" in found.trail
    assert dns_server.count("example.org.") == 0  # never mailed past the null MX


def test_published_contact_is_preferred(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address, mx_local_parts=["abuse", "postmaster"]).find("203.0.113.40")
    assert found.recipients == ["noc@hosting.example.com"]
    assert dns_server.count("40.113.0.203.in-addr.arpa.") == 0  # no PTR guesswork needed


def test_ptr_that_does_not_resolve_back_is_never_used(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address).find("198.51.100.8")
    assert found.recipients == [] and found.ptr is None and not found.temporary
    assert any("does not resolve back: not used" in step for step in found.trail)
    assert dns_server.count("victim.example.org.") == 0


def test_the_attacking_host_itself_is_never_mailed(dns_server: ZoneServer) -> None:
    found = finder(dns_server.address).find("192.0.2.23")
    assert found.ptr == "mail.attacker.example"
    assert found.recipients == []  # its own MX is not asked; "attacker.example" has none
    assert ("mail.attacker.example.", "MX") not in dns_server.queries


def test_names_that_are_not_host_names_are_not_used(dns_server: ZoneServer) -> None:
    for ip in ("192.0.2.24", "192.0.2.25"):
        found = finder(dns_server.address).find(ip)
        assert found.recipients == [] and found.ptr is None, ip
        assert any("not a valid host name" in step for step in found.trail), ip
    assert dns_server.count("example.com.") == 0


def test_contact_service_addresses_must_have_valid_domains(dns_server: ZoneServer) -> None:
    assert finder(dns_server.address).find("192.0.2.26").recipients == ["abuse@net.example"]


def test_a_dead_first_name_server_fails_over(dns_server: ZoneServer) -> None:
    hole = BlackHole("udp")
    try:
        resolver = make_resolver(
            DnsSettings(nameservers=[hole.address, dns_server.address], timeout=1.0)
        )
        settings = NotifySettings(ip_contact_zone="abuse-contacts.test")
        found = ContactFinder(settings, resolver).find("203.0.113.40")
    finally:
        hole.close()
    assert found.recipients == ["noc@hosting.example.com"] and not found.temporary


def test_one_report_ends_within_its_deadline(dns_server: ZoneServer) -> None:
    """A 120-label PTR and a dead first name server: found within the deadline, with at
    most a handful of MX lookups; the dead server is asked last after its first timeout."""
    hole = BlackHole("udp")
    try:
        resolver = make_resolver(
            DnsSettings(nameservers=[hole.address, dns_server.address], timeout=1.0)
        )
        settings = NotifySettings(ip_contact_zone="abuse-contacts.test")
        start = time.monotonic()
        found = ContactFinder(settings, resolver).find("192.0.2.27", start + 2.0)
        took = time.monotonic() - start
    finally:
        hole.close()
    assert took < 2.0, took
    assert found.ptr is not None and found.ptr.endswith("deep.example")
    mx = [name for name, qtype in dns_server.queries if qtype == "MX" and "deep" in name]
    assert 0 < len(mx) <= 5  # the walk looks at the last labels only, not 120 of them


def test_the_deadline_stops_the_lookups(dns_server: ZoneServer) -> None:
    hole = BlackHole("udp")  # every server dead: each lookup would wait its full second
    try:
        resolver = make_resolver(DnsSettings(nameservers=[hole.address], timeout=1.0))
        start = time.monotonic()
        found = ContactFinder(NotifySettings(), resolver).find("192.0.2.20", start + 1.2)
        took = time.monotonic() - start
    finally:
        hole.close()
    assert took < 1.5, took
    assert found.temporary and found.recipients == []
    # The last lookup got only what was left of the report's time (0.2 s, not 1 s).
    assert found.trail[-1].endswith(("DNS timeout", "deadline reached: the lookup stopped here"))
