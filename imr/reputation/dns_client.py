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
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdataclass
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


class Malformed(dns.exception.DNSException):
    """A server answered with something that is not a DNS message (or not for our question)."""


def resolve(
    resolver: dns.resolver.Resolver, name: str, rdtype: str, lifetime: float | None = None
) -> dns.resolver.Answer:
    """Look `name` up, asking the servers in turn within `lifetime` (default the resolver's).

    NXDOMAIN and NoAnswer are answers and end it at once. A server that times out,
    fails (SERVFAIL, REFUSED) or answers with a malformed message goes to the back of
    the list. When every server failed, a malformed answer is reported as Malformed,
    not as the timeout dnspython's resolver makes of it (it drops such a reply and
    waits on)."""
    budget = resolver.lifetime if lifetime is None else min(lifetime, resolver.lifetime)
    deadline = time.monotonic() + budget
    qname = dns.name.from_text(name)
    failure: dns.exception.DNSException = dns.exception.Timeout(timeout=budget)  # type: ignore[no-untyped-call]
    for server in list(resolver.nameservers):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return _ask(server, qname, rdtype, min(left, resolver.timeout))
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            failure = failure if isinstance(failure, Malformed) else exc
        except Malformed as exc:
            failure = exc
        ordered = [s for s in resolver.nameservers if s is not server]
        resolver.nameservers = [*ordered, server]  # ask it last from now on
    raise failure


def _ask(server: object, qname: dns.name.Name, rdtype: str, timeout: float) -> dns.resolver.Answer:
    """One question to one server (UDP, TCP if truncated), as the resolver's answer types."""
    if isinstance(server, dns.nameserver.Do53Nameserver):
        host, port = server.address, server.port
    else:
        host, port = str(server), 53
    query = dns.message.make_query(qname, rdtype)
    try:
        response = dns.query.udp(
            query, host, timeout=timeout, port=port, ignore_unexpected=True,
            raise_on_truncation=True,
        )  # fmt: skip
    except dns.message.Truncated:
        response = dns.query.tcp(query, host, timeout=timeout, port=port)
    except (dns.exception.FormError, dns.exception.SyntaxError, ValueError, EOFError) as exc:
        detail = f"from {host}:{port}: {exc.__class__.__name__}"
        raise Malformed(detail) from None  # type: ignore[no-untyped-call]
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        raise dns.resolver.NXDOMAIN(qnames=[qname], responses={qname: response})  # type: ignore[no-untyped-call]
    if rcode != dns.rcode.NOERROR:
        errors = [(host, False, port, dns.rcode.to_text(rcode), response)]
        raise dns.resolver.NoNameservers(request=query, errors=errors)  # type: ignore[no-untyped-call]
    if not isinstance(response, dns.message.QueryMessage):  # make_query's reply is one
        raise Malformed(f"from {host}:{port}: not a reply to a query")  # type: ignore[no-untyped-call]
    answer = dns.resolver.Answer(
        qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, response, host, port
    )
    if answer.rrset is None:
        raise dns.resolver.NoAnswer(response=response)  # type: ignore[no-untyped-call]
    return answer


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
    if isinstance(exc, Malformed):
        return f"malformed DNS answer ({exc})"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no name server answered (SERVFAIL or refused)"
    return f"DNS error: {exc.__class__.__name__}"


# Lookups that mean "ask again later" rather than "there is no such record".
TEMPORARY = (
    dns.exception.Timeout,
    dns.resolver.NoNameservers,
    dns.resolver.NoResolverConfiguration,
)
