"""Cheap reads of nf_tables over raw netlink, for the nftables backend's drift check.

nft 1.0.6 fetches every element of every set before it answers anything about
a table, even `list chain` or `get element`: 0.4 s with 100,000 blocked
addresses. The drift check runs every few seconds, so it asks the kernel
directly instead: the names of a table's sets and chains, the number of rules
in a chain, whether a set holds one given element (one lookup), and the
number of elements in a small set. Read only; every change goes through nft.

A socket is opened per call, so it reads the calling thread's network namespace.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFT_MSG_GETSETELEM = 13
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}

NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

NFTA_TABLE = 1  # NFTA_SET_TABLE, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_ELEM_LIST_TABLE
NFTA_SET_NAME = 2
NFTA_CHAIN_NAME = 3
NFTA_RULE_CHAIN = 2
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_FLAGS = 3
NFTA_DATA_VALUE = 1
NFT_SET_ELEM_INTERVAL_END = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big-endian, 0 here)
_NLA = struct.Struct("=HH")
RECV_BUFFER = 1 << 20
TIMEOUT = 10.0  # seconds; the kernel answers a dump at once


class NetlinkReadError(Exception):
    """The kernel refused a read; `code` is the errno (ENOENT: no such table/set/chain)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(code)}")
        self.code = code


@dataclass(frozen=True)
class TableShape:
    """The sets and chains of one table; both empty when the table does not exist."""

    sets: frozenset[str]
    chains: frozenset[str]


def table_shape(family: str, table: str) -> TableShape:
    try:
        sets = {
            name
            for attrs in _dump(NFT_MSG_GETSET, family, _string(NFTA_TABLE, table))
            if _text(attrs.get(NFTA_TABLE)) == table and (name := _text(attrs.get(NFTA_SET_NAME)))
        }
        chains = {
            name
            for attrs in _dump(NFT_MSG_GETCHAIN, family, _string(NFTA_TABLE, table))
            if _text(attrs.get(NFTA_TABLE)) == table and (name := _text(attrs.get(NFTA_CHAIN_NAME)))
        }
    except NetlinkReadError as exc:
        if exc.code == errno.ENOENT:  # no such table
            return TableShape(frozenset(), frozenset())
        raise
    return TableShape(frozenset(sets), frozenset(chains))


def rule_count(family: str, table: str, chain: str) -> int:
    """Rules in the chain (0 if the table or chain does not exist)."""
    request = _string(NFTA_TABLE, table) + _string(NFTA_RULE_CHAIN, chain)
    try:
        return sum(
            1
            for attrs in _dump(NFT_MSG_GETRULE, family, request)
            if _text(attrs.get(NFTA_TABLE)) == table and _text(attrs.get(NFTA_RULE_CHAIN)) == chain
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
    request = _string(NFTA_TABLE, table) + _string(NFTA_SET_ELEM_LIST_SET, set_name)
    count = 0
    try:
        for attrs in _dump(NFT_MSG_GETSETELEM, family, request):
            elements = attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS)
            if elements is None:
                continue
            for kind, body in _attributes(elements):
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
    element = _nested(NFTA_LIST_ELEM, _nested(NFTA_SET_ELEM_KEY, _nla(NFTA_DATA_VALUE, key)))
    request = (
        _string(NFTA_TABLE, table)
        + _string(NFTA_SET_ELEM_LIST_SET, set_name)
        + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, element)
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
    for kind, body in _attributes(element):
        if kind == NFTA_SET_ELEM_FLAGS and len(body) >= 4:
            return bool(struct.unpack_from("!I", body)[0] & NFT_SET_ELEM_INTERVAL_END)
    return False


# ---------------------------------------------------------------------------
# The wire


def _nla(kind: int, data: bytes) -> bytes:
    return _NLA.pack(_NLA.size + len(data), kind) + data + b"\0" * (-len(data) % 4)


def _nested(kind: int, data: bytes) -> bytes:
    return _nla(kind | NLA_F_NESTED, data)


def _string(kind: int, value: str) -> bytes:
    return _nla(kind, value.encode() + b"\0")


def _text(value: memoryview | None) -> str | None:
    return bytes(value).split(b"\0", 1)[0].decode(errors="replace") if value is not None else None


def _attributes(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    offset = 0
    while offset + _NLA.size <= len(data):
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size:
            break  # malformed: stop rather than loop
        yield kind & NLA_TYPE_MASK, data[offset + _NLA.size : offset + length]
        offset += (length + 3) & ~3


def _dump(message: int, family: str, attributes: bytes) -> Iterator[dict[int, memoryview]]:
    return _exchange(message, family, attributes, dump=True)


def _exchange(
    message: int, family: str, attributes: bytes, dump: bool
) -> Iterator[dict[int, memoryview]]:
    """Each reply message's top-level attributes (type -> payload); a non-dump request has
    one reply."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(TIMEOUT)
        sock.bind((0, 0))
        kind = (NFNL_SUBSYS_NFTABLES << 8) | message
        body = _NFGEN.pack(NFPROTO[family], 0, 0) + attributes
        sequence = 1
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, sequence, 0) + body)
        buffer = bytearray(RECV_BUFFER)
        while True:
            size = sock.recv_into(buffer)
            view = memoryview(buffer)[:size]
            offset = 0
            while offset + _HEADER.size <= size:
                length, reply, _flags, seq, _pid = _HEADER.unpack_from(view, offset)
                if length < _HEADER.size:
                    return
                payload = view[offset + _HEADER.size : offset + length]
                offset += (length + 3) & ~3
                if seq != sequence:
                    continue
                if reply == NLMSG_DONE:
                    return
                if reply == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkReadError(code, "nf_tables netlink read")
                    return
                yield dict(_attributes(payload[_NFGEN.size :]))
                if not dump:
                    return
