"""The `[fleet]` configuration section (docs/fleet.md); off by default.

Redis is reached one of two ways: `redis_url` names one server, or `sentinels` (with
`sentinel_service`, the name Sentinel monitors the primary under) let Sentinel say which
server is the primary now. A configuration names exactly one of the two.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imr.config_types import Duration, Network

# A member's name is part of its stream's key (imr:fleet:NAME) and of log lines.
MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")  # of a host name
SENTINEL_FORM = "expected HOST:PORT, e.g. 192.0.2.5:26379 or [2001:db8::5]:26379"


def sentinel_address(text: str) -> tuple[str, int]:
    """`host:port` (an IPv6 address in brackets) as (host, port); ValueError says why not."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(SENTINEL_FORM)
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address; {SENTINEL_FORM}") from None
    if ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets; {SENTINEL_FORM}")
    if len(host) > 253 or not all(LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"{host!r} is not a host name or address; {SENTINEL_FORM}")
    return host, int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetMember(_Section):
    """Another host of the fleet (or this one): its signing key and its addresses."""

    public_key: str  # Ed25519, base64 of the 32 raw bytes (`imr fleet keygen` prints it)
    # Never blocked because of a fleet event, like this host's own addresses.
    addresses: list[Network] = Field(default_factory=list)
    # An admin key may lift blocks other members made (an admin workstation's key).
    admin: bool = False


class FleetSettings(_Section):
    enabled: bool = False
    name: str = ""  # this member; its events go to the stream imr:fleet:NAME
    redis_url: str = ""  # one server: redis://, rediss:// for TLS, unix://
    # ... or Sentinel: its addresses (HOST:PORT) and the name of the primary it monitors.
    sentinels: list[str] = Field(default_factory=list)
    sentinel_service: str = ""
    sentinel_password_file: Path | None = None  # Sentinel's own requirepass, if any
    sentinel_tls: bool = False  # talk TLS to the sentinels too (tls_ca, tls_cert)
    tls: bool = False  # with sentinels: TLS to the data servers (redis_url says rediss://)
    # Delete an outbox row only once this many replicas hold its event (WAIT after XADD).
    wait_replicas: int = Field(0, ge=0, le=16)
    username: str = ""  # the member's Redis ACL user (default: name)
    password_file: Path | None = None  # the ACL user's password, one line
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # client certificate, if Redis asks for one
    tls_key: Path | None = None
    private_key: Path = Path("/etc/imr/fleet.key")  # this member's Ed25519 key (PEM)
    members: dict[str, FleetMember] = Field(default_factory=dict)
    # Events one origin may have applied here in any 60 s window; the rest are refused.
    per_origin_per_minute: int = Field(6000, ge=1)
    # How long events stay in the streams (XTRIM MINID); at least the longest rung plus
    # the repeat window (checked with the policy: Config._fleet_retention).
    retention: Duration = 60 * 86400
    stream_prefix: str = "imr:fleet:"

    @field_validator("members")
    @classmethod
    def _names(cls, members: dict[str, FleetMember]) -> dict[str, FleetMember]:
        for name in members:
            if not MEMBER_NAME.match(name):
                raise ValueError(f"member name {name!r}: letters, digits, '_', '.', '-' only")
        return members

    @field_validator("sentinels")
    @classmethod
    def _sentinels(cls, sentinels: list[str]) -> list[str]:
        for text in sentinels:
            try:
                sentinel_address(text)
            except ValueError as exc:
                raise ValueError(f"{text!r}: {exc}") from None
        return sentinels

    @model_validator(mode="after")
    def _complete(self) -> FleetSettings:
        if not self.enabled:
            return self
        if not MEMBER_NAME.match(self.name):
            raise ValueError("fleet.name: this member's name is required (letters, digits, _.-)")
        if self.name not in self.members:
            raise ValueError(
                f"fleet.members has no entry {self.name!r} for this member (its public key)"
            )
        self._one_way_to_redis()
        return self

    def _one_way_to_redis(self) -> None:
        if self.redis_url and self.sentinels:
            raise ValueError(
                "fleet.redis_url and fleet.sentinels both given: name one server (redis_url)"
                " or the sentinels that know the primary (sentinels, sentinel_service)"
            )
        if self.sentinels:
            if not MEMBER_NAME.match(self.sentinel_service):
                raise ValueError(
                    "fleet.sentinel_service: the name Sentinel monitors the primary under"
                    ' (sentinel monitor NAME ...) is required with fleet.sentinels, e.g. "imr"'
                )
            return
        if not self.redis_url:
            raise ValueError(
                'fleet: set redis_url ("rediss://redis.example.org:6380/0") or sentinels'
                ' (["192.0.2.5:26379", ...]) with sentinel_service'
            )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("fleet.redis_url: expected redis://, rediss:// or unix://")
        for key in ("sentinel_service", "sentinel_password_file", "sentinel_tls", "tls"):
            if getattr(self, key):
                why = "use rediss:// in redis_url" if key == "tls" else "set fleet.sentinels"
                raise ValueError(f"fleet.{key} is for Sentinel only: {why}")

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [sentinel_address(text) for text in self.sentinels]

    @property
    def data_tls(self) -> bool:
        """Whether the data servers (the primary) are reached over TLS."""
        return self.tls if self.sentinels else self.redis_url.startswith("rediss://")

    @property
    def user(self) -> str:
        return self.username or self.name

    def stream(self, member: str) -> str:
        return f"{self.stream_prefix}{member}"
