"""A corpus of hostile addresses and messages, each refused with the right code by the real daemon.

Every line is sent on its own connection over the real Unix socket by the
real unprivileged block-role user (the role a compromised web application
has), and after each one the kernel (nftables sets) and the state file are
read back: a refusal changes nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import BLOCKER, NOBODY, Daemon, remove_test_users
from robust_harness import (
    NETWORK_CODES,
    LineConnection,
    Options,
    check_consistent,
    connect_unix_as,
    ensure_users,
    kernel_entries,
    log_failures,
    protected_addresses,
    reply_code,
    running,
    single_address,
    state_rows,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

BACKEND = "nftables"
MAX_LINE = 4096  # server.max_line_bytes (the default)

NETWORK = set(NETWORK_CODES)  # a network is refused to this role, whichever check sees it first
INVALID = {"invalid_address"}
BAD = {"bad_request"}

# (address, codes) sent both as `block ADDRESS` and as {"op":"block","ip":ADDRESS}.
ADDRESSES: list[tuple[str, set[str]]] = [
    ("0.0.0.0/0", NETWORK),
    ("::/0", NETWORK),
    ("203.0.113.0/24", NETWORK),
    ("2001:db8::/32", NETWORK),
    ("203.0.113.8/31", NETWORK),
    ("203.0.113.9/24", NETWORK),
    ("198.51.100.0/24", NETWORK | {"allowlisted"}),
    ("203.0.113.9/255.255.255.255", NETWORK),
    ("0.0.0.0", {"unspecified_address"}),
    ("::", {"unspecified_address"}),
    ("::ffff:0.0.0.0", {"unspecified_address"}),
    ("127.0.0.1", {"loopback_address"}),
    ("127.255.255.254", {"loopback_address"}),
    ("::1", {"loopback_address"}),
    ("0:0:0:0:0:0:0:1", {"loopback_address"}),
    ("::ffff:127.0.0.1", {"loopback_address"}),
    ("::ffff:7f00:1", {"loopback_address"}),
    ("127.1", INVALID),
    ("127.0.0.01", INVALID),
    ("0x7f.1", INVALID),
    ("0x7f000001", INVALID),
    ("0177.0.0.1", INVALID),
    ("2130706433", INVALID),
    ("[::1]", INVALID),
    ("fe80::1%eth0", INVALID),
    ("fe80::1%1", INVALID),
    ("fe80::1", {"link_local_address"}),
    ("169.254.169.254", {"link_local_address"}),
    ("224.0.0.1", {"multicast_address"}),
    ("ff02::1", {"multicast_address"}),
    ("255.255.255.255", {"broadcast_address"}),
    ("::ffff:255.255.255.255", {"broadcast_address"}),
    ("203.0.113.1", {"own_address"}),
    ("2001:DB8::1", {"own_address"}),
    ("2001:db8:0:0:0:0:0:1", {"own_address"}),
    ("::ffff:203.0.113.1", {"own_address"}),
    ("192.0.2.1", {"own_address"}),
    ("198.51.100.23", {"allowlisted"}),
    ("::ffff:198.51.100.23", {"allowlisted"}),
    ("localhost", INVALID),
    ("example.com", INVALID),
    ("203.0.113.5,203.0.113.6", INVALID),
    ("203.0.113.5;reboot", INVALID),
    ("$(reboot)", INVALID),
    ("`id`", INVALID),
    ("../../etc/passwd", INVALID),
    ("\uff12\uff10\uff13.\uff10.\uff11\uff11\uff13.\uff15", INVALID),  # fullwidth digits
    ("\u0662\u0660\u0663.\u0660.\u0661\u0661\u0663.\u0665", INVALID),  # Arabic-Indic digits
    ("203.0.113.5\u200b", INVALID),  # zero-width space
    ("203.0.113.256", INVALID),
    ("2001:db8::g", INVALID),
    ("2001:db8:::1", INVALID),
]

# Lines with their codes (a JSON line gets a JSON reply, a text line a text reply).
_DEEP = "[" * 2000 + "]" * 2000
_IP = "203.0.113.9"
LINES: list[tuple[str, bytes, set[str]]] = [
    # The original tool's injection: the text form takes the first word only.
    ("shell injection, text", b"block 1.2.3.4; rm -rf /\n", INVALID),
    ("shell injection, json", b'{"op":"block","ip":"1.2.3.4; rm -rf /"}\n', INVALID),
    ("newline inside ip", b'{"op":"block","ip":"203.0.113.5\\n"}\n', INVALID),
    ("NUL inside ip", b'{"op":"block","ip":"203.0.113.5\\u0000"}\n', INVALID),
    ("empty ip", b'{"op":"block","ip":""}\n', INVALID),
    ("overlong ip", b'{"op":"block","ip":"' + b"1" * 65 + b'"}\n', BAD),
    ("ip as JSON number", b'{"op":"block","ip":3405803781}\n', BAD),
    ("ip as JSON null", b'{"op":"block","ip":null}\n', BAD),
    ("ip as JSON list", b'{"op":"block","ip":["203.0.113.5"]}\n', BAD),
    ("ip as JSON object", b'{"op":"block","ip":{"v4":"203.0.113.5"}}\n', BAD),
    ("duplicate ip key", b'{"op":"block","ip":"127.0.0.1","ip":"203.0.113.9"}\n', BAD),
    ("duplicate op key", b'{"op":"block","ip":"203.0.113.9","op":"unblock"}\n', BAD),
    ("lone surrogate", b'{"op":"block","ip":"203.0.113.9","reason":"\\ud800"}\n', BAD),
    # A hostile key; the NBSP makes the reply text (the listener strips ASCII space
    # before choosing the reply's form, the parser Unicode space).
    ("lone surrogate key", b'\xc2\xa0{"op":"ping","\\udc80":1}\n', BAD),
    ("deeply nested JSON", _DEEP.encode() + b"\n", BAD),
    (
        "deeply nested field",
        b'{"op":"block","ip":"' + _IP.encode() + b'","x":' + b"[" * 1900 + b"]" * 1900 + b"}\n",
        BAD,
    ),
    ("two JSON objects", b'{"op":"block","ip":"203.0.113.9"}{"op":"ping"}\n', BAD),
    ("JSON then text", b'{"op":"ping"} block 203.0.113.9\n', BAD),
    ("truncated JSON", b'{"op":"block","ip":"203.0.113.9"\n', BAD),
    ("JSON with NaN", b'{"op":"block","ip":"203.0.113.9","severity":NaN}\n', BAD),
    ("severity out of range", b'{"op":"block","ip":"203.0.113.9","severity":11}\n', BAD),
    (
        "huge severity",
        b'{"op":"block","ip":"203.0.113.9","severity":' + b"9" * 5000 + b"}\n",
        {"line_too_long"},
    ),
    ("reason too long", b'{"op":"block","ip":"203.0.113.9","reason":"' + b"x" * 201 + b'"}\n', BAD),
    ("source with space", b'{"op":"block","ip":"203.0.113.9","source":"a b"}\n', BAD),
    ("unknown field", b'{"op":"block","ip":"203.0.113.9","ttl":0}\n', BAD),
    ("version 2", b'{"v":2,"op":"block","ip":"203.0.113.9"}\n', {"unsupported_version"}),
    ("version as string", b'{"v":"1","op":"block","ip":"203.0.113.9"}\n', {"unsupported_version"}),
    ("op in capitals", b'{"op":"BLOCK","ip":"203.0.113.9"}\n', BAD),
    ("no op", b'{"ip":"203.0.113.9"}\n', BAD),
    ("JSON array", b'["block","203.0.113.9"]\n', BAD),
    ("byte-order mark", b'\xef\xbb\xbf{"op":"block","ip":"203.0.113.9"}\n', BAD),
    ("NUL in text line", b"block 203.0.113.9\x00\n", BAD),
    ("NUL as separator", b"block\x00203.0.113.9\n", BAD),
    ("carriage return forging a log line", b"block 203.0.113.9 x\rrefused nothing\n", BAD),
    ("terminal escape", b"block 203.0.113.9 \x1b[2J\n", BAD),
    ("invalid UTF-8", b"block 203.0.113.9 \xff\xfe\n", BAD),
    ("overlong UTF-8 slash", b"block 203.0.113.9 \xc0\xaf\n", BAD),
    ("UTF-8 surrogate", b"block 203.0.113.9 \xed\xa0\x80\n", BAD),
    ("invalid UTF-8 in JSON", b'{"op":"block","ip":"203.0.113.9\xff"}\n', BAD),
    ("verb only", b"block\n", BAD),
    ("empty line", b"\n", BAD),
    ("blank line", b"   \t \n", BAD),
    ("unknown verb", b"drop 203.0.113.9\n", BAD),
    ("capital verb still validated", b"BLOCK 127.0.0.1\n", {"loopback_address"}),
    ("text reason too long", b"block 203.0.113.9 " + b"x" * 201 + b"\n", BAD),
    # Terminal escapes in a reason (issue #12): they would reach `imr list` on an admin's terminal.
    ("screen clear in reason", b'{"op":"block","ip":"203.0.113.9","reason":"\\u001b[2J"}\n', BAD),
    (
        "OSC title in reason",
        b'{"op":"block","ip":"203.0.113.9","reason":"\\u001b]0;x\\u0007"}\n',
        BAD,
    ),
    ("CR fake row in reason", b'{"op":"block","ip":"203.0.113.9","reason":"a\\rb"}\n', BAD),
    ("bidi override in reason", b'{"op":"block","ip":"203.0.113.9","reason":"\\u202eab"}\n', BAD),
    ("C1 CSI in reason", b'{"op":"block","ip":"203.0.113.9","reason":"\\u009b2J"}\n', BAD),
    ("bidi override, text form", "block 203.0.113.9 a\u202eb\n".encode(), BAD),
    # Operations a block-role client may not run.
    ("unblock", b"unblock 203.0.113.9\n", {"forbidden"}),
    ("show", b"show 203.0.113.9\n", {"forbidden"}),
    ("list", b"list\n", {"forbidden"}),
    ("status", b"status\n", {"forbidden"}),
    ("export", b'{"op":"export"}\n', {"forbidden"}),
]


@pytest.fixture(scope="module")
def world() -> Iterator[Daemon]:
    created = ensure_users()
    try:
        with running(Options(BACKEND)) as daemon:
            yield daemon
    finally:
        remove_test_users(created)


def snapshot(world: Daemon) -> tuple[object, ...]:
    return (
        kernel_entries(world, BACKEND),
        state_rows(world, "SELECT COUNT(*) FROM blocks"),
        state_rows(world, "SELECT COUNT(*) FROM hits"),
    )


def send_as_blocker(world: Daemon, line: bytes) -> tuple[bytes | None, bool]:
    """One line on a fresh connection: (the reply, whether the connection still serves).

    After a refusal the same connection must still answer a ping; only an
    unframeable line (line_too_long) makes the daemon hang up.
    """
    with LineConnection(connect_unix_as(BLOCKER, world.socket)) as conn:
        reply = conn.request(line)
        if reply is None or reply_code(reply) == "line_too_long":
            return reply, conn.reply() is not None
        return reply, conn.request(b"ping\n") == b"ok pong\n"


def assert_refused(world: Daemon, line: bytes, codes: set[str]) -> None:
    before = snapshot(world)
    reply, serving = send_as_blocker(world, line)
    assert reply is not None, f"no reply to {line[:80]!r}"
    code = reply_code(reply)
    assert code in codes, (line[:120], reply[:200])
    # Answered in the request's form; line_too_long is always text (the line was never read).
    assert reply.startswith(b"{") == (line.startswith(b"{") and code != "line_too_long")
    assert serving == (code != "line_too_long"), "the connection should serve on (or end)"
    assert snapshot(world) == before, f"{line[:80]!r} changed the kernel or the state file"


@pytest.mark.parametrize(("address", "codes"), ADDRESSES, ids=[a for a, _ in ADDRESSES])
def test_hostile_address_text_form(world: Daemon, address: str, codes: set[str]) -> None:
    assert_refused(world, f"block {address} hostile\n".encode(), codes)


@pytest.mark.parametrize(("address", "codes"), ADDRESSES, ids=[a for a, _ in ADDRESSES])
def test_hostile_address_json_form(world: Daemon, address: str, codes: set[str]) -> None:
    line = json.dumps({"v": 1, "op": "block", "ip": address, "source": "fuzz"}).encode() + b"\n"
    assert_refused(world, line, codes)


@pytest.mark.parametrize(("name", "line", "codes"), LINES, ids=[n for n, _, _ in LINES])
def test_hostile_message(world: Daemon, name: str, line: bytes, codes: set[str]) -> None:
    assert_refused(world, line, codes)


def test_line_length_limit_is_exact(world: Daemon) -> None:
    """max_line_bytes counts the bytes before the newline: 4096 pass, 4097 are refused."""
    ping = b'{"op":"ping"'
    fits = ping + b" " * (MAX_LINE - len(ping) - 1) + b"}"
    assert len(fits) == MAX_LINE
    reply, serving = send_as_blocker(world, fits + b"\n")
    assert reply is not None and reply_code(reply) == "ok" and serving
    assert_refused(world, fits + b" \n", {"line_too_long"})
    assert_refused(world, b"\x00" * 100_000 + b"\n", {"line_too_long"})


def test_ten_megabyte_line_is_refused_quickly(world: Daemon) -> None:
    """line_too_long once max_line_bytes are in, then a hang-up: the daemon never buffers 10 MB."""
    before = snapshot(world)
    started = time.monotonic()
    with LineConnection(connect_unix_as(BLOCKER, world.socket)) as conn:
        # The daemon may hang up before it has read all 10 MB: send() then reports False.
        conn.send(b"block 203.0.113.9 " + b"A" * 10 * 1024 * 1024 + b"\n")
        reply = conn.reply()
        assert reply is not None and reply_code(reply) == "line_too_long", reply
        assert conn.reply() is None
    assert time.monotonic() - started < 10
    assert snapshot(world) == before
    status = Path(f"/proc/{world.pid()}/status").read_text()
    rss_kb = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
    assert rss_kb < 200 * 1024, f"daemon RSS {rss_kb} kB after a 10 MB line"


def test_a_good_request_still_works_and_nothing_else_was_blocked(world: Daemon) -> None:
    """The positive control: the same user, socket and daemon block a valid address."""
    reply, _ = send_as_blocker(world, b"block 203.0.113.77 after the corpus\n")
    assert reply is not None and reply.startswith(b"ok blocked 203.0.113.77 "), reply
    address = single_address("203.0.113.77")
    assert address is not None
    active = check_consistent(world, BACKEND, protected_addresses(world), {address})
    assert {str(a) for a in active} == {"203.0.113.77"}
    assert log_failures(world) == []


def test_a_no_role_user_cannot_take_every_connection(world: Daemon) -> None:
    """Slot exhaustion (issue #12): the no-role user gets 4 connections; the others still get in."""
    conns = [LineConnection(connect_unix_as(NOBODY, world.socket)) for _ in range(8)]
    try:
        replies = [conn.request(b"ping\n") for conn in conns]
        assert replies.count(b"ok pong\n") == 4, replies
        assert all((r or b"").startswith(b"error busy:") for r in replies if r != b"ok pong\n"), (
            replies
        )
        reply, serving = send_as_blocker(world, b"ping\n")
        assert reply == b"ok pong\n" and serving
    finally:
        for conn in conns:
            conn.close()
