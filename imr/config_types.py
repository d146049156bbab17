"""Field types shared by every configuration section: durations and networks.

A duration is read as "90s", "30m", "1h", "1d", "2w" (or whole seconds) and
written back the same way; a network as CIDR text (a bare address is a /32 or
/128). Invalid values give the message the operator sees.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer

from imr.core.durations import exact_duration, parse_duration


def _duration(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 1h, 1d or 7d")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a duration must be longer than zero")
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError("expected a duration such as 1h, 1d or 7d")


Duration = Annotated[
    int, BeforeValidator(_duration), PlainSerializer(exact_duration, return_type=str)
]


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError("expected an address or network in CIDR form, e.g. 192.0.2.0/24")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("expected an address or network in CIDR form, e.g. 192.0.2.0/24") from None


Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(_network),
    PlainSerializer(str, return_type=str),
]


class Section(BaseModel):
    """A configuration section: unknown keys are refused, values never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)
