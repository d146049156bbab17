"""Human durations ("90s", "30m", "1h", "1d", "7d", "2w", "1d 2h") to seconds and back.

Two ways out: `format_duration` is for people (a block's length, a window, a
remaining time): the largest unit and the next one, rounded, so a block
escalated 32 seconds into its life prints "7d", not "604832s". `exact_duration`
is for the configuration `imr config show` writes back: every unit, nothing
rounded, in a form `parse_duration` reads again.
"""

from __future__ import annotations

import functools
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Weeks are accepted on input but printed as days: "7d" is how operators say it.
_PRINTED = ((86400, "d"), (3600, "h"), (60, "m"), (1, "s"))
_PART = re.compile(r"\s*(\d+)\s*([smhdw])")
_WHOLE = re.compile(r"^(?:\s*\d+\s*[smhdw])+\s*$")


def parse_duration(text: str) -> int:
    """Return whole seconds; raise ValueError with the accepted forms."""
    if not _WHOLE.match(text):
        raise ValueError(
            f"{text!r} is not a duration; use a number and a unit: 90s, 30m, 1h, 1d, 2w, 1d 2h"
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(text))
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """For people: "7d", "1d 2h", "45s": the largest unit and the next, rounded to the latter."""
    return _format_whole(max(0, round(seconds)))


@functools.lru_cache(maxsize=1024)  # every block reply has one; the ladder's few repeat
def _format_whole(whole: int) -> str:
    for index, (size, _) in enumerate(_PRINTED[:-1]):
        if whole >= size:
            step = _PRINTED[index + 1][0]
            # Rounding may carry into the unit above (23h 59m 40s is "1d"): split afresh.
            return _join(round(whole / step) * step, limit=2)
    return f"{whole}s"


def exact_duration(seconds: float) -> str:
    """Every unit, nothing rounded ("1d 2h 3m 4s"); parse_duration reads it back."""
    return _join(max(0, round(seconds)), limit=len(_PRINTED))


def _join(whole: int, limit: int) -> str:
    parts: list[str] = []
    for size, unit in _PRINTED:
        count, whole = divmod(whole, size)
        if parts or count:
            if count:
                parts.append(f"{count}{unit}")
            limit -= 1
        if limit == 0:
            break
    return " ".join(parts) or "0s"
