"""Load fail2ban filter.d files and use them as signatures.

Supported: [INCLUDES] before/after (and the automatic NAME.local), [DEFAULT],
[Init] and [Definition]; %(name)s interpolation including %(known/name)s;
<tag> substitution from [Init]/[Definition] (nested, like
<apache-prefix-<logging>>); multi-line failregex/ignoreregex; prefregex with
<F-CONTENT>; the host tags <HOST> <ADDR> <IP4> <IP6> <DNS> <SUBNET> <CIDR> and
<F-...> groups; datepattern (strftime-style, {^LN-BEG}, {DATE}) and a default
set of date formats. The date is cut out of the line before matching, as
fail2ban does (hence the `\\[\\]` in apache filters).

Not supported (the filter is refused with a message): multi-line matching
(<SKIPLINES>, maxlines). Host names (the <DNS> part of <HOST>) are never
resolved: only lines whose host is an IP address give hits, as with usedns=no.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass
from pathlib import Path

from imr.logscan.formats import Record
from imr.logscan.signatures import Signature

_MAX_INCLUDE_DEPTH = 8
_MAX_ROUNDS = 64

_IP4 = r"(?:\d{1,3}\.){3}\d{1,3}"
_IP6 = r"(?:[0-9a-fA-F]{1,4}::?|::){1,7}(?:[0-9a-fA-F]{1,4}|(?<=:):)"
_R_IP4 = rf"(?:::f{{4,6}}:)?(?P<ip4>{_IP4})"
_R_IP6 = rf"(?P<ip6>{_IP6})"
_R_DNS = r"(?P<dns>[\w\-.^_]*\w)"
_R_ADDR = rf"\[?(?:{_R_IP4}|{_R_IP6})\]?"
_HOST_TAGS = {
    "HOST": rf"(?:{_R_ADDR}|{_R_DNS})",
    "ADDR": _R_ADDR,
    "IP4": _R_IP4,
    "IP6": _R_IP6,
    "DNS": _R_DNS,
    "CIDR": r"(?P<cidr>\d+)",
    "SUBNET": rf"\[?(?:{_R_IP4}|{_R_IP6})(?:/(?P<cidr>\d+))?\]?",
    "F-ID/": r"(?P<fid>\S+)",
    "F-PORT/": r"(?P<fport>\w+)",
}
_HOST_TAGS.update({f"F-{k}/": v for k, v in _HOST_TAGS.items() if "/" not in k})
_TAG = re.compile(r"</?[\w\-]+/?>")
_F_TAG = re.compile(r"^(/?)F-([A-Z0-9_\-]+)$")
_GLOBAL_FLAGS = re.compile(r"(?<!\\)\((?:\?:)?(\(\?[a-z]+)\)")
_CONF_TAG = re.compile(r"<([^ <>]+)>")
_INTERP = re.compile(r"%\(([^)]+)\)s")


class FilterError(Exception):
    """A filter file that cannot be used; the message names the file and the problem."""


# --- dates ----------------------------------------------------------------------

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

    def cut(self, line: str) -> str | None:
        """The line without its date; None if no date is found (fail2ban skips such lines)."""
        best: re.Match[str] | None = None
        for pattern in self.patterns:
            m = pattern.search(line)
            if m is not None:
                best = m
                break
        if best is None:
            return None
        span = best.span(1) if best.group(1) is not None else best.span()
        return line[: span[0]] + line[span[1] :]


# --- reading the .conf files ------------------------------------------------------

Sections = dict[str, dict[str, str]]


def _parse_file(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        strict=False,
        inline_comment_prefixes=(";",),
        interpolation=None,
        default_section="DEFAULT",
    )
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=str(path))
    except FileNotFoundError:
        raise FilterError(f"{path}: no such file") from None
    except OSError as exc:
        raise FilterError(f"{path}: cannot read: {exc.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise FilterError(f"{path}: not a fail2ban filter file: {exc}") from None
    return parser


def _read(path: Path, sections: Sections, known: Sections, depth: int) -> None:
    if depth > _MAX_INCLUDE_DEPTH:
        raise FilterError(f"{path}: includes nested too deeply")
    parser = _parse_file(path)
    includes = dict(parser.items("INCLUDES")) if parser.has_section("INCLUDES") else {}
    for name in includes.get("before", "").split():
        _read_include(path.parent / name, sections, known, depth, required=True)
    own: Sections = {"DEFAULT": dict(parser.defaults())}
    for section in parser.sections():
        if section != "INCLUDES":
            # The section's own options only (items() would mix in [DEFAULT]).
            own[section] = dict(parser._sections[section])  # type: ignore[attr-defined]
    for section, values in own.items():
        target = sections.setdefault(section, {})
        for key, value in values.items():
            if key in target:
                known.setdefault(section, {})[key] = target[key]
            target[key] = value
    for name in includes.get("after", "").split():
        _read_include(path.parent / name, sections, known, depth, required=False)
    local = path.with_suffix(".local")
    if path.suffix == ".conf" and local.exists():
        _read(local, sections, known, depth + 1)


def _read_include(
    path: Path, sections: Sections, known: Sections, depth: int, required: bool
) -> None:
    if not path.exists():
        if required and path.suffix == ".conf":
            raise FilterError(f"{path}: included file not found")
        return
    _read(path, sections, known, depth + 1)


def _interpolate(value: str, section: str, sections: Sections, known: Sections) -> str:
    defaults = sections.get("DEFAULT", {})
    for _ in range(_MAX_ROUNDS):
        if "%(" not in value:
            break

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name.startswith("known/"):
                key = name[len("known/") :]
                found = known.get(section, {}).get(key, known.get("DEFAULT", {}).get(key))
                return found if found is not None else ""
            for source in (sections.get(section, {}), defaults):
                if name in source:
                    return source[name]
            if "/" in name:  # %(lt_file/datepattern)s: another section's option
                other, key = name.split("/", 1)
                if key in sections.get(other, {}):
                    return sections[other][key]
            raise FilterError(f"[{section}] refers to %({name})s, which is not defined")

        value = _INTERP.sub(repl, value)
    else:
        raise FilterError(f"[{section}]: interpolation does not terminate")
    return value.replace("%%", "%")


def _substitute_tags(value: str, tags: dict[str, str]) -> str:
    for _ in range(_MAX_ROUNDS):
        changed = False

        def repl(m: re.Match[str]) -> str:
            nonlocal changed
            name = m.group(1)
            if name in tags:
                changed = True
                return tags[name]
            return m.group(0)

        value = _CONF_TAG.sub(repl, value)
        if not changed:
            return value
    raise FilterError("tag substitution does not terminate (self-referencing <tags>?)")


def _host_tags(regex: str) -> str:
    """<HOST> and friends to fail2ban's regexes; <F-NAME>...</F-NAME> to named groups."""
    open_tags: set[str] = set()

    def repl(m: re.Match[str]) -> str:
        tag = m.group(0)
        name = tag[1:-1]
        if name in _HOST_TAGS:
            return _HOST_TAGS[name]
        f = _F_TAG.match(name)
        if f is None:
            return tag
        closing, fname = f.groups()
        if closing:
            return ")" if fname in open_tags else tag
        open_tags.add(fname)
        group = {"ID": "fid", "PORT": "fport"}.get(fname, fname.lower().replace("-", "_"))
        return f"(?P<{group}>"

    return _TAG.sub(repl, regex)


