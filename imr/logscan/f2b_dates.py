"""Date templates for fail2ban filters: find the date in a line and cut it out.

fail2ban cuts the date out of a line before its failregex sees the line (hence the
`\\[\\]` left in apache filters). This is a port of fail2ban 1.0.2's DateDetector
(server/datedetector.py, datetemplate.py, strptime.py): the same default templates,
the same strptime-style tokens, the same word and line-begin boundaries, so that the
same text is cut. What it does not port is the date's value (imr uses the scanner's
clock) and the detector's per-log learning; in its place, the rule the detector
applies to a log's first line: a template anchored at the line's beginning wins,
otherwise the match nearest the line's beginning (the earlier template on a tie).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from imr.logscan.f2b_config import FilterError

_MONTHS = "(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)"
_TZ_ABBR = r"[A-Z](?:[A-Z]{2,4})?"
# fail2ban's strptime.timeRE, its named groups made non-capturing (only the span is used).
_TIME_RE = {
    "a": r"(?:mon|tue|wed|thu|fri|sat|sun)",
    "A": r"(?:wednesday|thursday|saturday|tuesday|monday|friday|sunday)",
    "b": _MONTHS,
    "B": r"(?:september|february|november|december|january|october|august|march|april"
    r"|june|july|may)",
    "p": r"(?:am|pm)",
    "f": r"(?:[0-9]{1,6})",
    "y": r"(?:\d\d)",
    "Y": r"(?:\d{4})",
    "j": r"(?:36[0-6]|3[0-5]\d|[1-2]\d\d|0[1-9]\d|00[1-9]|[1-9]\d|0[1-9]|[1-9])",
    "I": r"(?:1[0-2]|0[1-9]|[1-9])",
    "k": r" ?(?:[0-2]?\d)",
    "l": r" ?(?:1?\d)",
    "d": r"(?:[1-2]\d|[0 ]?[1-9]|3[0-1])",
    "m": r"(?:0?[1-9]|1[0-2])",
    "H": r"(?:[0-1]?\d|2[0-3])",
    "M": r"(?:[0-5]?\d)",
    "S": r"(?:[0-5]?\d|6[0-1])",
    "U": r"(?:5[0-3]|[0-4]\d|\d)",
    "W": r"(?:5[0-3]|[0-4]\d|\d)",
    "w": r"(?:[0-6])",
    "Z": r"(?:Z|[A-Z]{3,5})",
    "z": r"(?:Z|UTC|GMT|[+-][01]\d(?::?\d{2})?)",
    "ExZ": rf"(?:{_TZ_ABBR})",
    "Exz": rf"(?:(?:{_TZ_ABBR})?[+-][01]\d(?::?\d{{2}})?|{_TZ_ABBR})",
    "Exd": r"(?:[1-2]\d|0[1-9]|3[0-1])",
    "Exm": r"(?:0[1-9]|1[0-2])",
    "ExH": r"(?:[0-1]\d|2[0-3])",
    "Exk": r" ?(?:[0-1]?\d|2[0-3])",
    "Exl": r" ?(?:1[0-2]|\d)",
    "ExM": r"(?:[0-5]\d)",
    "ExS": r"(?:[0-5]\d|6[0-1])",
    "ExY": r"(?:20\d\d)",  # fail2ban: this century's years near now
    "Exy": r"(?:\d{2})",
    "%": "%",
}
_TOKEN = re.compile(r"%(%|Ex[A-Za-z]|[A-Za-z])")
_ALPHA = re.compile(r"(?<!%)%[aAbBpc]")  # such patterns match case-insensitively

# fail2ban's DateDetectorCache.DEFAULT_TEMPLATES, in its order.
DEFAULT_TEMPLATES = (
    r"%ExY(?P<_sep>[-/.])%m(?P=_sep)%d(?:T|  ?)%H:%M:%S(?:[.,]%f)?(?:\s*%z)?",
    r"(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    r"(?:%a )?%b %d %ExY %k:%M:%S(?:\.%f)?",
    r"%d(?P<_sep>[-/])%m(?P=_sep)(?:%ExY|%Exy) %k:%M:%S",
    r"%d(?P<_sep>[-/])%b(?P=_sep)%ExY[ :]?%H:%M:%S(?:\.%f)?(?: %z)?",
    r"%m/%d/%ExY:%H:%M:%S",
    r"%m-%d-%ExY %k:%M:%S(?:\.%f)?",
    "EPOCH",
    r"{^LN-BEG}%H:%M:%S",
    r"^<%m/%d/%Exy@%H:%M:%S>",
    r"%Exy%Exm%Exd  ?%H:%M:%S",
    r"%b %d, %ExY %I:%M:%S %p",
    r"^%b-%d-%Exy %k:%M:%S",
    r"%ExY%Exm%Exd(?:T|  ?)%ExH%ExM%ExS(?:[.,]%f)?(?:\s*%z)?",
    r"(?:%Z )?(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    r"(?:%z )?(?:%a )?%b %d %k:%M:%S(?:\.%f)?(?: %ExY)?",
    "TAI64N",
)

# datetemplate.py's boundary rules.
_GROUPED = re.compile(r"(?<!(?:\(\?))(?<!\\)\((?!\?)")
_WRAP = re.compile(r"^((?:\(\?\w+\))?\^?(?:\(\?\w+\))?)(.*?)(\$?)$")
_GLOBAL_FLAGS = re.compile(r"((?:^|(?!<\\))\(\?[a-z]+\))")
_NO_BOUND_BEG = re.compile(r"^\(*(?:\(\?\w+\))?(?:\^|\(*\*\*|\((?:\?:)?\^)")
_NO_BOUND_END = re.compile(r"(?<!\\)(?:\$\)?|\\b|\\s|\*\*\)*)$")
_DEL_BOUNDS = re.compile(r"^\(*(?:\(\?\w+\))?\(*\*\*|(?<!\\)\*\*\)*$")
_LINE_BEG = re.compile(r"^(?:\(\?\w+\))?(?:\^|\((?:\?:)?\^(?!\|))")
_EPOCH = re.compile(r"(?<!\\)\{L?EPOCH\}", re.IGNORECASE)
_EPOCH_RE = r"\d{10,11}\b(?:\.\d{3,6})?"
_LEPOCH_RE = r"\d{10,11}(?:\d{3}(?:\.\d{1,6}|\d{3})?)?"
_LN_BEG = "{^LN-BEG}"
_DATE = re.compile(r"(?<!\\)\{DATE\}", re.IGNORECASE)


@dataclass(frozen=True)
class Template:
    regex: re.Pattern[str]
    line_begin: bool  # anchored at the line's beginning: a match ends the search


def _template(regex: str, word_begin: bool | str = True, word_end: bool = True) -> Template:
    """fail2ban's DateTemplate.setRegex: group 1 is the date; add the word boundaries."""
    regex = regex.strip()
    flags = _GLOBAL_FLAGS.search(regex)
    if flags:
        regex = _GLOBAL_FLAGS.sub("", regex, count=1)
    bound_begin = bool(word_begin) and not _NO_BOUND_BEG.search(regex)
    bound_end = word_end and not _NO_BOUND_END.search(regex)
    if not _GROUPED.search(regex):
        regex = _WRAP.sub(r"\1(\2)\3", regex)
    line_begin = False
    if bound_begin and word_begin == "start":
        regex, line_begin = r"^(?:\W{0,2})?" + regex, True
    elif bound_begin:
        regex = r"(?=^|\b|\W)" + regex
    if bound_end:
        regex += r"(?=\b|\W|$)"
    line_begin = line_begin or bool(_LINE_BEG.search(regex))
    regex = _DEL_BOUNDS.sub(lambda m: m.group().replace("**", ""), regex)
    if flags:
        regex = flags.group(1) + regex
    try:
        return Template(re.compile(regex), line_begin)
    except re.error as exc:
        raise FilterError(f"datepattern {regex!r}: {exc}") from None


