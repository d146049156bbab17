"""Behaviour every kernel firewall backend must show, checked through the kernel.

Use it by subclassing `BackendConformance` in a `Test...` class that

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
from collections.abc import Callable, Iterator

import pytest

from imr.backends.base import Backend, KernelBlock
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress

from netns import Netns, connect, netns

MakeBackend = Callable[[FirewallConfig], Backend]


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


V4_A, V4_B, V4_C = ip("192.0.2.10"), ip("192.0.2.11"), ip("198.51.100.7")
V6_A, V6_B = ip("2001:db8::10"), ip("2001:db8:1::11")
NEVER_BLOCKED = (ip("203.0.113.250"), ip("2001:db8:ffff::250"))
FAR_FUTURE = 4_102_444_800.0  # 2100-01-01; expiry is the broker's business, not the backend's

# The packet test: server and client joined by a veth pair.
SERVER_V4, CLIENT_V4 = "203.0.113.1", "203.0.113.66"
SERVER_V6, CLIENT_V6 = "2001:db8:66::1", "2001:db8:66::66"
LISTED_PORT, UNLISTED_PORT = 8080, 8081  # the config below lists 25 and 8000:8080
CONNECT_TIMEOUT = 1.5  # seconds; a REJECT answers at once, only a broken test waits


def blocks(*addresses: IPAddress) -> list[KernelBlock]:
    return [KernelBlock(address, FAR_FUTURE) for address in addresses]


class BackendConformance:
    """The shared checks; see the module docstring for what a subclass supplies."""

    default_config = FirewallConfig(ports=["80", "25", "110"])

    # -- read-back hooks (the subclass's own view of the kernel) -----------------

    def read_blocked(self, ns: Netns, family: int) -> list[IPAddress]:
        """Addresses imr's kernel objects of this family block, once per rule or element."""
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

    def blocked(self, ns: Netns) -> list[IPAddress]:
        """Both families, sorted, duplicates kept (so a duplicate rule shows)."""
        found = self.read_blocked(ns, 4) + self.read_blocked(ns, 6)
        return sorted(found, key=lambda a: (a.version, int(a)))

    def expect(self, ns: Netns, *addresses: IPAddress) -> None:
        assert self.blocked(ns) == sorted(addresses, key=lambda a: (a.version, int(a)))
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
        backend.close()


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
