"""fail2ban's line buffer: what a failregex sees, and which lines a match used.

A filter with `maxlines = N` matches against its last N lines, joined with newlines
(each without its date, the date cut out as fail2ban does) and ending in a newline;
its regexes are compiled with re.MULTILINE. The lines a match covers leave the buffer,
except those a `<SKIPLINES>` part skipped over, which stay for later matches
(fail2ban 1.0.2, server/failregex.py: Regex.search). With `maxlines = 1` the buffer is
the one line.
"""

from __future__ import annotations

import re

Line = tuple[str, str, str]  # (before the date, the date, after the date)

# fail2ban's <SKIPLINES>: any whole lines, as few as possible.
SKIPLINES = r"\n(?P<skiplines{n}>(?:(?:.*\n)*?))"


def joined(lines: list[Line]) -> str:
    """The buffer as the regexes see it: the lines without their dates, newline-ended."""
    return "\n".join(before + after for before, _, after in lines) + "\n"


def _skipped(m: re.Match[str]) -> list[str]:
    found = ""
    n = 0
    while f"skiplines{n}" in m.re.groupindex:
        found += m.group(f"skiplines{n}") or ""
        n += 1
    return found.splitlines()


def split_matched(m: re.Match[str], lines: list[Line]) -> tuple[list[Line], list[Line]]:
    """(the lines the match used, the lines left in the buffer)."""
    if len(lines) <= 1:
        return lines, []
    text = m.string
    start = text.rfind("\n", 0, m.start() + 1) + 1
    end = text.find("\n", m.end() - 1)
    end = len(text) if end < 0 else end + 1
    first, last = text.count("\n", 0, start), text.count("\n", 0, end)
    matched, left = lines[first:last], lines[:first]
    n = 0
    for skipped in _skipped(m):
        for k, line in enumerate(matched[n:]):
            if line[0] + line[2] == skipped:
                left.append(matched.pop(n + k))
                n += k
                break
    left.extend(lines[last:])
    return matched, left
