"""Log floods and forged log lines (issue #12, item 4), against the real daemon.

A client with no role could write 20,000 log lines a second with bad requests,
and an unknown JSON key went raw into the text log, so it could forge a whole
`unblocked ... by uid=0(root)` line. Now each kind of trouble is logged at most
once per client every 10 s, with a count, client text is escaped on every log
path, and flooding connections take turns with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from test_tcp_listener import serving

from daemon_harness import BLOCKER, NOBODY, READER, Daemon, remove_test_users
from robust_harness import LineConnection, Options, connect_unix_as, ensure_users, running

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

HOOK = str(Path(sys.executable).parent / "imr-hook")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and users")

FORGED = "2026-12-07 04:00:00,000 INFO imr.broker[1]: unblocked 203.0.113.9 by uid=0(root)"


@pytest.fixture(scope="module")
def world() -> Iterator[Daemon]:
    created = ensure_users()
    try:
        with running(Options()) as daemon:
            yield daemon
    finally:
        remove_test_users(created)


def log_lines(world: Daemon) -> list[str]:
    return world.log_file.read_text(errors="replace").splitlines()


def mentioning(world: Daemon, user: str) -> list[str]:
    uid = pwd.getpwnam(user).pw_uid
    return [line for line in log_lines(world) if f"uid={uid}(" in line]


def flood(conn: LineConnection, line: bytes, count: int) -> list[bytes | None]:
    """Send `count` copies of `line` at once, then read every reply."""
    conn.send(line * count)
    return [conn.reply() for _ in range(count)]


@needs_root
def test_a_flood_of_bad_requests_writes_a_few_lines_with_a_count(world: Daemon) -> None:
    with LineConnection(connect_unix_as(NOBODY, world.socket)) as conn:
        bad = flood(conn, b"bogus\n", 2000)
        assert all(r is not None and r.startswith(b"error bad_request") for r in bad)
        forbidden = flood(conn, b"list\n", 500)
        assert all(r is not None and r.startswith(b"error forbidden") for r in forbidden)
        unknown = flood(conn, b'{"op":"ping","x":1}\n', 500)
        assert all(r is not None and b'"bad_request"' in r for r in unknown)
    with LineConnection(connect_unix_as(BLOCKER, world.socket)) as conn:
        networks = flood(conn, b"block 203.0.113.0/24\n", 500)
        assert all(r is not None and r.startswith(b"error network_not_allowed") for r in networks)
    time.sleep(0.5)
    assert len(mentioning(world, NOBODY)) <= 2, mentioning(world, NOBODY)  # bad_request, forbidden
    assert len(mentioning(world, BLOCKER)) <= 1, mentioning(world, BLOCKER)
    # Ten seconds on, the next such line says how many were left out.
    time.sleep(10.5)
    with LineConnection(connect_unix_as(NOBODY, world.socket)) as conn:
        assert (conn.request(b"bogus\n") or b"").startswith(b"error bad_request")
    time.sleep(0.5)
    last = mentioning(world, NOBODY)[-1]
    assert re.search(r"; 2499 more like it since the last such line$", last), last


@needs_root
def test_an_unknown_json_key_cannot_forge_a_log_line(world: Daemon) -> None:
    # Two clients, so that neither line is held back by the other's throttle.
    for user, key in ((READER, f"x\n{FORGED}"), (BLOCKER, f"x\x1b[2K\r{FORGED}")):
        line = json.dumps({"op": "ping", key: 1}).encode() + b"\n"
        with LineConnection(connect_unix_as(user, world.socket)) as conn:
            reply = conn.request(line)
            assert reply is not None and json.loads(reply)["error"]["code"] == "bad_request"
    time.sleep(0.5)
    text = world.log_file.read_text(errors="replace")
    assert not any(line.startswith(FORGED[:40]) for line in text.splitlines()), text[-2000:]
    assert "\x1b" not in text and "\r" not in text
    logged = [line for line in text.splitlines() if "INFO imr.broker[1]: unblocked" in line]
    assert len(logged) == 2, logged
    for entry in logged:
        assert entry[:4].isdigit() and "bad request from uid=" in entry
    assert "x\\x0a2026-12-07" in logged[0] and "x\\x1b[2K\\x0d2026-12-07" in logged[1]


@needs_root
def test_flooding_connections_take_turns_with_the_hook(world: Daemon) -> None:
    """Sixteen connections flooding bad lines; the hook's block still gets through in time."""
    stop = threading.Event()

    def flooder(user: str) -> None:
        with LineConnection(connect_unix_as(user, world.socket)) as conn:
            drain = threading.Thread(target=lambda: [conn.reply() for _ in iter(stop.is_set, True)])
            drain.start()
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    conn.sock.sendall(b'{"op":"ping","bogus":1}\n' * 2000)
            stop.set()
            conn.sock.shutdown(socket.SHUT_RDWR)
            drain.join(10)

    users = [NOBODY] * 4 + [READER] * 12
    threads = [threading.Thread(target=flooder, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        outcomes = []
        for n in range(5):
            hook = subprocess.run(
                ["runuser", "-u", BLOCKER, "--", HOOK],
                env={
                    "PATH": os.environ["PATH"],
                    "IMR_SOCKET": str(world.socket),
                    "IMR_IP": f"203.0.113.{120 + n}",
                    "IMR_TIMEOUT": "1",
                },
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            outcomes.append((hook.stdout.strip(), hook.stderr.strip()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert [out for out, _ in outcomes] == [
        f"imr-hook: block 203.0.113.{120 + n}" for n in range(5)
    ], outcomes


async def test_a_certificate_subject_cannot_forge_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unmapped subject (signed by the client CA) is named escaped in every log line."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    evil = "e\nINFO imr.broker[1]: unblocked 203.0.113.9 by uid=0(root)"  # a CN: <= 64
    leaf = ca.issue_cert("evil.imrtest", common_name=evil)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "evil.pem"))
    caplog.set_level(logging.INFO, "imr")
    pki = type("Pki", (), {"server": tmp_path / "server.pem", "ca": tmp_path / "ca.pem"})
    async with serving(tmp_path, pki, tokens={}) as served:  # type: ignore[arg-type]
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        context.load_cert_chain(str(tmp_path / "evil.pem"))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", served.port, ssl=context, server_hostname="127.0.0.1"
        )
        writer.write(b"ping\n")
        reply = await asyncio.wait_for(reader.readline(), 5)
        assert reply.startswith(b"error unauthenticated")
        writer.close()
    messages = [record.getMessage() for record in caplog.records]
    assert any("e\\x0aINFO imr.broker[1]" in message for message in messages), messages
    assert not any("\n" in message for message in messages), messages
