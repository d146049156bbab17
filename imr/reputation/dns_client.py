"""One dnspython resolver per caller, from [reputation.dns]; the shared error type.

No resolver cache: http:BL keeps its own (with an injectable clock), and the
contact lookups run once per report.
"""

from __future__ import annotations

import dns.exception
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver

from imr.reputation.settings import DnsSettings, split_nameserver


class DnsUnavailable(Exception):
    """No usable answer in time (timeout, SERVFAIL, no resolver): worth retrying later."""


def make_resolver(settings: DnsSettings) -> dns.resolver.Resolver:
    configure = not settings.nameservers
    try:
        resolver = dns.resolver.Resolver(configure=configure)
    except dns.resolver.NoResolverConfiguration:
        raise DnsUnavailable(
            "no DNS resolver: /etc/resolv.conf has none; set reputation.dns.nameservers"
        ) from None
    if settings.nameservers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(*split_nameserver(ns)) for ns in settings.nameservers
        ]
    # `lifetime` bounds the whole lookup, retries and every server included.
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout
    resolver.cache = None
    return resolver


def negative_ttl(exc: dns.resolver.NXDOMAIN, default: int) -> int:
    """How long an NXDOMAIN holds (RFC 2308: the SOA's TTL capped by its minimum)."""
    for name in exc.qnames():  # type: ignore[no-untyped-call]
        try:
            response = exc.response(name)  # type: ignore[no-untyped-call]
        except KeyError:
            continue
        if not isinstance(response, dns.message.Message):
            continue
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return int(min(rrset.ttl, rrset[0].minimum))
    return default


def describe(exc: BaseException) -> str:
    """A short reason for a failed lookup, for logs and `why` texts."""
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL or refused)"
    return f"DNS error: {exc.__class__.__name__}"


# Lookups that mean "ask again later" rather than "there is no such record".
TEMPORARY = (
    dns.exception.Timeout,
    dns.resolver.NoNameservers,
    dns.resolver.NoResolverConfiguration,
)
