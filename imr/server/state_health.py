"""Whether the state file takes writes: PostgreSQL's answer to a full disk, in small.

The state file is *unwritable* from the first write it refuses (disk or quota full, an I/O
error, a read-only file system; `imr.store.unwritable`) until the first write that succeeds.
Meanwhile every change is refused with `state_unwritable` and reads go on; a write is tried
at most every RETRY_INTERVAL seconds, and the changes in between are refused without
touching the disk or the kernel. Both ends are logged once; the refusals are counted.

Used by the writer thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from imr.wire_codes import WireCode

log = logging.getLogger("imr.broker")

STATE_UNWRITABLE = WireCode.STATE_UNWRITABLE
MESSAGE = (
    "the state file cannot be written (disk full or failing); nothing was changed;"
    " changes are refused until it can be, reads still work"
)
RETRY_INTERVAL = 1.0  # seconds


class StateHealth:
    def __init__(self, path: Path, monotonic: Callable[[], float]) -> None:
        self._path = path
        self._monotonic = monotonic
        self._failed_at: float | None = None  # the last refused write (monotonic)
        self._since: float | None = None  # unwritable since (None: writable)
        self._refused = 0  # changes refused since then

    def holding_off(self) -> bool:
        """Refuse without trying: the last write failed less than RETRY_INTERVAL ago."""
        failed = self._failed_at
        return failed is not None and self._monotonic() - failed < RETRY_INTERVAL

    def failed(self, cause: BaseException) -> None:
        now = self._failed_at = self._monotonic()
        if self._since is not None:
            return
        self._since, self._refused = now, 0
        log.error(
            "the state file %s cannot be written (%s): refusing every change"
            " (block, unblock, expiry) with %s until a write succeeds; reads go on",
            self._path,
            cause,
            STATE_UNWRITABLE,
            extra={"event": "state_unwritable", "error": str(cause)},
        )

    def refused(self, count: int) -> None:
        self._refused += count

    def succeeded(self) -> None:
        since = self._since
        if since is None:
            return
        self._since = self._failed_at = None
        log.warning(
            "the state file %s can be written again after %.0f s; %d changes were refused"
            " meanwhile",
            self._path,
            self._monotonic() - since,
            self._refused,
            extra={"event": "state_writable", "refused": self._refused},
        )
