"""Whom to tell about an attacking address, found in DNS.

Two sources, merged (no duplicates, the order kept):
  1. a DNS abuse-contact service: TXT `<reversed ip>.<ip zone>` (abusix style,
     nibbles for IPv6) and, for the reverse name's domain, TXT
     `<domain>.<domain zone>` (abuse.net style);
  2. as the original did: the reverse name (PTR), then up its labels to the
     first domain that has an MX, whose `abuse@` (configurable) is mailed.

Every step is written to `trail` so `imr reports show` can say why these
recipients. A lookup that timed out makes the result `temporary`: the outbox
tries again later instead of deciding that nobody can be told.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.resolver
import dns.reversename

from imr.reputation.dns_client import TEMPORARY, describe
from imr.reputation.settings import NotifySettings

_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


@dataclass
class Contacts:
    recipients: list[str] = field(default_factory=list)
    ptr: str | None = None
    trail: list[str] = field(default_factory=list)
    temporary: bool = False  # some lookup failed for now: retry rather than give up

    def add(self, addresses: list[str]) -> None:
        for address in addresses:
            if address.lower() not in (r.lower() for r in self.recipients):
                self.recipients.append(address)


class ContactFinder:
    def __init__(self, settings: NotifySettings, resolver: dns.resolver.Resolver) -> None:
        self.settings = settings
        self._resolver = resolver

    def find(self, ip: str) -> Contacts:
        found = Contacts()
        if self.settings.ip_contact_zone:
            found.add(self._ip_service(ip, found))
        found.ptr = self._ptr(ip, found)
        if found.ptr is None:
            return found
        if self.settings.domain_contact_zone:
            found.add(self._domain_service(found.ptr, found))
        if self.settings.mx_walk:
            domain = self._mx_domain(found.ptr, found)
            if domain is not None:
                found.add([f"{part}@{domain}" for part in self.settings.mx_local_parts])
        return found

    # Lookups ------------------------------------------------------------------

    def _lookup(self, name: str, rdtype: str, found: Contacts) -> list[str] | None:
        """Record texts, [] when the name or type does not exist, None on failure."""
        try:
            answer = self._resolver.resolve(name, rdtype, search=False)
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
        addresses = _addresses(texts or [])
        found.trail.append(f"TXT {name}: {', '.join(addresses) or 'no contact'}")
        return addresses

    def _domain_service(self, host: str, found: Contacts) -> list[str]:
        labels = host.rstrip(".").split(".")
        domain = ".".join(labels[-2:]) if len(labels) >= 2 else host
        name = f"{domain}.{self.settings.domain_contact_zone.rstrip('.')}"
        texts = self._lookup(name, "TXT", found)
        addresses = _addresses(texts or [])
        found.trail.append(f"TXT {name}: {', '.join(addresses) or 'no contact'}")
        return addresses

    def _ptr(self, ip: str, found: Contacts) -> str | None:
        name = dns.reversename.from_address(ip).to_text()
        texts = self._lookup(name, "PTR", found)
        if not texts:
            if texts is not None:
                found.trail.append(f"PTR {name}: none")
            return None
        host = texts[0].rstrip(".").lower()
        found.trail.append(f"PTR {name}: {host}")
        return host

    def _mx_domain(self, host: str, found: Contacts) -> str | None:
        """The host name, then each parent with at least two labels: the first with an MX."""
        labels = host.split(".")
        for start in range(0, max(1, len(labels) - 1)):
            domain = ".".join(labels[start:])
            records = self._lookup(domain + ".", "MX", found)
            if records is None:
                return None  # a failed lookup: do not guess past it
            # A null MX (RFC 7505, "0 .") says the domain takes no mail.
            real = [r for r in records if r.split()[-1] != "."]
            if real:
                found.trail.append(f"MX {domain}: {real[0].split()[-1].rstrip('.')}")
                return domain
            found.trail.append(f"MX {domain}: none")
        return None


def _addresses(texts: list[str]) -> list[str]:
    out: list[str] = []
    for text in texts:
        for address in _ADDRESS.findall(text):
            if address not in out:
                out.append(address)
    return out
