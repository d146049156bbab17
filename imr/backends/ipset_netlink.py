"""ipset entries over raw netlink: many entries in one message, as `ipset restore` sends them.

pyroute2 sends one message per entry and builds each through its generic
attribute machinery (~0.4 ms an entry). ipset's protocol carries lists: an
IPSET_CMD_ADD or IPSET_CMD_DEL message names one set and holds an
IPSET_ATTR_ADT list of IPSET_ATTR_DATA entries (address, prefix length for
hash:net, timeout). The kernel applies them in order and stops at the first it
refuses; the message-level IPSET_ATTR_LINENO asks it to say which (each entry
carries its line number, and the error reply echoes the message with the
failed entry's number in IPSET_ATTR_LINENO).

ipset is not a batch subsystem: each message is applied on its own, with no
transaction. `EntryWriter.commit` sends the messages one at a time and stops at
the first refusal, so the entries of later messages are never applied.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from imr.netlink import (
    ERROR,
    HEADER,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    KeptSocket,
    attributes,
    message,
    messages,
    netfilter_socket,
    nla,
)

NFNL_SUBSYS_IPSET = 6
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
IPSET_PROTOCOL = 6  # the oldest the kernel accepts (IPSET_PROTOCOL_MIN); enough for ADT lists
IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_DATA = 7
IPSET_ATTR_ADT = 8
IPSET_ATTR_LINENO = 9  # message level: report the failed entry; entry level: its number
IPSET_ATTR_IP = 1
IPSET_ATTR_CIDR = 3
IPSET_ATTR_TIMEOUT = 6
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_ATTR_IPADDR_IPV6 = 2
NLA_F_NET_BYTEORDER = 0x4000  # the kernel refuses an address or timeout without it

ADD = IPSET_CMD_ADD
DELETE = IPSET_CMD_DEL
TIMEOUT = 10.0  # seconds; the kernel answers at once
# Entries per message: the ADT attribute's length is 16 bits, and the error reply echoes
# the whole message, which must fit the receive buffer.
MAX_LIST = 32_000
RECV_BUFFER = 1 << 17

# The kernel's ipset error codes (above 4096, so os.strerror does not know them).
_IPSET_ERRORS = {
    4097: "protocol error",
    4102: "set type mismatch",
    4103: "element already exists",
    4104: "invalid CIDR",
    4106: "invalid family",
    4107: "timeout cannot be used: set created without timeout support",
    4352: "hash is full (maxelem reached)",
    4353: "null-valued element",
}
_NFGEN = struct.Struct("=BBH")
_LINENO = struct.Struct("=I")  # host order, as libipset writes it


class IpsetRefused(Exception):
    """The kernel refused a message. `code` is the errno or ipset error code; `entry` is the
    index (in the step's list) of the refused entry when known. Entries before it, and all
    earlier steps, were applied; nothing after it was."""

    def __init__(self, code: int, set_name: str, entry: int | None, done: int) -> None:
        reason = _IPSET_ERRORS.get(code) or os.strerror(code)
        super().__init__(f"set {set_name}: {reason}")
        self.code, self.set_name, self.entry, self.done = code, set_name, entry, done


@dataclass(frozen=True)
class Step:
    """ADD or DELETE of `entries` (from `entry()`) in one set of address family `family`."""

    command: int
    set_name: str
    family: int  # socket.AF_INET or socket.AF_INET6
    entries: Sequence[bytes]


def entry(packed: bytes, cidr: int | None, timeout: int | None) -> bytes:
    """One IPSET_ATTR_DATA body without its line number: the address (4 or 16 bytes, network
    order), the prefix length for hash:net, the timeout in seconds (0: none) for an add."""
    kind = IPSET_ATTR_IPADDR_IPV4 if len(packed) == 4 else IPSET_ATTR_IPADDR_IPV6
    body = nla(IPSET_ATTR_IP | NLA_F_NESTED, nla(kind | NLA_F_NET_BYTEORDER, packed))
    if cidr is not None:
        body += nla(IPSET_ATTR_CIDR, bytes((cidr,)))
    if timeout is not None:
        body += nla(IPSET_ATTR_TIMEOUT | NLA_F_NET_BYTEORDER, struct.pack("!I", timeout))
    return body


def step_messages(step: Step, first_sequence: int) -> Iterator[tuple[int, int, bytes]]:
    """(sequence, index of the message's first entry, bytes) of the step's messages."""
    head = _head(step.family, step.set_name)
    kind = (NFNL_SUBSYS_IPSET << 8) | step.command
    sequence = first_sequence
    start = 0
    while start < len(step.entries):
        parts: list[bytes] = []
        size = 0
        index = start
        while index < len(step.entries) and size < MAX_LIST:
            # Line numbers count from 1 within the message: 0 means "no line" to the kernel.
            line = nla(IPSET_ATTR_LINENO, _LINENO.pack(index - start + 1))
            data = nla(IPSET_ATTR_DATA | NLA_F_NESTED, step.entries[index] + line)
            parts.append(data)
            size += len(data)
            index += 1
        body = head + nla(IPSET_ATTR_ADT | NLA_F_NESTED, b"".join(parts))
        yield sequence, start, message(kind, NLM_F_REQUEST | NLM_F_ACK, sequence, body)
        sequence += 1
        start = index


@functools.cache
def _head(family: int, set_name: str) -> bytes:
    """The message's fixed part: family, protocol, set name, "report the failed line"."""
    return (
        _NFGEN.pack(family, 0, 0)
        + nla(IPSET_ATTR_PROTOCOL, bytes((IPSET_PROTOCOL,)))
        + nla(IPSET_ATTR_SETNAME, set_name.encode() + b"\0")
        + nla(IPSET_ATTR_LINENO, _LINENO.pack(0))
    )


class EntryWriter:
    """Entry changes over one kept netlink socket, reopened when the calling thread is in
    another network namespace (or process) and after any failure. Not thread-safe: the
    ipset backend's lock serialises."""

    def __init__(self) -> None:
        self._socket = KeptSocket(lambda: netfilter_socket(TIMEOUT))
        self._next = 1
        self._buffer = bytearray(RECV_BUFFER)  # kept: zeroing 128 KiB an ACK costs ~5 µs

    def commit(self, steps: Sequence[Step]) -> None:
        """Apply the steps in order; IpsetRefused at the first refusal, OSError or
        TimeoutError if the kernel could not be asked."""
        sock = self._socket.get()
        done = 0
        try:
            for step in steps:
                for sequence, start, data in step_messages(step, self._next):
                    self._next = 1 if sequence > 1 << 30 else sequence + 1
                    sock.send(data)
                    refused = _await_ack(sock, sequence, self._buffer)
                    if refused is not None:
                        code, line = refused
                        where = start + line - 1 if line else None
                        raise IpsetRefused(code, step.set_name, where, done)
                done += len(step.entries)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._socket.close()


def _await_ack(sock: socket.socket, sequence: int, buffer: bytearray) -> tuple[int, int] | None:
    """None for an ACK; (error code, failed line or 0) for a refusal."""
    while True:
        size = sock.recv_into(buffer)
        for kind, _flags, seq, payload in messages(memoryview(buffer)[:size]):
            if seq != sequence or kind != NLMSG_ERROR or len(payload) < ERROR.size:
                continue
            code = -ERROR.unpack_from(payload)[0]
            if not code:
                return None
            return code, _failed_line(payload[ERROR.size :])


def _failed_line(echo: memoryview) -> int:
    """The IPSET_ATTR_LINENO of the echoed request (the kernel's batch-mode error reply); 0
    when there is no echo (an error of the message as a whole, such as a missing set)."""
    start = HEADER.size + _NFGEN.size
    if len(echo) < start:
        return 0
    for kind, body in attributes(echo[start:]):
        if kind == IPSET_ATTR_LINENO and len(body) >= _LINENO.size:
            return int(_LINENO.unpack_from(body)[0])
    return 0
