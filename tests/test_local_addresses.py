"""The host's addresses over raw rtnetlink, read in throwaway namespaces while they change."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imr.backends.nftables import NftablesBackend
from imr.config import Config
from imr.core.addresses import IPAddress
from imr.core.clock import SystemClock
from imr.protocol import BlockRequest
from imr.server.broker import Broker
from imr.server.local_addresses import LocalAddresses
from imr.store import Store

from fakes import ROOT, WEB
from netns import Netns, netns

WAIT = 5.0  # seconds for the view to follow a change (it takes milliseconds)
LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
LINK = "imrv0"


def a(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def wait_for(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture
def ns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with netns("imrla") as made:
        # A veth pair inside the namespace: a link to put documentation addresses on.
        made.run("ip", "link", "add", LINK, "type", "veth", "peer", "name", "imrv1")
        made.run("ip", "link", "set", LINK, "up")
        yield made


@pytest.fixture
def view(ns: Netns) -> Iterator[LocalAddresses]:
    local = LocalAddresses()
    with ns.entered():
        local.start()  # its sockets and its thread live in the namespace
    yield local
    local.stop()


def test_the_first_read_is_the_namespaces_own(view: LocalAddresses) -> None:
    # A fresh namespace with lo up: loopback only, none of the host's addresses.
    assert view.own == LOOPBACK
    assert view.broadcast == frozenset()


def test_ipv4_address_and_broadcast_follow_changes(ns: Netns, view: LocalAddresses) -> None:
    ns.run("ip", "addr", "add", "192.0.2.1/24", "brd", "+", "dev", LINK)
    assert wait_for(lambda: a("192.0.2.1") in view.own and a("192.0.2.255") in view.broadcast)
    assert view.own == LOOPBACK | {a("192.0.2.1")}
    assert view.broadcast == {a("192.0.2.255")}
    ns.run("ip", "addr", "add", "203.0.113.9/24", "dev", LINK)  # no broadcast given: none
    assert wait_for(lambda: a("203.0.113.9") in view.own)
    assert view.broadcast == {a("192.0.2.255")}
    ns.run("ip", "addr", "del", "192.0.2.1/24", "dev", LINK)
    assert wait_for(lambda: a("192.0.2.1") not in view.own)
    assert view.own == LOOPBACK | {a("203.0.113.9")}
    assert view.broadcast == frozenset()


def test_a_point_to_point_peer_counts_as_own(ns: Netns, view: LocalAddresses) -> None:
    # IFA_LOCAL is ours, IFA_ADDRESS the peer's: both are refused as block targets.
    ns.run("ip", "addr", "add", "198.51.100.1", "peer", "198.51.100.2", "dev", LINK)
    assert wait_for(lambda: {a("198.51.100.1"), a("198.51.100.2")} <= view.own)


def test_ipv6_addresses_and_mapped_ones_folded(ns: Netns, view: LocalAddresses) -> None:
    ns.run("ip", "addr", "add", "2001:db8::1/64", "dev", LINK, "nodad")
    ns.run("ip", "addr", "add", "::ffff:203.0.113.5/128", "dev", LINK, "nodad")
    assert wait_for(lambda: {a("2001:db8::1"), a("203.0.113.5")} <= view.own)
    assert a("::ffff:203.0.113.5") not in view.own  # folded to IPv4, as requests are
    ns.run("ip", "addr", "del", "2001:db8::1/64", "dev", LINK)
    assert wait_for(lambda: a("2001:db8::1") not in view.own)
    assert a("203.0.113.5") in view.own


def test_many_changes_at_once_end_in_the_right_list(ns: Netns, view: LocalAddresses) -> None:
    script = "".join(f"addr add 2001:db8:7::{i}/128 dev {LINK} nodad\n" for i in range(1, 201))
    ns.run("ip", "-batch", "-", input=script)
    wanted = {a(f"2001:db8:7::{i}") for i in range(1, 201)}
    assert wait_for(lambda: wanted <= view.own)
    ns.run("ip", "-batch", "-", input=script.replace("addr add", "addr del"))
    assert wait_for(lambda: not (wanted & view.own))


def test_stop_ends_the_watching_thread(ns: Netns) -> None:
    local = LocalAddresses()
    with ns.entered():
        local.start()
    watching = [t for t in threading.enumerate() if t.name == "imr-local-addresses"]
    assert watching
    local.stop()
    for thread in watching:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in watching)


def test_start_raises_when_netlink_cannot_be_read(ns: Netns) -> None:
    def refused() -> socket.socket:
        raise PermissionError(1, "Operation not permitted")

    with pytest.raises(RuntimeError, match="cannot read the host's addresses over netlink"):
        LocalAddresses(refused).start()

    # A real refusal from the kernel: the request reaches a netlink family that does not
    # know RTM_GETADDR (nfnetlink), which answers with an error.
    def wrong_family() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER

    with ns.entered(), pytest.raises(RuntimeError, match="cannot read the host's addresses"):
        LocalAddresses(wrong_family).start()


def test_a_blocked_address_that_becomes_the_hosts_own_is_lifted_from_the_kernel(
    ns: Netns, view: LocalAddresses, tmp_path: Path
) -> None:
    """A VIP failover: an address blocked while it was a remote peer's is added to the host.
    The broker lifts the block (state: reason `protected`) and takes it out of the kernel at
    once, not at the next restart; a network block holding the new address goes too."""
    vip, other, network = "203.0.113.80", "203.0.113.81", "198.51.100.0/24"
    nat64 = "64:ff9b::cb00:7150"  # the VIP's NAT64 form
    state = tmp_path / "state.db"

    async def scenario(backend: NftablesBackend) -> None:
        store = Store(state)
        broker = Broker(Config(), store, backend, SystemClock(), view)
        broker.reconcile()
        await broker.start()
        try:
            for ip in (vip, other, nat64):
                reply = await broker.handle(BlockRequest(op="block", ip=ip), WEB)
                assert reply["kind"] == "block", reply
            reply = await broker.handle(BlockRequest(op="block", ip=network), ROOT)
            assert reply["kind"] == "block", reply
            assert backend.installed() == {
                a(vip),
                a(other),
                a(nat64),
                ipaddress.ip_network(network),
            }

            ns.run("ip", "addr", "add", f"{vip}/32", "dev", LINK)
            ns.run("ip", "addr", "add", "198.51.100.9/32", "dev", LINK)
            deadline = time.monotonic() + WAIT
            while backend.installed() != {a(other)} and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert backend.installed() == {a(other)}  # read back from the kernel
        finally:
            await broker.stop()
            store.close()

    with ns.entered():
        backend = NftablesBackend(Config().firewall)
        try:
            asyncio.run(scenario(backend))
        finally:
            backend.teardown()
            backend.close()
    with sqlite3.connect(state) as db:
        rows = db.execute("SELECT ip, lift_reason, lifted_by FROM blocks ORDER BY ip").fetchall()
    assert rows == [
        (network, "protected", "imr"),
        (vip, "protected", "imr"),
        (other, None, None),
        (nat64, "protected", "imr"),
    ]
