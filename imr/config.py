"""The configuration file (TOML), validated with pydantic.

One object, `Config`, is built from the file (or defaults) and handed to the
daemon and the CLI; nothing else reads settings.
"""

from __future__ import annotations

import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The access sections live in imr/config_access.py; callers keep importing them from here.
from imr.config_access import TOKEN_NAME as TOKEN_NAME
from imr.config_access import AccessConfig as AccessConfig
from imr.config_access import MetricsConfig as MetricsConfig
from imr.config_access import Role as Role
from imr.config_access import TcpConfig as TcpConfig
from imr.config_types import Duration, Network, Section
from imr.core.policy import Ladder
from imr.core.prefixes import Level
from imr.core.quota import QuotaLimits
from imr.core.slots import SlotLimits
from imr.fleet.settings import FleetSettings
from imr.logscan.settings import LogscanConfig
from imr.reputation.settings import ReputationSettings

DEFAULT_CONFIG_PATH = Path("/etc/imr/imr.toml")
CONFIG_ENV = "IMR_CONFIG"


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names key, value and expectation."""


class ServerConfig(Section):
    socket: Path = Path("/run/imr/imr.sock")
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    socket_group: str | None = None
    pid_file: Path = Path("/run/imr/imr.pid")
    log_file: Path = Path("/var/log/imr/imr.log")  # used when running in the background
    max_connections: int = Field(64, ge=1, le=10_000)
    max_line_bytes: int = Field(4096, ge=256, le=1_048_576)
    idle_timeout: float = Field(30.0, gt=0, le=3600)  # since the last request other than ping
    # Connection slots per listener (docs/operations.md, "Connection slots"): the last
    # reserved_admin_connections are for admins; other clients are capped one by one.
    reserved_admin_connections: int = Field(4, ge=0, le=10_000)
    max_connections_per_client: int = Field(48, ge=1, le=10_000)
    max_connections_no_role: int = Field(4, ge=1, le=10_000)
    tcp: TcpConfig = Field(default_factory=TcpConfig)
    # "json": one JSON object per log line (ts, level, logger, message, fields) for log shippers.
    log_format: Literal["text", "json"] = "text"
    # Lines a second about single changes (blocked/escalated/hit/unblocked/expired); past it,
    # one summary line a second. The state file keeps every change. 0: no limit.
    log_changes_per_second: int = Field(100, ge=0, le=1_000_000)

    def slot_limits(self) -> SlotLimits:
        return SlotLimits(
            total=self.max_connections,
            reserved_admin=self.reserved_admin_connections,
            per_client=self.max_connections_per_client,
            per_client_no_role=self.max_connections_no_role,
        )

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode, 8)


class StateConfig(Section):
    path: Path = Path("/var/lib/imr/state.db")
    # Reports (hit rows) older than this are deleted, a few thousand rows at a time, every
    # hour; blocks are kept for ever (the repeat ladder reads them). docs/operations.md.
    hit_retention: Duration = 90 * 86400
    # Most rows one `show` (blocks and hits, each) or `export` page returns: what one read
    # request may cost the daemon. Longer answers come in pages (docs/protocol.md).
    page_rows: int = Field(1000, ge=10, le=10_000)


class PolicyConfig(Section):
    ladder: list[Duration] = Field(default_factory=lambda: [86400, 7 * 86400], min_length=1)
    repeat_window: Duration = 30 * 86400
    escalate_after: Duration = 3600
    # The offence unit of IPv6 (issue #16): a new address of a /64 that offended within the
    # repeat window is a repeat of that /64 for the ladder. 128: each address on its own.
    ipv6_offence_prefix: int = Field(64, ge=32, le=128)
    # Off: a reporter's severity is only noted; every first offence starts at rung 1, and
    # reports within escalate_after of a block's start are one incident. On (the old
    # behaviour): severity N starts a block at rung N at least and escalates it at once.
    severity_skips_rungs: bool = False

    @field_validator("ladder")
    @classmethod
    def _ascending(cls, steps: list[int]) -> list[int]:
        if steps != sorted(steps):
            raise ValueError("ladder steps must be in ascending order, e.g. ['1d', '7d']")
        return steps

    def to_ladder(self) -> Ladder:
        return Ladder(
            tuple(self.ladder), self.repeat_window, self.escalate_after, self.severity_skips_rungs
        )


class EscalationLevel(Section):
    """One rule of aggregation: `count` blocked members of one /prefix within `window`."""

    family: Literal[4, 6]
    prefix: int = Field(ge=1, le=127)
    # What is counted: addresses (32/128, the default) or networks (64: the /64s of a /48).
    member_prefix: int | None = Field(None, ge=2, le=128)
    count: int = Field(ge=2, le=65536)
    window: Duration = 3600

    @model_validator(mode="after")
    def _shorter(self) -> EscalationLevel:
        members = self.members
        if not self.prefix < members <= (32 if self.family == 4 else 128):
            raise ValueError(
                f"prefix /{self.prefix} must be shorter than member_prefix /{members}"
                f" (at most /{32 if self.family == 4 else 128} for IPv{self.family})"
            )
        return self

    @property
    def members(self) -> int:
        return self.member_prefix or (32 if self.family == 4 else 128)

    def to_level(self) -> Level:
        return Level(self.family, self.prefix, self.members, self.count, self.window)


def _default_levels() -> list[EscalationLevel]:
    # docs/policy.md says why: a /64 is one subscriber's LAN, a /24 often many customers.
    return [
        EscalationLevel(family=6, prefix=64, count=3, window=3600),
        EscalationLevel(family=4, prefix=24, count=8, window=3600),
    ]


class EscalationConfig(Section):
    """Blocks of many addresses of one prefix become a block of the prefix (docs/policy.md)."""

    enabled: bool = True
    levels: list[EscalationLevel] = Field(default_factory=_default_levels)
    # The prefix blocks' own ladder: shorter than the addresses', as a prefix holds bystanders.
    ladder: list[Duration] = Field(default_factory=lambda: [3600, 86400, 7 * 86400], min_length=1)
    # Never escalated, whatever the count: CGNAT ranges, a CDN's, a partner's.
    never_aggregate: list[Network] = Field(default_factory=list)

    @field_validator("ladder")
    @classmethod
    def _ascending(cls, steps: list[int]) -> list[int]:
        if steps != sorted(steps):
            raise ValueError("ladder steps must be in ascending order, e.g. ['1h', '1d']")
        return steps

    def to_levels(self) -> list[Level]:
        return [level.to_level() for level in self.levels] if self.enabled else []


_PORT_RANGE = re.compile(r"^(\d{1,5})(?::(\d{1,5}))?$")


def _port_spec(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not (m := _PORT_RANGE.match(text)):
        raise ValueError("expected a port (80) or a range ('8000:8080')")
    low = int(m.group(1))
    high = int(m.group(2)) if m.group(2) else low
    if not (1 <= low <= high <= 65535):
        raise ValueError("ports are 1 to 65535, a range low:high")
    return text


PortSpec = Annotated[str, BeforeValidator(_port_spec)]


class FirewallConfig(Section):
    # "auto": nftables where possible, else ipset, else per-address iptables rules.
    backend: Literal["auto", "nftables", "ipset", "iptables", "dryrun"] = "auto"
    # The per-address iptables backend slows every packet as it grows: warn past this many.
    per_address_warning: int = Field(2000, ge=1)
    # Which iptables the host uses; "auto" asks the host (see backends/iptables.py).
    iptables_flavour: Literal["auto", "nft", "legacy"] = "auto"
    # How often the daemon checks that imr's kernel objects are intact (drift) and repairs
    # them; the check reads structure and entry counts only, so it stays cheap at scale.
    drift_check: bool = True
    drift_interval: Duration = 10
    chain: str = Field("IMR", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,27}$")
    protocol: Literal["tcp", "udp", "all"] = "tcp"
    # Destination ports a block covers: the web ports by default, as the original rule
    # (`-p tcp -m multiport --dports 80,443`); an empty list (or "all") means every port. Until
    # issue #12 the default was every port: a config that names no ports now blocks 80
    # and 443 only (docs/operations.md, "Which packets a block refuses").
    ports: list[PortSpec] = Field(default_factory=lambda: ["80", "443"])
    reject_with_ipv4: Literal[
        "icmp-host-unreachable",
        "icmp-port-unreachable",
        "icmp-net-unreachable",
        "icmp-admin-prohibited",
        "tcp-reset",
    ] = "icmp-host-unreachable"
    reject_with_ipv6: Literal[
        "icmp6-addr-unreachable",
        "icmp6-port-unreachable",
        "icmp6-adm-prohibited",
        "icmp6-no-route",
        "tcp-reset",
    ] = "icmp6-addr-unreachable"

    @field_validator("ports", mode="before")
    @classmethod
    def _every_port(cls, value: Any) -> Any:
        return [] if value == "all" else value  # `ports = "all"`: the same as []

    @field_validator("ports")
    @classmethod
    def _multiport_limit(cls, ports: list[str]) -> list[str]:
        # The multiport match takes at most 15 ports; a range counts twice.
        weight = sum(2 if ":" in p else 1 for p in ports)
        if weight > 15:
            raise ValueError("at most 15 ports (a range counts as two), the multiport limit")
        return ports

    @model_validator(mode="before")
    @classmethod
    def _all_protocols_all_ports(cls, data: Any) -> Any:
        # The web-port default needs a port-carrying protocol: `protocol = "all"` without
        # ports keeps meaning every packet, as before the default changed.
        if isinstance(data, dict) and data.get("protocol") == "all" and "ports" not in data:
            return {**data, "ports": []}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> FirewallConfig:
        if self.ports and self.protocol == "all":
            raise ValueError("ports need protocol 'tcp' or 'udp'")
        tcp_reset = "tcp-reset" in (self.reject_with_ipv4, self.reject_with_ipv6)
        if tcp_reset and self.protocol != "tcp":
            raise ValueError("reject type tcp-reset needs protocol 'tcp'")
        return self


class ProtectConfig(Section):
    """Addresses never blocked, besides loopback and the host's own addresses."""

    allowlist: list[Network] = Field(default_factory=list)
    # The widest network an admin may block (CIDR prefix length); /0 is never accepted.
    network_min_prefix_v4: int = Field(16, ge=1, le=32)
    network_min_prefix_v6: int = Field(32, ge=1, le=128)

    @property
    def network_min_prefix(self) -> dict[int, int]:
        return {4: self.network_min_prefix_v4, 6: self.network_min_prefix_v6}


