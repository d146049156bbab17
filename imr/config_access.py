"""The configuration sections about who may connect: roles, the access map (local users,
groups, certificates, tokens), the TCP listener and the metrics endpoint.

Split out of imr/config.py, which re-exports every name here.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationInfo, field_validator, model_validator

from imr.config_types import Section
from imr.core.slots import StartupLimits


class Role(StrEnum):
    BLOCK = "block"  # may only ask for blocks
    READ = "read"  # may list and show
    ADMIN = "admin"  # everything, including unblock


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


class TcpConfig(Section):
    """The TCP listener for clients on other hosts (docs/security.md, "Network clients").

    Off by default. Loopback only unless allow_non_loopback; any other address
    needs TLS too, so tokens and requests never cross a network in clear.
    """

    enabled: bool = False
    listen: str = "127.0.0.1"  # one IPv4 or IPv6 address; 0.0.0.0 / :: mean every address
    port: int = Field(7700, ge=0, le=65535)  # 0: any free port (tests)
    tls_cert: Path | None = None  # the daemon's certificate chain (PEM)
    tls_key: Path | None = None  # its private key (PEM); may be inside tls_cert
    client_ca: Path | None = None  # CA that signs client certificates (access.certificates)
    allow_non_loopback: bool = False
    # Before it is identified a connection is a startup (docs/operations.md, "Connection
    # slots"): at most max_startups, dropped at random from startups_drop_from on.
    max_startups: int = Field(32, ge=1, le=10_000)
    startups_drop_from: int = Field(16, ge=1, le=10_000)
    max_connections_per_source: int = Field(16, ge=1, le=10_000)  # an IPv4 address or IPv6 /64

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError("expected an IP address such as 127.0.0.1 or ::1") from None

    @model_validator(mode="after")
    def _safe(self) -> TcpConfig:
        if self.startups_drop_from > self.max_startups:
            raise ValueError(
                f"startups_drop_from = {self.startups_drop_from} is above max_startups ="
                f" {self.max_startups}: random early drop starts at or below the limit"
            )
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError("tls_key needs tls_cert")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (client certificates) needs TLS: set tls_cert and tls_key")
        if not _is_loopback(self.listen):
            if not self.allow_non_loopback:
                raise ValueError(
                    f"listen = {self.listen!r} is not a loopback address: set"
                    " allow_non_loopback = true to accept clients from other hosts"
                )
            if self.tls_cert is None:
                raise ValueError(
                    f"listen = {self.listen!r} is not a loopback address and needs TLS:"
                    " set tls_cert and tls_key (and client_ca for client certificates)"
                )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def startup_limits(self) -> StartupLimits:
        return StartupLimits(
            max_startups=self.max_startups,
            drop_from=self.startups_drop_from,
            per_source=self.max_connections_per_source,
        )


# Certificate subject attributes a key in access.certificates may name (OpenSSL's short names).
SUBJECT_ATTRIBUTES = ("CN", "O", "OU", "C", "L", "ST", "DC", "emailAddress", "serialNumber")
_ATTRIBUTE_BY_LOWER = {name.lower(): name for name in SUBJECT_ATTRIBUTES}
TOKEN_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # noqa: S105 - a pattern, not a secret


def canonical_subject(key: str) -> str:
    """'cn = web1, O=Example' -> 'CN=web1,O=Example'; ValueError for anything else."""
    parts = []
    for part in key.split(","):
        name, eq, value = part.partition("=")
        attribute = _ATTRIBUTE_BY_LOWER.get(name.strip().lower())
        if not eq or attribute is None or not value.strip():
            raise ValueError(
                "expected ATTRIBUTE=value pairs separated by commas, such as"
                f" 'CN=web1.example' or 'CN=web1.example,O=Example'"
                f" (attributes: {', '.join(SUBJECT_ATTRIBUTES)})"
            )
        parts.append(f"{attribute}={value.strip()}")
    return ",".join(parts)


class TokenConfig(Section):
    """One bearer token: only its SHA-256 is stored (`imr token new` prints this entry)."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Role | list[Role]


class AccessConfig(Section):
    """Maps local users and groups, and TCP clients, to roles. root is always admin."""

    users: dict[str, Role | list[Role]] = Field(default_factory=dict)
    groups: dict[str, Role | list[Role]] = Field(default_factory=dict)
    # TCP clients with a certificate from server.tcp.client_ca: a key matches a
    # certificate whose subject has every attribute=value it names ("CN=web1.example").
    certificates: dict[str, Role | list[Role]] = Field(default_factory=dict)
    # TCP clients without a certificate: name -> hashed token and role.
    tokens: dict[Annotated[str, Field(pattern=TOKEN_NAME)], TokenConfig] = Field(
        default_factory=dict
    )

    @field_validator("certificates")
    @classmethod
    def _subjects(cls, mapping: dict[str, Role | list[Role]]) -> dict[str, Role | list[Role]]:
        result: dict[str, Role | list[Role]] = {}
        for key, roles in mapping.items():
            try:
                canonical = canonical_subject(key)
            except ValueError as exc:
                raise ValueError(f"{key!r}: {exc}") from None
            if canonical in result:
                raise ValueError(f"{key!r} names the same subject as another key")
            result[canonical] = roles
        return result


_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<v4>[0-9.]+)):(?P<port>\d{1,5})$")


class MetricsConfig(Section):
    """The Prometheus endpoint (docs/operations.md, Metrics): off, and loopback-only, by default."""

    enabled: bool = False
    allow_non_loopback: bool = False  # the page has no authentication; keep it local
    listen: str = "127.0.0.1:9737"  # an address literal and port: "127.0.0.1:9737", "[::1]:9737"

    @field_validator("listen")
    @classmethod
    def _loopback_address_and_port(cls, value: str, info: ValidationInfo) -> str:
        m = _LISTEN.match(value)
        if not m or not 1 <= int(m.group("port")) <= 65535:
            raise ValueError("expected address:port, e.g. '127.0.0.1:9737' or '[::1]:9737'")
        try:
            address = ipaddress.ip_address(m.group("v6") or m.group("v4"))
        except ValueError:
            raise ValueError("expected an IP address literal, not a host name") from None
        if not address.is_loopback and not info.data.get("allow_non_loopback"):
            raise ValueError(
                "not a loopback address; set metrics.allow_non_loopback = true"
                " to expose metrics on the network"
            )
        return value

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])
