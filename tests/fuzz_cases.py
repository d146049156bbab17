"""Fuzz inputs and properties, shared by tests/test_fuzz.py (CI budget) and bench/fuzz.py.

Two layers:
- the parser (imr.protocol.parse_request), in-process: whatever the bytes,
  it returns a request or raises ProtocolError, and valid requests round-trip;
- the running daemon (robust_harness): hypothesis-generated and random-byte
  messages over real connections; every reply is one well-formed line with
  the code an independent oracle expects, the daemon never dies, and what
  ends up in the kernel and the state file is only what may be blocked.

Budgets are arguments, so CI and the bench run the same code.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import socket
import string
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imr.protocol import (
    OPS,
    BlockRequest,
    ListRequest,
    PingRequest,
    ProtocolError,
    Request,
    ShowRequest,
    StatusRequest,
    UnblockRequest,
    encode_json_reply,
    encode_text_reply,
    error_reply,
    parse_request,
)
from imr.terminal import UNSAFE
from imr.wire_codes import WireCode

from daemon_harness import Daemon
from robust_harness import (
    NETWORK_CODES,
    REFUSAL_CODES,
    Connector,
    IPAddress,
    Ledger,
    LineConnection,
    Protected,
    check_consistent,
    daemon_alive,
    host_prefix,
    log_failures,
    reply_code,
    single_address,
)

MAX_LINE = 4096  # server.max_line_bytes in the test daemon (the default)

# Addresses -------------------------------------------------------------------------

# Every address a fuzz may get blocked is a documentation address; the rest must be refused.
doc_v4 = st.builds(
    lambda net, host: f"{net}.{host}",
    st.sampled_from(["192.0.2", "198.51.100", "203.0.113"]),
    st.integers(0, 255),
)
doc_v6 = st.builds(
    lambda a, b: str(ipaddress.IPv6Address((0x20010DB8 << 96) | (a << 64) | b)),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
)
SPECIAL = [
    "0.0.0.0", "0.0.0.0/0", "::", "::/0", "::1", "127.0.0.1", "127.1", "127.255.255.254",
    "::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:255.255.255.255", "255.255.255.255",
    "224.0.0.1", "ff02::1", "169.254.1.1", "fe80::1", "fe80::1%eth0", "fe80::1%1",
    "203.0.113.1", "2001:db8::1", "192.0.2.1", "2001:db8:1::1", "::ffff:203.0.113.1",
    "203.0.113.255", "192.0.2.255", "198.51.100.7", "::ffff:198.51.100.7",
    "2130706433", "0x7f.1", "0177.0.0.1", "[::1]", "localhost", "example.com",
    "1.2.3.4; rm -rf /", "$(reboot)", "`id`", "203.0.113.0/24", "2001:db8::/32",
]  # fmt: skip


# Anywhere in a range that must never be blocked (its first address is in SPECIAL).
RANGES = [
    "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "198.51.100.0/24", "::ffff:127.0.0.0/104",
    "fe80::/10", "ff00::/8",
]  # fmt: skip
in_ranges = st.builds(
    lambda net, n: str(net[n % net.num_addresses]),
    st.sampled_from([ipaddress.ip_network(r) for r in RANGES]),
    st.integers(0, 2**32),
)
# The protected ones that parse: mutated forms of them must be refused too.
PROTECTED = [a for a in SPECIAL if single_address(a) is not None]
FULLWIDTH_DIGITS = str.maketrans("0123456789", "".join(chr(0xFF10 + d) for d in range(10)))


def _mutate(address: str, how: int) -> str:
    forms: list[Callable[[str], str]] = [
        lambda a: a,
        lambda a: a.upper(),
        lambda a: f"::ffff:{a}" if "." in a else a,
        lambda a: ipaddress.ip_address(a).exploded,
        lambda a: f"0{a}",
        lambda a: f"{a}/32",
        lambda a: f"{a}%lo",
        lambda a: f"[{a}]",
        lambda a: f" {a}",
        lambda a: f"{a}\n",
        lambda a: f"{a}\x00",
        lambda a: a.translate(FULLWIDTH_DIGITS),
        lambda a: str(int(ipaddress.ip_address(a))),
        lambda a: f"{a},{a}",
    ]
    return forms[how % len(forms)](address)


address_texts = st.one_of(
    doc_v4,
    doc_v6,
    st.builds(_mutate, st.one_of(doc_v4, doc_v6), st.integers(0, 13)),
    st.sampled_from(SPECIAL),
    st.text(alphabet="0123456789abcdefABCDEF.:/%[]x -", max_size=48),
    st.text(max_size=70),
)

# JSON requests ---------------------------------------------------------------------

# Text with what breaks naive handling: lone surrogates (from "\ud800" escapes),
# NUL, line and paragraph separators, a byte-order mark.
wild_text = st.text(
    st.one_of(st.characters(), st.sampled_from("\ud800\udbff\udc00\udfff\x00\n\r\u2028\ufeff")),
    max_size=40,
)

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    wild_text,
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(OPS), st.sampled_from(OPS), json_leaves)},
    optional={
        "v": st.one_of(st.just(1), json_leaves),
        "id": st.one_of(st.text(max_size=70), json_leaves),
        "ip": st.one_of(address_texts, address_texts, json_values),
        "reason": st.one_of(st.text(max_size=220), wild_text, json_leaves),
        "source": st.one_of(
            st.from_regex(r"[A-Za-z0-9_.:/@+-]{0,70}", fullmatch=True), json_leaves
        ),
        "severity": st.one_of(st.integers(-2, 12), json_leaves),
        "limit": st.one_of(st.integers(-1, 200_000), json_leaves),
        "extra": json_values,
    },
)


@st.composite
def json_lines(draw: st.DrawFn) -> bytes:
    """A JSON request line, sometimes malformed: duplicate keys, truncation, trailing junk."""
    obj = draw(json_objects)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    twist = draw(st.integers(0, 9))
    if twist == 0 and len(obj) > 1:  # a key twice: {"ip": A, ..., "ip": B}
        key = draw(st.sampled_from(sorted(obj)))
        text = text[:-1] + f", {json.dumps(key)}: {json.dumps(draw(json_leaves))}}}"
    elif twist == 1:
        text = text[: draw(st.integers(0, len(text)))]
    elif twist == 2:
        text += draw(st.sampled_from([" ", "{}", " block 203.0.113.9", "\x00", "]"]))
    elif twist == 3:
        text = "[" * draw(st.integers(1, 3000)) + text
    elif twist == 4:  # a key that is itself hostile: quoted back in the error message
        key = draw(wild_text)
        text = text[:-1] + f", {json.dumps(key, ensure_ascii=draw(st.booleans()))}: 1}}"
    if draw(st.integers(0, 9)) == 0:  # Unicode space before "{": str.strip() takes it
        text = draw(st.sampled_from(["\u00a0", "\u3000", "\u2028", "\x85"])) + text
    return text.encode("utf-8", "surrogatepass")


# Text requests ---------------------------------------------------------------------


@st.composite
def text_lines(draw: st.DrawFn) -> bytes:
    verb = draw(
        st.one_of(
            st.sampled_from(["block", "unblock", "show", "list", "status", "ping", "export"]),
            st.sampled_from(["BLOCK", "Block", "block\t", "\ufeffblock"]),
            st.text(max_size=10),
        )
    )
    parts = [verb]
    if draw(st.booleans()):
        parts.append(draw(address_texts))
    if draw(st.booleans()):
        parts.append(draw(st.one_of(st.text(max_size=230), wild_text)))
    separator = draw(st.sampled_from([" ", " ", "  ", "\t"]))
    text = separator.join(parts)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def block_lines(draw: st.DrawFn) -> bytes:
    """Block requests that are mostly well formed, so the accepting path is fuzzed too."""
    ip = draw(
        st.one_of(
            doc_v4,
            doc_v6,
            st.sampled_from(SPECIAL),
            in_ranges,
            st.builds(_mutate, st.sampled_from(PROTECTED), st.integers(0, 13)),
            address_texts,
        )
    )
    reason = draw(st.one_of(st.just(""), st.text(max_size=60), wild_text))
    if draw(st.booleans()):
        return f"block {ip} {reason}".encode("utf-8", "surrogatepass")
    request: dict[str, Any] = {"v": 1, "op": "block", "ip": ip, "reason": reason}
    if draw(st.booleans()):
        request["source"] = draw(st.from_regex(r"[a-z0-9:]{0,20}", fullmatch=True))
        request["severity"] = draw(st.integers(1, 10))
    return json.dumps(request, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


any_lines = st.one_of(
    block_lines(), block_lines(), json_lines(), text_lines(), st.binary(max_size=300)
)


# Expected replies (the oracle) -------------------------------------------------------


def expected_codes(line: bytes, protected: Protected) -> frozenset[str]:
    """The reply codes a block-role client may get for one complete line (without "\\n")."""
    if len(line) > MAX_LINE:
        return frozenset({"line_too_long"})
    try:
        request, _ = parse_request(line.rstrip(b"\r\n"))
    except ProtocolError as exc:
        return frozenset({exc.code})
    if isinstance(request, PingRequest):
        return frozenset({"ok"})
    if not isinstance(request, BlockRequest):
        return frozenset({"forbidden"})  # every other op needs the read or admin role
    if "/" in request.ip:  # a network: refused for this role, unless it is one address
        host = host_prefix(request.ip)
        if host is None:
            return NETWORK_CODES
        return NETWORK_CODES | (_address_codes(host, protected) - {"invalid_address"})
    address = single_address(request.ip)
    if address is None:
        return frozenset({"invalid_address"})
    return _address_codes(address, protected)


def _address_codes(address: IPAddress, protected: Protected) -> frozenset[str]:
    if protected.refuses(address):
        return REFUSAL_CODES - {"invalid_address", "network_not_allowed", "network_too_wide"}
    return frozenset({"ok"})


@dataclass
class Tally:
    """What a fuzz run did, for the bench's report and the tests' sanity checks."""

    connections: int = 0
    bytes_sent: int = 0
    replies: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        top = ", ".join(f"{code} {n}" for code, n in self.replies.most_common())
        return f"{self.connections} connections, {self.bytes_sent:,} bytes, replies: {top}"


def converse(
    connect: Connector,
    payload: bytes,
    protected: Protected,
    ledger: Ledger,
    tally: Tally,
    identified: bool = True,
) -> None:
    """Send `payload` on one connection and check every reply against the oracle.

    Each "\\n"-terminated line gets exactly one reply, in order, in the form of
    its request (JSON for a "{" line, else text), with an expected code; after
    a line_too_long the daemon hangs up, and nothing after it is answered.
    A client that never identified itself (`identified` False: TCP without
    `auth`) gets one refusal and is hung up on; nothing it sent may be applied,
    so its lines are not noted in the ledger.
    """
    if identified:
        ledger.note_sent(payload)
    tally.connections += 1
    tally.bytes_sent += len(payload)
    *lines, tail = payload.split(b"\n")
    with LineConnection(connect()) as conn:

        def send() -> None:
            with contextlib.suppress(OSError):  # the daemon may have hung up already
                conn.send(payload)
                conn.sock.shutdown(socket.SHUT_WR)  # EOF: the daemon answers, then closes

        # Send while reading: a client that does not read its replies is (rightly)
        # dropped after the daemon's write timeout.
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            _check_replies(conn, lines, tail, identified, protected, tally)
        finally:
            sender.join(30)


def _check_replies(
    conn: LineConnection,
    lines: list[bytes],
    tail: bytes,
    identified: bool,
    protected: Protected,
    tally: Tally,
) -> None:
    """converse's checks, on the replies as they arrive."""
    for line in lines if identified else lines[:1]:
        reply = conn.reply()
        assert reply is not None, f"no reply to {line[:120]!r}"
        code = reply_code(reply)
        tally.replies[code] += 1
        if identified:
            expected = expected_codes(line, protected)
        else:
            expected = frozenset({"unauthenticated", "line_too_long"})
        assert code in expected, (line[:200], reply[:300], sorted(expected))
        if code in ("line_too_long", "unauthenticated"):
            assert conn.reply() is None, f"still open after {code}"
            return
        assert reply.startswith(b"{") == line.lstrip().startswith(b"{"), (line, reply)
    if len(tail) > MAX_LINE:  # an unterminated line past the limit is refused too
        reply = conn.reply()
        assert reply is not None and reply_code(reply) == "line_too_long", reply
        tally.replies["line_too_long"] += 1
    assert conn.reply() is None, "a reply no line asked for, or the connection stayed open"


