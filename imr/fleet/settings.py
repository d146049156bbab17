"""The `[fleet]` configuration section (docs/fleet.md); off by default."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imr.config_types import Duration, Network

# A member's name is part of its stream's key (imr:fleet:NAME) and of log lines.
MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


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
    redis_url: str = "redis://127.0.0.1:6379/0"  # rediss:// for TLS
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
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("fleet.redis_url: expected redis://, rediss:// or unix://")
        return self

    @property
    def user(self) -> str:
        return self.username or self.name

    def stream(self, member: str) -> str:
        return f"{self.stream_prefix}{member}"
