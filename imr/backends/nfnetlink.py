"""nf_tables over raw netlink: cheap reads for the drift check, and the bulk element load.

nft 1.0.6 fetches every element of every set before it answers anything about
a table, even `list chain` or `get element`: 0.4 s with 100,000 blocked
addresses. The drift check runs every few seconds, so it asks the kernel
directly instead: the names of a table's sets and chains, the number of rules
in a chain, whether a set holds one given element (one lookup), and the
number of elements in a small set.

Writes are nfnetlink batches of set-element messages (each batch is one kernel
transaction): `replace_elements` flushes sets and fills them again, for the
start-up load of 100,000 blocks (libnftables spends ~0.5 s parsing and
evaluating that as a text script); `ElementWriter` sends the single-address
changes of every block, unblock and expiry on a kept socket (libnftables made
~10 netlink round trips fetching its cache before each of them). Structure
(tables, chains, rules) and network blocks still go through nft.

Reads and `replace_elements` open a socket per call, so they act in the calling
thread's network namespace; `ElementWriter` checks the namespace on every batch.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from imr.netlink import (
    ERROR,
    NETLINK_NETFILTER,
    NLA,
    NLA_F_NESTED,
    NLA_MAX_PAYLOAD,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SO_SNDBUFFORCE,
    KeptSocket,
    attributes,
    message,
    messages,
    nested,
    netfilter_socket,
    nla,
    replies,
    string,
    text,
)

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_GETSETELEM = 13
NFT_MSG_DELSETELEM = 14
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}

NFTA_TABLE = 1  # NFTA_SET_TABLE, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_ELEM_LIST_TABLE
NFTA_SET_NAME = 2
NFTA_CHAIN_NAME = 3
NFTA_RULE_CHAIN = 2
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 1

_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big-endian)
RECV_BUFFER = 1 << 20
TIMEOUT = 10.0  # seconds; the kernel answers a dump at once, and commits 100,000 in ~0.1 s


class NetlinkReadError(Exception):
    """The kernel refused a read; `code` is the errno (ENOENT: no such table/set/chain)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(code)}")
        self.code = code


class NetlinkWriteError(Exception):
    """The kernel refused a batch, or did not answer it: nothing of it was committed,
    unless the answer was lost (then all of it was)."""


@dataclass(frozen=True)
class TableShape:
    """The sets and chains of one table; both empty when the table does not exist."""

    sets: frozenset[str]
    chains: frozenset[str]


def table_shape(family: str, table: str) -> TableShape:
    try:
        sets = {
            name
            for attrs in _dump(NFT_MSG_GETSET, family, string(NFTA_TABLE, table))
            if text(attrs.get(NFTA_TABLE)) == table and (name := text(attrs.get(NFTA_SET_NAME)))
        }
        chains = {
            name
            for attrs in _dump(NFT_MSG_GETCHAIN, family, string(NFTA_TABLE, table))
            if text(attrs.get(NFTA_TABLE)) == table and (name := text(attrs.get(NFTA_CHAIN_NAME)))
        }
    except NetlinkReadError as exc:
        if exc.code == errno.ENOENT:  # no such table
            return TableShape(frozenset(), frozenset())
        raise
    return TableShape(frozenset(sets), frozenset(chains))


def rule_count(family: str, table: str, chain: str) -> int:
    """Rules in the chain (0 if the table or chain does not exist)."""
    request = string(NFTA_TABLE, table) + string(NFTA_RULE_CHAIN, chain)
    try:
        return sum(
            1
            for attrs in _dump(NFT_MSG_GETRULE, family, request)
            if text(attrs.get(NFTA_TABLE)) == table and text(attrs.get(NFTA_RULE_CHAIN)) == chain
        )
    except NetlinkReadError as exc:
        if exc.code == errno.ENOENT:
            return 0
        raise


