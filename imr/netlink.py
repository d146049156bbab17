"""The netlink wire format, shared by imr's raw-netlink readers and writers.

Only what imr speaks: the message header, attributes (TLVs) and their parsing,
and the NETLINK_NETFILTER socket that the nftables and ipset writers keep
(`KeptSocket`). A socket belongs to the network namespace of the thread that
opened it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
NLA_MAX_PAYLOAD = 0xFFFF - 4  # an attribute's length is 16 bits, header included

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # errors do not echo the failed request (a batch message is ~64 KiB)
SO_SNDBUFFORCE = 32  # socket.SO_SNDBUFFORCE is not exported by every Python build

HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
NLA = struct.Struct("=HH")  # nlattr: len, type (host order; payloads are usually big-endian)
ERROR = struct.Struct("=i")  # nlmsgerr's first field: 0 (an ACK) or -errno


def align(length: int) -> int:
    return (length + 3) & ~3


def nla(kind: int, data: bytes) -> bytes:
    return NLA.pack(NLA.size + len(data), kind) + data + b"\0" * (-len(data) % 4)


def nested(kind: int, data: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, data)


def string(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def text(value: memoryview | None) -> str | None:
    """A NUL-terminated string attribute's text; None for a missing attribute."""
    return bytes(value).split(b"\0", 1)[0].decode(errors="replace") if value is not None else None


def message(kind: int, flags: int, sequence: int, body: bytes) -> bytes:
    return HEADER.pack(HEADER.size + len(body), kind, flags, sequence, 0) + body


def attributes(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type without flags, payload) of each attribute in `data`; stops at a malformed one."""
    offset = 0
    while offset + NLA.size <= len(data):
        length, kind = NLA.unpack_from(data, offset)
        if length < NLA.size:
            break  # malformed: stop rather than loop
        yield kind & NLA_TYPE_MASK, data[offset + NLA.size : offset + length]
        offset += align(length)


def messages(data: memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, sequence, payload) of each message in one received datagram."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, flags, sequence, _pid = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            return  # malformed: stop rather than loop
        yield kind, flags, sequence, data[offset + HEADER.size : offset + length]
        offset += align(length)


def where_we_are() -> tuple[int, str]:
    """(pid, namespace) of the calling thread's network namespace, in this process: a
    netlink socket acts in the namespace it was opened in, and one inherited over fork is
    the parent's, so a kept socket is reopened when this changes. The namespace is its
    link's text, "net:[inode]": the same identity as the inode os.stat gives, for ~3 µs
    instead of ~8-14 (procfs resolves a stat's target; bench/one_address.py)."""
    return os.getpid(), os.readlink("/proc/thread-self/ns/net")


def replies(
    sock: socket.socket, sequence: int, buffer_size: int
) -> Iterator[tuple[int, int, memoryview]]:
    """(type, flags, payload) of each reply to request `sequence`, read from `sock` until
    an NLMSG_DONE or NLMSG_ERROR, which is yielded last."""
    buffer = bytearray(buffer_size)
    while True:
        size = sock.recv_into(buffer)
        for kind, flags, seq, payload in messages(memoryview(buffer)[:size]):
            if seq != sequence:
                continue
            yield kind, flags, payload
            if kind in (NLMSG_DONE, NLMSG_ERROR):
                return


def netfilter_socket(timeout: float) -> socket.socket:
    """A bound NETLINK_NETFILTER socket whose error replies do not echo the request."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class KeptSocket:
    """One socket kept between calls, opened anew when the calling thread is in another
    network namespace (or process), and after `close`. Not thread-safe: the owner
    serialises."""

    def __init__(self, opener: Callable[[], socket.socket]) -> None:
        self._open = opener
        self._sock: socket.socket | None = None
        self._where: tuple[int, str] | None = None

    def get(self) -> socket.socket:
        where = where_we_are()
        if self._sock is None or where != self._where:
            self.close()
            self._sock, self._where = self._open(), where
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            if self._where is not None and self._where[0] == os.getpid():
                self._sock.close()  # (one inherited over fork is the parent's: only dropped)
            self._sock = self._where = None