def _pattern(pattern: str) -> Template:
    """fail2ban's DatePatternRegex: strptime tokens to regexes, {^LN-BEG} and {UNB} prefixes."""
    word_begin: bool | str = True
    word_end = True
    if pattern.startswith("{UNB}"):
        pattern, word_begin, word_end = pattern[len("{UNB}") :], False, False
    if word_begin and pattern.startswith(_LN_BEG):
        pattern, word_begin = pattern[len(_LN_BEG) :], "start"
    regex = _TOKEN.sub(lambda m: _TIME_RE.get(m.group(1), re.escape(m.group(0))), pattern)
    if _ALPHA.search(pattern):
        regex = "(?iu)" + regex
    return _template(regex, word_begin, word_end)


def _epoch(pattern: str | None, line_begin: bool, long: bool) -> Template:
    """fail2ban's DateEpoch: also inside `[...]` at line begin and in `audit(...:`."""
    number = _LEPOCH_RE if long else _EPOCH_RE
    if pattern:
        return _template("(" + _EPOCH.sub(lambda _: f"({number})", pattern) + ")")
    if line_begin:
        return _template(rf"((?P<square>(?<=^\[))?{number})(?(square)(?=\]))", "start")
    return _template(
        rf"((?:^|(?P<square>(?<=^\[))|(?P<selinux>(?<=\baudit\()))({number}))"
        r"(?:(?(selinux)(?=:\d+\)))|(?(square)(?=\])))",
        word_begin=False,
    )


