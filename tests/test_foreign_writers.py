"""Foreign writers: other programs change the firewall while imr works, in the same namespace.

While the real daemon blocks and unblocks addresses for real clients, another
process (tests/foreign_writer.py) adds and deletes its own iptables rules (in
INPUT and in its own chain), its own nftables table contents and its own ipset
entries. None of the foreign objects may be removed or rewritten by imr (each
foreign delete must find its rule, and the listings of the foreign objects are
the same before and after); imr's kernel state must hold exactly its active
blocks; and after a foreign flush of everything, imr's drift check restores
its own state.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from test_drift import REPAIR_WAIT, start

from daemon_harness import (
    ATTACKER_V4,
    BLOCKER,
    PYTHON,
    SERVER_V4,
    TESTS,
    Daemon,
    daemon_world,
)
from netns import Netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]

ROUNDS = 25
ADDRESSES = [f"203.0.113.{n}" for n in range(10, 34)]  # the imr work, beside the attacker's


def add_persistent_foreign_objects(ns: Netns) -> None:
    """What another program keeps in place for the whole test."""
    for tool, source in (("iptables-nft", "198.51.100.200"), ("ip6tables-nft", "2001:db8:200::1")):
        ns.run(tool, "-A", "INPUT", "-s", source, "-j", "ACCEPT")
        ns.run(tool, "-N", "FOREIGN")
        ns.run(tool, "-A", "FOREIGN", "-s", source, "-p", "tcp", "--dport", "22", "-j", "DROP")
        ns.run(tool, "-A", "INPUT", "-j", "FOREIGN")
        ns.run(tool, "-A", "OUTPUT", "-d", source, "-j", "ACCEPT")
    ns.run(
        "nft",
        "-f",
        "-",
        input="""
        table inet foreign {
            set watch { type ipv4_addr; elements = { 198.51.100.250 } }
            chain input {
                type filter hook input priority 0; policy accept;
                ip saddr @watch tcp dport 22 drop
                ip saddr 198.51.100.251 counter accept comment "someone else's rule"
            }
        }
        """,
    )
    ns.run("ipset", "create", "foreign4", "hash:ip")
    ns.run("ipset", "add", "foreign4", "198.51.100.240")


def foreign_listing(ns: Netns) -> list[str]:
    """Every foreign object, in a form that changes if anything of it is rewritten (nftables
    handles included: a rule deleted and re-added gets a new one)."""
    lines = []
    for tool in ("iptables-nft", "ip6tables-nft"):
        for line in ns.run(tool, "-S").stdout.splitlines():
            if not (line == "-N IMR" or line.startswith("-A IMR ") or line == "-A INPUT -j IMR"):
                lines.append(f"{tool} {line}")
    table = json.loads(ns.run("nft", "-a", "-j", "list", "table", "inet", "foreign").stdout)
    lines += [json.dumps(item) for item in table["nftables"] if "metainfo" not in item]
    ipset = ns.run("ipset", "list", "foreign4").stdout.splitlines()
    lines += [line for line in ipset if not line.startswith("Size in memory")]
    return lines


def imr_blocks_v4(world: Daemon, backend: str) -> set[str]:
    """The IPv4 addresses imr's own kernel objects block, read with the ordinary tools."""
    ns = world.server
    if backend == "nftables":
        result = ns.run("nft", "-j", "list", "set", "inet", "imr", "blocked_v4", check=False)
        if result.returncode != 0:
            return set()
        (item,) = [i for i in json.loads(result.stdout)["nftables"] if "set" in i]
        found = {
            e["elem"]["val"] if isinstance(e, dict) else e for e in item["set"].get("elem", [])
        }
        return found - {"255.255.255.255"}  # the drift check's marker
    if backend == "ipset":
        result = ns.run("ipset", "list", "imr4", check=False)
        lines = result.stdout.splitlines()
        if "Members:" not in lines:
            return set()
        hooked = "-A INPUT -j IMR" in ns.run("iptables-nft", "-S", "INPUT").stdout
        members = {line.split()[0] for line in lines[lines.index("Members:") + 1 :] if line}
        return members if hooked else set()
    if "-A INPUT -j IMR" not in ns.run("iptables-nft", "-S", "INPUT").stdout:
        return set()
    listing = ns.run("iptables-nft", "-S", "IMR", check=False).stdout.splitlines()
    return {
        line.split()[3].removesuffix("/32")
        for line in listing
        if line.startswith("-A IMR -s ")  # not the conntrack guard
    }


def active_v4(world: Daemon) -> set[str]:
    rows = world.state_rows("SELECT ip FROM blocks WHERE lifted_at IS NULL")
    return {str(ip) for (ip,) in rows if ":" not in str(ip)}


@pytest.mark.parametrize("backend", ["nftables", "iptables", "ipset"])
def test_foreign_writers_are_left_alone_and_imr_survives_a_foreign_flush(backend: str) -> None:
    with daemon_world() as world:
        add_persistent_foreign_objects(world.server)
        before = foreign_listing(world.server)
        start(world, backend)
        world.listen(80)
        assert foreign_listing(world.server) == before, "changed by the daemon's start"

        writer = subprocess.Popen(
            world.server.argv(PYTHON, str(TESTS / "foreign_writer.py"), str(ROUNDS)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            result = world.as_user(BLOCKER, "block", ATTACKER_V4)
            assert result.returncode == 0, result.stderr
            for n, address in enumerate(ADDRESSES):
                result = world.as_user(BLOCKER, "block", address, "--reason", "foreign test")
                assert result.returncode == 0, result.stderr
                if n % 3 == 2:  # and an admin lifts some again
                    lifted = world.as_root("unblock", ADDRESSES[n - 1])
                    assert lifted.returncode == 0, lifted.stderr
            out, err = writer.communicate(timeout=90)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(5)
        assert writer.returncode == 0, err  # every foreign delete found its own rule
        assert out.strip() == f"done {ROUNDS}"

        assert foreign_listing(world.server) == before
        expected = {ATTACKER_V4, *ADDRESSES} - {ADDRESSES[n - 1] for n in range(2, 24, 3)}
        assert active_v4(world) == expected
        assert imr_blocks_v4(world, backend) == expected
        assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"

        # Someone flushes everything; imr's drift check puts its own state back.
        repairs = world.log_file.read_text().count("drift repaired")
        if backend == "nftables":
            world.server.run("nft", "flush", "ruleset")
        else:
            world.server.run("iptables-nft", "-F")
            world.server.run("ipset", "flush")
        # Not read back empty here: the 1 s drift check may have repaired it already. The
        # log's new "drift repaired" line below shows that the flush hit imr's objects.
        assert world.wait_for(lambda: imr_blocks_v4(world, backend) == expected, REPAIR_WAIT), (
            world.log_file.read_text()[-2000:]
        )
        assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
        assert world.log_file.read_text().count("drift repaired") > repairs
