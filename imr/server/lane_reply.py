"""A fast-lane request's Waiter (changes.Waiter): the writer loop settles a batch by calling
each waiter, and this one writes the client's reply there and then, then counts the request.

Split out of broker.py (Broker.submit_block makes one a request).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from imr.server.access import Peer
from imr.server.changes import BrokerError, Reply
from imr.server.metrics import Metrics
from imr.wire_codes import WireCode

log = logging.getLogger("imr.broker")


class LaneReply:
    """A fast-lane request's Waiter: the writer loop hands the outcome straight to the lane's
    callback (the reply is written there and then), then counts it as handle() would. A
    future a request cost a future, a done-callback and a loop turn (~3 µs; py-spy of
    bench/one_address.py, docs/performance.md "Speed round two, per request")."""

    __slots__ = ("_answered", "_done", "_metrics", "_peer", "_started")

    def __init__(
        self,
        metrics: Metrics,
        peer: Peer,
        started: float,
        answered: Callable[[Reply | None, BaseException | None], object],
    ) -> None:
        self._metrics, self._peer, self._started = metrics, peer, started
        self._answered = answered
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Reply, /) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException, /) -> None:
        self._finish(None, exception)

    def _finish(self, result: Reply | None, error: BaseException | None) -> None:
        self._done = True
        try:
            self._answered(result, error)
        except Exception:  # the writer loop goes on whatever one client's reply did
            log.exception("the reply to %s failed", self._peer.describe())
        code: str = "ok"
        if error is not None:
            code = error.code if isinstance(error, BrokerError) else WireCode.INTERNAL_ERROR
        self._metrics.request_later("block", self._peer, code, time.monotonic() - self._started)
