"""The iptables backend in both flavours (run in throwaway namespaces), flavour detection
(with a fake command runner, no kernel) and the dry-run backend."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import imr.backends.iptables_drivers as drivers_module
import imr.backends.iptables_rules as rules_module
from imr.backends.base import Backend, BackendError, Drift, KernelBlock
from imr.backends.dryrun import DryRunBackend
from imr.backends.iptables import IptablesBackend
from imr.backends.xtables import detect_flavour, run_tool
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress, Target

from backend_conformance import (
    FAR_FUTURE,
    NET4_A,
    V4_A,
    V4_B,
    V4_C,
    V6_A,
    V6_B,
    BackendConformance,
    Damage,
    MakeBackend,
    blocks,
    expected_for,
    ip,
    target,
)
from netns import Netns, netns

CHAIN = "IMR"
JUMP = f"-A INPUT -j {CHAIN}"


class IptablesConformance(BackendConformance):
    """Read-back through the flavour's own command-line tools, not through the backend."""

    flavour: str  # "nft" or "legacy", forced: the test must not depend on detection

    def tool(self, family: int) -> str:
        return f"{'iptables' if family == 4 else 'ip6tables'}-{self.flavour}"

    def listing(self, ns: Netns, family: int, *chain: str) -> list[str]:
        lines = ns.run(self.tool(family), "-S", *chain).stdout.splitlines()
        return [line for line in lines if not line.startswith("#")]  # "# Warning: ..." notes

    @staticmethod
    def is_own(line: str) -> bool:
        return line == f"-N {CHAIN}" or line.startswith(f"-A {CHAIN} ") or line == JUMP

    # -- hooks ------------------------------------------------------------------

    def read_blocked(self, ns: Netns, family: int) -> list[Target]:
        found = []
        for line in self.listing(ns, family):
            if line.startswith(f"-A {CHAIN} ") and " -s " in line:  # not the conntrack guard
                words = line.split()
                found.append(target(words[words.index("-s") + 1]))
        return found

    def read_hook_positions(self, ns: Netns, family: int) -> list[int]:
        rules = [line for line in self.listing(ns, family, "INPUT") if line.startswith("-A ")]
        return [position for position, line in enumerate(rules, 1) if line == JUMP]

    def read_own_objects(self, ns: Netns) -> list[str]:
        return [
            f"IPv{family} {line}"
            for family in (4, 6)
            for line in self.listing(ns, family)
            if self.is_own(line)
        ]

    def add_foreign_objects(self, ns: Netns) -> None:
        for family, source in ((4, "198.51.100.200"), (6, "2001:db8:200::200")):
            tool = self.tool(family)
            ns.run(tool, "-A", "INPUT", "-s", source, "-j", "ACCEPT")
            ns.run(tool, "-N", "FOREIGN")
            ns.run(tool, "-A", "FOREIGN", "-s", source, "-p", "tcp", "--dport", "22", "-j", "DROP")
            ns.run(tool, "-A", "INPUT", "-j", "FOREIGN")
            ns.run(
                *(tool, "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"),
                *("-m", "comment", "--comment", "someone else's rule", "-j", "ACCEPT"),
            )
            ns.run(tool, "-A", "OUTPUT", "-d", source, "-j", "ACCEPT")

    def read_foreign_objects(self, ns: Netns) -> list[str]:
        return [
            f"IPv{family} {line}"
            for family in (4, 6)
            for line in self.listing(ns, family)
            if not self.is_own(line)
        ]

    def add_block_directly(self, ns: Netns, address: IPAddress) -> None:
        reject = "icmp-host-unreachable" if address.version == 4 else "icmp6-addr-unreachable"
        ns.run(
            self.tool(address.version),
            *("-A", CHAIN, "-s", str(address), "-p", "tcp", "-m", "multiport"),
            *("--dports", "443", "-j", "REJECT", "--reject-with", reject),
        )

    def damage(self, ns: Netns, how: Damage) -> None:
        if how == "flush":
            ns.run(self.tool(4), "-F", CHAIN)
            return
        for family in (4, 6):
            ns.run(self.tool(family), "-D", "INPUT", "-j", CHAIN)
            if how == "delete":
                ns.run(self.tool(family), "-F", CHAIN)
                ns.run(self.tool(family), "-X", CHAIN)

    # -- fixtures ---------------------------------------------------------------

    @pytest.fixture
    def make_backend(self) -> MakeBackend:
        def make(config: FirewallConfig) -> Backend:
            return IptablesBackend(config, self.flavour)

        return make

    # -- iptables specifics -----------------------------------------------------

    @pytest.mark.parametrize(
        ("config", "matches", "rejects"),
        [
            (
                FirewallConfig(ports=["80", "25", "110"]),
                "-p tcp -m multiport --dports 80,25,110",
                ("icmp-host-unreachable", "icmp6-addr-unreachable"),
            ),
            (
                FirewallConfig(protocol="udp", ports=["053", "8000:8080", "9:9"]),
                "-p udp -m multiport --dports 53,8000:8080,9",
                ("icmp-host-unreachable", "icmp6-addr-unreachable"),
            ),
            (
                FirewallConfig(reject_with_ipv4="tcp-reset", reject_with_ipv6="tcp-reset"),
                "-p tcp -m multiport --dports 80,443",  # the default ports: the web ports
                ("tcp-reset", "tcp-reset"),
            ),
            (
                FirewallConfig(ports=[]),
                "-p tcp",  # every port
                ("icmp-host-unreachable", "icmp6-addr-unreachable"),
            ),
            (
                FirewallConfig(protocol="all"),
                "",
                ("icmp-host-unreachable", "icmp6-addr-unreachable"),
            ),
        ],
        ids=["tcp-ports", "udp-ranges", "tcp-default-ports", "tcp-all-ports", "all-protocols"],
    )
    def test_rule_shape(
        self,
        server_ns: Netns,
        make_backend: MakeBackend,
        config: FirewallConfig,
        matches: str,
        rejects: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        backend = make_backend(config)
        backend.prepare()
        backend.apply(blocks(V4_A, V6_A), [])
        for family, source, reject in (
            (4, f"{V4_A}/32", rejects[0]),
            (6, f"{V6_A}/128", rejects[1]),
        ):
            rule = " ".join(
                part for part in (f"-A {CHAIN} -s {source}", matches, "-j REJECT") if part
            )
            assert self.listing(server_ns, family, CHAIN) == [
                f"-N {CHAIN}",
                f"-A {CHAIN} -m conntrack ! --ctstate NEW -j RETURN",  # new connections only
                f"{rule} --reject-with {reject}",
            ]
        # The kernel's form equals the backend's, so a second apply plans no rewrite.
        plans: list[rules_module._Plan[object]] = []

        def recording_plan(*args: Any) -> rules_module._Plan[object]:
            plans.append(real_plan(*args))
            return plans[-1]

        real_plan = rules_module._plan
        monkeypatch.setattr(drivers_module, "_plan", recording_plan)
        backend.apply(blocks(V4_A, V6_A), [])
        assert len(plans) == 2
        assert all(not plan.delete and not plan.append for plan in plans)

    def test_changed_ports_rewrite_the_rule_once(
        self, server_ns: Netns, make_backend: MakeBackend
    ) -> None:
        old = make_backend(FirewallConfig(ports=["80"]))
        old.prepare()
        old.apply(blocks(V4_A, V6_A), [])
        new = make_backend(FirewallConfig(ports=["443"]))
        new.apply(blocks(V4_A, V6_A), [])
        new.apply(blocks(V4_A, V6_A), [])
        for family, address in ((4, V4_A), (6, V6_A)):
            rules = [line for line in self.listing(server_ns, family, CHAIN) if " -s " in line]
            assert len(rules) == 1
            assert f"-s {address}/" in rules[0]
            assert "--dports 443 " in rules[0]

    def test_a_change_is_one_process_and_survives_edits_behind_its_back(
        self, server_ns: Netns, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After a change, the next one makes one restore and reads nothing (a read costs a
        process and, with 500 rules, most of a change). A rule someone deleted meanwhile
        makes that batch fail whole; the chain is then read and the change made."""
        backend.apply(blocks(V4_A, V4_B), [])
        calls: list[str] = []
        real_run = run_tool

        def counting_run(argv: Sequence[str], *args: Any) -> subprocess.CompletedProcess[str]:
            calls.append(" ".join(argv))
            return real_run(argv, *args)

        monkeypatch.setattr(drivers_module, "run_tool", counting_run)
        backend.apply(blocks(V4_C), [V4_A])
        assert len(calls) == 1 and "-restore" in calls[0], calls
        self.expect(server_ns, V4_B, V4_C)
        server_ns.run(self.tool(4), "-D", CHAIN, "2")  # V4_B's rule, behind the backend's back
        backend.apply(blocks(V4_A), [V4_B, V4_C])
        self.expect(server_ns, V4_A)

    def test_apply_recreates_a_chain_someone_deleted(
        self, server_ns: Netns, backend: Backend
    ) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        for family in (4, 6):
            for argv in (("-D", "INPUT", "-j", CHAIN), ("-F", CHAIN), ("-X", CHAIN)):
                server_ns.run(self.tool(family), *argv)
        assert backend.installed() == set()
        backend.apply([], [V4_A, V6_A])  # nothing to remove: creates nothing either
        assert self.read_own_objects(server_ns) == []
        backend.apply(blocks(V4_B, V6_B), [])
        self.expect(server_ns, V4_B, V6_B)
        for family in (4, 6):
            assert self.read_hook_positions(server_ns, family) == [1]

    def test_prepare_removes_a_duplicated_jump(self, server_ns: Netns, backend: Backend) -> None:
        for family, source in ((4, "198.51.100.200"), (6, "2001:db8:200::200")):
            server_ns.run(self.tool(family), "-A", "INPUT", "-s", source, "-j", "ACCEPT")
            server_ns.run(self.tool(family), "-A", "INPUT", "-j", CHAIN)
            assert self.read_hook_positions(server_ns, family) == [1, 3]
        backend.prepare()
        for family in (4, 6):
            assert self.read_hook_positions(server_ns, family) == [1]
            assert len(self.listing(server_ns, family, "INPUT")) == 3  # policy, jump, ACCEPT

    def test_a_failed_family_undoes_the_other(
        self, server_ns: Netns, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        assert isinstance(backend, IptablesBackend)
        backend.apply(blocks(V4_A), [])
        driver = backend._driver
        real_apply = driver.apply

        def ipv6_fails(
            family: int, add: Sequence[IPAddress], remove: Sequence[IPAddress]
        ) -> rules_module._Change:
            if family == 6:
                raise BackendError("injected IPv6 failure")
            return real_apply(4, add, remove)

        monkeypatch.setattr(driver, "apply", ipv6_fails)
        with pytest.raises(BackendError, match="injected"):
            backend.apply(blocks(V4_B, V6_A), [V4_A])
        monkeypatch.undo()
        self.expect(server_ns, V4_A)

    def test_kernel_refusal_becomes_backend_error(self, server_ns: Netns, backend: Backend) -> None:
        # Someone else jumps to imr's chain: the kernel refuses to delete a chain in use.
        server_ns.run(self.tool(4), "-A", "FORWARD", "-j", CHAIN)
        with pytest.raises(BackendError) as caught:
            backend.teardown()
        message = str(caught.value)
        assert self.tool(4).split("-")[0] in message  # names the tool it came from
        assert "Traceback" not in message
        assert len(message) < 600
        assert self.read_hook_positions(server_ns, 4) == [1]  # nothing half-done


class TestNftFlavour(IptablesConformance):
    flavour = "nft"

    def test_describe(self, server_ns: Netns, backend: Backend) -> None:
        assert backend.describe() == "iptables (nf_tables flavour: set by the caller)"

    def test_legacy_tables_stay_untouched(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            assert CHAIN not in server_ns.run(tool, "-S").stdout


class TestLegacyFlavour(IptablesConformance):
    flavour = "legacy"

    @pytest.fixture(autouse=True)
    def _needs_python_iptables(self) -> None:
        pytest.importorskip("iptc")

    def test_describe(self, server_ns: Netns, backend: Backend) -> None:
        assert backend.describe() == "iptables (legacy flavour: set by the caller)"

    def test_nft_tables_stay_untouched(self, server_ns: Netns, backend: Backend) -> None:
        backend.apply(blocks(V4_A, V6_A), [])
        for tool in ("iptables-nft", "ip6tables-nft"):
            assert CHAIN not in server_ns.run(tool, "-S").stdout

    def test_waits_for_the_xtables_lock_then_gives_up(
        self,
        server_ns: Netns,
        make_backend: MakeBackend,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        lock_file = tmp_path / "xtables.lock"
        monkeypatch.setenv("XTABLES_LOCKFILE", str(lock_file))
        monkeypatch.setattr(drivers_module, "XTABLES_LOCK_WAIT", 0.3)
        backend = make_backend(self.default_config)
        with open(lock_file, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another iptables command is running
            with pytest.raises(BackendError, match="xtables lock"):
                backend.prepare()
        backend.prepare()  # released: goes through
        assert self.read_hook_positions(server_ns, 4) == [1]


# ---------------------------------------------------------------------------
# Detection against the real tools, inside a namespace


@pytest.fixture
def inside_netns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with netns("imrd") as ns, ns.entered():
        yield ns


def test_auto_detection_on_a_fresh_host_follows_iptables_v(inside_netns: Netns) -> None:
    version = subprocess.run(["iptables", "-V"], capture_output=True, text=True, check=True)
    expected = "nf_tables" if "(nf_tables)" in version.stdout else "legacy"
    backend = IptablesBackend(FirewallConfig(), "auto")
    assert backend.describe() == (
        f"iptables ({expected} flavour: auto-detected, iptables -V says {expected})"
    )


def test_auto_detection_stays_with_the_flavour_that_has_the_chain(inside_netns: Netns) -> None:
    pytest.importorskip("iptc")
    # Make legacy the minority (the nft side gets more rules) so only the chain decides.
    for n in range(3):
        inside_netns.run(
            "iptables-nft", "-A", "OUTPUT", "-d", f"198.51.100.{n + 1}", "-j", "ACCEPT"
        )
    IptablesBackend(FirewallConfig(), "legacy").prepare()
    backend = IptablesBackend(FirewallConfig(), "auto")
    assert backend.flavour == "legacy"
    assert "chain IMR already exists in the legacy tables" in backend.describe()


def test_unknown_flavour_is_refused() -> None:
    with pytest.raises(BackendError, match="expected auto, nft or legacy"):
        IptablesBackend(FirewallConfig(), "ebtables")


# ---------------------------------------------------------------------------
# Detection logic with a fake runner: no kernel, no tools


def save_output(rules: int, chain: str | None = None, table: str = "filter") -> str:
    lines = [f"*{table}", ":INPUT ACCEPT [0:0]"]
    if chain:
        lines.append(f":{chain} - [0:0]")
    lines += [f"-A INPUT -s 192.0.2.{n + 1}/32 -j ACCEPT" for n in range(rules)]
    return "\n".join([*lines, "COMMIT", ""])


class FakeRun:
    """Answers commands from a table; a command not in it is a missing tool."""

    def __init__(self, outputs: dict[str, str | int]) -> None:
        self.outputs = outputs  # command line -> stdout, or a non-zero exit code
        self.calls: list[str] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        command = " ".join(argv)
        self.calls.append(command)
        if command not in self.outputs:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        output = self.outputs[command]
        if isinstance(output, int):
            return subprocess.CompletedProcess(list(argv), output, "", "it broke")
        return subprocess.CompletedProcess(list(argv), 0, output, "")


def fake(
    nft_v4: str | int = "",
    legacy_v4: str | int = "",
    version: str | None = "iptables v1.8.9 (nf_tables)",
    nft_v6: str | int = "",
    legacy_v6: str | int = "",
) -> FakeRun:
    outputs: dict[str, str | int] = {
        "iptables-nft-save": nft_v4,
        "ip6tables-nft-save": nft_v6,
        "iptables-legacy-save": legacy_v4,
        "ip6tables-legacy-save": legacy_v6,
    }
    if version is not None:
        outputs["iptables -V"] = version
    return FakeRun(outputs)


def test_detect_chain_in_legacy_only_wins_over_rule_counts() -> None:
    run = fake(nft_v4=save_output(50), legacy_v4=save_output(0, chain="IMR"))
    assert detect_flavour(run) == ("legacy", "chain IMR already exists in the legacy tables")


def test_detect_chain_in_nft_only_wins_over_rule_counts() -> None:
    run = fake(nft_v6=save_output(0, chain="IMR"), legacy_v4=save_output(50))
    assert detect_flavour(run) == ("nft", "chain IMR already exists in the nf_tables tables")


def test_detect_uses_the_configured_chain_name() -> None:
    run = fake(nft_v4=save_output(5, chain="IMR"), legacy_v4=save_output(0, chain="BLOCKS"))
    assert detect_flavour(run, chain="BLOCKS")[0] == "legacy"


def test_detect_chain_in_another_table_does_not_count() -> None:
    run = fake(nft_v4=save_output(0, chain="IMR", table="nat"), legacy_v4=save_output(2))
    assert detect_flavour(run) == ("legacy", "nf_tables holds 0 rules, legacy 2")


def test_detect_chain_in_both_falls_back_to_rule_counts() -> None:
    run = fake(nft_v4=save_output(3, chain="IMR"), legacy_v4=save_output(1, chain="IMR"))
    assert detect_flavour(run) == ("nft", "nf_tables holds 3 rules, legacy 1")


def test_detect_more_legacy_rules_means_legacy() -> None:
    run = fake(nft_v4=save_output(1), legacy_v4=save_output(2), legacy_v6=save_output(2))
    assert detect_flavour(run) == ("legacy", "nf_tables holds 1 rules, legacy 4")


def test_detect_more_nft_rules_means_nft() -> None:
    run = fake(nft_v4=save_output(7), legacy_v4=save_output(2), version="iptables v1.8.9 (legacy)")
    assert detect_flavour(run) == ("nft", "nf_tables holds 7 rules, legacy 2")


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("iptables v1.8.9 (nf_tables)\n", ("nft", "iptables -V says nf_tables")),
        ("iptables v1.8.9 (legacy)\n", ("legacy", "iptables -V says legacy")),
    ],
)
def test_detect_tie_asks_iptables_v(version: str, expected: tuple[str, str]) -> None:
    run = fake(nft_v4=save_output(2), legacy_v4=save_output(2), version=version)
    assert detect_flavour(run) == expected
    assert run.calls[-1] == "iptables -V"


def test_detect_tie_without_iptables_binary_is_an_error() -> None:
    with pytest.raises(BackendError, match=r"'iptables' not found.*apt-get install iptables"):
        detect_flavour(fake(version=None))


def test_detect_tie_with_unknown_version_text_is_an_error() -> None:
    with pytest.raises(BackendError, match="iptables_flavour"):
        detect_flavour(fake(version="iptables v1.4.21"))


def test_detect_without_any_tools_names_the_package() -> None:
    with pytest.raises(BackendError, match=r"apt-get install iptables"):
        detect_flavour(FakeRun({}))


def test_detect_with_only_one_flavour_installed() -> None:
    run = FakeRun({"iptables-nft-save": "", "ip6tables-nft-save": ""})
    assert detect_flavour(run) == ("nft", "only the nf_tables tools are installed")


def test_detect_a_failing_save_tool_counts_as_empty() -> None:
    run = fake(nft_v4=save_output(1), legacy_v4=1, legacy_v6=1)
    assert detect_flavour(run) == ("nft", "nf_tables holds 1 rules, legacy 0")


# ---------------------------------------------------------------------------
# Dry run: the same contract, in memory, without root


def test_dryrun_keeps_the_set_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    backend = DryRunBackend(FirewallConfig(chain="BLOCKS"))
    caplog.set_level(logging.INFO, logger="imr.backend")
    backend.prepare()
    backend.apply(blocks(V4_A, V6_A), [])
    backend.apply(blocks(V4_A, V4_A), [ip("203.0.113.250")])  # no duplicate, absent is fine
    assert backend.installed() == {V4_A, V6_A}
    backend.apply(blocks(V4_B), [V4_A, V6_B])
    assert backend.installed() == {V4_B, V6_A}
    messages = [record.getMessage() for record in caplog.records]
    assert "dryrun: would create chain BLOCKS and jump to it from INPUT" in messages
    assert f"dryrun: would block {V4_A} until 2100-01-01 00:00:00Z" in messages
    assert f"dryrun: would unblock {V4_A}" in messages
    assert sum(f"block {V4_A} " in message for message in messages) == 1
    assert all(record.name == "imr.backend" for record in caplog.records)


def test_dryrun_replace_all_and_teardown() -> None:
    backend = DryRunBackend()
    backend.apply([KernelBlock(V4_A, FAR_FUTURE)], [])
    backend.replace_all(blocks(V4_B, V6_B))
    assert backend.installed() == {V4_B, V6_B}
    backend.apply(blocks(V4_A), [V4_A])  # in both lists: ends up blocked, like iptables
    assert V4_A in backend.installed()
    backend.teardown()
    assert backend.installed() == set()
    assert backend.describe().startswith("dryrun")
    assert backend.name == "dryrun"


def test_dryrun_check_compares_its_counts() -> None:
    backend = DryRunBackend()
    wanted = blocks(V4_A, V6_A, NET4_A)
    backend.apply(wanted, [])
    assert backend.check(expected_for(wanted)) == Drift()
    backend.apply([], [NET4_A])
    assert backend.check(expected_for(wanted)).entries == (
        "dryrun net4 entries holds 0 entries, expected 1",
    )
