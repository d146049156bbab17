"""The [reputation] section of the configuration file: http:BL, abuse mail, report exports.

Everything is off by default. A key is required only when its feature is
enabled, and may be given in a file of its own (`*_file`, read when used, so
the main config can stay world-readable while the secret is not).

Example (TOML):

    [reputation]
    timezone = "Europe/Berlin"
    state_dir = "/var/lib/imr/reputation"

    [reputation.httpbl]
    enabled = true
    key_file = "/etc/imr/httpbl.key"
    trigger = 25

    [reputation.notify]
    enabled = true
    sender = "abuse-reports@example.org"
    smtp_host = "mail.example.org"

    [reputation.abuseipdb]
    key_file = "/etc/imr/abuseipdb.key"
    categories = [21]

    [reputation.dshield]
    userid = 12345
    key_file = "/etc/imr/dshield.key"
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from imr.config_types import Duration

HTTPBL_KEY = re.compile(r"^[a-z]{12}$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_-]{1,63}){0,126}\.?$")
_MAILBOX = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")


MailKind = Literal["evidence", "httpbl", "manual"]
_EVIDENCE: MailKind = "evidence"


class SecretError(Exception):
    """A secret that is configured but cannot be read; the message is for the user."""


def _nameserver(value: Any) -> str:
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:5353'."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a name server address, e.g. '192.0.2.53' or '127.0.0.1:5353'")
    split_nameserver(value)
    return value


def split_nameserver(text: str) -> tuple[str, int]:
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r}: expected [address]:port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: expected address:port")
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: a name server must be an IP address") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port must be 1 to 65535")
    return host, port


Nameserver = Annotated[str, BeforeValidator(_nameserver)]


def read_secret(inline: str | None, path: Path | None, what: str) -> str:
    """The inline value, or the first line of the file (read now, not at config load)."""
    if inline:
        return inline
    if path is None:
        raise SecretError(f"{what}: no key configured (set it or its *_file)")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not text:
        raise SecretError(f"{what}: {path} is empty")
    return text.splitlines()[0].strip()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DnsSettings(_Model):
    # Empty: the system's resolvers (/etc/resolv.conf).
    nameservers: list[Nameserver] = Field(default_factory=list)
    # Whole lookup, all retries and every server included: DNS must never hold anything
    # up for long. Each server gets an equal share of it per try, so a dead first server
    # leaves time for the next (as resolv.conf's resolvers fail over).
    timeout: float = Field(2.0, gt=0, le=30)


class HttpBLSettings(_Model):
    """Project Honey Pot's http:BL: https://www.projecthoneypot.org/httpbl_api.php"""

    enabled: bool = False
    key: str | None = Field(None, repr=False, exclude=True)  # never printed
    key_file: Path | None = None
    zone: str = Field("dnsbl.httpbl.org", pattern=_HOST.pattern)
    # Block when the age-discounted score reaches this (0-255).
    trigger: int = Field(25, ge=1, le=255)
    # The threat score falls linearly to zero at this age in days (the original used 255).
    max_age_days: int = Field(255, ge=1, le=255)
    # "ladder": the normal ladder; "score": severity 1 at the trigger, one more per score_per_rung.
    duration: Literal["ladder", "score"] = "ladder"
    score_per_rung: int = Field(50, ge=1, le=255)
    # NXDOMAIN without an SOA to say how long "not listed" holds.
    negative_ttl: Duration = 300
    # No answer is kept longer than this, whatever TTL the zone gives it.
    max_cache_ttl: Duration = 3600
    cache_entries: int = Field(10_000, ge=1, le=1_000_000)

    @field_validator("key")
    @classmethod
    def _key_form(cls, value: str | None) -> str | None:
        if value is not None and not HTTPBL_KEY.match(value):
            raise ValueError("an http:BL access key is 12 lower-case letters")
        return value

    @model_validator(mode="after")
    def _needs_key(self) -> HttpBLSettings:
        if self.enabled and not self.key and self.key_file is None:
            raise ValueError("http:BL is enabled: set key or key_file")
        return self

    def access_key(self) -> str:
        key = read_secret(self.key, self.key_file, "reputation.httpbl")
        if not HTTPBL_KEY.match(key):
            raise SecretError("reputation.httpbl: the access key must be 12 lower-case letters")
        return key


