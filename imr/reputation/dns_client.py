"""One dnspython resolver per caller, from [reputation.dns]; lookups that fail over.

No resolver cache: http:BL keeps its own (with an injectable clock, its TTLs
capped), and the contact lookups run once per report.

Fail-over: `resolve()` asks the name servers one after the other, each for its
share of the lookup's time, and a server that timed out or failed goes to the
back of the list, so the lookups after it ask a live one first (as a stub
resolver with a dead first server should; dnspython alone asks the dead one
first every time, and with one server's timeout equal to the whole lifetime
never asked the second at all).
"""

from __future__ import annotations

import time

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
    # `lifetime` bounds the whole lookup, retries and every server included; `timeout` is
    # one try at one server. Equal to the lifetime (as it was), a dead first server took
    # all of it and the second was never asked: each server gets its share instead.
    resolver.lifetime = settings.timeout
    resolver.timeout = settings.timeout / max(1, len(resolver.nameservers))
    resolver.cache = None
    return resolver


def resolve(
    resolver: dns.resolver.Resolver, name: str, rdtype: str, lifetime: float | None = None
) -> dns.resolver.Answer:
    """resolver.resolve(name, rdtype), trying each server in turn within `lifetime` (default
    the resolver's); NXDOMAIN and NoAnswer are answers and end it at once."""
    budget = resolver.lifetime if lifetime is None else min(lifetime, resolver.lifetime)
    servers = list(resolver.nameservers)
    if len(servers) < 2:
        return resolver.resolve(name, rdtype, search=False, lifetime=budget)
    deadline = time.monotonic() + budget
    failure: dns.exception.DNSException = dns.exception.Timeout(timeout=budget)
    for server in servers:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        one = dns.resolver.Resolver(configure=False)
        one.nameservers = [server]
        one.cache = None
        one.timeout = one.lifetime = min(left, resolver.timeout)
        try:
            return one.resolve(name, rdtype, search=False)
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            failure = exc
            ordered = [s for s in resolver.nameservers if s is not server]
            resolver.nameservers = [*ordered, server]  # ask it last from now on
    raise failure


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
