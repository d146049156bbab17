"""The ipset backend (both iptables flavours), in throwaway namespaces, read back with
`ipset list` and `iptables -S`."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from imr.backends.base import Backend, BackendError, KernelBlock
from imr.backends.ipset import IpsetBackend
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress, Target

from backend_conformance import (
    FAR_FUTURE,
    V4_A,
    V4_B,
    V6_A,
    V6_B,
    BackendConformance,
    Damage,
    MakeBackend,
    TimeoutConformance,
    blocks,
    expected_for,
    target,
)
from netns import Netns

CHAIN = "IMR"
JUMP = f"-A INPUT -j {CHAIN}"
SETS = {4: "imr4", 6: "imr6"}
NET_SETS = {4: "imrnet4", 6: "imrnet6"}


def members(ns: Netns, name: str) -> dict[str, int] | None:
    """Entry -> timeout (0: none) from `ipset list`; None if the set does not exist."""
    result = ns.run("ipset", "list", name, check=False)
    if result.returncode != 0:
        assert "does not exist" in result.stderr, result.stderr
        return None
    lines = result.stdout.splitlines()
    found = {}
    for line in lines[lines.index("Members:") + 1 :]:
        words = line.split()
        if words:
            found[words[0]] = int(words[2]) if len(words) > 2 and words[1] == "timeout" else 0
    return found


class IpsetConformance(TimeoutConformance):
    flavour: str

    def tool(self, family: int) -> str:
        return f"{'iptables' if family == 4 else 'ip6tables'}-{self.flavour}"

    def listing(self, ns: Netns, family: int, *chain: str) -> list[str]:
        lines = ns.run(self.tool(family), "-S", *chain).stdout.splitlines()
        return [line for line in lines if not line.startswith("#")]

    @staticmethod
    def is_own(line: str) -> bool:
        return line == f"-N {CHAIN}" or line.startswith(f"-A {CHAIN} ") or line == JUMP

    # -- hooks ------------------------------------------------------------------

    def read_blocked(self, ns: Netns, family: int) -> list[Target]:
        return [
            target(entry)
            for name in (SETS[family], NET_SETS[family])
            for entry in members(ns, name) or {}
        ]

    def read_hook_positions(self, ns: Netns, family: int) -> list[int]:
        rules = [line for line in self.listing(ns, family, "INPUT") if line.startswith("-A ")]
        return [position for position, line in enumerate(rules, 1) if line == JUMP]

    def read_own_objects(self, ns: Netns) -> list[str]:
        rules = [
            f"IPv{family} {line}"
            for family in (4, 6)
            for line in self.listing(ns, family)
            if self.is_own(line)
        ]
        sets = [name for name in ns.run("ipset", "list", "-n").stdout.split() if "imr" in name]
        return rules + sets

    def add_foreign_objects(self, ns: Netns) -> None:
        ns.run("ipset", "create", "foreign4", "hash:ip")
        ns.run("ipset", "add", "foreign4", "198.51.100.200")
        for family, source in ((4, "198.51.100.200"), (6, "2001:db8:200::200")):
            tool = self.tool(family)
            ns.run(tool, "-A", "INPUT", "-s", source, "-j", "ACCEPT")
            ns.run(tool, "-N", "FOREIGN")
            ns.run(tool, "-A", "FOREIGN", "-s", source, "-p", "tcp", "--dport", "22", "-j", "DROP")
            ns.run(tool, "-A", "INPUT", "-j", "FOREIGN")
        ns.run(self.tool(4), "-A", "FOREIGN", "-m", "set", "--match-set", "foreign4", "src")

    def read_foreign_objects(self, ns: Netns) -> list[str]:
        rules = [
            f"IPv{family} {line}"
            for family in (4, 6)
            for line in self.listing(ns, family)
            if not self.is_own(line)
        ]
        foreign = ns.run("ipset", "list", "foreign4").stdout.splitlines()
        return rules + [line for line in foreign if not line.startswith("Size in memory")]

    def add_block_directly(self, ns: Netns, address: IPAddress) -> None:
        ns.run("ipset", "add", SETS[address.version], str(address))  # no timeout

    def read_own_state(self, ns: Netns) -> list[str]:
        """Rules, set names and every member of imr's sets (read_own_objects lists no members)."""
        entries = [
            f"{name} {entry}"
            for name in (*SETS.values(), *NET_SETS.values())
            for entry in sorted(members(ns, name) or {})
        ]
        return self.read_own_objects(ns) + entries

    def damage(self, ns: Netns, how: Damage) -> None:
        if how == "flush":
            ns.run("ipset", "flush", SETS[4])
            return
        for family in (4, 6):
            ns.run(self.tool(family), "-D", "INPUT", "-j", CHAIN)
            if how == "delete":
                ns.run(self.tool(family), "-F", CHAIN)
                ns.run(self.tool(family), "-X", CHAIN)
        if how == "delete":
            for name in (*SETS.values(), *NET_SETS.values()):
                ns.run("ipset", "destroy", name)

    def read_timeouts(self, ns: Netns) -> dict[str, int]:
        return {**(members(ns, SETS[4]) or {}), **(members(ns, SETS[6]) or {})}

    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        def make(config: FirewallConfig) -> Backend:
            return IpsetBackend(config, self.flavour)

        return make

    # -- ipset specifics --------------------------------------------------------

    def test_describe(self, server_ns: Netns, backend: Backend) -> None:
        assert backend.describe().startswith("ipset (hash:ip sets imr4/imr6")
        assert "set by the caller" in backend.describe()

    def test_rule_shape_and_set_header(self, server_ns: Netns, make_backend: MakeBackend) -> None:
        backend = make_backend(FirewallConfig(protocol="udp", ports=["53", "8000:8080"]))
        backend.prepare()
        backend.prepare()
        assert self.listing(server_ns, 4, CHAIN)[1:] == [
            f"-A {CHAIN} -p udp -m set --match-set {name} src -m conntrack --ctstate NEW"
            " -m multiport --dports 53,8000:8080 -j REJECT --reject-with icmp-host-unreachable"
            for name in ("imr4", "imrnet4")
        ]
        for name, kind in (("imr6", "hash:ip"), ("imrnet6", "hash:net")):
            header = server_ns.run("ipset", "list", name, "-t").stdout
            assert f"Type: {kind}" in header
            assert "family inet6" in header and "timeout 0" in header and "maxelem 262144" in header
            # The address set's full table from the start: no rehash of every entry mid-batch.
            assert ("hashsize 65536" in header) == (name == "imr6")

    def test_a_block_beyond_the_kernel_limit_gets_no_timeout(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        backend.apply([KernelBlock(V6_A, FAR_FUTURE)], [])
        assert members(server_ns, "imr6") == {str(V6_A): 0}  # no timeout, never early

    def test_apply_recreates_sets_someone_destroyed(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        backend.teardown()
        backend.apply(blocks(V4_B, V6_A), [V4_A])
        self.expect(server_ns, V4_B, V6_A)
        assert self.read_hook_positions(server_ns, 4) == [1]

    def test_repairs_on_a_thread_that_runs_an_event_loop(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        """The daemon commits small batches on its event loop (commit_place.py), where
        pyroute2 (the repair's tool) refuses to run: apply and replace_all still repair."""

        async def apply() -> None:
            backend.apply(blocks(V4_B, V6_A), [V4_A])

        async def replace_all() -> None:
            backend.replace_all(blocks(V4_A))

        backend.teardown()
        asyncio.run(apply())
        self.expect(server_ns, V4_B, V6_A)
        backend.teardown()
        asyncio.run(replace_all())
        self.expect(server_ns, V4_A)
        assert self.read_hook_positions(server_ns, 4) == [1]

    def test_kernel_refusal_becomes_backend_error(self, server_ns: Netns) -> None:
        server_ns.run("ipset", "create", "imr4", "hash:net")  # imr's name, another type
        backend = IpsetBackend(BackendConformance.default_config, self.flavour)
        with pytest.raises(BackendError, match="ipset create imr4"):
            backend.prepare()

    def test_a_refused_entry_in_a_batch(self, server_ns: Netns, backend: Backend) -> None:
        """A full set refuses the 101st new address of a 500-address batch: BackendError
        names it, the batch's removals are not made (no address of a failed batch is
        unblocked), the additions before it are in, and the drift check then finds them."""
        kept = [ipaddress.ip_address(f"2001:db8:6::{i:x}") for i in range(1, 11)]
        backend.apply(blocks(*kept), [])
        # The live set swapped for one of the same type that holds 110 entries at most.
        server_ns.run(
            "ipset",
            "create",
            "small6",
            "hash:ip",
            "family",
            "inet6",
            "timeout",
            "0",
            "maxelem",
            "110",
        )
        for address in kept:
            server_ns.run("ipset", "add", "small6", str(address), "timeout", "0")
        server_ns.run("ipset", "swap", "small6", "imr6")
        server_ns.run("ipset", "destroy", "small6")
        batch = [ipaddress.ip_address(f"2001:db8:7::{i:x}") for i in range(1, 501)]
        with pytest.raises(BackendError, match=r"entry 101 of its list .*hash is full") as info:
            backend.apply(blocks(*batch), kept[:5])
        assert "100 of the batch's 505 changes were made" in str(info.value)
        assert set(self.read_blocked(server_ns, 6)) == {*kept, *batch[:100]}
        wanted = blocks(*kept)
        drift = backend.check(expected_for(wanted))
        assert drift.entries and not drift.structure


class TestIpsetNftFlavour(IpsetConformance):
    flavour = "nft"

    def test_replace_all_with_100000_addresses(self, server_ns: Netns, backend: Backend) -> None:
        base = int(ipaddress.IPv6Address("2001:db8::"))
        v6 = [ipaddress.IPv6Address(base + i) for i in range(1, 99_239)]
        v4 = [
            ipaddress.IPv4Address(f"{net}.{host}")
            for net in ("192.0.2", "198.51.100", "203.0.113")
            for host in range(1, 255)
        ]
        backend.apply(blocks(V6_B), [])  # not in the new state: must go
        backend.replace_all(blocks(*v4, *v6))
        found = {4: self.read_blocked(server_ns, 4), 6: self.read_blocked(server_ns, 6)}
        assert len(found[4]) + len(found[6]) == 100_000
        assert set(found[4]) == set(v4) and set(found[6]) == set(v6)
        assert "imr6-new" not in server_ns.run("ipset", "list", "-n").stdout
        backend.apply(blocks(V6_B), v6[:10])
        assert len(self.read_blocked(server_ns, 6)) == 99_238 - 10 + 1


class TestIpsetLegacyFlavour(IpsetConformance):
    flavour = "legacy"