def element_count(family: str, table: str, set_name: str, intervals: bool = False) -> int | None:
    """Elements in the set (for an interval set: intervals); None if the set does not exist.

    This dumps every element (the kernel spends about 0.2 s on 100,000), so it
    is meant for small sets. The kernel keeps an interval as two elements, its
    start and its end (flagged); only starts are counted. Expired elements are
    not dumped.
    """
    request = string(NFTA_TABLE, table) + string(NFTA_SET_ELEM_LIST_SET, set_name)
    count = 0
    try:
        for attrs in _dump(NFT_MSG_GETSETELEM, family, request):
            elements = attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS)
            if elements is None:
                continue
            for kind, body in attributes(elements):
                if kind != NFTA_LIST_ELEM:
                    continue
                if intervals and _is_interval_end(body):
                    continue
                count += 1
    except NetlinkReadError as exc:
        if exc.code == errno.ENOENT:
            return None
        raise
    return count


def has_element(family: str, table: str, set_name: str, key: bytes) -> bool:
    """Whether the set holds the element `key` (packed, network order): one lookup, no dump.

    False also when the set or table does not exist.
    """
    element = nested(NFTA_LIST_ELEM, nested(NFTA_SET_ELEM_KEY, nla(NFTA_DATA_VALUE, key)))
    request = (
        string(NFTA_TABLE, table)
        + string(NFTA_SET_ELEM_LIST_SET, set_name)
        + nested(NFTA_SET_ELEM_LIST_ELEMENTS, element)
    )
    try:
        for _ in _exchange(NFT_MSG_GETSETELEM, family, request, dump=False):
            return True
    except NetlinkReadError as exc:
        if exc.code == errno.ENOENT:
            return False
        raise
    return False


def _is_interval_end(element: memoryview) -> bool:
    for kind, body in attributes(element):
        if kind == NFTA_SET_ELEM_FLAGS and len(body) >= 4:
            return bool(struct.unpack_from("!I", body)[0] & NFT_SET_ELEM_INTERVAL_END)
    return False


# ---------------------------------------------------------------------------
# The bulk load


def address_element(key: bytes, timeout_ms: int | None) -> bytes:
    """One NFTA_LIST_ELEM: `key` packed in network order, with a timeout unless None."""
    if timeout_ms is None:
        return _PLAIN_HEAD[len(key)] + key
    return _TIMED_HEAD[len(key)] + key + TIMEOUT_HEAD + timeout_ms.to_bytes(8, "big")


def element_head(key_size: int) -> bytes:
    """What precedes a key of `key_size` bytes (4 or 16) in an element with a timeout:
    element_head(n) + key + TIMEOUT_HEAD + 8 bytes of milliseconds (big-endian) is
    address_element(key, ms), for callers that build 100,000 of them."""
    return _TIMED_HEAD[key_size]


def interval_elements(intervals: Sequence[tuple[bytes, bytes | None, int | None]]) -> list[bytes]:
    """The elements of an interval set holding `intervals`, encoded as nft 1.0.6 does.

    Each interval is (first key, key after the last or None at the top of the address
    space, timeout in ms or None), sorted and not overlapping. The kernel keeps an
    interval as a start element (with the timeout) and an end element (flagged
    INTERVAL_END, also where the next interval starts at the same key); nft also adds an
    end element at key zero first when the first interval does not start there.
    """
    found: list[bytes] = []
    if intervals and any(intervals[0][0]):
        found.append(_interval_end(bytes(len(intervals[0][0]))))
    for start, end, timeout_ms in intervals:
        found.append(address_element(start, timeout_ms))
        if end is not None:
            found.append(_interval_end(end))
    return found


# A step of a batch: (ADD or DELETE, set name, encoded elements). DELETE with no elements
# flushes the set; ADD with none sends nothing.
ADD = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
DELETE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM
Step = tuple[int, str, Sequence[bytes]]


