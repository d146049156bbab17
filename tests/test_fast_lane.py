"""The Unix socket's fast lane (imr/server/fast_lane.py): the same answers as the streams path.

In-process, real socket, as tests/test_listener.py; each scenario runs with the lane
(as the daemon runs) and without it, and the replies must be byte for byte the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from imr.config import Config
from imr.protocol import BlockRequest, parse_message
from imr.server.broker import Broker, BrokerError
from imr.server.fast_lane import parse_block
from imr.server.listener import UnixListener
from imr.store import Store

from fakes import FakeClock, FixedAddresses, RecordingBackend

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(
    tmp_path: Path, lane: bool, escalation: bool = True, **server: object
) -> AsyncIterator[tuple[Path, RecordingBackend, Broker]]:
    socket_path = tmp_path / f"imr-{lane}.sock"
    config = Config.model_validate(
        {"server": {"socket": str(socket_path), **server}, "escalation": {"enabled": escalation}}
    )
    backend = RecordingBackend()
    store = Store(tmp_path / f"state-{lane}.db")
    broker = Broker(config, store, backend, FakeClock(), FixedAddresses("192.0.2.1"))
    broker.reconcile()
    await broker.start()
    submit = broker.submit_block if lane else None
    listener = UnixListener(config.server, config.access, broker.handle, BrokerError, None, submit)
    await listener.start()
    try:
        yield socket_path, backend, broker
    finally:
        await listener.close()
        await broker.stop()
        store.close()


async def one_by_one(path: Path, lines: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    replies = []
    for line in lines:
        writer.write(line)
        await writer.drain()
        replies.append(await asyncio.wait_for(reader.readline(), 5))
    writer.close()
    return replies


async def pipelined(path: Path, lines: list[bytes]) -> list[bytes]:
    """All lines in one write, the write side closed; every reply until the daemon hangs up."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"".join(lines))
    await writer.drain()
    writer.write_eof()
    replies = (await asyncio.wait_for(reader.read(), 10)).splitlines(keepends=True)
    writer.close()
    return replies


SCRIPT = [
    b'{"v":1,"op":"block","ip":"203.0.113.7"}\n',
    b"block 2001:db8::7\n",
    b'{"v": 1, "op": "block", "ip": "203.0.113.7", "reason": "again", "source": "web"}\n',
    b'{"v":1,"id":"x","op":"block","ip":"2001:db8::8","severity":2}\n',
    b"block 127.0.0.1\n",  # refused by admission in the lane: an error reply, still the lane
    b'{"v":1,"op":"block","ip":"192.0.2.1"}\n',  # the host's own address
    b'{"v":1,"op":"block","ip":"203.0.113.9","duration":"1h"}\n',  # not an admin's to choose
    b"block 2001:DB8::9 upper case\n",
    b'{"v":1,"op":"block","ip":"not an address"}\n',
    b"block 198.51.100.1\n",
    b'{"v":1,"op":"status"}\n',  # the lane hands the connection back here
    b"block 198.51.100.2\n",
    b'{"v":1,"op":"block","ip":"203.0.113.7","reason":"\\u0007"}\n',
    b"frob\n",
    b"block 198.51.100.3\n",
]


def comparable(reply: bytes) -> bytes:
    """A status reply carries the pid and the socket path: everything else must match."""
    return b"status" if b'"kind":"status"' in reply else reply


@pytest.mark.parametrize("send", [one_by_one, pipelined])
async def test_the_lane_answers_as_the_streams_path(tmp_path: Path, send: object) -> None:
    answers = {}
    kernels = {}
    for lane in (True, False):
        async with serving(tmp_path, lane) as (path, backend, _):
            replies = await send(path, SCRIPT)  # type: ignore[operator]
            answers[lane] = [comparable(r) for r in replies]
            kernels[lane] = sorted(map(str, backend.kernel))
    assert len(answers[True]) == len(SCRIPT)
    assert answers[True] == answers[False]
    assert kernels[True] == kernels[False]
    assert "198.51.100.3" in kernels[True]


async def test_lane_blocks_are_in_the_state_and_the_kernel_when_answered(tmp_path: Path) -> None:
    async with serving(tmp_path, True, escalation=False) as (path, backend, broker):
        lines = [f"block 2001:db8::{n:x}\n".encode() for n in range(1, 41)]
        replies = await asyncio.gather(*(one_by_one(path, [line]) for line in lines))
        assert all(r[0].startswith(b"ok blocked 2001:db8::") for r in replies)
        assert len(backend.kernel) == 40
        assert broker.status()["active_blocks"] == 40


async def test_lane_idle_timeout_closes_and_frees_the_slot(tmp_path: Path) -> None:
    async with serving(tmp_path, True, idle_timeout=0.5, max_connections=1) as (path, _, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"block 203.0.113.20\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"ok blocked")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # idled out, not at once
        writer.close()
        (pong,) = await one_by_one(path, [b"ping\n"])  # its slot is free again
        assert pong == b"ok pong\n"


async def test_lane_line_too_long_after_blocks(tmp_path: Path) -> None:
    async with serving(tmp_path, True, max_line_bytes=1024) as (path, backend, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"block 203.0.113.21\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"ok blocked")
        writer.write(b"block 203.0.113.22 " + b"x" * 5000 + b"\nblock 203.0.113.23\n")
        reply = await asyncio.wait_for(reader.readline(), 5)
        assert reply.startswith(b"error line_too_long:")
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert sorted(map(str, backend.kernel)) == ["203.0.113.21"]


async def test_lane_half_sent_line_is_not_executed(tmp_path: Path) -> None:
    async with serving(tmp_path, True) as (path, backend, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"block 203.0.113.30\nblock 203.0.113.31")
        writer.write_eof()
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"ok blocked 203.0.113.30")
        writer.close()
        assert sorted(map(str, backend.kernel)) == ["203.0.113.30"]


@pytest.mark.parametrize(
    "line",
    [
        b'{"v":1,"op":"block","ip":"2001:db8::1"}',
        b'{"v": 1, "op": "block", "ip": "192.0.2.9", "reason": "r \\u00e9", "source": "s"}',
        b'{"v":1,"op":"block","ip":"192.0.2.9","reason":"\xc3\xa9","source":"web:1"}',
        b'{"v":1,"op":"block","ip":"192.0.2.9","reason":"\xe2\x80\xae"}',  # a bidi override
        b'{"v":1,"op":"block","ip":"192.0.2.9","source":"bad source"}',
        b'{"v":1,"op":"block","ip":"' + b"1" * 65 + b'"}',
        b'{"v":1,"op":"block","ip":"1.2.3.4","reason":"' + b"a" * 201 + b'"}',
        b"block 2001:db8::1",
        b"block 2001:db8::1 with a reason",
        b"BLOCK 192.0.2.9",
        b'{"v":1,"op":"status"}',
    ],
)
def test_parse_block_is_parse_message_for_blocks(line: bytes) -> None:
    try:
        expected, _ = parse_message(line)
    except Exception:
        expected = None
    if type(expected) is not BlockRequest:
        expected = None
    found = parse_block(line)
    assert found == expected
    if found is not None and expected is not None:
        assert found.model_fields_set == expected.model_fields_set
