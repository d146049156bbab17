"""Project Honey Pot's http:BL: the verdict (pure) and a cached, fast-failing lookup.

A query is `<key>.<reversed IPv4>.<zone>`; NXDOMAIN means not listed; an
answer 127.D.T.Y gives D days since the address was last seen, a threat score
T (0-255) and the visitor type bits Y (1 suspicious, 2 harvester, 4 comment
spammer; 0 is a search engine, whose third octet names the engine instead).

The score discounts the threat linearly with age, as the original did: a
threat seen today counts fully, one `max_age_days` old not at all. Search
engines are never blocked. IPv6 is not listed by http:BL and is skipped.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import dns.exception
import dns.resolver

from imr.reputation.dns_client import TEMPORARY, describe, negative_ttl, resolve
from imr.reputation.settings import HttpBLSettings

SEARCH_ENGINES = {
    0: "undocumented",
    1: "AltaVista",
    2: "Ask",
    3: "Baidu",
    4: "Excite",
    5: "Google",
    6: "Looksmart",
    7: "Lycos",
    8: "MSN",
    9: "Yahoo",
    10: "Cuil",
    11: "InfoSeek",
    12: "miscellaneous",
}
_TYPE_BITS = ((1, "suspicious"), (2, "harvester"), (4, "comment spammer"))
THREAT_BITS = 7  # the rest (8 ... 128) are reserved: they say nothing about a threat


# Never looked up nor blocked, here and in the log scanner (imr/logscan/httpbl.py): they
# say something about the local network, cannot be listed, and `imr check --block` must
# refuse them as every other path does. (ipaddress's is_private also covers the
# documentation networks, which the tests use, so the list is spelled out.)
LOCAL_NETWORKS = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/3",  # multicast, reserved and broadcast
    )
)


def local_refusal(ip: str) -> str | None:
    """Why `ip` is private or reserved (never looked up, never blocked), or None."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            special = address.is_loopback or address.is_link_local or address.is_multicast
            special = special or address.is_unspecified or address.is_site_local
            special = special or address in ipaddress.IPv6Network("fc00::/7")
            return f"{ip} is a private or reserved address" if special else None
        address = address.ipv4_mapped
    if any(address in net for net in LOCAL_NETWORKS):
        return f"{ip} is a private or reserved address"
    return None


class HttpBLError(Exception):
    """An answer that is not http:BL's (wrong zone or key); the message is for the user."""


@dataclass(frozen=True)
class Answer:
    days: int
    threat: int
    visitor_type: int

    @classmethod
    def parse(cls, address: str) -> Answer:
        parts = address.split(".")
        if len(parts) != 4 or parts[0] != "127":
            raise HttpBLError(f"{address} is not an http:BL answer (expected 127.days.threat.type)")
        days, threat, visitor = (int(p) for p in parts[1:])
        return cls(days, threat, visitor)

    @property
    def search_engine(self) -> bool:
        return self.visitor_type == 0

    @property
    def threat_type(self) -> bool:
        """Whether a defined threat bit is set (reserved bits alone are no threat)."""
        return bool(self.visitor_type & THREAT_BITS)

    def describe_type(self) -> str:
        if self.search_engine:
            return f"search engine ({SEARCH_ENGINES.get(self.threat, 'unknown')})"
        names = [name for bit, name in _TYPE_BITS if self.visitor_type & bit]
        reserved = self.visitor_type & ~THREAT_BITS
        if reserved:
            names.append(f"reserved type bits {reserved} (ignored)")
        return ", ".join(names)


Status = Literal["listed", "not_listed", "skipped", "error"]


@dataclass(frozen=True)
class Verdict:
    ip: str
    status: Status
    block: bool
    score: int
    why: str
    answer: Answer | None = None
    severity: int | None = None  # None: the normal ladder

    def reason(self) -> str:
        """The block reason sent to the daemon (kept in the state file)."""
        a = self.answer
        detail = f"threat {a.threat}, {a.days} days, {a.describe_type()}" if a else ""
        return f"http:BL score {self.score} ({detail})"

    def as_json(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "status": self.status,
            "block": self.block,
            "score": self.score,
            "severity": self.severity,
            "why": self.why,
            "answer": None
            if self.answer is None
            else {
                "days": self.answer.days,
                "threat": self.answer.threat,
                "type": self.answer.visitor_type,
                "type_name": self.answer.describe_type(),
            },
        }


