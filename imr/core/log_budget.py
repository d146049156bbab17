"""How many per-change log lines to write under a flood (pure; the caller passes the time).

Every block, escalation, hit, unblock and expiry is a row in the state file; the log line
per change is for the operator reading along. During a scan wave that would be thousands
of lines a second: the log becomes unreadable, journald's rate limit drops lines at
random, and formatting them costs the daemon more than the change itself. So each
one-second window gets at most `per_second` change lines; the rest are counted, and
once the window is over the caller logs one summary line with the count.
"""

from __future__ import annotations

import math


class LineBudget:
    def __init__(self, per_second: int) -> None:
        self.per_second = per_second  # 0: no limit
        self._window = -math.inf  # start of the current one-second window
        self._written = 0
        self._held = 0  # lines held back in the current window

    def admit(self, lines: int, now: float) -> int:
        """How many of `lines` change lines to write now; the rest count as held back.

        Call held_back() first, so a finished window's count is reported before this
        starts a new one.
        """
        if self.per_second <= 0:
            return lines
        self._roll(now)
        allowed = min(lines, self.per_second - self._written)
        self._written += allowed
        self._held += lines - allowed
        return allowed

    def held_back(self, now: float) -> int:
        """Lines held back in a window that has ended (0 if none, or it is still running);
        each count is answered once."""
        if now - self._window < 1.0:
            return 0
        held, self._held = self._held, 0
        return held

    def _roll(self, now: float) -> None:
        if now - self._window >= 1.0:
            self._window, self._written = now, 0
