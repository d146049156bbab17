"""The configuration file (TOML), validated with pydantic.

One object, `Config`, is built from the file (or defaults) and handed to the
daemon and the CLI; nothing else reads settings.
"""

from __future__ import annotations

import os
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from imr.config_types import Duration, Network
from imr.core.policy import Ladder
from imr.logscan.settings import LogscanConfig

DEFAULT_CONFIG_PATH = Path("/etc/imr/imr.toml")
CONFIG_ENV = "IMR_CONFIG"


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names key, value and expectation."""


class Role(StrEnum):
    BLOCK = "block"  # may only ask for blocks
    READ = "read"  # may list and show
    ADMIN = "admin"  # everything, including unblock


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    socket: Path = Path("/run/imr/imr.sock")
    socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    socket_group: str | None = None
    pid_file: Path = Path("/run/imr/imr.pid")
    log_file: Path = Path("/var/log/imr/imr.log")  # used when running in the background
    max_connections: int = Field(64, ge=1, le=10_000)
    max_line_bytes: int = Field(4096, ge=256, le=1_048_576)
    idle_timeout: float = Field(30.0, gt=0, le=3600)

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode, 8)


class StateConfig(_Section):
    path: Path = Path("/var/lib/imr/state.db")


class PolicyConfig(_Section):
    ladder: list[Duration] = Field(default_factory=lambda: [86400, 7 * 86400], min_length=1)
    repeat_window: Duration = 30 * 86400
    escalate_after: Duration = 3600

    @field_validator("ladder")
    @classmethod
    def _ascending(cls, steps: list[int]) -> list[int]:
        if steps != sorted(steps):
            raise ValueError("ladder steps must be in ascending order, e.g. ['1d', '7d']")
        return steps

    def to_ladder(self) -> Ladder:
        return Ladder(tuple(self.ladder), self.repeat_window, self.escalate_after)


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


class FirewallConfig(_Section):
    # "auto": nftables where possible, else ipset, else per-address iptables rules.
    backend: Literal["auto", "nftables", "ipset", "iptables", "dryrun"] = "auto"
    # The per-address iptables backend slows every packet as it grows: warn past this many.
    per_address_warning: int = Field(2000, ge=1)
    # Which iptables the host uses; "auto" asks the host (see backends/iptables.py).
    iptables_flavour: Literal["auto", "nft", "legacy"] = "auto"
    chain: str = Field("IMR", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,27}$")
    protocol: Literal["tcp", "udp", "all"] = "tcp"
    ports: list[PortSpec] = Field(default_factory=list)  # empty: every port
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

    @field_validator("ports")
    @classmethod
    def _multiport_limit(cls, ports: list[str]) -> list[str]:
        # The multiport match takes at most 15 ports; a range counts twice.
        weight = sum(2 if ":" in p else 1 for p in ports)
        if weight > 15:
            raise ValueError("at most 15 ports (a range counts as two), the multiport limit")
        return ports

    @model_validator(mode="after")
    def _consistent(self) -> FirewallConfig:
        if self.ports and self.protocol == "all":
            raise ValueError("ports need protocol 'tcp' or 'udp'")
        tcp_reset = "tcp-reset" in (self.reject_with_ipv4, self.reject_with_ipv6)
        if tcp_reset and self.protocol != "tcp":
            raise ValueError("reject type tcp-reset needs protocol 'tcp'")
        return self


class AccessConfig(_Section):
    """Maps local users and groups to roles. root is always admin."""

    users: dict[str, Role | list[Role]] = Field(default_factory=dict)
    groups: dict[str, Role | list[Role]] = Field(default_factory=dict)


class ProtectConfig(_Section):
    """Addresses never blocked, besides loopback and the host's own addresses."""

    allowlist: list[Network] = Field(default_factory=list)


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    firewall: FirewallConfig = Field(default_factory=FirewallConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    protect: ProtectConfig = Field(default_factory=ProtectConfig)
    logscan: LogscanConfig = Field(default_factory=LogscanConfig)

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
