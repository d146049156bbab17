"""Fuzzing: the protocol parser in-process, and the live daemon's listener(s) over real sockets.

The CI budget is small (tens of seconds); bench/fuzz.py runs the same code
(tests/fuzz_cases.py) with a larger one. A failing example is printed by
hypothesis (with a blob to reproduce it); the random-bytes seed is printed on
failure (IMR_FUZZ_SEED=N repeats a run).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imr.protocol import Request
from imr.wire_codes import WireCode

from daemon_harness import BLOCKER, Daemon, remove_test_users
from fuzz_cases import (
    FORGED_LOG_LINE,
    TERMINAL_ESCAPES,
    TEXT_VERBS,
    Tally,
    any_lines,
    check_survived,
    free_text,
    hostile_key_message_is_escaped,
    hypothesis_fuzz,
    json_lines,
    json_round_trip,
    parses_or_refuses,
    random_bytes_fuzz,
    reply_is_one_line,
    text_lines,
    text_round_trip,
    token,
    unsafe_reason_is_refused,
    valid_requests,
)
from robust_harness import (
    FUZZ_TOKEN,
    Connector,
    Ledger,
    Options,
    Protected,
    ensure_users,
    protected_addresses,
    running,
    tcp_connector,
    unix_connector,
)

PARSER = settings(max_examples=400, deadline=None, database=None, print_blob=True)
LISTENER_EXAMPLES = 200  # hypothesis examples per listener, 1-4 lines each
RANDOM_CONNECTIONS = 40  # random-bytes connections per listener, up to ~100 kB each

# The parser ---------------------------------------------------------------------------


@PARSER
@given(st.binary(max_size=600))
def test_parser_takes_any_bytes(line: bytes) -> None:
    parses_or_refuses(line)


@PARSER
@given(st.one_of(json_lines(), text_lines()))
def test_parser_takes_any_generated_request(line: bytes) -> None:
    parses_or_refuses(line)


@PARSER
@given(valid_requests)
def test_valid_json_requests_round_trip(request: Request) -> None:
    json_round_trip(request)


@PARSER
@given(
    st.sampled_from(TEXT_VERBS),
    token,
    free_text,
    st.sampled_from([str.lower, str.upper, str.title]),
)
def test_valid_text_requests_round_trip(
    verb: str, ip: str, reason: str, case: Callable[[str], str]
) -> None:
    text_round_trip(verb, ip, reason, case)


@PARSER
@given(st.sampled_from(list(WireCode)), st.text(), st.one_of(st.none(), st.text(max_size=64)))
def test_every_reply_is_one_line(code: WireCode, message: str, request_id: str | None) -> None:
    reply_is_one_line(code, message, request_id)


@PARSER
@given(
    st.text(max_size=120),
    st.sampled_from([*TERMINAL_ESCAPES, FORGED_LOG_LINE]),
    st.sampled_from(["block", "block_many", "unblock", "list"]),
)
def test_terminal_escapes_in_a_reason_are_refused(prefix: str, escape: str, op: str) -> None:
    unsafe_reason_is_refused(prefix, escape, op)


@PARSER
@given(st.text(max_size=40), st.sampled_from([*TERMINAL_ESCAPES, FORGED_LOG_LINE]))
def test_a_hostile_key_is_quoted_back_escaped(prefix: str, escape: str) -> None:
    hostile_key_message_is_escaped(prefix + escape)


# The live daemon ----------------------------------------------------------------------

daemon_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


@dataclass
class Target:
    world: Daemon
    backend: str
    pid: int
    protected: Protected
    ledger: Ledger
    tally: Tally


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    created = ensure_users()
    try:
        with running(Options("nftables", tcp=True)) as world:
            pid = world.pid()
            assert pid is not None
            yield Target(world, "nftables", pid, protected_addresses(world), Ledger(), Tally())
    finally:
        remove_test_users(created)


# Each listener, as a block-role client: the Unix socket (a real unprivileged user),
# TCP with a block-role token, and TCP by a client that never authenticates.
TRANSPORTS = ["unix", "tcp", "tcp-unauthenticated"]


def connector(target: Target, transport: str) -> Connector:
    if transport == "unix":
        return unix_connector(target.world, BLOCKER)
    if transport == "tcp":
        return tcp_connector(target.world, FUZZ_TOKEN)
    if transport == "tcp-unauthenticated":
        return tcp_connector(target.world, None)
    raise AssertionError(f"unknown transport {transport}")


def survived(target: Target, transport: str) -> None:
    serving = "unix" if transport == "tcp-unauthenticated" else transport
    active = check_survived(
        target.world,
        target.backend,
        target.pid,
        target.protected,
        target.ledger,
        connector(target, serving),
    )
    print(f"{target.tally.summary()}; {len(active)} active blocks")


@daemon_only
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_listener_survives_generated_messages(target: Target, transport: str) -> None:
    before = target.tally.replies["ok"]
    hypothesis_fuzz(
        connector(target, transport),
        target.protected,
        target.ledger,
        target.tally,
        max_examples=LISTENER_EXAMPLES,
        lines=any_lines,
        identified=transport != "tcp-unauthenticated",
    )
    if transport != "tcp-unauthenticated":
        assert target.tally.replies["ok"] > before, "the fuzz never made a valid request"
    survived(target, transport)


@daemon_only
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_listener_survives_random_bytes(target: Target, transport: str) -> None:
    seed = int(os.environ.get("IMR_FUZZ_SEED", random.randrange(2**32)))  # noqa: S311
    print(f"random-bytes seed {seed} (IMR_FUZZ_SEED={seed} repeats it)")
    random_bytes_fuzz(
        connector(target, transport),
        target.protected,
        target.ledger,
        target.tally,
        connections=RANDOM_CONNECTIONS,
        seed=seed,
        identified=transport != "tcp-unauthenticated",
    )
    survived(target, transport)
