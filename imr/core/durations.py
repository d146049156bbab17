"""Human durations ("90s", "30m", "1h", "1d", "7d", "2w") to seconds and back."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PATTERN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_duration(text: str) -> int:
    """Return whole seconds; raise ValueError with the accepted forms."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration; use a number and a unit: 90s, 30m, 1h, 1d, 2w"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The largest unit that divides exactly, so ladders print as they were written."""
    whole = round(seconds)
    # Weeks are accepted on input but printed as days: "7d" is how operators say it.
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if whole >= size and whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"