def hypothesis_fuzz(
    connect: Connector,
    protected: Protected,
    ledger: Ledger,
    tally: Tally,
    max_examples: int,
    lines: st.SearchStrategy[bytes] = any_lines,
    identified: bool = True,
) -> None:
    """Hypothesis-generated lines, a few per connection, through the live daemon."""

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(lines, min_size=1, max_size=4), st.booleans())
    def run(batch: list[bytes], crlf: bool) -> None:
        end = b"\r\n" if crlf else b"\n"
        payload = b"".join(line + end for line in batch)
        converse(connect, payload, protected, ledger, tally, identified)

    run()


def random_bytes_fuzz(
    connect: Connector,
    protected: Protected,
    ledger: Ledger,
    tally: Tally,
    connections: int,
    seed: int,
    identified: bool = True,
) -> None:
    """Random bytes (with newlines, valid-looking prefixes, overlong runs) on many connections."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible fuzz, not a secret
    prefixes = [b"", b"block ", b"block 203.0.113.", b'{"op":"block","ip":"', b"{", b"ping"]
    for _ in range(connections):
        chunks = []
        for _ in range(rng.randint(1, 6)):
            size = rng.choice([0, 1, 8, 64, 512, 4096, MAX_LINE + 1, 20_000])
            kind = rng.random()
            if kind < 0.5:
                body = rng.randbytes(size)  # about one newline in 256 bytes
            elif kind < 0.75:
                body = rng.randbytes(size).replace(b"\n", b"")  # one long line
            else:
                body = _printable(rng, size).replace(b"\n", b"")
            chunks.append(rng.choice(prefixes) + body + rng.choice([b"\n", b"\r\n", b""]))
        converse(connect, b"".join(chunks), protected, ledger, tally, identified)


def _printable(rng: random.Random, size: int) -> bytes:
    alphabet = string.printable + "é€\u2028\ufeff"
    return "".join(rng.choice(alphabet) for _ in range(size)).encode()


# Parser-level properties (no daemon) -------------------------------------------------

REQUEST_CODES = {"bad_request", "unsupported_version"}


def parses_or_refuses(line: bytes) -> Request | None:
    """parse_request's contract: a request, or ProtocolError with a documented code."""
    try:
        request, is_json = parse_request(line)
    except ProtocolError as exc:
        assert exc.code in REQUEST_CODES, exc.code
        assert exc.message
        reply_is_one_line(exc.code, exc.message, None)  # encodable, one line, in both forms
        return None
    assert is_json == line.decode().strip().startswith("{")
    return request