def _named(item: str) -> Template:
    """One datepattern line (fail2ban's _getPatternTemplate)."""
    key = item if "%" in item else item.upper()
    if "EPOCH" in key:
        if _EPOCH.search(item):
            return _epoch(item, False, "LEPOCH" in key)
        for name, long in (("EPOCH", False), ("LEPOCH", True)):
            if key in (name, _LN_BEG + name, "^" + name):
                return _epoch(None, key != name, long)
    if key in ("TAI64N", _LN_BEG + "TAI64N", "^TAI64N"):
        return _template("@[0-9a-f]{24}", "start" if key != "TAI64N" else False)
    return _pattern(item)


def _unbound(pattern: str) -> str:
    pattern = pattern.removeprefix("{UNB}").removeprefix(_LN_BEG)
    pattern = re.sub(r"^\((?:\?:)?\^\|\\b\|\\W\)", "", pattern)
    return re.sub(r"\(\?=\\b\|\\W\|\$\)$", "", pattern)


@functools.cache
def _defaults() -> tuple[Template, ...]:
    """fail2ban's default list: line-begin copies first, then the templates themselves.

    Compiled on first use, not at import (30 ms, which every `imr scan` would pay)."""
    anchored = [_named(_LN_BEG + d) for d in DEFAULT_TEMPLATES if not d.startswith((_LN_BEG, "^"))]
    return (*anchored, *(_named(d) for d in DEFAULT_TEMPLATES))


def _templates(value: str | None) -> tuple[Template, ...]:
    items = [i.strip() for i in (value or "").splitlines() if i.strip()]
    if not items:
        return _defaults()
    found: list[Template] = []
    for item in items:
        key = item if "%" in item else item.upper()
        if key == _LN_BEG:
            found += [t for t in _defaults() if t.line_begin]
        elif key == "{DEFAULT}":
            found += _defaults()
        elif "{DATE}" in key:
            found += [
                _named(_DATE.sub(_unbound(d).replace("\\", "\\\\"), item))
                for d in DEFAULT_TEMPLATES
                if d not in ("EPOCH", "TAI64N")
            ]
        elif key == "{NONE}":
            found.append(_pattern("{UNB}^"))
        else:
            found.append(_named(item))
    return tuple(found)


@dataclass(frozen=True)
class DateCutter:
    """Finds the date in a line, as fail2ban's DateDetector would, and cuts it out."""

    templates: tuple[Template, ...]

    @classmethod
    def from_datepattern(cls, value: str | None) -> DateCutter:
        return cls(_templates(value))

    def split(self, line: str) -> tuple[str, str, str] | None:
        """(before, date, after); None if no template matches (fail2ban skips such lines)."""
        best: re.Match[str] | None = None
        for template in self.templates:
            m = template.regex.search(line)
            if m is None:
                continue
            if template.line_begin or m.start() <= 1:
                best = m
                break
            if best is None or m.start() < best.start():
                best = m
        if best is None:
            return None
        start, end = best.span(1) if best.group(1) is not None else best.span()
        return line[:start], line[start:end], line[end:]
