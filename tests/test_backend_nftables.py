"""The nftables set backend, run in throwaway namespaces and read back with `nft -j`."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time
from typing import Any

import pytest

from imr.backends import nfnetlink
from imr.backends import nftables as nftables_module
from imr.backends.base import Backend, BackendError, Drift, KernelBlock, Slot, expected_counts
from imr.backends.nftables import NftablesBackend
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress, Target

from backend_conformance import (
    FAR_FUTURE,
    NET4_A,
    NET6_A,
    V4_A,
    V4_B,
    V4_C,
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
from netns import Netns, netns

SETS = {4: "blocked_v4", 6: "blocked_v6"}
NET_SETS = {4: "blocked_net_v4", 6: "blocked_net_v6"}
MARKERS = {"255.255.255.255", "ff00::"}  # one per address set, for the drift check


def nft_json(ns: Netns, *command: str) -> list[dict[str, Any]]:
    """The objects of `nft -j list ...`; [] if what is listed does not exist."""
    result = ns.run("nft", "-j", "list", *command, check=False)
    if result.returncode != 0:
        assert "No such file or directory" in result.stderr, result.stderr
        return []
    items: list[dict[str, Any]] = json.loads(result.stdout)["nftables"]
    return [item for item in items if "metainfo" not in item]


def elements(ns: Netns, family: int, sets: dict[int, str] = SETS) -> list[dict[str, Any]]:
    """The set's elements as {"val": ..., "timeout": ...} (timeout absent: none), without the
    marker; a network's "val" is its CIDR text."""
    found = []
    for item in nft_json(ns, "set", "inet", "imr", sets[family]):
        for entry in item["set"].get("elem", []):
            element = dict(entry["elem"]) if isinstance(entry, dict) else {"val": entry}
            if isinstance(element["val"], dict):
                prefix = element["val"]["prefix"]
                element["val"] = f"{prefix['addr']}/{prefix['len']}"
            if element["val"] not in MARKERS:
                found.append(element)
    return found


def markers(ns: Netns) -> list[str]:
    return [
        entry if isinstance(entry, str) else entry["elem"]["val"]
        for family in (4, 6)
        for item in nft_json(ns, "set", "inet", "imr", SETS[family])
        for entry in item["set"].get("elem", [])
        if (entry if isinstance(entry, str) else entry["elem"]["val"]) in MARKERS
    ]


def is_own(item: dict[str, Any]) -> bool:
    (body,) = item.values()
    return bool(body.get("family") == "inet" and body.get("table", body.get("name")) == "imr")


