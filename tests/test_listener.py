"""The socket listener under malformed, hostile and slow clients (in-process, real socket)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from imr.config import Config
from imr.server.broker import Broker, BrokerError
from imr.server.listener import UnixListener
from imr.store import Store

from fakes import FakeClock, FixedAddresses, RecordingBackend

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)


@asynccontextmanager
async def serving(tmp_path: Path, **server: object) -> AsyncIterator[tuple[Path, RecordingBackend]]:
    socket_path = tmp_path / "imr.sock"
    config = Config.model_validate({"server": {"socket": str(socket_path), **server}})
    backend = RecordingBackend()
    store = Store(tmp_path / "state.db")
    broker = Broker(config, store, backend, FakeClock(), FixedAddresses("192.0.2.1"))
    broker.reconcile()
    await broker.start()
    listener = UnixListener(config.server, config.access, broker.handle, BrokerError)
    await listener.start()
    try:
        yield socket_path, backend
    finally:
        await listener.close()
        await broker.stop()
        store.close()


async def exchange(path: Path, *lines: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    replies = []
    for line in lines:
        writer.write(line)
        await writer.drain()
        replies.append(await asyncio.wait_for(reader.readline(), 5))
    writer.close()
    return replies


async def test_json_and_text_forms_on_one_connection(tmp_path: Path) -> None:
    async with serving(tmp_path) as (path, backend):
        replies = await exchange(
            path,
            b'{"v":1,"id":"a","op":"block","ip":"203.0.113.7","source":"test"}\n',
            b"block 2001:db8::bad soapCaller.bs\n",
            b'{"op":"ping"}\n',
            b"list\n",
        )
        first = json.loads(replies[0])
        assert first["ok"] and first["id"] == "a" and first["result"]["action"] == "block"
        assert replies[1].startswith(b"ok blocked 2001:db8::bad until ")
        assert json.loads(replies[2])["result"]["kind"] == "pong"
        assert replies[3].startswith(b"ok 2 active")
        assert len(backend.kernel) == 2


async def test_malformed_input_gets_an_error_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    hostile = [
        (b"{not json\n", "bad_request"),
        (b'{"v":2,"op":"ping"}\n', "unsupported_version"),
        (b'{"op":"block"}\n', "bad_request"),
        (b'{"op":"block","ip":"203.0.113.9","extra":1}\n', "bad_request"),
        (b'{"op":"block","ip":"203.0.113.9","severity":99}\n', "bad_request"),
        (b'{"op":"drop_table"}\n', "bad_request"),
        (b"[1,2,3]\n", "bad_request"),
        (b"\xff\xfe\xfd\n", "bad_request"),
        (b"block 1.2.3.4; rm -rf /\n", "invalid_address"),
        (b"block 0.0.0.0/0\n", "network_too_wide"),  # root is admin: networks yes, /0 never
        (b"block ::\n", "unspecified_address"),
        (b"block 127.1\n", "invalid_address"),
        (b"block ::ffff:127.0.0.1\n", "loopback_address"),
        (b"block 192.0.2.1\n", "own_address"),
        (b"block 203.0.113.9 \x00nul\n", "bad_request"),
        (b"\n", "bad_request"),
        (b"[" * 2000 + b"\n", "bad_request"),
        (b"{" + b'"a":{' * 700 + b"\n", "bad_request"),
    ]
    async with serving(tmp_path) as (path, backend):
        for line, code in hostile:
            (reply,) = await exchange(path, line)
            text = reply.decode()
            if text.startswith("{"):
                assert json.loads(text)["error"]["code"] == code, line
            else:
                assert text.startswith(f"error {code}:"), (line, text)
        assert backend.kernel == {}
        (reply,) = await exchange(path, b"ping\n")
        assert reply == b"ok pong\n"


async def test_overlong_line_is_refused_and_closed(tmp_path: Path) -> None:
    async with serving(tmp_path, max_line_bytes=1024) as (path, _):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"block 203.0.113.9 " + b"x" * 10 * 1024 * 1024 + b"\n")
        sending = asyncio.create_task(writer.drain())
        reply = await asyncio.wait_for(reader.readline(), 10)
        sending.cancel()
        assert reply.startswith(b"error line_too_long:")
        # The daemon hangs up: EOF, or a reset if we were still sending.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        (pong,) = await exchange(path, b"ping\n")
        assert pong == b"ok pong\n"


async def test_connection_limit_and_idle_clients_do_not_stall_others(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=3, idle_timeout=1.0) as (path, _):
        idle = [await asyncio.open_unix_connection(str(path)) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_unix_connection(str(path))
        busy = await asyncio.wait_for(reader.readline(), 5)
        assert busy.startswith(b"error busy:")
        writer.close()
        # The idle connections are dropped after idle_timeout; then others get in.
        await asyncio.sleep(1.5)
        (pong,) = await exchange(path, b"ping\n")
        assert pong == b"ok pong\n"
        for _, idle_writer in idle:
            idle_writer.close()


async def test_half_sent_request_is_not_executed(tmp_path: Path) -> None:
    async with serving(tmp_path) as (path, backend):
        _, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"block 203.0.113.9")  # no newline, then hang up
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.2)
        assert backend.kernel == {}


async def test_socket_is_created_with_the_configured_mode(tmp_path: Path) -> None:
    async with serving(tmp_path, socket_mode="0660") as (path, _):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o660
