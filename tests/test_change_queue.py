"""The writer's queue (imr/server/changes.py ChangeQueue): after a large batch the writer
lets the event loop read the sockets already readable before it takes the next one; after
a one-change batch it takes the queue at once."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

import pytest

from imr.server.changes import AnyChange, ChangeQueue, Queued, Waiter

pytestmark = pytest.mark.anyio


def queued(name: str) -> Queued:
    return Queued(cast(AnyChange, name), cast(Waiter, None))


async def take(expect: int) -> list[str]:
    """One change queued, and a client whose request is in its socket but not yet read:
    the reader queues it when the loop polls the socket."""
    queue = ChangeQueue()
    loop = asyncio.get_running_loop()
    server, client = socket.socketpair()
    with server, client:
        server.setblocking(False)

        def readable() -> None:
            queue.put_nowait(queued(server.recv(100).decode()))
            loop.remove_reader(server)

        loop.add_reader(server, readable)
        try:
            queue.put_nowait(queued("first"))
            client.send(b"second")
            batch = await asyncio.wait_for(queue.batch(512, expect), 5)
        finally:
            loop.remove_reader(server)
    return [cast(str, item.change) for item in batch]


async def test_after_a_large_batch_the_readable_sockets_are_read_first() -> None:
    assert await take(expect=50) == ["first", "second"]


async def test_after_a_one_change_batch_the_queue_is_taken_at_once() -> None:
    assert await take(expect=1) == ["first"]


async def test_the_extra_turns_are_bounded_when_nothing_arrives() -> None:
    queue = ChangeQueue()
    queue.put_nowait(queued("only"))
    batch = await asyncio.wait_for(queue.batch(512, 50), 5)
    assert [cast(str, item.change) for item in batch] == ["only"]
