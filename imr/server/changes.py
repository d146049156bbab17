"""What passes between the broker's stages: changes, their outcomes, and the request error.

A *change* is one request's (or the expiry loop's) wish for the state and the kernel:
admission (admission.py) builds a BlockChange, the broker queues it, and the writer
thread applies a batch of them in one BatchTransaction (batch_transaction.py). Each change
gets an *outcome*: a reply for its client, an error, or "readmit" (a hit that turned
into a new block must pass the quota first). A *batch result* is the outcomes of one
batch with the index changes the event loop publishes after the commit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict

from imr.core.addresses import (
    Refusal,
    Target,
    address_of_packed,
    canonical_packed,
    canonical_target,
    parse_target,
)
from imr.core.quota import Reservation
from imr.fleet.events import Event
from imr.protocol import BlockedItem, BlockResult, ProtocolError, UnblockRequest, UnblockResult
from imr.server.access import Peer
from imr.server.block_answer import BlockAnswer
from imr.store import BlockRecord
from imr.wire_codes import WireCode


class StateUnwritable(Exception):
    """A batch failed because the state file cannot be written; its kernel change is undone."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


# The request error is one type for the parser and the broker; this name stays because
# the broker's stages (and branches merging into them) raise it under this name.
BrokerError = ProtocolError


def internal_error(exc: Exception) -> BrokerError:
    return BrokerError(WireCode.INTERNAL_ERROR, f"the change could not be applied: {exc}")


# Slots on the per-request objects: no __dict__ each to make and free (thousands a second).
@dataclass(slots=True)
class BlockChange:
    address: Target  # a network only from an admin
    ip: str  # str(address): the index key and the state file's text (formatting is slow)
    reason: str
    source: str
    severity: int
    peer: Peer
    compact: bool = False  # answer with block_many's short per-address result
    duration: float | None = None  # an admin's `duration`: ends now + this, not the ladder's
    # Quotas: may this change make a new block (admitted, or exempt)? The reservation
    # is given back unless it does. A hit on an active block is admitted without one.
    may_create: bool = False
    reservation: Reservation | None = None


@dataclass
class UnblockChange:
    address: Target
    request: UnblockRequest
    peer: Peer


@dataclass
class ExpireChange:
    due: Sequence[str]
    # Blocks of addresses that became protected while blocked (a VIP moved to this host),
    # lifted at once: index key -> why.
    protected: dict[str, str] = field(default_factory=dict)


@dataclass
class RemoteChange:
    """A fleet event that passed the checks on the loop (imr/fleet/member.py), or None for
    a refused one: either way its stream position is stored with the batch. Queued in a
    RemoteBatch."""

    stream: str
    position: str
    seq: int
    event: Event | None
    admin: bool  # signed by an admin key: may lift blocks other members made

    @property
    def ip(self) -> str:
        return self.event.ip if self.event is not None else ""


@dataclass
class RemoteBatch:
    """Many fleet events as one change (imr/fleet/member.py hands over whole stream entries,
    thousands at a time in a catch-up): one queue item, one outcome, and the writer's batch
    holds them all. Each keeps its own position, so the parts of a failed one can be applied
    one by one."""

    items: list[RemoteChange]


AnyChange = BlockChange | UnblockChange | ExpireChange | RemoteBatch


class ExpireResult(TypedDict):
    """The expiry loop's outcome (not a reply: no client waits for it)."""

    kind: Literal["expire"]
    lifted: list[str]


class RemoteBatchResult(TypedDict):
    """A RemoteBatch's outcome: the events the writer refused, as (index, code, message)."""

    kind: Literal["remote"]
    refused: list[tuple[int, str, str]]


# A change's reply: a block's (compact in block_many: BlockedItem), or an unblock's.
Answer = BlockResult | BlockedItem | UnblockResult | ExpireResult | RemoteBatchResult
# What the writer leaves: a `block`'s row and decision (BlockAnswer, the dict made only if
# asked: the fast lane writes its reply from the row), or an Answer.
Reply = BlockAnswer | Answer


class Waiter(Protocol):
    """Who hears a queued change's outcome: an asyncio future (Broker.handle awaits it), or
    a fast-lane request's reply (Broker.submit_block), which the writer calls at once."""

    def done(self) -> bool: ...

    def set_result(self, result: Reply, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(slots=True)
class Queued:
    """One change waiting for the writer, and the client waiting for its outcome."""

    change: AnyChange
    future: Waiter


# The writer's extra loop turns before it takes a batch (ChangeQueue.batch).
GATHER_FROM = 4  # changes in the last batch
GATHER_TURNS = 4  # at most, each a poll of the sockets (no timer)


class ChangeQueue:
    """The writer's queue: put_nowait as asyncio.Queue's, and the next batch taken at once
    (asyncio.Queue's get_nowait and empty cost ~0.6 µs a request, with a task count the
    writer never reads; bench/one_address.py)."""

    def __init__(self) -> None:
        self._items: deque[Queued] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Queued) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def batch(self, limit: int, expect: int = 0) -> list[Queued]:
        """The queued changes, oldest first, at most `limit`; waits for one if none is.

        `expect`: how many the last batch held. If that was GATHER_FROM or more, those
        clients have just had their replies and are likely sending again, so the event
        loop gets up to GATHER_TURNS more turns to read them (each only polls the sockets
        already readable: no timer) until `expect` changes are queued. With 50 clients the
        batches stay near 50 (mean 40-49) instead of splitting into two alternating parts
        (mean ~25), and the per-batch cost (fsync, the kernel transaction) is shared by
        nearly twice as many (docs/performance.md, "Writer batch sizes with 50 clients").
        After a one-change batch there is no extra turn: one client's request is taken at
        once."""
        items = self._items
        while not items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if expect >= GATHER_FROM:
            want = min(expect, limit)
            for _ in range(GATHER_TURNS):
                if len(items) >= want:
                    break
                await _loop_turn()
        if len(items) <= limit:
            batch = list(items)
            items.clear()
            return batch
        return [items.popleft() for _ in range(limit)]


async def _loop_turn() -> None:
    """Let the event loop poll its sockets and run their readers once before going on:
    the first yield resumes ahead of the readers that poll woke, the second after them."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


@dataclass(slots=True)
class Outcome:
    result: Reply | None = None
    error: BrokerError | None = None
    readmit: bool = False  # a hit turned into a new block: pass the quota first, then retry


@dataclass
class BatchResult:
    outcomes: list[Outcome]
    changed: dict[str, BlockRecord | None] = field(default_factory=dict)  # None: lifted
    expired: int = 0  # blocks lifted because their time came (metrics)
    # One per change, for the operator; formatted only if logged (a flood logs few of them).
    log_lines: list[Callable[[], str]] = field(default_factory=list)


def stored_address(ip: str) -> Target:
    """An address (or network, in CIDR form) read back from the state file, where only valid
    ones are written."""
    parsed = parse_target(ip)
    if isinstance(parsed, Refusal):
        raise ValueError(f"state file holds an invalid address {ip!r}")
    return parsed


def stored_target(ip: str) -> tuple[Target, str]:
    """stored_address(ip) and its canonical text, cheaply for the text the daemon writes
    (start-up reads 100,000 of these; see canonical_target)."""
    packed = canonical_packed(ip)  # canonical_target's fast path, without its layers (~1 µs)
    if packed is not None:
        return address_of_packed(packed), ip
    parsed = canonical_target(ip)
    if isinstance(parsed, Refusal):
        raise ValueError(f"state file holds an invalid address {ip!r}")
    return parsed
