"""Behaviour every kernel firewall backend must show, checked through the kernel.

Use it by subclassing `BackendConformance` (or `TimeoutConformance`, for a backend whose
kernel entries carry their own timeouts) in a `Test...` class that

* provides a pytest fixture `make_backend` returning a factory
  `(FirewallConfig) -> Backend` (called while the test thread is inside the
  test's fresh namespace, so the backend changes only that namespace), and
* implements the read-back hooks below with tools of its own mechanism
  (iptables -S, nft list, ipset list ...).

The checks never trust the backend's own view (`installed()` is itself under
test): what counts is what the kernel reports, and whether a real packet from a
blocked peer is refused.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Literal

import pytest

from imr.backends.base import Backend, Drift, Expected, KernelBlock, Slot, expected_counts, slot_of
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress, IPNetwork, Target

from netns import Netns, connect, netns

MakeBackend = Callable[[FirewallConfig], Backend]


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def target(text: str) -> Target:
    """An address, or a network if the text has a prefix shorter than the full length."""
    found = ipaddress.ip_network(text, strict=False)
    return found.network_address if found.prefixlen == found.max_prefixlen else found


def order(targets: list[Target]) -> list[Target]:
    def key(t: Target) -> tuple[int, int, int]:
        if isinstance(t, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return (t.version, int(t.network_address), t.prefixlen)
        return (t.version, int(t), t.max_prefixlen)

    return sorted(targets, key=key)


V4_A, V4_B, V4_C = ip("192.0.2.10"), ip("192.0.2.11"), ip("198.51.100.7")
V6_A, V6_B = ip("2001:db8::10"), ip("2001:db8:1::11")
# Admin network blocks; NET4_A holds V4_C, which may be blocked on its own as well.
NET4_A, NET4_B, NET6_A = net("198.51.100.0/24"), net("192.0.2.128/25"), net("2001:db8:5::/48")
NEVER_BLOCKED = (ip("203.0.113.250"), ip("2001:db8:ffff::250"))
STRAYS = (ip("203.0.113.9"), ip("2001:db8:9::9"))  # in the kernel, not in the state
FAR_FUTURE = 4_102_444_800.0  # 2100-01-01; expiry is the broker's business, not the backend's

# The packet test: server and client joined by a veth pair.
SERVER_V4, CLIENT_V4 = "203.0.113.1", "203.0.113.66"
SERVER_V6, CLIENT_V6 = "2001:db8:66::1", "2001:db8:66::66"
LISTED_PORT, UNLISTED_PORT = 8080, 8081  # the config below lists 25 and 8000:8080
CONNECT_TIMEOUT = 1.5  # seconds; a REJECT answers at once, only a broken test waits


# The packet test for networks: the client's address is inside these, the server's is not.
CLIENT_NET_V4, CLIENT_NET_V6 = net("203.0.113.64/26"), net("2001:db8:66::40/122")

Damage = Literal["flush", "unhook", "delete"]


def blocks(*targets: Target) -> list[KernelBlock]:
    return [KernelBlock(target, FAR_FUTURE) for target in targets]


def expected_for(wanted: list[KernelBlock]) -> dict[Slot, Expected]:
    return expected_counts(((slot_of(b.address), b.expires_at) for b in wanted), 0.0)


def repair(backend: Backend, drift: Drift, wanted: list[KernelBlock]) -> None:
    """What the broker does with a drift report."""
    if drift.structure:
        backend.prepare()
    if drift.entries:
        backend.replace_all(wanted)


class BackendConformance:
    """The shared checks; see the module docstring for what a subclass supplies."""

    default_config = FirewallConfig(ports=["80", "25", "110"])

    # -- read-back hooks (the subclass's own view of the kernel) -----------------

    def read_blocked(self, ns: Netns, family: int) -> list[Target]:
        """Addresses and networks imr's kernel objects of this family block, once per rule or
        element (never a marker element)."""
        raise NotImplementedError

    def read_hook_positions(self, ns: Netns, family: int) -> list[int]:
        """1-based positions in INPUT of the jumps into imr's objects (a base chain: [1])."""
        raise NotImplementedError

    def read_own_objects(self, ns: Netns) -> list[str]:
        """Every kernel object imr created (chains, jumps, rules, sets), described in text."""
        raise NotImplementedError

    def add_foreign_objects(self, ns: Netns) -> None:
        """Create rules and chains that belong to someone else (they must survive imr)."""
        raise NotImplementedError

    def read_foreign_objects(self, ns: Netns) -> list[str]:
        """Everything in the ruleset that is not imr's, for before/after comparison."""
        raise NotImplementedError

    def add_block_directly(self, ns: Netns, address: IPAddress) -> None:
        """Block an address in imr's objects without the backend, as an earlier run would have,
        preferably in a shape the current config would not produce."""
        raise NotImplementedError

    def damage(self, ns: Netns, how: Damage) -> None:
        """Break imr's objects as a careless admin or another tool would, with the usual tools:
        "flush" empties the IPv4 address set or chain, "unhook" removes what sends packets to
        imr (the INPUT jump; for nftables the rules of imr's base chain), "delete" removes
        imr's objects altogether."""
        raise NotImplementedError

    def read_own_state(self, ns: Netns) -> list[str]:
        """imr's kernel objects in a form that is equal after a faithful rebuild (without
        kernel handles or running timers); by default `read_own_objects`."""
        return self.read_own_objects(ns)

    # -- fixtures ---------------------------------------------------------------

    @pytest.fixture
    def server_ns(self) -> Iterator[Netns]:
        """A fresh namespace the test thread runs in; deleted afterwards even on failure."""
        if os.geteuid() != 0:
            pytest.skip("needs root (network namespaces, firewall tools)")
        with netns("imrc") as ns, ns.entered():
            # Belt and braces: never let a backend under test loose on the host.
            here = os.stat("/proc/thread-self/ns/net").st_ino
            assert here == os.stat(f"/run/netns/{ns.name}").st_ino
            yield ns

    @pytest.fixture
    def backend(self, server_ns: Netns, make_backend: MakeBackend) -> Iterator[Backend]:
        backend = make_backend(self.default_config)
        backend.prepare()
        yield backend
        backend.close()

    # -- helpers ----------------------------------------------------------------

    def blocked(self, ns: Netns) -> list[Target]:
        """Both families, sorted, duplicates kept (so a duplicate rule shows)."""
        return order(self.read_blocked(ns, 4) + self.read_blocked(ns, 6))

    def expect(self, ns: Netns, *targets: Target) -> None:
        assert self.blocked(ns) == order(list(targets))
        for family in (4, 6):  # each address in its own family's table only
            assert all(a.version == family for a in self.read_blocked(ns, family))

    # -- prepare ----------------------------------------------------------------

    def test_prepare_hooks_in_once_at_the_top(self, server_ns: Netns, backend: Backend) -> None:
        backend.prepare()
        backend.prepare()
        for family in (4, 6):
            assert self.read_hook_positions(server_ns, family) == [1]
        self.expect(server_ns)

    def test_prepare_keeps_existing_blocks(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        backend.prepare()
        self.expect(server_ns, V4_A, V6_A)

    # -- apply ------------------------------------------------------------------

    def test_add_shows_in_the_kernel(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        self.expect(server_ns, V4_A, V6_A)
        assert backend.installed() == {V4_A, V6_A}

    def test_add_twice_makes_no_duplicate(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        backend.apply(blocks(V4_A, V6_A), [])
        backend.apply(blocks(V4_A, V4_A, V6_A, V6_A), [])
        self.expect(server_ns, V4_A, V6_A)

    def test_remove_takes_the_block_away(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V4_B, V6_A, V6_B), [])
        backend.apply([], [V4_A, V6_B])
        self.expect(server_ns, V4_B, V6_A)
        backend.apply([], [V4_B, V6_A])
        self.expect(server_ns)

    def test_remove_of_an_absent_address_is_no_error(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        backend.apply([], list(NEVER_BLOCKED))
        backend.apply(blocks(V4_A), [V4_A])  # an address in both lists ends up blocked
        backend.apply(blocks(V6_A), [*NEVER_BLOCKED, V4_B])
        self.expect(server_ns, V4_A, V6_A)

    def test_add_and_remove_in_one_batch(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        backend.apply(blocks(V4_B, V6_B), [V4_A, V6_A])
        self.expect(server_ns, V4_B, V6_B)

    # -- the kernel is the truth ------------------------------------------------

    def test_installed_reads_the_kernel(
        self, server_ns: Netns, backend: Backend, make_backend: MakeBackend
    ) -> None:
        backend.apply(blocks(V4_A), [])
        self.add_block_directly(server_ns, V4_C)
        self.add_block_directly(server_ns, V6_B)
        fresh = make_backend(self.default_config)  # as after a restart: no memory of anything
        assert fresh.installed() == {V4_A, V4_C, V6_B}
        fresh.apply(blocks(V4_C), [V6_B])  # whatever shape the old rule had, it is handled
        self.expect(server_ns, V4_A, V4_C)
        fresh.close()

    def test_replace_all_makes_the_state_exact(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V4_B, V6_A), [])
        self.add_block_directly(server_ns, V4_C)
        backend.replace_all(blocks(V4_B, V4_C, V6_B, V4_B))
        self.expect(server_ns, V4_B, V4_C, V6_B)
        backend.replace_all([])
        self.expect(server_ns)
        for family in (4, 6):
            assert self.read_hook_positions(server_ns, family) == [1]

    # -- network blocks (admin only; the broker checks roles and overlaps) -------

    def test_networks_show_in_the_kernel(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(NET4_A, NET6_A, V4_A), [])
        self.expect(server_ns, NET4_A, NET6_A, V4_A)
        assert backend.installed() == {NET4_A, NET6_A, V4_A}
        backend.apply(blocks(NET4_A, NET6_A, V4_C), [])  # twice: no duplicate; an address inside
        self.expect(server_ns, NET4_A, NET6_A, V4_A, V4_C)
        backend.apply(blocks(NET4_B), [NET4_A, V4_A])
        self.expect(server_ns, NET4_B, NET6_A, V4_C)
        backend.apply([], [NET4_B, NET6_A, NET4_A])  # NET4_A is no longer there: no error
        self.expect(server_ns, V4_C)

    def test_replace_all_with_networks(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(NET4_A, NET6_A, V6_A), [])
        backend.replace_all(blocks(NET4_B, V4_C, V6_A, NET4_B))
        self.expect(server_ns, NET4_B, V4_C, V6_A)
        assert backend.installed() == {NET4_B, V4_C, V6_A}

    # -- drift: someone changed imr's objects behind its back ------------------

    DRIFT_STATE = (V4_A, V4_B, V6_A, NET4_A, NET6_A)

    def test_check_finds_nothing_when_all_is_well(self, server_ns: Netns, backend: Backend) -> None:
        empty = expected_counts([], 0.0)
        drift = backend.check(empty)
        assert drift == Drift(), drift.describe()
        wanted = blocks(*self.DRIFT_STATE)
        backend.apply(wanted, [])
        expected = expected_for(wanted)
        drift = backend.check(expected)
        assert drift == Drift(), drift.describe()
        assert backend.check(empty).entries  # the counts are really compared

    @pytest.mark.parametrize("how", ["flush", "unhook", "delete"])
    def test_drift_is_found_and_repaired_exactly(
        self, server_ns: Netns, backend: Backend, how: Damage
    ) -> None:
        wanted = blocks(*self.DRIFT_STATE)
        backend.apply(wanted, [])
        before = self.read_own_state(server_ns)
        expected = expected_for(wanted)

        self.damage(server_ns, how)
        assert self.read_own_state(server_ns) != before
        drift = backend.check(expected)
        assert drift.found, f"{how} went unnoticed"
        if how == "flush":  # blocks lost, the structure is fine
            assert drift.entries and not drift.structure, drift.describe()
        if how == "delete":
            assert drift.structure and drift.entries, drift.describe()

        repair(backend, drift, wanted)
        assert self.read_own_state(server_ns) == before
        self.expect(server_ns, *self.DRIFT_STATE)
        for family in (4, 6):
            assert self.read_hook_positions(server_ns, family) == [1]
        drift = backend.check(expected)
        assert drift == Drift(), drift.describe()

    def test_drift_repair_leaves_foreign_objects_alone(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        wanted = blocks(*self.DRIFT_STATE)
        backend.apply(wanted, [])
        self.add_foreign_objects(server_ns)
        foreign = self.read_foreign_objects(server_ns)
        expected = expected_for(wanted)
        damages: list[Damage] = ["flush", "unhook", "delete"]
        for how in damages:
            self.damage(server_ns, how)
            repair(backend, backend.check(expected), wanted)
            assert self.read_foreign_objects(server_ns) == foreign, f"changed after {how}"
        self.expect(server_ns, *self.DRIFT_STATE)

    def test_a_stray_entry_is_found_and_removed(self, server_ns: Netns, backend: Backend) -> None:
        """An entry the state does not hold (left by a refused request, or by hand) is drift:
        the check reports it and the repair takes it out, on every backend."""
        wanted = blocks(*self.DRIFT_STATE)
        backend.apply(wanted, [])
        expected = expected_for(wanted)
        for stray in STRAYS:
            self.add_block_directly(server_ns, stray)
            assert stray in self.blocked(server_ns)
            drift = backend.check(expected)
            assert drift.entries and not drift.structure, f"stray {stray} went unnoticed"
            repair(backend, drift, wanted)
            self.expect(server_ns, *self.DRIFT_STATE)
            assert backend.check(expected) == Drift()

    # -- other people's rules ---------------------------------------------------

    def test_foreign_rules_and_chains_survive(
        self, server_ns: Netns, make_backend: MakeBackend
    ) -> None:
        self.add_foreign_objects(server_ns)
        before = self.read_foreign_objects(server_ns)
        assert before, "the hook should have created something"
        backend = make_backend(self.default_config)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("prepare", backend.prepare),
            ("apply", lambda: backend.apply(blocks(V4_A, V6_A), [])),
            ("apply again", lambda: backend.apply(blocks(V4_A, V4_B), [V6_A, V4_C])),
            ("replace_all", lambda: backend.replace_all(blocks(V4_C, V6_B))),
            ("teardown", backend.teardown),
        ]
        for step, action in steps:
            action()
            assert self.read_foreign_objects(server_ns) == before, f"changed by {step}"
            if step == "prepare":
                for family in (4, 6):  # hooked in before the foreign rule
                    assert self.read_hook_positions(server_ns, family) == [1]
        backend.close()

    # -- teardown ---------------------------------------------------------------

    def test_teardown_removes_everything_of_imr(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        assert self.read_own_objects(server_ns)
        backend.teardown()
        assert self.read_own_objects(server_ns) == []
        assert backend.installed() == set()
        backend.teardown()  # nothing left to remove is fine
        backend.prepare()  # and imr can come back
        for family in (4, 6):
            assert self.read_hook_positions(server_ns, family) == [1]

    # -- a real packet ----------------------------------------------------------

    def test_blocked_peer_is_refused_on_listed_ports_only(
        self, server_ns: Netns, make_backend: MakeBackend
    ) -> None:
        """Client connects over a veth; blocked, it gets "No route to host" on listed ports."""
        # REJECT answers through icmp_send, which the kernel rate-limits per peer.
        server_ns.run("sysctl", "-qw", "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0")
        backend = make_backend(FirewallConfig(ports=["25", "8000:8080"]))
        backend.prepare()
        with netns("imrc") as client, _listening(LISTED_PORT, UNLISTED_PORT):
            connect(
                server_ns,
                client,
                [f"{SERVER_V4}/24", f"{SERVER_V6}/64"],
                [f"{CLIENT_V4}/24", f"{CLIENT_V6}/64"],
            )
            everything_open = {
                (server, port): "connected"
                for server in (SERVER_V4, SERVER_V6)
                for port in (LISTED_PORT, UNLISTED_PORT)
            }
            assert _probe_all(client) == everything_open

            backend.apply(blocks(ip(CLIENT_V4), ip(CLIENT_V6)), [])
            assert _probe_all(client) == {
                (SERVER_V4, LISTED_PORT): "EHOSTUNREACH",
                (SERVER_V4, UNLISTED_PORT): "connected",
                (SERVER_V6, LISTED_PORT): "EHOSTUNREACH",
                (SERVER_V6, UNLISTED_PORT): "connected",
            }

            backend.apply([], [ip(CLIENT_V4), ip(CLIENT_V6)])
            assert _probe_all(client) == everything_open

            # The same with the client's networks blocked instead (an admin's network block).
            backend.apply(blocks(CLIENT_NET_V4, CLIENT_NET_V6), [])
            assert _probe_all(client) == {
                (SERVER_V4, LISTED_PORT): "EHOSTUNREACH",
                (SERVER_V4, UNLISTED_PORT): "connected",
                (SERVER_V6, LISTED_PORT): "EHOSTUNREACH",
                (SERVER_V6, UNLISTED_PORT): "connected",
            }
            backend.apply([], [CLIENT_NET_V4, CLIENT_NET_V6])
            assert _probe_all(client) == everything_open
        backend.close()

    def test_a_block_refuses_new_connections_only(
        self, server_ns: Netns, make_backend: MakeBackend
    ) -> None:
        """With every port blocked (the widest rule): a connection the blocked peer opened
        before keeps working, the host's own connection out to the blocked peer gets its
        replies, and a new connection from the peer is refused."""
        server_ns.run("sysctl", "-qw", "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0")
        backend = make_backend(FirewallConfig(ports=[]))
        backend.prepare()
        with netns("imrc") as client, contextlib.ExitStack() as stack:
            connect(
                server_ns,
                client,
                [f"{SERVER_V4}/24", f"{SERVER_V6}/64"],
                [f"{CLIENT_V4}/24", f"{CLIENT_V6}/64"],
            )
            listener = stack.enter_context(_listener(LISTED_PORT))
            with client.entered():
                stack.enter_context(_listener(UNLISTED_PORT))  # the blocked peer's own server
                opened = [
                    stack.enter_context(socket.create_connection((s, LISTED_PORT), 2))
                    for s in (SERVER_V4, SERVER_V6)
                ]
            accepted = [stack.enter_context(listener.accept()[0]) for _ in opened]
            backend.apply(blocks(ip(CLIENT_V4), ip(CLIENT_V6)), [])

            for sock, peer in zip(opened, accepted, strict=True):
                sock.sendall(b"still open")
                peer.settimeout(CONNECT_TIMEOUT)
                assert peer.recv(64) == b"still open", "an open connection was cut"
            for peer_address in (CLIENT_V4, CLIENT_V6):
                assert _probe(peer_address, UNLISTED_PORT) == "connected", "replies refused"
            assert _probe_all(client) == {
                (server, port): "EHOSTUNREACH"
                for server in (SERVER_V4, SERVER_V6)
                for port in (LISTED_PORT, UNLISTED_PORT)
            }
        backend.close()


@contextlib.contextmanager
def _listener(port: int) -> Iterator[socket.socket]:
    """One dual-stack TCP listener in the calling thread's namespace."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        sock.listen(64)
        sock.settimeout(CONNECT_TIMEOUT)
        yield sock


@contextlib.contextmanager
def _listening(*ports: int) -> Iterator[None]:
    """TCP listeners (IPv4 and IPv6) in the calling thread's namespace.

    The kernel completes handshakes into the backlog by itself: nobody needs to accept.
    """
    with contextlib.ExitStack() as stack:
        for port in ports:
            sock = stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            sock.listen(64)
        yield


def _probe_all(client: Netns) -> dict[tuple[str, int], str]:
    with client.entered():
        return {
            (server, port): _probe(server, port)
            for server in (SERVER_V4, SERVER_V6)
            for port in (LISTED_PORT, UNLISTED_PORT)
        }


def _probe(host: str, port: int) -> str:
    """ "connected", "timeout" or the errno name of the failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((host, port))
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
        return "connected"


class TimeoutConformance(BackendConformance):
    """The shared checks, and those of a backend whose kernel entries carry each block's
    remaining time (ipset, nftables sets), so the kernel lifts a block on time even when no
    daemon runs. A subclass also implements `read_timeouts`."""

    def read_timeouts(self, ns: Netns) -> dict[str, int]:
        """Seconds each blocked address has left, as the kernel reports it, by its text
        (0: no timeout)."""
        raise NotImplementedError

    def test_timeouts_follow_expiry_and_escalation(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        now = time.time()
        backend.apply([KernelBlock(V4_A, now + 3600), KernelBlock(V6_A, now + 600)], [])
        backend.apply([KernelBlock(V4_A, now + 86400)], [])  # escalated: longer timeout
        timeouts = self.read_timeouts(server_ns)
        assert 86390 < timeouts[str(V4_A)] <= 86400 and 590 < timeouts[str(V6_A)] <= 600
        backend.apply([KernelBlock(V4_A, now + 60)], [])  # and shortened again
        assert 50 < self.read_timeouts(server_ns)[str(V4_A)] <= 60

    def test_an_expired_block_is_not_added_and_is_taken_out(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        backend.apply(blocks(V4_A), [])
        past = time.time() - 5
        backend.apply([KernelBlock(V4_A, past), KernelBlock(V4_B, past)], [])
        backend.replace_all([KernelBlock(V6_A, past), *blocks(V6_B)])
        self.expect(server_ns, V6_B)

    def test_kernel_lifts_a_block_with_no_daemon(
        self, server_ns: Netns, make_backend: MakeBackend
    ) -> None:
        backend = make_backend(self.default_config)
        backend.prepare()
        backend.apply([KernelBlock(V4_A, time.time() + 2), KernelBlock(V6_A, time.time() + 2)], [])
        backend.apply(blocks(V4_B), [])
        backend.close()
        del backend  # nothing of imr runs any more
        assert self.blocked(server_ns) == [V4_A, V4_B, V6_A]
        deadline = time.monotonic() + 6
        while self.blocked(server_ns) != [V4_B] and time.monotonic() < deadline:
            time.sleep(0.25)
        assert self.blocked(server_ns) == [V4_B]