class TestNftables(TimeoutConformance):
    # -- hooks ------------------------------------------------------------------

    def read_blocked(self, ns: Netns, family: int) -> list[Target]:
        return [
            target(element["val"])
            for sets in (SETS, NET_SETS)
            for element in elements(ns, family, sets)
        ]

    def read_hook_positions(self, ns: Netns, family: int) -> list[int]:
        """Our base chain's place among all input-hook chains that see this family."""
        families = ("inet", "ip" if family == 4 else "ip6")
        chains = [
            item["chain"]
            for item in nft_json(ns, "chains")
            if item["chain"].get("hook") == "input" and item["chain"]["family"] in families
        ]
        chains.sort(key=lambda chain: chain["prio"])
        return [
            position
            for position, chain in enumerate(chains, 1)
            if (chain["family"], chain["table"], chain["name"]) == ("inet", "imr", "input")
        ]

    def read_own_objects(self, ns: Netns) -> list[str]:
        return [json.dumps(item) for item in nft_json(ns, "ruleset") if is_own(item)]

    def add_foreign_objects(self, ns: Netns) -> None:
        ns.run(
            "nft",
            "-f",
            "-",
            input="""
            table inet foreign {
                set blocked_v4 { type ipv4_addr; elements = { 198.51.100.200 } }
                chain input {
                    type filter hook input priority 0; policy accept;
                    ip saddr @blocked_v4 tcp dport 22 drop
                }
            }
            table ip6 other { chain input { type filter hook input priority -5; }; }
            """,
        )
        # iptables-nft keeps its rules in nf_tables too: they are someone else's as well.
        ns.run("iptables-nft", "-A", "INPUT", "-s", "198.51.100.200", "-j", "ACCEPT")
        ns.run("ip6tables-nft", "-A", "INPUT", "-s", "2001:db8:200::200", "-j", "ACCEPT")

    def read_foreign_objects(self, ns: Netns) -> list[str]:
        return [json.dumps(item) for item in nft_json(ns, "ruleset") if not is_own(item)]

    def add_block_directly(self, ns: Netns, address: IPAddress) -> None:
        # No timeout: a shape the backend never writes.
        ns.run("nft", "add", "element", "inet", "imr", SETS[address.version], f"{{ {address} }}")

    def damage(self, ns: Netns, how: Damage) -> None:
        command = {
            "flush": "flush set inet imr blocked_v4",
            "unhook": "flush chain inet imr input",
            "delete": "delete table inet imr",
        }[how]
        ns.run("nft", command)

    def read_own_state(self, ns: Netns) -> list[str]:
        """Own objects without handles and running timers (they differ after a rebuild)."""
        state = []
        for item in nft_json(ns, "ruleset"):
            if not is_own(item):
                continue
            (kind, body) = next(iter(item.items()))
            body = {key: value for key, value in body.items() if key != "handle"}
            if "elem" in body:
                body["elem"] = sorted(
                    json.dumps(
                        {k: v for k, v in e["elem"].items() if k not in ("timeout", "expires")}
                        if isinstance(e, dict)
                        else e
                    )
                    for e in body["elem"]
                )
            state.append(json.dumps({kind: body}, sort_keys=True))
        return sorted(state)

    def read_timeouts(self, ns: Netns) -> dict[str, int]:
        # The remaining time ("expires"), as ipset reports it; "timeout" is the one set.
        return {e["val"]: e.get("expires", 0) for f in (4, 6) for e in elements(ns, f)}

    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        def make(config: FirewallConfig) -> Backend:
            return NftablesBackend(config)

        return make

    # -- nftables specifics -----------------------------------------------------

    def test_describe(self, server_ns: Netns, backend: Backend) -> None:
        assert backend.describe().startswith("nftables (table inet imr: hash sets")
        assert "libnftables, in-process" in backend.describe()

    @pytest.mark.parametrize(
        ("config", "expected"),
        [
            (
                FirewallConfig(ports=["80", "25", "8000:8080", "9:9"]),
                (
                    "ip saddr @blocked_v4 ct state new tcp dport { 9, 25, 80, 8000-8080 }"
                    " reject with icmp host-unreachable",
                    "ip6 saddr @blocked_v6 ct state new tcp dport { 9, 25, 80, 8000-8080 }"
                    " reject with icmpv6 addr-unreachable",
                ),
            ),
            (
                FirewallConfig(reject_with_ipv4="tcp-reset", reject_with_ipv6="tcp-reset"),
                (  # the default ports: the web ports
                    "ip saddr @blocked_v4 ct state new tcp dport { 80, 443 } reject with tcp reset",
                    "ip6 saddr @blocked_v6 ct state new tcp dport { 80, 443 }"
                    " reject with tcp reset",
                ),
            ),
            (
                FirewallConfig(ports=[]),
                (  # every port
                    "ip saddr @blocked_v4 ct state new meta l4proto tcp"
                    " reject with icmp host-unreachable",
                    "ip6 saddr @blocked_v6 ct state new meta l4proto tcp"
                    " reject with icmpv6 addr-unreachable",
                ),
            ),
            (
                FirewallConfig(
                    protocol="all",
                    reject_with_ipv4="icmp-admin-prohibited",
                    reject_with_ipv6="icmp6-no-route",
                ),
                (
                    "ip saddr @blocked_v4 ct state new reject with icmp admin-prohibited",
                    "ip6 saddr @blocked_v6 ct state new reject with icmpv6 no-route",
                ),
            ),
        ],
        ids=["tcp-ports", "tcp-reset-default-ports", "every-port", "all-protocols"],
    )
    def test_rule_shape(
        self,
        server_ns: Netns,
        make_backend: MakeBackend,
        config: FirewallConfig,
        expected: tuple[str, str],
    ) -> None:
        backend = make_backend(config)
        backend.prepare()
        backend.prepare()
        # nft 1.0.6 prints "reject with icmp host-unreachable" for "... icmp type ...".
        listing = server_ns.run("nft", "list", "chain", "inet", "imr", "input").stdout
        lines = [line.strip() for line in listing.splitlines()]
        assert "type filter hook input priority filter - 10; policy accept;" in lines
        networks = [
            line.replace("@blocked_v4", "@blocked_net_v4").replace("@blocked_v6", "@blocked_net_v6")
            for line in expected
        ]
        assert [line for line in lines if "saddr" in line] == [*expected, *networks]

    def test_replace_all_with_100000_addresses(
        self, server_ns: Netns, backend: Backend, caplog: pytest.LogCaptureFixture
    ) -> None:
        base = int(ipaddress.IPv6Address("2001:db8::"))
        v6 = [ipaddress.IPv6Address(base + i) for i in range(1, 99_001)]
        v4 = [
            ipaddress.IPv4Address(f"{net}.{host}")
            for net in ("192.0.2", "198.51.100", "203.0.113")
            for host in range(1, 255)
        ][:1000]
        backend.apply(blocks(V6_B), [])  # not in the new state: must go
        backend.replace_all(blocks(*v4, *v6))
        found = {4: self.read_blocked(server_ns, 4), 6: self.read_blocked(server_ns, 6)}
        assert len(found[4]) == 762 and len(found[6]) == 99_000  # three /24s hold 762 hosts
        assert set(found[4]) == set(v4) and set(found[6]) == set(v6)
        assert len(backend.installed()) == 99_762
        assert "loading the sets over netlink failed" not in caplog.text  # the netlink batch did it
        backend.apply(blocks(V6_B), v6[:10])  # and small changes still work on a big set
        assert len(self.read_blocked(server_ns, 6)) == 98_991
        # The drift check reads no elements of the big set: it still sees a flush.
        in_v4: list[tuple[Slot, float]] = [("v4", FAR_FUTURE)] * 762
        in_v6: list[tuple[Slot, float]] = [("v6", FAR_FUTURE)] * 98_991
        expected = expected_counts(in_v4 + in_v6, 0)
        drift = backend.check(expected)
        assert drift == Drift(), drift.describe()
        server_ns.run("nft", "flush", "set", "inet", "imr", "blocked_v6")
        assert backend.check(expected).entries == (
            "set inet imr blocked_v6 lost its marker element ff00:: (flushed or deleted);"
            " expected 98991 entries",
        )

    def test_big_sets_are_counted_at_most_every_interval(
        self, server_ns: Netns, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(nftables_module, "COUNT_ALWAYS", 1)  # two blocks: "big"
        wanted = blocks(V4_A, V4_B)
        backend.apply(wanted, [])
        expected = expected_for(wanted)
        assert backend.check(expected) == Drift()  # counted: all well
        self.add_block_directly(server_ns, V4_C)
        assert backend.check(expected) == Drift()  # within the interval: not counted again
        monkeypatch.setattr(nftables_module, "COUNT_INTERVAL", 0.0)
        assert backend.check(expected).entries == (
            "set inet imr blocked_v4 holds 3 addresses, expected 2",
        )

    def test_markers_stay_out_of_the_way(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        backend.replace_all(blocks(V4_B))
        backend.apply([], [V4_B])
        assert sorted(markers(server_ns)) == sorted(MARKERS)  # always there, once each
        assert backend.installed() == set()
        backend.teardown()
        assert markers(server_ns) == []

    def test_network_sets_are_interval_sets_with_timeouts(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        now = time.time()
        backend.apply([KernelBlock(NET4_A, now + 3600), KernelBlock(NET6_A, now + 600)], [])
        backend.apply([KernelBlock(NET4_A, now + 86400)], [])  # escalated: longer timeout
        for family, flags in ((4, ["interval", "timeout"]), (6, ["interval", "timeout"])):
            (item,) = nft_json(server_ns, "set", "inet", "imr", NET_SETS[family])
            assert item["set"]["flags"] == flags
        timeouts = {
            e["val"]: e.get("timeout") for f in (4, 6) for e in elements(server_ns, f, NET_SETS)
        }
        assert timeouts == {str(NET4_A): 86400, str(NET6_A): 600}
        assert elements(server_ns, 4) == []  # the address sets hold no network

    def test_apply_recreates_a_table_someone_deleted(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        backend.apply(blocks(V4_A), [])
        server_ns.run("nft", "delete", "table", "inet", "imr")
        backend.apply(blocks(V4_B, V6_A), [V4_A])
        self.expect(server_ns, V4_B, V6_A)
        assert self.read_hook_positions(server_ns, 4) == [1]

    def test_kernel_refusal_becomes_backend_error(self, server_ns: Netns) -> None:
        # A set of imr's name but without timeouts (e.g. made by hand): nft refuses to redefine it.
        server_ns.run("nft", "add table inet imr; add set inet imr blocked_v4 { type ipv4_addr; }")
        backend = NftablesBackend(BackendConformance.default_config)
        with pytest.raises(BackendError, match="nftables refused the change: Error: "):
            backend.prepare()

    def test_the_nft_command_fallback_works_too(self, server_ns: Netns) -> None:
        backend = NftablesBackend(BackendConformance.default_config, use_library=False)
        assert "via nft -f -" in backend.describe()
        backend.prepare()
        backend.apply([KernelBlock(V4_A, FAR_FUTURE), KernelBlock(V6_A, time.time() + 99)], [V4_B])
        backend.apply(blocks(V4_B), [V4_A])
        self.expect(server_ns, V4_B, V6_A)
        backend.replace_all(blocks(V6_B))
        assert backend.installed() == {V6_B}
        backend.teardown()
        assert self.read_own_objects(server_ns) == []

    def test_the_kept_context_follows_the_threads_namespace(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        # The libnftables context is kept between calls (closing it is slow after a delete);
        # it must still act wherever the calling thread is now, and recover after a refusal.
        backend.apply(blocks(V4_A), [])
        with netns("imrk") as other:
            with other.entered():
                backend.prepare()
                backend.apply(blocks(V4_B), [])
                assert backend.installed() == {V4_B}
            backend.apply(blocks(V6_A), [V4_A])
            with other.entered():
                backend.apply(blocks(V6_B), [V4_B])
                assert backend.installed() == {V6_B}
            self.expect(server_ns, V6_A)
            self.expect(other, V6_B)
        server_ns.run("nft", "delete table inet imr")
        server_ns.run("nft", "add table inet imr; add set inet imr blocked_v4 { type ipv6_addr; }")
        with pytest.raises(BackendError):  # a set of imr's name but the wrong type
            backend.prepare()
        server_ns.run("nft", "delete table inet imr")
        backend.prepare()
        backend.apply(blocks(V4_B), [])
        self.expect(server_ns, V4_B)

    # -- replace_all's netlink batch ----------------------------------------------

    def test_the_netlink_batch_and_the_script_make_the_same_sets(
        self, server_ns: Netns, caplog: pytest.LogCaptureFixture
    ) -> None:
        now = time.time()
        wanted = [
            KernelBlock(V4_A, now + 3600),
            KernelBlock(V4_B, FAR_FUTURE),
            KernelBlock(V4_B, now + 60),  # the same address twice: the later expiry wins
            KernelBlock(V6_A, now + 86400 * 7),
            KernelBlock(V6_B, 1e300),  # beyond the kernel's range: no timeout at all
            # Networks: two adjacent ones (no end element between them), one starting at
            # zero (no zero end element first) and one reaching the top of the space (no end).
            KernelBlock(target("198.51.100.0/25"), now + 600),
            KernelBlock(target("198.51.100.128/25"), now + 1200),
            KernelBlock(target("203.0.113.0/24"), now + 1800),
            KernelBlock(target("::/16"), now + 2400),
            KernelBlock(target("2001:db8:5::/48"), now + 3000),
            KernelBlock(target("ff00::/8"), now + 3600),
        ]
        states = []
        for bulk in (True, False):
            backend = NftablesBackend(BackendConformance.default_config, bulk_netlink=bulk)
            backend.apply(blocks(V4_C, NET4_A), [])  # replaced: must go
            backend.replace_all(wanted)
            states.append(
                {
                    family: {
                        e["val"]: e.get("timeout")
                        for sets in (SETS, NET_SETS)
                        for e in elements(server_ns, family, sets)
                    }
                    for family in (4, 6)
                }
            )
            assert sorted(markers(server_ns)) == sorted(MARKERS)
            backend.teardown()
            backend.close()
        assert "loading the sets over netlink failed" not in caplog.text
        netlink, script = states
        assert netlink.keys() == script.keys()
        for family in netlink:
            assert netlink[family].keys() == script[family].keys()
            for value, timeout in netlink[family].items():
                # The two runs start a moment apart: a timeout may round a second apart.
                other = script[family][value]
                if timeout is None or other is None:
                    assert timeout is other, value
                else:
                    assert abs(timeout - other) <= 1, value
        assert (netlink[4][str(V4_B)] or 0) > 86400 * 365  # FAR_FUTURE, not now + 60
        assert netlink[6][str(V6_B)] is None
        assert netlink[6]["ff00::/8"] == pytest.approx(3600, abs=2)
        assert len(netlink[4]) == 2 + 3 and len(netlink[6]) == 2 + 3

    def test_a_refused_batch_changes_nothing_and_replace_all_falls_back(
        self,
        server_ns: Netns,
        backend: Backend,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        # A real refusal: the batch flushes blocked_v4 and fills it, but names a set that does
        # not exist. The kernel aborts the whole transaction: blocked_v4 keeps V4_A.
        v4 = nfnetlink.address_element(V4_B.packed, 60_000)
        with pytest.raises(nfnetlink.NetlinkWriteError, match="No such file or directory"):
            nfnetlink.replace_elements("inet", "imr", {"blocked_v4": [v4], "no_such_set": [v4]})
        self.expect(server_ns, V4_A, V6_A)
        # replace_all answers a failed batch with the nft script, and says so.
        real = nfnetlink.replace_elements

        def refuse(family: str, table: str, sets: Any) -> None:
            real(family, table, {**sets, "no_such_set": []})

        monkeypatch.setattr(nfnetlink, "replace_elements", refuse)
        backend.replace_all(blocks(V4_B, V6_B))
        self.expect(server_ns, V4_B, V6_B)
        assert sorted(markers(server_ns)) == sorted(MARKERS)
        assert "loading the sets over netlink failed (nf_tables batch: message" in caplog.text

    # -- apply's netlink batches ------------------------------------------------------

    def test_apply_over_netlink_and_the_script_make_the_same_sets(
        self, server_ns: Netns, caplog: pytest.LogCaptureFixture
    ) -> None:
        now = time.time()
        changes: list[tuple[list[KernelBlock], list[Target]]] = [
            ([KernelBlock(V4_A, now + 3600), KernelBlock(V6_A, now + 600)], [V4_C]),  # C absent
            ([KernelBlock(V4_A, now + 86400), KernelBlock(V4_B, FAR_FUTURE)], []),  # escalation
            ([KernelBlock(V6_B, 1e300), KernelBlock(V4_C, now - 5)], [V6_A]),  # no timeout; past
            ([KernelBlock(V6_A, now + 60)], [V4_B]),
        ]
        states = []
        for netlink in (True, False):
            backend = NftablesBackend(BackendConformance.default_config, element_netlink=netlink)
            backend.prepare()
            for add, remove in changes:
                backend.apply(add, remove)
            states.append(
                {e["val"]: e.get("timeout") for f in (4, 6) for e in elements(server_ns, f)}
            )
            assert sorted(markers(server_ns)) == sorted(MARKERS)
            backend.teardown()
            backend.close()
        assert "using nft" not in caplog.text  # the netlink path did every change
        over_netlink, by_script = states
        assert over_netlink.keys() == by_script.keys() == {str(V4_A), str(V6_A), str(V6_B)}
        assert over_netlink[str(V6_B)] is None and by_script[str(V6_B)] is None
        for value in (str(V4_A), str(V6_A)):
            mine, theirs = over_netlink[value], by_script[value]
            assert mine is not None and theirs is not None and abs(mine - theirs) <= 1, value
        assert over_netlink[str(V4_A)] == pytest.approx(86400, abs=2)

    def test_a_refused_netlink_change_falls_back_and_the_next_one_is_netlink_again(
        self, server_ns: Netns, backend: Backend, caplog: pytest.LogCaptureFixture
    ) -> None:
        backend.apply(blocks(V4_A), [])
        server_ns.run("nft", "delete", "table", "inet", "imr")  # so the batch fails: ENOENT
        caplog.set_level("INFO", logger="imr.backend")
        backend.apply(blocks(V6_A), [V4_A])  # the script rebuilds the table and applies
        assert "nftables change over netlink failed" in caplog.text
        self.expect(server_ns, V6_A)
        caplog.clear()
        backend.apply(blocks(V4_B), [V6_A])
        assert "over netlink failed" not in caplog.text
        self.expect(server_ns, V4_B)

    def test_a_refusal_before_the_last_message_is_heard_though_only_the_last_is_acked(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        writer = nfnetlink.ElementWriter("inet", "imr")
        v4 = nfnetlink.address_element(V4_B.packed, 60_000)
        steps: list[nfnetlink.Step] = [
            (nfnetlink.ADD, "no_such_set", [v4]),  # refused: the kernel aborts the batch
            (nfnetlink.ADD, "blocked_v4", [v4]),  # accepted: its ACK comes after the error
        ]
        with pytest.raises(nfnetlink.NetlinkWriteError, match="No such file or directory"):
            writer.commit(steps)
        self.expect(server_ns)  # nothing of the batch: V4_B is not in blocked_v4
        # The next batch hears its own answer (no error of the last one is left unread).
        writer.commit([(nfnetlink.ADD, "blocked_v4", [v4])])
        writer.commit(
            [(nfnetlink.ADD, "blocked_v6", [nfnetlink.address_element(V6_B.packed, None)])]
        )
        self.expect(server_ns, V4_B, V6_B)
        writer.close()


def test_a_batch_without_an_answer_fails_after_the_kernel_timeout() -> None:
    """The batch socket has no Python timeout (no poll per call): SO_RCVTIMEO's EAGAIN is
    the kernel's "no answer", and is a NetlinkWriteError like the old timeout."""
    quiet, _other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with quiet, _other:
        quiet.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, 50_000))
        started = time.monotonic()
        with pytest.raises(nfnetlink.NetlinkWriteError, match="no answer"):
            nfnetlink._await_acks(quiet, 1)
        assert time.monotonic() - started < 5
