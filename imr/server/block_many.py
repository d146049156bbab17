"""block_many: many addresses in one request, each decided and answered on its own.

Split out of broker.py, which routes the request here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from imr.core.addresses import Refusal, canonical_target
from imr.protocol import BlockedItem, BlockManyItem, BlockManyRequest, BlockManyResult
from imr.server import replies
from imr.server.access import Peer
from imr.server.admission import Gatekeeper
from imr.server.changes import AnyChange, BrokerError, Reply


async def block_many(
    request: BlockManyRequest,
    peer: Peer,
    gate: Gatekeeper,
    enqueue: Callable[[AnyChange], asyncio.Future[Reply]],
) -> BlockManyResult:
    """Each address as its own block request: own checks, own quota share, own outcome.

    All the admitted ones are queued at once, so they usually share one batch (one
    state transaction, one kernel transaction); a refusal or failure of one address
    answers only that address.
    """
    results: list[BlockManyItem | None] = [None] * len(request.ips)
    waiting: list[tuple[int, asyncio.Future[Reply]]] = []
    # Spellings of one address ("2001:db8::7", "2001:DB8:0::7", "::ffff:192.0.2.7") are
    # one change, admitted and counted once; the others share its answer.
    first: dict[str, int] = {}
    spelling: dict[int, int] = {}
    for index, text in enumerate(request.ips):
        parsed = canonical_target(text)
        if not isinstance(parsed, Refusal):
            spelling[index] = first.setdefault(parsed[1], index)
            if spelling[index] != index:
                continue
        try:
            change = gate.block_change(text, request, peer, compact=True)
        except BrokerError as exc:
            results[index] = replies.refused_item(text, exc)
            continue
        waiting.append((index, enqueue(change)))
    for index, future in waiting:
        try:
            results[index] = cast(BlockedItem, await future)  # a compact change's
        except BrokerError as exc:
            results[index] = replies.refused_item(request.ips[index], exc)
    for index, original in spelling.items():
        answer = results[original]
        if index != original and answer is not None:
            results[index] = answer if answer["ok"] else {**answer, "ip": request.ips[index]}
    return replies.block_many_reply([item for item in results if item is not None])
