"""The log's line per change (blocked, escalated, hit, unblocked, expired), within
server.log_changes_per_second: the state file has every change; under a flood the log
says how many it left out, once a second.

Split out of broker.py (the writer loop writes each batch's lines here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from imr.core.log_budget import LineBudget

log = logging.getLogger("imr.broker")


class ChangeLog:
    def __init__(self, per_second: int, monotonic: Callable[[], float]) -> None:
        self._budget = LineBudget(per_second)
        self._monotonic = monotonic

    def configure(self, per_second: int) -> None:
        """A reload's server.log_changes_per_second (a new second's budget)."""
        self._budget = LineBudget(per_second)

    def write(self, lines: list[Callable[[], str]]) -> None:
        """One line per change, up to the budget; a line is formatted only when written."""
        self.report_held_back()
        for line in lines[: self._budget.admit(len(lines), self._monotonic())]:
            log.info("%s", line())

    def report_held_back(self) -> None:
        """The count of the lines a past second left out (the expiry loop calls this every
        tick, so a flood's last second is reported once it is over)."""
        held = self._budget.held_back(self._monotonic())
        if held:
            log.info(
                "%d more changes in the last second not logged one by one"
                " (server.log_changes_per_second = %d); `imr list --since 1m` and"
                " `imr show IP` have them all",
                held,
                self._budget.per_second,
                extra={"event": "changes_not_logged", "count": held},
            )