def _compile(regex: str, what: str, path: Path) -> re.Pattern[str]:
    if "<SKIPLINES>" in regex:
        raise FilterError(f"{path}: {what} uses <SKIPLINES> (multi-line matching is not supported)")
    text = _GLOBAL_FLAGS.sub(r"\1:", _host_tags(regex))
    try:
        return re.compile(text)
    except re.error as exc:
        raise FilterError(f"{path}: {what} {regex[:80]!r} does not compile: {exc}") from None


@dataclass(frozen=True)
class Fail2banFilter:
    name: str
    failregex: tuple[re.Pattern[str], ...]
    ignoreregex: tuple[re.Pattern[str], ...]
    prefregex: re.Pattern[str] | None
    dates: DateCutter

    def match(self, line: str) -> tuple[str, str] | None:
        """(host, evidence) if the line is a failure with an IP-address host."""
        text = self.dates.cut(line.rstrip("\r\n"))
        if text is None:
            return None
        groups: dict[str, str | None] = {}
        if self.prefregex is not None:
            pm = self.prefregex.search(text)
            if pm is None:
                return None
            groups.update(pm.groupdict())
            content = pm.groupdict().get("content")
            if content is not None:
                text = content
        for ignore in self.ignoreregex:
            if ignore.search(text):
                return None
        for index, regex in enumerate(self.failregex):
            m = regex.search(text)
            if m is None:
                continue
            found = {**groups, **{k: v for k, v in m.groupdict().items() if v is not None}}
            host = found.get("ip4") or found.get("ip6") or found.get("dns") or found.get("fid")
            if not host:
                return None
            return host, f"fail2ban {self.name} failregex #{index + 1}"
        return None

    def matches_line(self, line: str) -> tuple[bool, str | None]:
        """For comparison with fail2ban: did a failregex match, and which host (any kind)."""
        found = self.match(line)
        return (found is not None, found[0] if found else None)


