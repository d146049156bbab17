"""Load fail2ban filter.d files and use them as signatures.

A port of what fail2ban 1.0.2 does with a filter, in five parts: reading the .conf
files (f2b_config: includes, interpolation, known/ values, <tags>), cutting the date
(f2b_dates: the DateDetector's templates), the line buffer of multi-line filters
(f2b_lines: maxlines, <SKIPLINES>), sessions (f2b_sessions: <F-MLFID>, <F-NOFAIL>,
<F-MLFGAINED>, <F-MLFFORGET>), and here the regexes (<HOST> and friends, <F-...>
groups, prefregex with <F-CONTENT>, ignoreregex) and findFailure's order of work.

A filter keeps state across the lines it is given (sessions, line buffer), so lines
must come in log order. Host names (the <DNS> part of <HOST>) are never resolved:
only lines whose host is an IP address give hits, as with usedns=no.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from imr.logscan.f2b_config import (
    FilterError,
    Sections,
    interpolate,
    read_filter,
    substitute_tags,
)
from imr.logscan.f2b_dates import DateCutter
from imr.logscan.f2b_lines import SKIPLINES, Line, joined, split_matched
from imr.logscan.f2b_sessions import Groups, Sessions
from imr.logscan.formats import Record
from imr.logscan.signatures import Signature

__all__ = ["Fail2banFilter", "FilterError", "load_filter", "parse_filter"]

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


def _host_tags(regex: str) -> str:
    """<HOST> and friends to fail2ban's regexes; <F-NAME>...</F-NAME> to named groups."""
    open_tags: set[str] = set()
    skips = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal skips
        tag = m.group(0)
        name = tag[1:-1]
        if name == "SKIPLINES":
            skips += 1
            return SKIPLINES.format(n=skips - 1)
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


def _compile(regex: str, what: str, path: Path, multiline: bool = False) -> re.Pattern[str]:
    text = _GLOBAL_FLAGS.sub(r"\1:", _host_tags(regex))
    try:
        return re.compile(text, re.MULTILINE if multiline else 0)
    except re.error as exc:
        raise FilterError(f"{path}: {what} {regex[:80]!r} does not compile: {exc}") from None


_MAX_LINES = 100  # fail2ban has no limit; this bounds the cost of one line (slapd uses 20)
_ALT = re.compile(r"^alt_(.*?)(?:_\d+)?$")


def _groups(m: re.Match[str]) -> Groups:
    """The matched groups, alternates merged as fail2ban does (alt_user_1 -> user if unset)."""
    found = m.groupdict()
    for key in sorted(k for k in found if k.startswith("alt_")):
        alt = _ALT.match(key)
        name = {"id": "fid", "port": "fport"}.get(alt.group(1), alt.group(1)) if alt else key
        if found[key] and not found.get(name):
            found[name] = found[key]
    return {k: v for k, v in found.items() if v is not None}


@dataclass(frozen=True)
class Fail2banFilter:
    name: str
    failregex: tuple[re.Pattern[str], ...]
    ignoreregex: tuple[re.Pattern[str], ...]
    prefregex: re.Pattern[str] | None
    dates: DateCutter
    maxlines: int = 1
    sessions: Sessions = field(default_factory=lambda: Sessions(), compare=False, repr=False)
    buffer: list[Line] = field(default_factory=list, compare=False, repr=False)

    def match(self, line: str) -> tuple[str, str] | None:
        """(host, evidence) if the line is a failure with an IP-address host.

        Lines are fed in log order: sessions and the line buffer carry state."""
        parts = self.dates.split(line.rstrip("\r\n"))
        if self.maxlines <= 1:
            return None if parts is None else self._find([parts], [])
        # A line without a date still fills the buffer (fail2ban), but gives no failure.
        self.buffer.append(parts or ("", "", line.rstrip("\r\n")))
        del self.buffer[: -self.maxlines]
        return None if parts is None else self._find(list(self.buffer), self.buffer)

    def _find(self, lines: list[Line], buffer: list[Line]) -> tuple[str, str] | None:
        """fail2ban's Filter.findFailure on one buffer (first matching failregex wins)."""
        text = joined(lines)
        # fail2ban tries ignoreregex on the whole buffer first only when there are few.
        few = self.ignoreregex and len(self.ignoreregex) < len(self.failregex) - 2
        if few and any(ignore.search(text) for ignore in self.ignoreregex):
            return None
        groups: Groups = {}
        if self.prefregex is not None:
            pm = self.prefregex.search(text)
            if pm is None:
                return None
            groups.update((k, v) for k, v in pm.groupdict().items() if v is not None)
            content = groups.pop("content", None)
            if content:
                text = f"{content}\n"
                buffer[:] = [("", "", str(content))]
        for index, regex in enumerate(self.failregex):
            m = regex.search(text)
            if m is None:
                continue
            matched, buffer[:] = split_matched(m, lines)
            if self.ignoreregex:
                seen = joined(matched) if self.maxlines > 1 else text
                if any(ignore.search(seen) for ignore in self.ignoreregex):
                    return None
            return self._failure(index, {**groups, **_groups(m)})
        return None

    def _failure(self, index: int, fail: Groups) -> tuple[str, str] | None:
        mlfid = fail.get("mlfid")
        if isinstance(mlfid, str):
            fail = self.sessions.merge(mlfid, fail)
        if fail.get("nofail"):
            return None  # a success or a neutral event: never a failure
        host = fail.get("ip4") or fail.get("ip6") or fail.get("dns") or fail.get("fid")
        if not host:
            if mlfid is not None:
                fail["mlfpending"] = "1"  # the failure counts once the session names its host
            return None
        return str(host), f"fail2ban {self.name} failregex #{index + 1}"