def element_batch(
    family: str, table: str, steps: Sequence[Step], first: int
) -> tuple[bytes, int | None]:
    """One nfnetlink batch of `steps`, in order; its messages are numbered from `first`, and
    the last asks for an ACK. Returns the bytes and the last message's number (None: no
    message, nothing to await).

    One ACK is enough: the kernel reports an error for every message it refused, ACK or
    not, and delivers them all, in order, after the batch (nfnetlink_rcv_batch); so the
    last message's ACK comes after any error of the batch. An ACK per message cost a
    recv each (three for a block's add/delete/add; bench/one_address.py)."""
    parts: list[bytes] = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first - 1, _BATCH_GEN)]
    bodies: list[tuple[int, bytes]] = []
    for kind, name, elements in steps:
        head = _set_head(family, table, name)
        if not elements and kind == DELETE:
            bodies.append((kind, head))  # no list: the whole set
            continue
        # Each set's elements in runs of at most 64 KiB (an attribute's length is 16 bits).
        runs = [elements[0]] if len(elements) == 1 else _chunks(elements)
        for run in runs:
            bodies.append((kind, head + NLA.pack(NLA.size + len(run), _ELEMENTS) + run))
    last = first + len(bodies) - 1
    for sequence, (kind, body) in enumerate(bodies, first):
        flags = NLM_F_REQUEST | (NLM_F_CREATE if kind == ADD else 0)
        parts.append(message(kind, flags | (NLM_F_ACK if sequence == last else 0), sequence, body))
    parts.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, last + 1, _BATCH_GEN))
    return b"".join(parts), last if bodies else None


@functools.lru_cache(maxsize=16)
def _set_head(family: str, table: str, set_name: str) -> bytes:
    """What every element message for the set starts with (nfgenmsg, table, set)."""
    nfgen = _NFGEN.pack(NFPROTO[family], 0, 0)
    return nfgen + string(NFTA_TABLE, table) + string(NFTA_SET_ELEM_LIST_SET, set_name)


def replace_elements(family: str, table: str, sets: Mapping[str, Sequence[bytes]]) -> None:
    """Flush each named set and add its elements (from `address_element`/`interval_elements`),
    all in one nfnetlink batch: the kernel commits it as one transaction, so the old and
    the new contents never mix. Raises NetlinkWriteError (nothing changed) or OSError."""
    steps: list[Step] = [(DELETE, name, ()) for name in sets]  # every flush first
    steps += [(ADD, name, elements) for name, elements in sets.items()]
    batch, last = element_batch(family, table, steps, 1)
    with _batch_socket() as sock:
        _send(sock, batch, last)


class ElementWriter:
    """Small element batches (every block, unblock and expiry) over one kept socket.

    A socket per batch would cost its close: closing an nfnetlink socket after a delete
    waits for the kernel's deferred release of the deleted elements (an RCU grace period,
    ~15 ms). The socket acts in the namespace it was opened in, so it is opened anew when
    the calling thread is in another namespace (or process); and after any failure, so no
    answer of an earlier batch is ever read as this one's. Not thread-safe: the caller
    serialises (the nftables backend's lock).
    """

    def __init__(self, family: str, table: str) -> None:
        self.family, self.table = family, table
        self._socket = KeptSocket(_batch_socket)
        self._next = 1

    def commit(self, steps: Sequence[Step]) -> None:
        """One transaction; NetlinkWriteError or OSError if it was refused (nothing done)."""
        sock = self._socket.get()
        batch, last = element_batch(self.family, self.table, steps, self._next)
        following = self._next + 1 if last is None else last + 2  # (last + 1: the end)
        self._next = 1 if following > 1 << 30 else following
        try:
            _send(sock, batch, last)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._socket.close()