class QuotaConfig(Section):
    """Limits on what block-role clients can make imr do (docs/operations.md, Quotas); 0: none.

    A client is a principal: a Unix uid, a certificate or a token. Admins are
    exempt unless admin_exempt is false.
    """

    blocks_per_minute: int = Field(60, ge=0)  # new blocks per client in any 60 s window
    active_per_client: int = Field(10_000, ge=0)
    active_global: int = Field(200_000, ge=0)
    hits_per_minute: int = Field(600, ge=0)  # reports of already-blocked addresses per client
    admin_exempt: bool = True

    def to_limits(self) -> QuotaLimits:
        return QuotaLimits(
            self.blocks_per_minute, self.active_per_client, self.active_global, self.hits_per_minute
        )


class Config(Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)
    firewall: FirewallConfig = Field(default_factory=FirewallConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    protect: ProtectConfig = Field(default_factory=ProtectConfig)
    logscan: LogscanConfig = Field(default_factory=LogscanConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    reputation: ReputationSettings = Field(default_factory=ReputationSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    @model_validator(mode="after")
    def _fleet_retention(self) -> Config:
        needed = max(self.policy.ladder) + self.policy.repeat_window
        if self.fleet.enabled and self.fleet.retention < needed:
            raise ValueError(
                f"fleet.retention must be at least the longest rung plus policy.repeat_window"
                f" ({needed} s): a member catching up must see every offence that still counts"
            )
        return self

    @cached_property
    def guarded(self) -> ProtectConfig:
        """The protect section in force: in fleet mode, every member's addresses join the
        allowlist. A local client (a hook whose realip settings are wrong reports the proxy)
        must not block the load balancer or another member any more than a remote event may."""
        if not self.fleet.enabled:
            return self.protect
        allowlist = list(self.protect.allowlist)
        for member in self.fleet.members.values():
            allowlist += [net for net in member.addresses if net not in allowlist]
        return self.protect.model_copy(update={"allowlist": allowlist})

    def to_toml(self) -> str:
        return _to_toml(self.model_dump(mode="json"))


def config_path(explicit: Path | None) -> Path:
    """--config wins, then IMR_CONFIG, then the default."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path, *, missing_ok: bool) -> Config:
    """Read and validate a config file. A missing default file means all defaults."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return Config()
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid configuration:\n{describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """One line per problem: the key, the value given and what was expected."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif error["type"] == "missing":
            lines.append(f"  {key}: required")
        elif isinstance(error.get("input"), dict):  # a whole section: the message names the key
            lines.append(f"  {key}: {message}")
        else:
            lines.append(f"  {key} = {error.get('input')!r}: {message}")
    return "\n".join(lines)


def _to_toml(data: dict[str, Any]) -> str:
    """Enough TOML writing for our own config (tomllib only reads): tables, arrays of tables."""
    out: list[str] = []
    for section, values in data.items():
        _emit_table([section], values, out)
    return "\n".join(out).strip() + "\n"


def _emit_table(
    path: list[str], table: dict[str, Any], out: list[str], array: bool = False
) -> None:
    header = ".".join(_toml_key(p) for p in path)
    out.append(f"\n[[{header}]]" if array else f"\n[{header}]")
    nested: list[tuple[str, Any]] = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, dict) or (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            nested.append((key, value))
        else:
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in nested:
        if isinstance(value, dict):
            _emit_table([*path, key], value, out)
        else:
            for item in value:
                _emit_table([*path, key], item, out, array=True)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
