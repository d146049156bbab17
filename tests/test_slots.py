"""Connection slots (issue #12, item 3): no client can keep root or the others out.

The rules (imr/core/slots.py) in-process, then the real daemon with real
unprivileged users: the no-role user, the block-role user and an admin each get
their share of the Unix socket, root always gets in, a `busy` reply comes in the
form the client spoke (the ModSecurity hook reports it as such), and pinging
does not keep an idle connection open. On TCP, silent unauthenticated
connections from one source cannot take the slots of identified clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_tcp_listener import READ_TOKEN, TOKENS, WEB_TOKEN, serving

from imr.core.slots import SlotLimits, Slots, StartupLimits, Startups, source_of

from daemon_harness import BLOCKER, NOBODY, READER, Daemon, daemon_world, remove_test_users
from robust_harness import LineConnection, Options, connect_unix_as, ensure_users, write_config

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

HOOK = str(Path(sys.executable).parent / "imr-hook")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and users")


# The rules ---------------------------------------------------------------------------------


def test_slots_cap_each_principal_and_keep_a_reserve_for_admins() -> None:
    slots = Slots(SlotLimits(total=8, reserved_admin=2, per_client=3, per_client_no_role=1))
    assert slots.claim("uid:1", admin=False, has_role=False) is None
    assert "already has 1" in str(slots.claim("uid:1", admin=False, has_role=False))
    assert [slots.claim("uid:2", admin=False, has_role=True) for _ in range(3)] == [None] * 3
    assert "already has 3" in str(slots.claim("uid:2", admin=False, has_role=True))
    assert [slots.claim("uid:3", admin=False, has_role=True) for _ in range(2)] == [None] * 2
    assert "reserved for admins" in str(slots.claim("uid:4", admin=False, has_role=True))
    assert slots.claim("uid:0", admin=True, has_role=True) is None
    assert slots.claim("uid:0", admin=True, has_role=True) is None
    assert "all 8" in str(slots.claim("uid:0", admin=True, has_role=True))
    slots.release("uid:2")
    slots.release("uid:0")
    slots.release("uid:0")
    assert slots.claim("uid:4", admin=False, has_role=True) is None
    assert slots.held("uid:2") == 2


def test_a_reserve_as_large_as_the_total_still_leaves_one_slot() -> None:
    slots = Slots(SlotLimits(total=2, reserved_admin=5, per_client=5, per_client_no_role=5))
    assert slots.claim("uid:1", admin=False, has_role=True) is None
    assert slots.claim("uid:1", admin=False, has_role=True) is not None


def test_startups_drop_at_random_then_always_and_cap_each_source() -> None:
    startups = Startups(StartupLimits(max_startups=4, drop_from=2, per_source=3))
    assert startups.admit("192.0.2.1", 0.0) is None
    assert startups.admit("192.0.2.2", 0.0) is None
    # At drop_from the chance is 30%: a throw of 0.29 is dropped, 0.31 is not.
    assert "random early drop" in str(startups.admit("192.0.2.3", 0.29))
    assert startups.admit("192.0.2.3", 0.31) is None
    # Between drop_from and the limit the chance rises: 65% at 3 of 4.
    assert startups.admit("192.0.2.3", 0.64) is not None
    assert startups.admit("192.0.2.3", 0.66) is None
    assert "still authenticating" in str(startups.admit("192.0.2.4", 0.99))
    startups.identified()
    startups.identified()
    assert startups.admit("192.0.2.3", 0.99) is None
    assert "192.0.2.3 already has 3" in str(startups.admit("192.0.2.3", 0.99))
    startups.closed("192.0.2.3", identified=True)
    assert startups.admit("192.0.2.3", 0.99) is None


def test_an_ipv6_source_is_its_slash_64() -> None:
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:2") == "2001:db8::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("192.0.2.7") == "192.0.2.7"


# The real daemon ---------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(server: str, max_connections: int = 64) -> Iterator[Daemon]:
    """The real daemon with these [server] settings; the read-role user is made an admin."""
    created = ensure_users()
    try:
        with daemon_world() as world:
            write_config(world, Options(max_connections=max_connections))
            text = world.config_file.read_text().replace("[server]\n", f"[server]\n{server}", 1)
            text = text.replace(f'"{READER}" = "read"', f'"{READER}" = "admin"', 1)
            world.config_file.write_text(text)
            started = world.start()
            assert started.returncode == 0, started.stderr
            yield world
    finally:
        remove_test_users(created)


def connect_root(world: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(world.socket))
    return sock


def held(connections: list[LineConnection], line: bytes = b"ping\n") -> list[bytes | None]:
    return [conn.request(line) for conn in connections]


@needs_root
def test_no_client_can_take_every_slot_and_root_always_gets_in() -> None:
    settings = "reserved_admin_connections = 2\nmax_connections_per_client = 6\n"
    with daemon(settings, max_connections=12) as world, contextlib.ExitStack() as stack:

        def open_as(user: str | None, count: int) -> list[LineConnection]:
            return [
                stack.enter_context(
                    LineConnection(
                        connect_root(world) if user is None else connect_unix_as(user, world.socket)
                    )
                )
                for _ in range(count)
            ]

        # The no-role user (it may only ping) gets max_connections_no_role (4) at most.
        replies = held(open_as(NOBODY, 6))
        assert replies[:4] == [b"ok pong\n"] * 4
        for busy in replies[4:]:
            assert busy is not None and busy.startswith(b"error busy: uid:"), busy
            assert b"already has 4 connections open" in busy
        # The block-role user fills what is left but the admins' reserve (12 - 2 - 4 = 6).
        replies = held(open_as(BLOCKER, 7))
        assert replies[:6] == [b"ok pong\n"] * 6
        assert replies[6] is not None and b"reserved for admins" in replies[6], replies[6]
        # A JSON client gets a JSON `busy`, with its id.
        (conn,) = open_as(BLOCKER, 1)
        reply = conn.request(b'{"v":1,"id":"h1","op":"ping"}\n')
        assert reply is not None
        assert json.loads(reply) == {
            "v": 1,
            "id": "h1",
            "ok": False,
            "error": {"code": "busy", "message": json.loads(reply)["error"]["message"]},
        }
        assert "reserved for admins" in json.loads(reply)["error"]["message"]
        # The hook says why it did not block, instead of "an unreadable reply".
        hook = subprocess.run(
            ["runuser", "-u", BLOCKER, "--", HOOK],
            env={
                "PATH": os.environ["PATH"],
                "IMR_SOCKET": str(world.socket),
                "IMR_IP": "203.0.113.77",
                "IMR_TIMEOUT": "1",
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert hook.stdout.strip() == "imr-hook: refused"
        assert "busy: the last 2 connections are reserved for admins" in hook.stderr, hook.stderr
        # An admin and root still get in: the reserve is theirs.
        assert held(open_as(READER, 1)) == [b"ok pong\n"]
        assert held(open_as(None, 1)) == [b"ok pong\n"]
        # Now all 12 are in use: even root is told so (and not silently dropped).
        (last,) = held(open_as(None, 1))
        assert last is not None and last.startswith(b"error busy: all 12 connections are in use")
        assert world.state_rows("SELECT COUNT(*) FROM blocks") == [(0,)]


@needs_root
def test_pings_do_not_keep_an_idle_connection_open() -> None:
    with (
        daemon("idle_timeout = 1.5\n") as world,
        LineConnection(connect_unix_as(NOBODY, world.socket)) as pinger,
        LineConnection(connect_unix_as(READER, world.socket)) as worker,
    ):
        start = time.monotonic()
        while time.monotonic() - start < 6 and pinger.request(b"ping\n") == b"ok pong\n":
            # A request that does something renews the idle time.
            assert (worker.request(b"status\n") or b"").startswith(b"ok running")
            time.sleep(0.3)
        lasted = time.monotonic() - start
        assert 1.2 < lasted < 3.0, lasted
        assert (worker.request(b"status\n") or b"").startswith(b"ok running")


async def test_silent_tcp_connections_from_one_source_leave_room_for_others(tmp_path: Path) -> None:
    """Before: 20 silent connections took all 8 slots and every token client got `busy`."""
    startups: dict[str, object] = {
        "max_startups": 8,
        "startups_drop_from": 8,
        "max_connections_per_source": 4,
    }
    async with serving(
        tmp_path,
        None,
        certificates={},
        tokens=TOKENS,
        tcp_options=startups,
        max_connections=8,
    ) as served:
        silent = []
        refused = 0
        for _ in range(20):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", served.port, local_addr=("127.0.0.2", 0)
            )
            silent.append(writer)
            with contextlib.suppress(TimeoutError):
                line = await asyncio.wait_for(reader.readline(), 0.2)
                refused += line.startswith(b"error busy: 127.0.0.2 already has 4")
        assert refused == 16
        for token in (WEB_TOKEN, READ_TOKEN):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(f"auth {token}\nping\n".encode())
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"ok auth")
            assert await asyncio.wait_for(reader.readline(), 5) == b"ok pong\n"
            writer.close()
        for writer in silent:
            writer.close()