def parse_filter(path: Path) -> Fail2banFilter:
    """Read a filter.d file (with its includes); FilterError names the file and the problem."""
    try:
        return _parse_filter(path)
    except FilterError as exc:
        if str(path) in str(exc):
            raise
        raise FilterError(f"{path}: {exc}") from None


def _parse_filter(path: Path) -> Fail2banFilter:
    sections, known = read_filter(path)
    if "Definition" not in sections:
        raise FilterError(f"{path}: no [Definition] section")

    def option(name: str) -> str | None:
        """As fail2ban combines them: [Init] over [Definition] over [DEFAULT]."""
        if name in sections.get("Init", {}):
            return interpolate(sections["Init"][name], "Init", sections, known)
        raw = sections["Definition"].get(name)
        if raw is None:
            raw = sections.get("DEFAULT", {}).get(name)
        if raw is None:
            return None
        return interpolate(raw, "Definition", sections, known)

    tags = _filter_tags(sections, known)

    maxlines = _maxlines(substitute_tags(option("maxlines") or "1", tags), path)

    def regexes(name: str) -> tuple[re.Pattern[str], ...]:
        value = option(name)
        if not value:
            return ()
        value = substitute_tags(value, tags)
        return tuple(
            _compile(line.strip(), name, path, maxlines > 1)
            for line in value.splitlines()
            if line.strip()
        )

    failregex = regexes("failregex")
    if not failregex:
        raise FilterError(f"{path}: no failregex")
    pref = option("prefregex")
    prefregex = (
        _compile(substitute_tags(pref, tags).strip(), "prefregex", path)
        if pref and pref.strip()
        else None
    )
    datepattern = option("datepattern")
    return Fail2banFilter(
        name=path.stem,
        failregex=failregex,
        ignoreregex=regexes("ignoreregex"),
        prefregex=prefregex,
        maxlines=maxlines,
        dates=DateCutter.from_datepattern(
            substitute_tags(datepattern, tags) if datepattern else None
        ),
    )


def _filter_tags(sections: Sections, known: Sections) -> dict[str, str]:
    """Every option that interpolates, by name; other sections' as qualified tags."""
    tags: dict[str, str] = {}
    for section in ("DEFAULT", "Definition", "Init"):
        for key in sections.get(section, {}):
            try:
                tags[key] = interpolate(sections[section][key], section, sections, known)
            except FilterError:
                continue  # an unused option may refer to something undefined
    for section, values in sections.items():
        if section in ("DEFAULT", "Definition", "Init"):
            continue
        for key, raw in values.items():  # <lt_file/__prefix_line>: qualified tags
            try:
                tags[f"{section}/{key}"] = interpolate(raw, section, sections, known)
            except FilterError:
                continue
    return {k: substitute_tags(v, tags) for k, v in tags.items()}


def _maxlines(value: str, path: Path) -> int:
    try:
        lines = int(value.strip())
    except ValueError:
        lines = 0
    if not 1 <= lines <= _MAX_LINES:
        raise FilterError(f"{path}: maxlines = {value.strip()!r}: expected 1 to {_MAX_LINES}")
    return lines


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
