"""The access gates of a signature set, decided per candidate line from needle positions.

signatures.AccessGate says what an access-log line must hold before some test could
accept it. The scanner already knows, from its prefilter, where the first occurrence
of each needle is on each candidate line. So one regex match per line finds where
the request's path ends, and an integer comparison does the rest:

* path: the path ends ("stop") at the first "?" after the request's first space, or
  at the first "?" when it has no space, or at its closing quote. A path needle's
  first occurrence before `stop` is in the path, or before the request (a needle in
  the user name, say, where the gate cannot judge): both mean "parse". At or after
  `stop`, every later occurrence is too: no path gate opens. Path needles hold no
  quote, space, "?" or line end, so an occurrence that starts in the path ends there.
* user agent: a line holding an agent needle is checked against the fifth quoted
  field (AccessGate's user agent), with bytes.find.
* odd request: the line regex requires a plain request (signatures.PLAIN_REQUEST,
  spelled with its end at the closing quote); an odd one fails it, so "parse".

The line regex fails, so the line is parsed, on every doubt: a line that is not
ASCII without backslash, NUL or CR (not checked when the whole block was); with
`auto`, a JSON or error-log line (parse_access never sees it); no request, an empty
one ('""') or one without its closing quote; and an overlong line (counted as bad).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

from imr.logscan.signatures import AccessGate

# Matched on a line without its newline (as an end position).
_PLAIN_LINE = rb"(?=[^\\\x00\r\x80-\xff]*+\Z)"
_ACCESS_LINE = rb"(?![{\[]|[0-9]{4}/)"  # parse_line(AUTO) sends these to JSON / error parsers
_REQUEST = rb'[^"]*+"(?!")'  # up to the request's opening quote; not '""'
_PLAIN_REQUEST = rb'(?=(?!connect )[a-z]{2,16} /|options \* |-")'
_TO_STOP = rb'(?:[^" ]*+ [^"?]*+|[^" ?]*+)(?=[^"]*+")'  # the path; the request closes
# From `stop`: the request's closing quote, the referer, and the agent (group 1).
_AGENT_FIELD = re.compile(rb'[^"]*+"[^"]*+"[^"]*+"[^"]*+"([^"]*+)"')
_NOT_IN_NEEDLES = frozenset(b'" ?\n\r')


@dataclass(frozen=True)
class Gates:
    """The gates of a signature set, for one log format setting."""

    paths: tuple[bytes, ...]
    agents: tuple[bytes, ...]
    _any_line: re.Pattern[bytes]
    _plain_line: re.Pattern[bytes]

    @classmethod
    def of(cls, gates: Sequence[AccessGate], needles: Sequence[bytes], auto: bool) -> Gates | None:
        """None when a gate needle is not among `needles` (its positions would be
        unknown), cannot be judged from positions (see the module docstring), or is
        both a path and an agent needle (the scanner records one or the other)."""
        paths = tuple(sorted({n for g in gates for n in g.path}))
        agents = tuple(sorted({n for g in gates for n in g.user_agent}))
        if set(paths) & set(agents):
            return None
        for needle in (*paths, *agents):
            if needle not in needles or needle != needle.lower() or not needle.isascii():
                return None
            if _NOT_IN_NEEDLES.intersection(needle):
                return None
        head = _ACCESS_LINE if auto else b""
        tail = _REQUEST + (_PLAIN_REQUEST if any(g.odd_request for g in gates) else b"")
        tail += _TO_STOP
        return cls(paths, agents, re.compile(_PLAIN_LINE + head + tail), re.compile(head + tail))

    def to_parse(
        self,
        lowered: bytes,
        starts: Sequence[int],
        first_path: dict[int, int],
        agent_lines: dict[int, int],
        *,
        plain_block: bool,
        max_line: int,
    ) -> list[int]:
        """The starts of the candidate lines some gate lets through, or that the gates
        cannot judge. `starts`: every candidate line's start, in order.

        `first_path`: line start -> position of the first path needle on it, or a
        larger number; `agent_lines`: the starts of lines holding an agent needle.
        `plain_block`: the caller checked that the block is ASCII without backslash,
        NUL or CR."""
        match = (self._plain_line if plain_block else self._any_line).match
        size, first = len(lowered), first_path.get
        # map() keeps the two calls a line needs out of the interpreter loop.
        ends = list(map(lowered.find, repeat(b"\n"), starts))
        if ends and ends[-1] == -1:
            ends[-1] = size
        return [
            start
            for start, end, m in zip(
                starts, ends, map(match, repeat(lowered), starts, ends), strict=True
            )
            if m is None
            or end - start > max_line
            or first(start, size) < m.end()
            or (start in agent_lines and self._agent_has_needle(lowered, m.end(), end))
        ]

    def _agent_has_needle(self, lowered: bytes, stop: int, end: int) -> bool:
        field = _AGENT_FIELD.match(lowered, stop, end)
        if field is None:
            return False
        a, b = field.span(1)
        return any(lowered.find(needle, a, b) != -1 for needle in self.agents)