class NotifySettings(_Model):
    """Abuse mail to whoever runs the attacking host."""

    enabled: bool = False
    sender: str | None = None
    reply_to: str | None = None
    # Who we are, in the report's first line (default: this host's name).
    reporter: str | None = None
    smtp_host: str = "localhost"
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    smtp_user: str | None = None
    smtp_password: str | None = Field(None, repr=False, exclude=True)
    smtp_password_file: Path | None = None
    smtp_timeout: float = Field(10.0, gt=0, le=300)
    # One report per address per period, at most daily_cap reports in any 24 hours.
    period: Duration = 7 * 86400
    daily_cap: int = Field(50, ge=1, le=100_000)
    # Delivery attempts (a relay that is down); the wait doubles from retry_after, up to a day.
    max_attempts: int = Field(8, ge=1, le=100)
    retry_after: Duration = 300
    # `reports collect` looks this far back in the block history.
    collect_window: Duration = 86400
    # Only blocks whose source starts with one of these (empty: every block). The source
    # is a tag any block-role client chooses freely: `uids` is the filter it cannot fake.
    sources: list[str] = Field(default_factory=list)
    # Only blocks requested by these uids (the peer's uid, as the daemon saw it); empty: any.
    uids: list[int] = Field(default_factory=list)
    # What may be mailed: "evidence" (a log line or ModSecurity rule imr saw itself: sources
    # logscan:* and modsecurity:*), "httpbl" (Project Honey Pot's verdict), "manual".
    kinds: list[MailKind] = Field(default_factory=lambda: [_EVIDENCE], min_length=1)
    # What was attacked, as the mail and its X-ARF part say (default: not disclosed).
    destination: str | None = None
    # The attacked port per block source prefix, e.g. {"logscan:sshd" = 22, "logscan:" = 443}.
    ports_by_source: dict[str, int] = Field(default_factory=dict)
    # Time limits: one report's contact lookups, and one `reports send` run (its lookups
    # and mail); what is left is tried on the next run, not charged an attempt.
    report_lookup_timeout: float = Field(10.0, gt=0, le=300)
    run_timeout: Duration = 300
    # Abuse-contact lookups: TXT <reversed ip>.<ip_contact_zone> (abusix style) and
    # TXT <domain>.<domain_contact_zone> (abuse.net style); "" turns either off.
    ip_contact_zone: str = "abuse-contacts.abusix.zone"
    domain_contact_zone: str = ""
    # Reverse name, then up its labels to the first domain with an MX: mail these local parts.
    mx_walk: bool = True
    mx_local_parts: list[str] = Field(default_factory=lambda: ["abuse"], min_length=1)
    max_evidence_lines: int = Field(20, ge=1, le=1000)

    @field_validator("sender", "reply_to")
    @classmethod
    def _mailbox(cls, value: str | None) -> str | None:
        if value is not None and not _MAILBOX.match(value):
            raise ValueError("expected a mail address, e.g. abuse-reports@example.org")
        return value

    @field_validator("ip_contact_zone", "domain_contact_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value and not _HOST.match(value):
            raise ValueError("expected a DNS zone name, or '' for none")
        return value

    @field_validator("mx_local_parts")
    @classmethod
    def _local_parts(cls, value: list[str]) -> list[str]:
        if any(not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", part) for part in value):
            raise ValueError("expected local parts such as 'abuse' or 'postmaster'")
        return value

    @model_validator(mode="after")
    def _needs_sender(self) -> NotifySettings:
        if self.enabled and not self.sender:
            raise ValueError("abuse mail is enabled: set sender (the From address)")
        if self.smtp_user and not self.smtp_password and self.smtp_password_file is None:
            raise ValueError("smtp_user is set: set smtp_password or smtp_password_file")
        return self

    def port_for(self, source: str) -> int | None:
        best = ""
        for prefix in self.ports_by_source:
            if source.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return self.ports_by_source[best] if best else None

    def password(self) -> str | None:
        if not self.smtp_user:
            return None
        return read_secret(self.smtp_password, self.smtp_password_file, "reputation.notify")


class AbuseIPDBSettings(_Model):
    """https://docs.abuseipdb.com/#report-endpoint"""

    key: str | None = Field(None, repr=False, exclude=True)  # never printed
    key_file: Path | None = None
    url: str = "https://api.abuseipdb.com/api/v2/report"
    # Category ids (https://www.abuseipdb.com/categories); 21 is "Web App Attack".
    categories: list[int] = Field(default_factory=lambda: [21], min_length=1)
    # Per block source prefix, e.g. {"logscan:sshd" = [18, 22]}; the longest prefix wins.
    categories_by_source: dict[str, list[int]] = Field(default_factory=dict)
    # The service takes one report per address per 15 minutes, 1000 a day on the free plan.
    per_address: Duration = 900
    daily_cap: int = Field(900, ge=1, le=1_000_000)

    @field_validator("categories")
    @classmethod
    def _ids(cls, value: list[int]) -> list[int]:
        if any(not 1 <= c <= 255 for c in value):
            raise ValueError("category ids are 1 to 255")
        return value

    def api_key(self) -> str:
        return read_secret(self.key, self.key_file, "reputation.abuseipdb")

    def categories_for(self, source: str) -> list[int]:
        best = ""
        for prefix in self.categories_by_source:
            if source.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return self.categories_by_source[best] if best else self.categories


class DShieldSettings(_Model):
    """SANS ISC DShield: the submit API (JSON, HMAC header) and the tab-separated format."""

    userid: int | None = Field(None, ge=1)
    key: str | None = Field(None, repr=False, exclude=True)  # never printed
    key_file: Path | None = None
    url: str = "https://www.dshield.org/submitapi/"
    # What was attacked: the address and port written as the target of every entry.
    # The default hides this host's address, as DShield's own clients can.
    target_ip: str = "10.0.0.1"
    target_port: int = Field(80, ge=1, le=65535)

    def api_key(self) -> str:
        return read_secret(self.key, self.key_file, "reputation.dshield")


class ReputationSettings(_Model):
    # Times in reports and mail; default the system's local zone.
    timezone: str | None = None
    # Outbox and submission ledger (SQLite), owned by whoever runs the reports commands.
    state_dir: Path = Path("/var/lib/imr/reputation")
    # Pause between two HTTP submissions, and their timeout.
    http_interval: float = Field(1.0, ge=0, le=60)
    http_timeout: float = Field(10.0, gt=0, le=300)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    httpbl: HttpBLSettings = Field(default_factory=HttpBLSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    abuseipdb: AbuseIPDBSettings = Field(default_factory=AbuseIPDBSettings)
    dshield: DShieldSettings = Field(default_factory=DShieldSettings)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError("not a known time zone; use a name like 'Europe/Berlin'") from None
        return value

    def zone(self) -> ZoneInfo | None:
        return ZoneInfo(self.timezone) if self.timezone else None
