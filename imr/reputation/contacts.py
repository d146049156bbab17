"""Whom to tell about an attacking address, found in DNS, and only from names DNS vouches for.

In order of preference, the first that gives an address wins:
  1. the network's published abuse contact: TXT `<reversed ip>.<ip zone>`
     (abusix style, `abuse-contacts.abusix.zone`; nibbles for IPv6);
  2. for the address's *forward-confirmed* reverse name (below), TXT
     `<domain>.<domain zone>` (abuse.net style, off by default);
  3. as the original did: up the labels of that name, from its parent, to the
     first domain that has an MX, whose `abuse@` (configurable) is mailed.

*Forward-confirmed reverse DNS* (FCrDNS): the PTR's name is used only if it is a
valid host name and its A (or AAAA) records include the address. Whoever runs an
address's reverse zone can write any name into its PTR; a PTR naming
`www.victim.example.org` does not resolve back to the attacker, so nobody at
victim.example.org is accused. Beyond that:
  - the attacking host itself is never mailed (the walk starts at its parent),
    nor a single-label domain;
  - a null MX (RFC 7505) ends the walk: that domain takes no mail, and its parent
    is not asked in its place;
  - the walk looks at the last MAX_WALK_LABELS labels only: a 121-label PTR costs
    at most MAX_WALK_LABELS - 1 MX lookups, not 120;
  - addresses from TXT records are kept only when their domain is a valid name.

Every lookup shares the report's *deadline* (a monotonic time): a lookup gets what
is left of it, and none starts after it. Every step is written to `trail` so
`imr reports show` can say why these recipients. A lookup that timed out (or the
deadline) makes the result `temporary`: the outbox tries again later instead of
deciding that nobody can be told.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.resolver
import dns.reversename

from imr.reputation.dns_client import TEMPORARY, describe, resolve
from imr.reputation.settings import NotifySettings

MAX_WALK_LABELS = 6
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9._%+-]{1,64}$")
_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+")


@dataclass
class Contacts:
    recipients: list[str] = field(default_factory=list)
    ptr: str | None = None  # the forward-confirmed reverse name, if any
    trail: list[str] = field(default_factory=list)
    temporary: bool = False  # some lookup failed for now: retry rather than give up

    def add(self, addresses: list[str]) -> None:
        for address in addresses:
            if address.lower() not in (r.lower() for r in self.recipients):
                self.recipients.append(address)


def host_name(text: str) -> str | None:
    """The name in canonical form (lower case, no final dot) if it is a valid host name
    of at least two labels (letters, digits, hyphens; <= 63 per label, <= 253 in all)."""
    name = text.rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(part) for part in labels):
        return None
    if labels[-1].isdigit():  # "192.0.2.7" is not a domain
        return None
    return name


class _Deadline(Exception):
    """The report's time is up: stop looking."""


