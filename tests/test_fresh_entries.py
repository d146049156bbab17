"""A first block of an address goes to the kernel as a fresh entry; any later one does not.

KernelBlock.fresh tells nftables it may only add the element, without taking it out
first (a third of the kernel's work): only when the address never had a state row, so
imr's sets cannot hold it (batch_transaction._apply_block, as _remote_block for a fleet
catch-up). A repeat, a re-armed hit, a block after an unblock are never fresh.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_broker import DAY, block, running

from imr.protocol import UnblockRequest
from imr.server.broker import Broker

from fakes import ROOT, RecordingBackend

pytestmark = pytest.mark.anyio


def last_added(backend: RecordingBackend) -> list[tuple[str, bool]]:
    add, _ = backend.applies[-1]
    return [(b.text, b.fresh) for b in add]


async def unblock(broker: Broker, ip: str) -> None:
    await broker.handle(UnblockRequest(op="unblock", ip=ip), ROOT)


async def test_only_a_first_block_is_fresh(tmp_path: Path) -> None:
    async with running(tmp_path) as (broker, backend, clock, _):
        await block(broker, "203.0.113.7")
        assert last_added(backend) == [("203.0.113.7", True)]
        clock.advance(60)
        await block(broker, "203.0.113.7")  # a hit: re-armed, not fresh
        assert last_added(backend) == [("203.0.113.7", False)]
        clock.advance(DAY)
        await broker.expire_due()
        await block(broker, "203.0.113.7")  # a repeat
        assert last_added(backend) == [("203.0.113.7", False)]
        await block(broker, "2001:db8::5")
        assert last_added(backend) == [("2001:db8::5", True)]
        await unblock(broker, "2001:db8::5")
        await block(broker, "2001:db8::5")  # blocked again after a pardon: a row exists
        assert last_added(backend) == [("2001:db8::5", False)]
        assert {str(a) for a in backend.kernel} == {"203.0.113.7", "2001:db8::5"}