ids = st.one_of(st.none(), st.text(max_size=64))
token = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=64,
)
free_text = (
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=200)
    .map(str.strip)
    .filter(lambda text: UNSAFE.search(text) is None)  # no bidi overrides, U+2028 either
)
# A reason the protocol takes: no control characters or bidi overrides (imr/terminal.py).
reasons = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=200).filter(
    lambda text: UNSAFE.search(text) is None
)
valid_requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(
        BlockRequest,
        op=st.just("block"),
        id=ids,
        ip=st.text(max_size=64),
        reason=reasons,
        source=st.from_regex(r"[A-Za-z0-9_.:/@+-]{0,64}", fullmatch=True),
        severity=st.integers(1, 10),
    ),
    st.builds(
        UnblockRequest,
        op=st.just("unblock"),
        id=ids,
        ip=st.text(max_size=64),
        reason=reasons,
    ),
    st.builds(ShowRequest, op=st.just("show"), id=ids, ip=st.text(max_size=64)),
    st.builds(ListRequest, op=st.just("list"), id=ids, limit=st.none() | st.integers(1, 100_000)),
    st.builds(StatusRequest, op=st.just("status"), id=ids),
    st.builds(PingRequest, op=st.just("ping"), id=ids),
)


# Terminal escapes and forged log lines (issue #12): what a reason or a key may not carry.
TERMINAL_ESCAPES = [
    "\x1b[2J",  # clear the screen
    "\x1b]0;owned\x07",  # OSC: the window title
    "\r203.0.113.66  fake row",
    "\nfake row",
    "\u202eevil",  # right-to-left override
    "\u2066isolate\u2069",
    "\x9b31m",  # C1 CSI
    "one\u2028two",
]
FORGED_LOG_LINE = "\n2026-12-07 04:00:00,000 INFO imr.broker[1]: unblocked 203.0.113.9 by root"


