"""Date templates for fail2ban filters: find the date in a line and cut it out.

fail2ban cuts the date out of a line before its failregex sees the line (hence the
`\\[\\]` left in apache filters). A filter's `datepattern` names its templates; without
one, a default list close to fail2ban's DateDetector templates is tried in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imr.logscan.f2b_config import FilterError

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\w*"
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)\w*"
_TIME = r"\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?"
_ZONE = r"(?:\s*(?:Z|[+-]\d{2}:?\d{2}|UTC|GMT|[A-Z]{3,4}))"
# Roughly fail2ban's default templates, most specific first.
_DEFAULT_DATES = (
    rf"\d{{4}}-\d{{2}}-\d{{2}}[T ]{_TIME}{_ZONE}?",  # ISO 8601
    rf"\d{{2}}/{_MONTH}/\d{{2,4}}:{_TIME}(?: ?[+-]\d{{4}})?",  # Apache access log
    rf"(?:{_DAY} )?{_MONTH}\s+\d{{1,2}},? (?:\d{{4}} )?{_TIME}(?: \d{{4}})?{_ZONE}?",  # syslog
    rf"\d{{4}}/\d{{2}}/\d{{2}} {_TIME}",  # nginx error log
    rf"\d{{1,2}}[-/.]{_MONTH}[-/.]\d{{2,4}}[ :]{_TIME}{_ZONE}?",  # 21-Jan-2015 10:56:10
    rf"\d{{1,2}}-\d{{1,2}}-\d{{4}} {_TIME}{_ZONE}?",  # 11-06-2013 02:09:40 +0300
    rf"\d{{1,2}}/\d{{1,2}}/\d{{2,4}} {_TIME}",
    rf"\d{{4}}\.\d{{2}}\.\d{{2}} {_TIME}",
    rf"\d{{2}}\d{{2}}\d{{2}} {_TIME}",  # mysql 120101 12:00:00
    r"(?<![\d.])\d{10}(?:\.\d{1,6})?(?![\d.])",  # epoch
    r"@[0-9a-f]{24}",  # TAI64N
)
_STRFTIME = {
    "ExY": r"\d{4}",
    "Exy": r"\d{2}",
    "ExH": r"\d{2}",
    "ExM": r"\d{2}",
    "ExS": r"\d{2}",
    "Exm": r"\d{2}",
    "Exd": r"\d{2}",
    "Exb": _MONTH,
    "Y": r"\d{4}",
    "y": r"\d{2}",
    "m": r"\d{1,2}",
    "d": r"\d{1,2}",
    "e": r" ?\d{1,2}",
    "H": r"\d{1,2}",
    "I": r"\d{1,2}",
    "k": r" ?\d{1,2}",
    "l": r" ?\d{1,2}",
    "M": r"\d{1,2}",
    "S": r"\d{1,2}",
    "f": r"\d+",
    "p": r"[AP]M",
    "b": _MONTH,
    "B": _MONTH,
    "a": _DAY,
    "A": _DAY,
    "z": r"(?:Z|UTC|GMT|[+-]\d{2}(?::?\d{2})?)",
    "Z": r"(?:[A-Z]{3,5})",
    "j": r"\d{1,3}",
    "s": r"\d{10}",
    "%": "%",
}
_STRF_TOKEN = re.compile(r"%(Ex[A-Za-z]|[A-Za-z%])")


_GROUPED = re.compile(r"(?<!\(\?)(?<!\\)\((?!\?)")


def _template(regex: str, line_begin: bool) -> re.Pattern[str]:
    """As fail2ban builds a date template: the date is group 1 (wrapped if the
    pattern has no group), at line begin after at most two non-word characters,
    and at a word boundary unless the pattern starts/ends with '**'."""
    regex = regex.strip()
    bound_begin = not regex.startswith(("**", "^", "(^", "(?:^"))
    bound_end = not regex.endswith(("**", "$"))
    regex = regex.removeprefix("**").removesuffix("**")
    if not _GROUPED.search(regex):
        regex = f"({regex})"
    if line_begin and bound_begin:
        regex = r"^(?:\W{0,2})?" + regex
    if bound_end:
        regex += r"(?=\b|\W|$)"
    try:
        return re.compile(regex)
    except re.error as exc:
        raise FilterError(f"datepattern {regex!r}: {exc}") from None


def _strftime_regex(pattern: str) -> str:
    def repl(m: re.Match[str]) -> str:
        return _STRFTIME.get(m.group(1), re.escape(m.group(0)))

    return _STRF_TOKEN.sub(repl, pattern)


@dataclass(frozen=True)
class DateCutter:
    """Finds the date in a line and cuts it out (or group 1 of it, if the pattern has one)."""

    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def from_datepattern(cls, value: str | None) -> DateCutter:
        if not value or not value.strip():
            return cls(tuple(_template(p, False) for p in _DEFAULT_DATES))
        compiled: list[re.Pattern[str]] = []
        for raw in value.splitlines():
            item = raw.strip()
            if not item:
                continue
            line_begin = item.upper().startswith("{^LN-BEG}")
            item = item[len("{^LN-BEG}") :] if line_begin else item
            if not item or item.upper() == "{DEFAULT}":
                compiled.extend(_template(p, line_begin) for p in _DEFAULT_DATES)
                continue
            if item.upper() in ("EPOCH", "LEPOCH"):
                compiled.append(_template(r"^\s*\[?(\d{10}(?:\.\d+)?)\]?", False))
                continue
            if item.upper() == "TAI64N":
                compiled.append(_template(r"@[0-9a-f]{24}", line_begin))
                continue
            if "{DATE}" in item:
                item = item.replace("{DATE}", "(?:" + "|".join(_DEFAULT_DATES) + ")")
            else:
                item = _strftime_regex(item)
            compiled.append(_template(item, line_begin))
        return cls(tuple(compiled))

    def split(self, line: str) -> tuple[str, str, str] | None:
        """(before, date, after); None if no date is found (fail2ban skips such lines)."""
        for pattern in self.patterns:
            m = pattern.search(line)
            if m is not None:
                start, end = m.span(1) if m.group(1) is not None else m.span()
                return line[:start], line[start:end], line[end:]
        return None