class ContactFinder:
    def __init__(
        self,
        settings: NotifySettings,
        resolver: dns.resolver.Resolver,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._resolver = resolver
        self._monotonic = monotonic
        self._deadline = float("inf")

    def find(self, ip: str, deadline: float | None = None) -> Contacts:
        """Whom to tell about `ip`, looking no later than `deadline` (monotonic)."""
        self._deadline = (
            deadline
            if deadline is not None
            else self._monotonic() + self.settings.report_lookup_timeout
        )
        found = Contacts()
        try:
            self._find(ip, found)
        except _Deadline:
            found.temporary = True
            found.trail.append("deadline reached: the lookup stopped here")
        return found

    def _find(self, ip: str, found: Contacts) -> None:
        if self.settings.ip_contact_zone:
            found.add(self._ip_service(ip, found))
            if found.recipients:
                return  # the network's own published contact: preferred
        found.ptr = self._confirmed_ptr(ip, found)
        if found.ptr is None:
            return
        if self.settings.domain_contact_zone:
            found.add(self._domain_service(found.ptr, found))
            if found.recipients:
                return
        if self.settings.mx_walk:
            domain = self._mx_domain(found.ptr, found)
            if domain is not None:
                found.add([f"{part}@{domain}" for part in self.settings.mx_local_parts])

    # Lookups ------------------------------------------------------------------

    def _lookup(self, name: str, rdtype: str, found: Contacts) -> list[str] | None:
        """Record texts, [] when the name or type does not exist, None on failure."""
        left = self._deadline - self._monotonic()
        if left <= 0:
            raise _Deadline
        try:
            answer = resolve(self._resolver, name, rdtype, left)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except TEMPORARY as exc:
            found.temporary = True
            found.trail.append(f"{rdtype} {name}: {describe(exc)}")
            return None
        except dns.exception.DNSException as exc:
            found.trail.append(f"{rdtype} {name}: {describe(exc)}")
            return None
        if answer.rrset is None:
            return []
        if rdtype == "TXT":
            # Each character-string on its own: services put one address in each.
            return [s.decode(errors="replace") for r in answer.rrset for s in r.strings]
        return [rdata.to_text() for rdata in answer.rrset]

    def _ip_service(self, ip: str, found: Contacts) -> list[str]:
        base = dns.reversename.from_address(ip)
        # Keep the reversed address, drop "in-addr.arpa." / "ip6.arpa.".
        reversed_ip = ".".join(label.decode() for label in base.labels[:-3])
        name = f"{reversed_ip}.{self.settings.ip_contact_zone.rstrip('.')}"
        texts = self._lookup(name, "TXT", found)
        addresses = _addresses(texts or [], None)
        found.trail.append(f"TXT {name}: {', '.join(addresses) or 'no contact'}")
        return addresses

    def _domain_service(self, host: str, found: Contacts) -> list[str]:
        domain = ".".join(host.split(".")[-2:])
        name = f"{domain}.{self.settings.domain_contact_zone.rstrip('.')}"
        texts = self._lookup(name, "TXT", found)
        addresses = _addresses(texts or [], host)
        found.trail.append(f"TXT {name}: {', '.join(addresses) or 'no contact'}")
        return addresses

    def _confirmed_ptr(self, ip: str, found: Contacts) -> str | None:
        """The PTR's name if it is valid and resolves back to `ip` (FCrDNS), else None."""
        name = dns.reversename.from_address(ip).to_text()
        texts = self._lookup(name, "PTR", found)
        if not texts:
            if texts is not None:
                found.trail.append(f"PTR {name}: none")
            return None
        host = host_name(texts[0])
        if host is None:
            found.trail.append(f"PTR {name}: not a valid host name: not used")
            return None
        address = ipaddress.ip_address(ip)
        forward = self._lookup(host + ".", "A" if address.version == 4 else "AAAA", found)
        if forward is None:
            return None
        if not any(_same(text, address) for text in forward):
            found.trail.append(f"PTR {name}: {host}, which does not resolve back: not used")
            return None
        found.trail.append(f"PTR {name}: {host} (forward-confirmed)")
        return host

    def _mx_domain(self, host: str, found: Contacts) -> str | None:
        """The host's parent, then each parent with at least two labels: the first with an MX.

        Never the host itself (the attacker), never past a null MX, and only among the last
        MAX_WALK_LABELS labels of the name."""
        labels = host.split(".")
        first = max(1, len(labels) - MAX_WALK_LABELS)
        for start in range(first, len(labels) - 1):
            domain = ".".join(labels[start:])
            records = self._lookup(domain + ".", "MX", found)
            if records is None:
                return None  # a failed lookup: do not guess past it
            if any(r.split()[-1] == "." for r in records):
                found.trail.append(f"MX {domain}: null MX (takes no mail): stop")
                return None
            if records:
                found.trail.append(f"MX {domain}: {records[0].split()[-1].rstrip('.')}")
                return domain
            found.trail.append(f"MX {domain}: none")
        return None


def _same(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


def _addresses(texts: list[str], attacker: str | None) -> list[str]:
    """Mail addresses in TXT texts whose domain is a valid name (never the attacking host)."""
    out: list[str] = []
    for text in texts:
        for candidate in _ADDRESS.findall(text):
            local, _, domain_text = candidate.rpartition("@")
            domain = host_name(domain_text)
            if domain is None or not _LOCAL_PART.match(local) or domain == attacker:
                continue
            address = f"{local}@{domain}"
            if address not in out:
                out.append(address)
    return out