def unsafe_reason_is_refused(prefix: str, escape_text: str, op: str) -> None:
    """A reason holding a terminal escape anywhere is refused, in JSON and in the text form."""
    reason = (prefix + escape_text)[-200:]
    fields: dict[str, Any] = {"op": op, "reason": reason}
    fields |= {"ips": ["203.0.113.9"]} if op == "block_many" else {}
    fields |= {"ip": "203.0.113.9"} if op in ("block", "unblock") else {}
    try:
        parse_request(json.dumps(fields).encode())
    except ProtocolError as exc:
        assert exc.code == "bad_request" and "reason" in exc.message, exc.message
    else:
        raise AssertionError(f"reason {reason!r} was accepted")


def hostile_key_message_is_escaped(key: str) -> None:
    """An unknown key is quoted back escaped: no control character reaches a log line."""
    try:
        parse_request(json.dumps({"op": "ping", key: 1}).encode())
    except ProtocolError as exc:
        assert UNSAFE.search(exc.message) is None, exc.message
    else:
        raise AssertionError(f"key {key!r} was accepted")


def json_round_trip(request: Request) -> None:
    """A valid request, written as JSON (compact or spaced, CRLF or not), parses back to itself."""
    line = json.dumps(request.model_dump()).encode()
    assert parse_request(line) == (request, True)
    spaced = json.dumps(request.model_dump(), indent=1).replace("\n", " ").encode()
    assert parse_request(b"  " + spaced + b"\r") == (request, True)


