"""`imr list` filters: the pure selection, the protocol fields, and the real daemon answering."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from imr.core.listing import ListQuery, select_blocks
from imr.protocol import ListRequest, ProtocolError, parse_request
from imr.store import Store

from daemon_harness import (
    ATTACKER_V4,
    ATTACKER_V6,
    BLOCKER,
    READER,
    Daemon,
    daemon_world,
)

NOW = 1_700_000_000.0
HOUR = 3600


@dataclass(frozen=True)
class Rec:
    id: int
    blocked_at: float
    reason: str
    source: str


RECORDS = [
    Rec(1, NOW - 5 * HOUR, "SSH brute force", "logscan"),
    Rec(2, NOW - 2 * HOUR, "w00tw00t scan", "modsec"),
    Rec(3, NOW - 30 * 60, "ssh: invalid user", "logscan"),
    Rec(4, NOW - 60, "", "cli"),
    Rec(5, NOW - 30 * 60, "sql injection", "modsec"),  # same time as 3: id decides
]


def ids(query: ListQuery) -> list[int]:
    return [r.id for r in select_blocks(reversed(RECORDS), query, NOW).rows]


# -- the pure selection ------------------------------------------------------------


def test_no_filter_lists_everything_oldest_first() -> None:
    assert ids(ListQuery()) == [1, 2, 3, 5, 4]


def test_since_keeps_blocks_made_within_the_duration() -> None:
    assert ids(ListQuery(since=HOUR)) == [3, 5, 4]
    assert ids(ListQuery(since=30 * 60)) == [3, 5, 4]  # the boundary is included
    assert ids(ListQuery(since=59)) == []


def test_reason_is_a_case_insensitive_substring() -> None:
    assert ids(ListQuery(reason="ssh")) == [1, 3]
    assert ids(ListQuery(reason="W00T")) == [2]
    assert ids(ListQuery(reason="nothing like it")) == []


def test_source_is_an_exact_tag() -> None:
    assert ids(ListQuery(source="modsec")) == [2, 5]
    assert ids(ListQuery(source="mod")) == []
    assert ids(ListQuery(source="LOGSCAN")) == []


def test_filters_combine_and_limit_cuts_after_filtering() -> None:
    assert ids(ListQuery(since=3 * HOUR, source="logscan")) == [3]
    assert ids(ListQuery(source="logscan", reason="ssh", limit=1)) == [1]
    listing = select_blocks(RECORDS, ListQuery(since=3 * HOUR, limit=2), NOW)
    assert [r.id for r in listing.rows] == [2, 3] and listing.matched == 4
    assert select_blocks([], ListQuery(limit=5), NOW).matched == 0


# -- the protocol --------------------------------------------------------------------


def parse(line: str) -> ListRequest:
    request, _ = parse_request(line.encode())
    assert isinstance(request, ListRequest)
    return request


def test_json_fields() -> None:
    request = parse('{"op": "list", "since": "90m", "reason": "ssh", "source": "logscan"}')
    assert (request.since, request.reason, request.source, request.limit) == (
        5400,
        "ssh",
        "logscan",
        None,
    )
    assert parse('{"op": "list", "since": 120, "limit": 3}').since == 120
    assert parse('{"op": "list"}') == ListRequest(op="list")


def test_text_form_takes_key_value_options() -> None:
    assert parse("list") == ListRequest(op="list")
    request = parse("list since=1h source=logscan reason=ssh limit=5")
    assert (request.since, request.reason, request.source, request.limit) == (
        3600,
        "ssh",
        "logscan",
        5,
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("list since=soon", "since: 'soon' is not a duration"),
        ('{"op": "list", "since": 0}', "since: a duration must be longer than zero"),
        ('{"op": "list", "source": "two words"}', "source: String should match pattern"),
        ('{"op": "list", "reason": ""}', "reason: String should have at least 1 character"),
        ("list limit=0", "limit: Input should be greater than or equal to 1"),
        ("list ssh", "usage: list [since=DURATION]"),
        ("list since=1h since=2h", "usage: list [since=DURATION]"),
        ("list colour=red", "usage: list [since=DURATION]"),
    ],
)
def test_bad_filters_are_refused_with_a_reason(line: str, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_request(line.encode())
    assert caught.value.code == "bad_request" and message in caught.value.message


# -- the real daemon -----------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


@pytest.fixture
def world(test_users: None) -> Iterator[Daemon]:
    with daemon_world() as daemon:
        yield daemon


def text_request(daemon: Daemon, line: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(line.encode() + b"\n")
        return sock.makefile("rb").readline().decode().strip()


@needs_root
def test_list_filters_through_the_real_daemon(world: Daemon) -> None:
    # Two blocks made hours ago, written to the state file before the daemon starts.
    world.write_config()
    now = time.time()
    store = Store(world.state_file)
    with store.transaction():
        store.insert_block(
            "192.0.2.10", now - 5 * HOUR, now + HOUR, 1, "SSH brute force", "logscan", 0, 1
        )
        store.insert_block("2001:db8:5::10", now - 3 * HOUR, now + HOUR, 1, "sqli", "modsec", 0, 1)
    store.close()
    assert world.start().returncode == 0
    blocked = world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "ssh: invalid user")
    assert blocked.returncode == 0, blocked.stderr
    assert world.as_user(BLOCKER, "block", ATTACKER_V6, "--source", "scanner").returncode == 0

    def listed(*args: str) -> list[str]:
        result = world.as_user(READER, "list", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [entry["ip"] for entry in json.loads(result.stdout)]

    assert listed() == ["192.0.2.10", "2001:db8:5::10", ATTACKER_V4, ATTACKER_V6]
    assert listed("--since", "1h") == [ATTACKER_V4, ATTACKER_V6]
    assert listed("--since", "4h") == ["2001:db8:5::10", ATTACKER_V4, ATTACKER_V6]
    assert listed("--reason", "SSH") == ["192.0.2.10", ATTACKER_V4]
    assert listed("--source", "modsec") == ["2001:db8:5::10"]
    assert listed("--source", "scanner", "--since", "10m") == [ATTACKER_V6]
    assert listed("--reason", "ssh", "--limit", "1") == ["192.0.2.10"]

    table = world.as_user(READER, "list", "--since", "1h", "--limit", "1")
    assert table.returncode == 0, table.stderr
    assert ATTACKER_V4 in table.stdout and ATTACKER_V6 not in table.stdout
    assert "(1 of 2 matching; raise --limit for more)" in table.stderr
    none = world.as_user(READER, "list", "--source", "nobody-sent-this")
    assert (none.returncode, none.stdout.strip()) == (0, "no matching active blocks")

    bad = world.as_user(READER, "list", "--since", "soon")
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr
    bad = world.as_user(READER, "list", "--source", "two words")
    assert bad.returncode == 1 and "source:" in bad.stderr and "Traceback" not in bad.stderr

    # The text form, as socat users type it.
    reply = text_request(world, "list since=1h reason=ssh")
    assert reply.startswith(f"ok 1 active: {ATTACKER_V4}@"), reply
    assert text_request(world, "list since=later").startswith("error bad_request: since:")

    # Answered from the daemon's memory: emptying the kernel's chain does not change the list.
    for tool in ("iptables-nft", "ip6tables-nft"):
        world.server.run(tool, "-F", "IMR")
    assert listed("--since", "1h") == [ATTACKER_V4, ATTACKER_V6]
