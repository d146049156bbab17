"""Reading fail2ban filter.d files: includes, sections, interpolation, <tags>.

Follows fail2ban's SafeConfigParserWithIncludes: files are read in include order
(`before`, the file, `after`, then NAME.local); a section read again updates the
earlier one, and the values it replaces are kept as *known* values (fail2ban's
`KNOWN/<section>`), which `%(known/name)s` reads, falling back to `[DEFAULT]`.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

_MAX_INCLUDE_DEPTH = 8
_MAX_ROUNDS = 64
_CONF_TAG = re.compile(r"<([^ <>]+)>")
_INTERP = re.compile(r"%\(([^)]+)\)s")


class FilterError(Exception):
    """A filter file that cannot be used; the message names the file and the problem."""


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
            if key in target and section != "DEFAULT":  # fail2ban keeps no KNOWN/DEFAULT
                known.setdefault(section, {})[key] = target[key]
            target[key] = value
    for name in includes.get("after", "").split():
        _read_include(path.parent / name, sections, known, depth, required=False)
    local = path.with_suffix(".local")
    if path.suffix == ".conf" and local.exists():
        _read(local, sections, known, depth + 1)


def read_filter(path: Path) -> tuple[Sections, Sections]:
    """Every section of the filter and its includes, merged; and the known (replaced) values."""
    sections: Sections = {}
    known: Sections = {}
    _read(path, sections, known, 0)
    return sections, known


def _read_include(
    path: Path, sections: Sections, known: Sections, depth: int, required: bool
) -> None:
    if not path.exists():
        if required and path.suffix == ".conf":
            raise FilterError(f"{path}: included file not found")
        return
    _read(path, sections, known, depth + 1)


def interpolate(value: str, section: str, sections: Sections, known: Sections) -> str:
    defaults = sections.get("DEFAULT", {})
    for _ in range(_MAX_ROUNDS):
        if "%(" not in value:
            break

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            for source in (sections.get(section, {}), defaults):
                if name in source:
                    return source[name]
            if "/" in name:
                other, key = name.split("/", 1)
                if other.lower() == "known":
                    # fail2ban: the value this section's option replaced, else [DEFAULT]'s.
                    if key in known.get(section, {}):
                        return known[section][key]
                    if key in defaults:
                        return defaults[key]
                    return ""
                if other.lower() != "default" and key in sections.get(other, {}):
                    return sections[other][key]  # %(lt_file/datepattern)s
                if key in defaults:
                    return defaults[key]
            raise FilterError(f"[{section}] refers to %({name})s, which is not defined")

        value = _INTERP.sub(repl, value)
    else:
        raise FilterError(f"[{section}]: interpolation does not terminate")
    return value.replace("%%", "%")


def substitute_tags(value: str, tags: dict[str, str]) -> str:
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