TEXT_VERBS = ["block", "unblock", "show", "list", "status", "ping"]


def text_round_trip(verb: str, ip: str, reason: str, case: Callable[[str], str]) -> None:
    """A text-form line parses to the request it spells, whatever the verb's case."""
    expected: Request
    if verb in ("block", "unblock"):
        line = f"{case(verb)} {ip}" + (f" {reason}" if reason else "")
        expected = (
            BlockRequest(op="block", ip=ip, reason=reason)
            if verb == "block"
            else UnblockRequest(op="unblock", ip=ip, reason=reason)
        )
    elif verb == "show":
        line = f"{case(verb)} {ip}"
        expected = ShowRequest(op="show", ip=ip)
    else:
        line = case(verb)
        plain: dict[str, Request] = {
            "list": ListRequest(op="list"),
            "status": StatusRequest(op="status"),
            "ping": PingRequest(op="ping"),
        }
        expected = plain[verb]
    assert parse_request(line.encode()) == (expected, False)


def reply_is_one_line(code: WireCode, message: str, request_id: str | None) -> None:
    """Whatever a refusal quotes back, the reply cannot break the framing or forge a line."""
    text = encode_text_reply(error_reply(request_id, code, message))
    assert text.endswith(b"\n") and text.count(b"\n") == 1 and b"\r" not in text
    data = encode_json_reply(error_reply(request_id, code, message))
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data)["error"] == {"code": code, "message": message}


# After a live fuzz ------------------------------------------------------------------


def check_survived(
    world: Daemon, backend: str, pid: int, protected: Protected, ledger: Ledger, connect: Connector
) -> set[IPAddress]:
    """The daemon lives, blocked only what it may, wrote whole rows, and still serves.

    Returns the active blocks (kernel and state file agree on them).
    """
    assert daemon_alive(world, pid), "the daemon died"
    assert world.pid() == pid, "the daemon was restarted"
    fresh = f"2001:db8:ffff::{random.randrange(2, 0xFFFF):x}"  # noqa: S311 - rarely fuzzed
    address = single_address(fresh)
    assert address is not None
    ledger.requested.add(address)
    with LineConnection(connect()) as conn:
        assert conn.request(b"ping\n") == b"ok pong\n"
        reply = conn.request(f"block {fresh} after the fuzz\n".encode())
        assert reply is not None and reply_code(reply) == "ok", reply
    active = check_consistent(world, backend, protected, ledger.requested)
    assert address in active
    assert log_failures(world) == [], "the daemon logged an unexpected exception"
    return active
