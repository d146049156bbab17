"""User and group look-ups stay off the event loop (issue #12, item 10, last bullet).

NSS may ask LDAP or sssd over the network. The listener looks names up in a
thread and keeps them for a minute, so a slow directory neither stalls clients
that are already connected nor makes every new connection wait.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from test_listener import serving

import imr.server.access

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

SLOW = 0.4  # seconds a look-up takes in these tests


def slow_user_name(uid: int) -> str | None:
    time.sleep(SLOW)  # a directory server that answers slowly
    return "root" if uid == 0 else None


async def ping(path: Path) -> float:
    """Seconds from connecting to the pong."""
    started = time.monotonic()
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"ping\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"ok pong\n"
    writer.close()
    return time.monotonic() - started


async def test_a_slow_directory_does_not_stall_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imr.server.access, "_user_name", slow_user_name)
    async with serving(tmp_path) as (path, _):
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def heartbeat() -> None:
            while True:
                before = loop.time()
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - before)

        beat = asyncio.create_task(heartbeat())
        first = await ping(path)  # the one slow look-up, in a thread
        assert first >= SLOW * 0.9
        # The loop kept turning meanwhile: no gap near the look-up's length.
        assert max(gaps) < SLOW / 2, max(gaps)
        # Later connections of the same uid are served from the cache.
        again = await asyncio.gather(*(ping(path) for _ in range(10)))
        assert max(again) < SLOW / 2, again
        beat.cancel()
