"""The [logscan] section of the configuration file.

Example (TOML):

    [logscan]
    state_dir = "/var/lib/imr/logscan"
    trusted_proxies = ["10.0.0.0/8"]
    disabled = ["nonsense-path"]

    [logscan.thresholds.proxy-probe]
    hits = 2
    window = "10m"

    [[logscan.rules]]
    name = "wp-login"
    field = "target"
    pattern = '^/wp-login\\.php'
    needles = ["wp-login"]
    hits = 5
    window = "5m"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imr.config_types import Duration, Network
from imr.logscan.formats import LogFormat

# Source tags go on the wire as "logscan:<name>" (≤ 64 chars, [A-Za-z0-9_.:/@+-]).
RULE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(_Model):
    hits: int = Field(ge=1, le=100_000)
    window: Duration


class UserRule(_Model):
    name: str = Field(pattern=RULE_NAME)
    pattern: str
    field: Literal["target", "user_agent", "referer", "method", "message"] = "target"
    ignore_case: bool = True
    severity: int = Field(5, ge=1, le=10)
    hits: int = Field(1, ge=1, le=100_000)
    window: Duration = 600
    description: str = Field("", max_length=120)
    # Literals one of which every matching line contains: lets the scanner skip
    # lines without parsing them. Without needles the rule is tried on every line.
    needles: list[str] = Field(default_factory=list)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @field_validator("needles")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if any(not n for n in value):
            raise ValueError("needles must not be empty strings")
        return value


class LogscanConfig(_Model):
    # Where cron mode remembers how far it read each file; the scanning user must own it.
    state_dir: Path = Path("/var/lib/imr/logscan")
    format: LogFormat = LogFormat.AUTO
    # Peers whose X-Forwarded-For is believed; they themselves are never blocked.
    trusted_proxies: list[Network] = Field(default_factory=list)
    # Per-signature overrides of the default hits/window.
    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    disabled: list[str] = Field(default_factory=list)
    rules: list[UserRule] = Field(default_factory=list)
    # Lines longer than this are counted as bad and skipped (URIs that got a 414).
    max_line_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    # fail2ban filters have no thresholds of their own; these mirror fail2ban's defaults.
    fail2ban_maxretry: int = Field(5, ge=1, le=100_000)
    fail2ban_findtime: Duration = 600
    # Where `--fail2ban-filter NAME` looks for NAME.conf when NAME is not a file.
    fail2ban_filter_dir: Path = Path("/etc/fail2ban/filter.d")
    # Look every client address up in http:BL (needs [reputation.httpbl] with a key);
    # at most this many lookups per `imr scan` run (per hour for `imr watch`).
    httpbl: bool = False
    httpbl_max_lookups: int = Field(500, ge=1, le=1_000_000)