def _batch_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket for batches, blocking with the kernel's own timeouts
    (SO_SNDTIMEO, SO_RCVTIMEO): a Python timeout would poll() before every send and recv."""
    sock = netfilter_socket(TIMEOUT)
    try:
        sock.settimeout(None)
        limit = struct.pack("@ll", int(TIMEOUT), 0)  # struct timeval
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    except BaseException:
        sock.close()
        raise
    return sock


def _send(sock: socket.socket, batch: bytes, last: int | None) -> None:
    # The kernel takes a batch as one datagram, and refuses one larger than the send
    # buffer (4 MB at 100,000 IPv6 elements): raise the buffer for it, as nft does.
    if len(batch) > _DEFAULT_SNDBUF:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(batch) + 4096)
    sent = sock.send(batch)
    if sent != len(batch):
        raise NetlinkWriteError(f"nf_tables batch: sent {sent} of {len(batch)} bytes")
    if last is not None:
        _await_acks(sock, last)


_DEFAULT_SNDBUF = 1 << 16  # below the kernel's smallest default (net.core.wmem_default)
_ACK_BUFFER = 1 << 13  # one message a datagram: an ACK or error is 36 bytes (NETLINK_CAP_ACK)


def _await_acks(sock: socket.socket, last: int) -> None:
    """Read the answers up to message `last`'s ACK; the first error (the batch was aborted)
    raises."""
    buffer = bytearray(_ACK_BUFFER)
    while True:
        try:
            size = sock.recv_into(buffer)
        except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO ran out (EAGAIN)
            raise NetlinkWriteError(f"nf_tables batch: no answer in {TIMEOUT:.0f} s") from None
        for kind, _flags, sequence, payload in messages(memoryview(buffer)[:size]):
            if kind != NLMSG_ERROR or len(payload) < ERROR.size:
                continue
            code = -ERROR.unpack_from(payload)[0]
            if code:
                raise NetlinkWriteError(
                    f"nf_tables batch: message {sequence} refused: {os.strerror(code)}"
                )
            if sequence == last:
                return


def _chunks(elements: Sequence[bytes]) -> Iterator[bytes]:
    """The elements joined into runs that fit one attribute (a 16-bit length)."""
    run: list[bytes] = []
    size = 0
    for element in elements:
        if size + len(element) > NLA_MAX_PAYLOAD and run:
            yield b"".join(run)
            run, size = [], 0
        run.append(element)
        size += len(element)
    if run:
        yield b"".join(run)


def _interval_end(key: bytes) -> bytes:
    flags = nla(NFTA_SET_ELEM_FLAGS, struct.pack("!I", NFT_SET_ELEM_INTERVAL_END))
    return nested(NFTA_LIST_ELEM, flags + nested(NFTA_SET_ELEM_KEY, nla(NFTA_DATA_VALUE, key)))


def _element_heads(timeout: bool) -> dict[int, bytes]:
    """The bytes before the key of an element, for IPv4 and IPv6 keys (4 and 16 bytes)."""
    heads = {}
    for size in (4, 16):
        data = NLA.size + size
        key = NLA.size + data
        element = NLA.size + key + (NLA.size + 8 if timeout else 0)
        heads[size] = (
            NLA.pack(element, NFTA_LIST_ELEM | NLA_F_NESTED)
            + NLA.pack(key, NFTA_SET_ELEM_KEY | NLA_F_NESTED)
            + NLA.pack(data, NFTA_DATA_VALUE)
        )
    return heads


_PLAIN_HEAD = _element_heads(timeout=False)
_TIMED_HEAD = _element_heads(timeout=True)
TIMEOUT_HEAD = NLA.pack(NLA.size + 8, NFTA_SET_ELEM_TIMEOUT)
_ELEMENTS = NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED
# nfgenmsg of the batch messages: AF_UNSPEC, version 0, res_id = the subsystem (big-endian).
_BATCH_GEN = struct.pack("!BBH", 0, 0, NFNL_SUBSYS_NFTABLES)


# ---------------------------------------------------------------------------
# Reading


def _dump(message_type: int, family: str, attrs: bytes) -> Iterator[dict[int, memoryview]]:
    return _exchange(message_type, family, attrs, dump=True)


def _exchange(
    message_type: int, family: str, attrs: bytes, dump: bool
) -> Iterator[dict[int, memoryview]]:
    """Each reply message's top-level attributes (type -> payload); a non-dump request has
    one reply."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(TIMEOUT)
        sock.bind((0, 0))
        kind = (NFNL_SUBSYS_NFTABLES << 8) | message_type
        body = _NFGEN.pack(NFPROTO[family], 0, 0) + attrs
        sequence = 1
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        sock.send(message(kind, flags, sequence, body))
        for reply, _flags, payload in replies(sock, sequence, RECV_BUFFER):
            if reply == NLMSG_DONE:
                return
            if reply == NLMSG_ERROR:
                code = -ERROR.unpack_from(payload)[0]
                if code:
                    raise NetlinkReadError(code, "nf_tables netlink read")
                return
            yield dict(attributes(payload[_NFGEN.size :]))
            if not dump:
                return