def parse_filter(path: Path) -> Fail2banFilter:
    """Read a filter.d file (with its includes); FilterError names the file and the problem."""
    try:
        return _parse_filter(path)
    except FilterError as exc:
        if str(path) in str(exc):
            raise
        raise FilterError(f"{path}: {exc}") from None


def _parse_filter(path: Path) -> Fail2banFilter:
    sections: Sections = {}
    known: Sections = {}
    _read(path, sections, known, 0)
    if "Definition" not in sections:
        raise FilterError(f"{path}: no [Definition] section")

    def option(name: str) -> str | None:
        raw = sections["Definition"].get(name)
        if raw is None:
            raw = sections.get("DEFAULT", {}).get(name)
        if raw is None:
            return None
        return _interpolate(raw, "Definition", sections, known)

    tags: dict[str, str] = {}
    for section in ("DEFAULT", "Definition", "Init"):
        for key in sections.get(section, {}):
            try:
                tags[key] = _interpolate(sections[section][key], section, sections, known)
            except FilterError:
                continue  # an unused option may refer to something undefined
    for section, values in sections.items():
        if section in ("DEFAULT", "Definition", "Init"):
            continue
        for key, raw in values.items():  # <lt_file/__prefix_line>: qualified tags
            try:
                tags[f"{section}/{key}"] = _interpolate(raw, section, sections, known)
            except FilterError:
                continue
    tags = {k: _substitute_tags(v, tags) for k, v in tags.items()}

    def regexes(name: str) -> tuple[re.Pattern[str], ...]:
        value = option(name)
        if not value:
            return ()
        value = _substitute_tags(value, tags)
        return tuple(
            _compile(line.strip(), name, path) for line in value.splitlines() if line.strip()
        )

    failregex = regexes("failregex")
    if not failregex:
        raise FilterError(f"{path}: no failregex")
    pref = option("prefregex")
    prefregex = (
        _compile(_substitute_tags(pref, tags).strip(), "prefregex", path)
        if pref and pref.strip()
        else None
    )
    datepattern = option("datepattern")
    return Fail2banFilter(
        name=path.stem,
        failregex=failregex,
        ignoreregex=regexes("ignoreregex"),
        prefregex=prefregex,
        dates=DateCutter.from_datepattern(
            _substitute_tags(datepattern, tags) if datepattern else None
        ),
    )


def _never(record: Record) -> str | None:
    return None


def load_filter(path: Path, *, maxretry: int = 5, findtime: int = 600) -> Signature:
    """A fail2ban filter as a Signature that tests whole lines (no prefilter)."""
    flt = parse_filter(path)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", flt.name)[:48] or "filter"
    return Signature(
        name=name,
        severity=5,
        description=f"fail2ban filter {path}",
        hits=maxretry,
        window=findtime,
        test=_never,
        line_test=flt.match,
        source_prefix="fail2ban",
    )
