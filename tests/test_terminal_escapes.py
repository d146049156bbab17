"""Client text never reaches an admin's terminal raw (issue #12, item 5).

A block-role client chooses the `reason` of its blocks, and `imr list` / `imr show`
print it on an admin's terminal. The protocol refuses control characters and bidi
overrides in it, and the CLI escapes them anyway, for rows written before that.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3

import pytest

from imr.protocol import ProtocolError, parse_request
from imr.terminal import UNSAFE, escape

from daemon_harness import READER, remove_test_users
from robust_harness import Options, ensure_users, running, start, wait_until_gone

# A screen clear, an OSC window title, CR/LF starting a fake row, a right-to-left
# override, a C1 CSI and a Unicode line separator.
HOSTILE = [
    "\x1b[2J",
    "\x1b]0;owned\x07",
    "ok\r203.0.113.66  fake row",
    "ok\nfake row",
    "evil \u202etxt.exe",
    "\x9b31m red",
    "one\u2028two",
    "\u2066isolate\u2069",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_the_protocol_refuses_control_and_bidi_in_reasons(text: str) -> None:
    for request in (
        {"op": "block", "ip": "203.0.113.9", "reason": text},
        {"op": "block_many", "ips": ["203.0.113.9"], "reason": text},
        {"op": "unblock", "ip": "203.0.113.9", "reason": text},
        {"op": "list", "reason": text},
    ):
        with pytest.raises(ProtocolError) as caught:
            parse_request(json.dumps(request).encode())
        assert caught.value.code == "bad_request"
        assert "reason: control characters" in caught.value.message


def test_plain_reasons_still_pass() -> None:
    line = json.dumps({"op": "block", "ip": "203.0.113.9", "reason": "scan, café ✓"}).encode()
    request, _ = parse_request(line)
    assert request.reason == "scan, café ✓"  # type: ignore[union-attr]


@pytest.mark.parametrize("text", HOSTILE)
def test_escape_leaves_nothing_a_terminal_acts_on(text: str) -> None:
    shown = escape(text)
    assert UNSAFE.search(shown) is None
    assert escape("plain text, ünïcode") == "plain text, ünïcode"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
def test_state_rows_written_before_the_fix_print_escaped() -> None:
    """Rows with hostile text put straight into the state file print escaped in list and show."""
    created = ensure_users()
    try:
        with running(Options()) as world:
            done = world.as_root("block", "203.0.113.50", "--reason", "plain")
            assert done.returncode == 0, done.stderr
            pid = world.pid()
            assert world.stop().returncode == 0
            assert pid is not None
            wait_until_gone(pid)
            hostile = "".join(HOSTILE)
            with contextlib.closing(sqlite3.connect(world.state_file)) as db, db:
                db.execute("UPDATE blocks SET reason = ?, source = ?", (hostile, "x\x1b[1m"))
                db.execute("UPDATE hits SET reason = ?", (hostile,))
            start(world, Options())
            for args in (("list",), ("show", "203.0.113.50")):
                shown = world.as_user(READER, *args)
                assert shown.returncode == 0, shown.stderr
                assert "203.0.113.50" in shown.stdout
                # Only the table's own newlines; the hostile row is one row.
                assert UNSAFE.search(shown.stdout.replace("\n", "")) is None, repr(shown.stdout)
                assert "fake row" not in "".join(
                    line.split("  ")[0] for line in shown.stdout.splitlines()
                )
                assert "\\x1b[2J" in shown.stdout and "\\u202e" in shown.stdout
            # The machine-readable form keeps the text exactly (JSON escapes it).
            as_json = world.as_user(READER, "list", "--json")
            assert json.loads(as_json.stdout)[0]["reason"] == hostile
    finally:
        remove_test_users(created)
