"""The host's own addresses, read over raw rtnetlink and kept current.

A thread listens for RTM_NEWADDR/RTM_DELADDR and re-reads the whole list on
any change, so an address added while the daemon runs is protected at once.
It subscribes to the address events before the first read, so no change can
fall in between. Raw sockets rather than pyroute2: its import alone cost the
daemon's start ~0.1 s and ~8 MB.

Own addresses are every IFA_ADDRESS and IFA_LOCAL (on a point-to-point link the
first is the peer's: refused as well, as before), IPv4-mapped IPv6 folded to
IPv4; broadcast addresses are every IFA_BROADCAST. The sockets belong to the
network namespace of the thread that calls start().
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable

from imr.core.addresses import IPAddress
from imr.netlink import (
    ERROR,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    attributes,
    message,
    messages,
    replies,
)

log = logging.getLogger("imr.local")

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
NLM_F_DUMP_INTR = 0x10  # the list changed during the dump: read it again
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_ADDRESS_SIZE = {socket.AF_INET: 4, socket.AF_INET6: 16}
RECV_BUFFER = 1 << 16
READ_TIMEOUT = 5.0  # seconds; the kernel answers a dump at once
WAKE_EVERY = 0.5  # seconds between checks of stop() while no event comes
DUMP_TRIES = 5

SocketFactory = Callable[[], socket.socket]


def _route_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)


class LocalAddresses:
    def __init__(self, open_socket: SocketFactory = _route_socket) -> None:
        """`open_socket` makes an unbound NETLINK_ROUTE socket (tests replace it)."""
        self._open_socket = open_socket
        self._own: frozenset[IPAddress] = frozenset()
        self._broadcast: frozenset[IPAddress] = frozenset()
        self._stopping = threading.Event()

    @property
    def own(self) -> frozenset[IPAddress]:
        return self._own

    @property
    def broadcast(self) -> frozenset[IPAddress]:
        return self._broadcast

    def start(self) -> None:
        """Read the addresses once and keep watching; RuntimeError if netlink cannot be read.

        The first read runs in the calling thread, and every socket is opened there or by
        the watching thread it starts: both read the caller's network namespace.
        """
        try:
            watcher = self._open_socket()
            try:
                watcher.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
                self._refresh()
            except BaseException:
                watcher.close()
                raise
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the host's addresses over netlink: {exc}") from None
        threading.Thread(
            target=self._run, args=(watcher,), name="imr-local-addresses", daemon=True
        ).start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self, watcher: socket.socket) -> None:
        watcher.settimeout(WAKE_EVERY)
        buffer = bytearray(RECV_BUFFER)
        with watcher:
            while not self._stopping.is_set():
                try:
                    size = watcher.recv_into(buffer)
                    view = memoryview(buffer)[:size]
                    changed = any(kind in (RTM_NEWADDR, RTM_DELADDR) for kind, *_ in messages(view))
                except TimeoutError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        log.exception("watching local addresses failed; keeping the last list")
                        self._stopping.wait(5)
                        continue
                    changed = True  # events were lost (a full socket buffer): read it all again
                if changed:
                    try:
                        self._refresh()
                    except (OSError, ValueError):
                        log.exception("reading local addresses failed; keeping the last list")

    def _refresh(self) -> None:
        own, broadcast = self._read()
        changed = own != self._own
        self._own, self._broadcast = own, broadcast
        if changed:
            log.info("local addresses: %s", " ".join(sorted(str(a) for a in own)))

    def _read(self) -> tuple[frozenset[IPAddress], frozenset[IPAddress]]:
        """One RTM_GETADDR dump, on a socket of its own (the watcher's carries events)."""
        for _ in range(DUMP_TRIES):
            result = _dump_addresses(self._open_socket())
            if result is not None:
                return result
        raise OSError(errno.EAGAIN, "the address list kept changing during the read")


def _dump_addresses(
    sock: socket.socket,
) -> tuple[frozenset[IPAddress], frozenset[IPAddress]] | None:
    """(own, broadcast) from one dump; None if the dump was interrupted by a change."""
    own: set[IPAddress] = set()
    broadcast: set[IPAddress] = set()
    interrupted = False
    with sock:
        sock.settimeout(READ_TIMEOUT)
        sock.bind((0, 0))
        sequence = 1
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(message(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, sequence, request))
        for kind, flags, payload in replies(sock, sequence, RECV_BUFFER):
            interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
            if kind == NLMSG_ERROR:
                code = -ERROR.unpack_from(payload)[0]
                raise OSError(code, f"RTM_GETADDR: {os.strerror(code)}")
            if kind != RTM_NEWADDR or len(payload) < _IFADDRMSG.size:
                continue  # the NLMSG_DONE that ends the dump, too
            width = _ADDRESS_SIZE.get(_IFADDRMSG.unpack_from(payload)[0])
            for attr, value in attributes(payload[_IFADDRMSG.size :]):
                if width is None or len(value) != width:
                    continue  # not IPv4 or IPv6
                if attr in (IFA_ADDRESS, IFA_LOCAL):
                    own.add(_plain(ipaddress.ip_address(bytes(value))))
                elif attr == IFA_BROADCAST:
                    broadcast.add(_plain(ipaddress.ip_address(bytes(value))))
    return None if interrupted else (frozenset(own), frozenset(broadcast))


def _plain(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