def score(answer: Answer, max_age_days: int = 255) -> int:
    """The threat discounted linearly to zero at max_age_days (search engines, and reserved
    type bits alone, score 0)."""
    if answer.search_engine or not answer.threat_type:
        return 0
    remaining = max(0, max_age_days - answer.days)
    return answer.threat * remaining // max_age_days


def severity_for(points: int, settings: HttpBLSettings) -> int | None:
    """The rung to ask for: None keeps the normal ladder; "score" climbs with the score."""
    if settings.duration == "ladder":
        return None
    return min(10, 1 + (points - settings.trigger) // settings.score_per_rung)


def judge(ip: str, answer: Answer | None, settings: HttpBLSettings) -> Verdict:
    """The verdict on one lookup's result (None: NXDOMAIN, not listed)."""
    if answer is None:
        return Verdict(ip, "not_listed", False, 0, "not listed in http:BL")
    if answer.search_engine:
        return Verdict(ip, "listed", False, 0, f"a {answer.describe_type()}: never blocked", answer)
    if not answer.threat_type:
        why = f"listed with {answer.describe_type()} only: no threat type, not blocked"
        return Verdict(ip, "listed", False, 0, why, answer)
    points = score(answer, settings.max_age_days)
    basis = (
        f"listed as {answer.describe_type()}, threat {answer.threat},"
        f" last seen {answer.days} day(s) ago: score {points}"
        f" (threat discounted to 0 at {settings.max_age_days} days)"
    )
    if points < settings.trigger:
        return Verdict(
            ip,
            "listed",
            False,
            points,
            f"{basis} < trigger {settings.trigger}: not blocked",
            answer,
        )
    severity = severity_for(points, settings)
    length = "the normal ladder" if severity is None else f"severity {severity}"
    return Verdict(
        ip,
        "listed",
        True,
        points,
        f"{basis} >= trigger {settings.trigger}: block ({length})",
        answer,
        severity,
    )


def query_name(key: str, ip: str, zone: str) -> str:
    reversed_ip = ".".join(reversed(ip.split(".")))
    return f"{key}.{reversed_ip}.{zone}"


class HttpBL:
    """Looks addresses up, caching each answer (listed or not) for its TTL.

    Failures (timeout, SERVFAIL) are not cached and never block: the verdict is
    "error" with the reason, and the next lookup tries again.
    """

    def __init__(
        self,
        settings: HttpBLSettings,
        resolver: dns.resolver.Resolver,
        key: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._resolver = resolver
        self._key = key
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Answer | None]] = OrderedDict()
        self.queries = 0  # DNS queries actually sent (tests and stats)

    def check(self, ip: str) -> Verdict:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return Verdict(ip, "error", False, 0, f"{ip!r} is not an IP address")
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is None:
                return Verdict(ip, "skipped", False, 0, "IPv6: http:BL lists IPv4 only")
            address = address.ipv4_mapped
        text = str(address)
        refusal = local_refusal(text)
        if refusal is not None:
            return Verdict(text, "skipped", False, 0, f"{refusal}: not looked up, never blocked")
        now = self._clock()
        cached = self._cache.get(text)
        if cached is not None and cached[0] > now:
            return judge(text, cached[1], self.settings)
        try:
            answer, ttl = self._query(text)
        except HttpBLError as exc:
            return Verdict(text, "error", False, 0, str(exc))
        except TEMPORARY as exc:
            return Verdict(text, "error", False, 0, f"lookup failed: {describe(exc)}")
        except dns.exception.DNSException as exc:
            return Verdict(text, "error", False, 0, f"lookup failed: {describe(exc)}")
        # Whatever the zone says, no answer is kept past max_cache_ttl.
        self._remember(text, now + min(ttl, self.settings.max_cache_ttl), answer)
        return judge(text, answer, self.settings)

    def _query(self, ip: str) -> tuple[Answer | None, int]:
        name = query_name(self._key, ip, self.settings.zone)
        self.queries += 1
        try:
            result = resolve(self._resolver, name, "A")
        except dns.resolver.NXDOMAIN as exc:
            return None, negative_ttl(exc, self.settings.negative_ttl)
        except dns.resolver.NoAnswer:
            return None, self.settings.negative_ttl
        rrset = result.rrset
        if rrset is None or not len(rrset):
            return None, self.settings.negative_ttl
        return Answer.parse(rrset[0].to_text()), int(rrset.ttl)

    def _remember(self, ip: str, until: float, answer: Answer | None) -> None:
        self._cache[ip] = (until, answer)
        self._cache.move_to_end(ip)
        while len(self._cache) > self.settings.cache_entries:
            self._cache.popitem(last=False)
