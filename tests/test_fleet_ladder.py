"""One ladder for the fleet with per-prefix escalation on (issues #14 and #16), and the
admin key's lifts, with real daemons: four members (a, b, c and the admin member ops),
each in its own namespace with its own state file and nftables table, one real
redis-server (ACLs, TLS) in a hub namespace, and a fifth configured member, x, that runs
no daemon: the test writes its stream, as a compromised web host would.

Topology (documentation addresses only): hub 192.0.2.(16i+1) <-> member i 192.0.2.(16i+2)
over /28 links. The attacker holds 198.51.100.66 (inside the network a escalates) and
reaches b's 203.0.113.1 over a point-to-point link; an innocent client (192.0.2.98) reaches
b too. The admins' network 192.0.2.224/27 is in every member's allowlist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis import Redis
from test_fleet import wait

from imr.fleet import events

from daemon_harness import BLOCKER, READER, Daemon, require_unprivileged_access
from fleet_harness import (
    RedisServer,
    fleet_hub,
    fleet_section,
    hub_address,
    member_address,
    write_member_config,
)
from netns import Netns, connect

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
    pytest.mark.usefixtures("test_users"),
]

DAEMONS = ("a", "b", "c", "ops")
MEMBERS = (*DAEMONS, "x")  # x: configured, no daemon (the test writes its stream)
HUBS = [hub_address(i) for i in range(len(DAEMONS))]
ATTACKER, B_ATTACKER_SIDE = "198.51.100.66", "203.0.113.1"
INNOCENT, B_INNOCENT_SIDE = "192.0.2.98", "192.0.2.97"
ADMINS = "192.0.2.224/27"  # the admins' network: allowlisted everywhere
NET = "198.51.100.0/24"  # what a escalates to (8 addresses of a /24: the default level)
NEVER = "2001:db8:cd::/48"  # escalation.never_aggregate


@dataclass
class Fleet:
    hub: Netns
    redis: RedisServer
    root: Path
    daemons: dict[str, Daemon]
    attacker: Netns
    innocent: Netns
    port: int

    def kernel(self, name: str, family: int = 4) -> set[str]:
        """The addresses in member `name`'s nftables address set, read back."""
        return self._elements(name, f"blocked_v{family}")

    def networks(self, name: str, family: int = 4) -> set[str]:
        """The networks in member `name`'s nftables interval set, read back."""
        return self._elements(name, f"blocked_net_v{family}")

    def _elements(self, name: str, kernel_set: str) -> set[str]:
        out = self.daemons[name].server.run("nft", "-j", "list", "set", "inet", "imr", kernel_set)
        found: set[str] = set()
        for item in json.loads(out.stdout)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                value = elem["elem"]["val"] if isinstance(elem, dict) else elem
                if isinstance(value, dict) and "prefix" in value:
                    value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
                found.add(str(value))
        return found

    def status(self, name: str) -> dict[str, Any]:
        result = self.daemons[name].as_root("fleet", "status", "--json")
        assert result.returncode == 0, result.stderr
        found: dict[str, Any] = json.loads(result.stdout)
        return found

    def refused(self, name: str) -> dict[str, int]:
        return dict(self.status(name)["refused"])

    def rows(self, name: str, query: str) -> list[tuple[object, ...]]:
        return self.daemons[name].state_rows(query)

    def active(self, name: str, ip: str) -> list[tuple[object, ...]]:
        query = (
            "SELECT origin, source, rung, expires_at FROM blocks"  # noqa: S608
            f" WHERE ip = '{ip}' AND lifted_at IS NULL"
        )
        return self.rows(name, query)


def member_config(daemon: Daemon, fleet_text: str) -> None:
    write_member_config(
        daemon,
        f"""
[policy]
ladder = ["1h", "1d"]
repeat_window = "1d"

[quota]
blocks_per_minute = 0

# Per-prefix escalation on, with its default levels (8 addresses of a /24, 3 of a /64).
[escalation]
enabled = true
never_aggregate = ["{NEVER}"]

[access.users]
"{BLOCKER}" = "block"
"{READER}" = "read"

[protect]
allowlist = ["{ADMINS}"]

{fleet_text}
""",
        # The drift check every second: kernel and state must agree throughout (no_drift).
        firewall="drift_interval = 1",
    )


@pytest.fixture(scope="module")
def fleet(test_users: None) -> Iterator[Fleet]:
    require_unprivileged_access()
    with fleet_hub("fld", DAEMONS, MEMBERS, HUBS) as hub:
        attacker, innocent = hub.netns("fldatk"), hub.netns("fldinn")
        addresses = {name: [member_address(i)] for i, name in enumerate(DAEMONS)}
        addresses["b"] += [B_ATTACKER_SIDE, B_INNOCENT_SIDE]
        for name, ns in hub.members.items():
            hub.daemons[name] = Daemon(ns, attacker, innocent, hub.root / name)
            text = fleet_section(
                name, hub.url(name), hub.root, hub.publics, addresses, ("ops",), "", hub.server.ca
            )
            member_config(hub.daemons[name], text)
        b = hub.daemons["b"]
        # Point to point: b's side is outside the network the attacker's address is in.
        connect(b.server, attacker, [f"{B_ATTACKER_SIDE}/32"], [f"{ATTACKER}/32"])
        b.server.run("ip", "route", "add", NET, "dev", _device(b.server, B_ATTACKER_SIDE))
        attacker.run("ip", "route", "add", B_ATTACKER_SIDE, "dev", _device(attacker, ATTACKER))
        connect(b.server, innocent, [f"{B_INNOCENT_SIDE}/28"], [f"{INNOCENT}/28"])
        b.server.run("sysctl", "-qw", "net.ipv4.icmp_ratelimit=0")
        for daemon in hub.daemons.values():
            result = daemon.start()
            assert result.returncode == 0, result.stderr
        b.listen(80)
        world = Fleet(hub.ns, hub.server, hub.root, hub.daemons, attacker, innocent, hub.port)
        assert wait(lambda: all(world.status(n)["follower_connected"] for n in DAEMONS))
        yield world


def _device(ns: Netns, address: str) -> str:
    out = ns.run("ip", "-j", "addr", "show", "to", address).stdout
    return str(json.loads(out)[0]["ifname"])


def test_an_escalation_is_one_network_block_in_every_kernel(fleet: Fleet) -> None:
    a, b, ops = fleet.daemons["a"], fleet.daemons["b"], fleet.daemons["ops"]
    assert b.probe(fleet.attacker, B_ATTACKER_SIDE, 80) == "connected"
    wanted = [f"198.51.100.{n}" for n in range(10, 18)]
    result = a.as_user(BLOCKER, "block", *wanted, "--reason", "rotating scanner")
    assert result.returncode == 0, result.stderr
    assert NET in fleet.networks("a")
    assert wait(lambda: all(NET in fleet.networks(n) for n in ("b", "c", "ops")), 10)
    # b's row: a's escalation, on the prefix ladder's first rung.
    assert [r[:3] for r in fleet.active("b", NET)] == [("a", "imr:escalation", 1)]
    assert fleet.active("b", NET)[0][3] == fleet.active("a", NET)[0][3]
    # An address of the network that nobody blocked: refused by b's kernel.
    assert b.probe(fleet.attacker, B_ATTACKER_SIDE, 80) in ("EHOSTUNREACH", "ECONNREFUSED")
    assert b.probe(fleet.innocent, B_INNOCENT_SIDE, 80) == "connected"
    # The addresses keep their rows, but the network holds them out of every kernel,
    # and one blocked under the network later never goes in.
    later = "198.51.100.20"
    assert a.as_user(BLOCKER, "block", later).returncode == 0
    assert wait(lambda: fleet.active("b", later) != [], 10)
    for name in ("a", "b", "c"):
        assert fleet.kernel(name) & {*wanted, later} == set(), name
        assert len(fleet.rows(name, f"SELECT 1 FROM blocks WHERE ip = '{wanted[0]}'")) == 1  # noqa: S608
    # Nobody escalated it twice (b and c counted a's addresses, and saw the network first).
    assert fleet.rows("b", f"SELECT COUNT(*) FROM blocks WHERE ip = '{NET}'") == [(1,)]  # noqa: S608
    # b restarts: the network in its kernel, the addresses still held out.
    assert b.stop().returncode == 0
    assert b.start().returncode == 0
    assert NET in fleet.networks("b") and fleet.kernel("b") & {*wanted, later} == set()
    assert wait(lambda: fleet.status("b")["follower_connected"], 10)
    # The admin member lifts the network: gone from every kernel, the addresses back in.
    result = ops.as_root("unblock", NET, "--reason", "shared hosting")
    assert result.returncode == 0, result.stderr
    everywhere = ("a", "b", "c", "ops")
    assert wait(lambda: all(NET not in fleet.networks(n) for n in everywhere), 10)
    assert wait(lambda: all({*wanted, later} <= fleet.kernel(n) for n in ("a", "b", "c")), 10)
    lifted = f"SELECT lifted_by FROM blocks WHERE ip = '{NET}'"  # noqa: S608
    assert fleet.rows("b", lifted) == [("fleet:ops",)]
    assert fleet.rows("a", lifted) == [("fleet:ops",)]
    assert b.probe(fleet.attacker, B_ATTACKER_SIDE, 80) == "connected"
    no_drift(fleet)


def no_drift(fleet: Fleet) -> None:
    """Every member's drift check (every second) found its kernel as its state says."""
    time.sleep(1.5)
    for name, daemon in fleet.daemons.items():
        assert "drift in" not in daemon.log_file.read_text(), name


def test_two_members_escalating_one_network_at_once_converge(fleet: Fleet) -> None:
    """a and b each block three addresses of one /64 at the same moment: whoever escalates
    (one, or both), every member ends with one network block of the same rung and expiry,
    in its kernel."""
    net = "2001:db8:77::/64"
    argv = {
        "a": ("block", "2001:db8:77::a1", "2001:db8:77::a2", "2001:db8:77::a3"),
        "b": ("block", "2001:db8:77::b1", "2001:db8:77::b2", "2001:db8:77::b3"),
    }
    runs = [
        subprocess.Popen(fleet.daemons[n].imr_argv(*argv[n]), stdout=subprocess.PIPE) for n in argv
    ]
    assert [run.wait(30) for run in runs] == [0, 0]
    everywhere = ("a", "b", "c", "ops")

    def same() -> bool:
        rows = [[r[2:] for r in fleet.active(n, net)] for n in everywhere]
        return len(rows[0]) == 1 and all(r == rows[0] for r in rows)

    assert wait(same, 10), [fleet.active(n, net) for n in everywhere]
    assert all(net in fleet.networks(n, 6) for n in everywhere)
    for name in everywhere:  # the addresses are held out: one kernel element, the network
        assert {e for e in fleet.kernel(name, 6) if e.startswith("2001:db8:77:")} == set(), name
    no_drift(fleet)


def _signed(key_path: Path, seq: int, ip: str, **fields: object) -> dict[str, bytes]:
    now = time.time()
    body: dict[str, object] = {
        "v": 1,
        "origin": "x",
        "seq": seq,
        "kind": "block",
        "ip": ip,
        "at": now,
        "expires_at": now + 3600,
        "rung": 1,
        "offence": 1,
        "reason": "8 blocked addresses",
        "source": "imr:escalation",
    }
    body.update(fields)
    raw = json.dumps(body, sort_keys=True).encode()
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return events.sign(raw, key.sign)


def test_a_compromised_member_cannot_block_members_admins_or_guarded_networks(
    fleet: Fleet,
) -> None:
    """x's key is stolen: it publishes network blocks (as escalations) that would lock the
    fleet out of a member or of its admins, or block a never-aggregated network. Every
    member refuses and counts them, and no kernel changes."""
    hostile = {
        "192.0.2.48/28": "protected_target",  # holds ops's address 192.0.2.50
        "192.0.2.192/26": "protected_target",  # overlaps the admins' allowlisted network
        "192.0.2.230": "protected_target",  # an admin's address
        "192.0.2.0/24": "protected_target",  # every member's links
        "2001:db8:cd:1::/64": "never_aggregate",  # never aggregated here
        "198.0.0.0/12": "too_wide",
    }
    expected: dict[str, int] = {}
    for reason in hostile.values():
        expected[reason] = expected.get(reason, 0) + 1
    watched = ("a", "b", "ops")
    before = {n: (fleet.kernel(n), fleet.networks(n), fleet.networks(n, 6)) for n in watched}
    refused = {n: fleet.refused(n) for n in watched}
    with fleet.hub.entered():
        admin = Redis(
            host=hub_address(0),
            port=fleet.port,
            username="admin",
            password="adminpw",  # noqa: S106 - the test Redis's admin (fleet_harness)
            ssl=True,
            ssl_ca_certs=str(fleet.redis.ca),
        )
        for seq, ip in enumerate(hostile, start=1):
            admin.xadd("imr:fleet:x", _signed(fleet.root / "x.key", seq, ip))  # type: ignore[arg-type]
        admin.close()

    def counted(name: str) -> dict[str, int]:
        now = fleet.refused(name)
        return {k: now.get(k, 0) - refused[name].get(k, 0) for k in expected}

    for name in watched:
        assert wait(lambda n=name: counted(n) == expected, 10), (name, counted(name))  # type: ignore[misc]
        assert (fleet.kernel(name), fleet.networks(name), fleet.networks(name, 6)) == before[name]
        for ip in hostile:
            assert fleet.rows(name, f"SELECT 1 FROM blocks WHERE ip = '{ip}'") == []  # noqa: S608
    assert "refused event" in fleet.daemons["b"].log_file.read_text()
    # The admins still reach b.
    assert fleet.daemons["b"].probe(fleet.innocent, B_INNOCENT_SIDE, 80) == "connected"


def test_only_an_admin_member_lifts_another_members_block(fleet: Fleet) -> None:
    target = "203.0.113.50"
    a, b, c, ops = (fleet.daemons[n] for n in ("a", "b", "c", "ops"))
    assert a.as_user(BLOCKER, "block", target, "--reason", "scan").returncode == 0
    assert wait(lambda: all(target in fleet.kernel(n) for n in ("b", "c", "ops")), 10)
    before = {n: fleet.refused(n).get("lift_not_allowed", 0) for n in ("a", "b")}
    # c is no admin member: its unblock lifts c's own copy and is published as a lift,
    # which a and b refuse and count.
    result = c.as_root("unblock", target, "--reason", "not mine to lift")
    assert result.returncode == 0, result.stderr
    assert target not in fleet.kernel("c")

    def refused(name: str) -> int:
        return int(fleet.refused(name).get("lift_not_allowed", 0)) - before[name]

    assert wait(lambda: refused("a") == 1 and refused("b") == 1, 10)
    assert target in fleet.kernel("a") and target in fleet.kernel("b")
    assert fleet.active("b", target) != [] and fleet.active("a", target) != []
    # ops holds an admin key: its unblock lifts the block on a (which made it) and b.
    result = ops.as_root("unblock", target, "--reason", "false positive")
    assert result.returncode == 0, result.stderr
    assert wait(lambda: target not in fleet.kernel("a") and target not in fleet.kernel("b"), 10)
    lifted = f"SELECT lift_reason, lifted_by FROM blocks WHERE ip = '{target}'"  # noqa: S608
    assert fleet.rows("a", lifted) == [("unblocked", "fleet:ops")]
    assert fleet.rows("b", lifted) == [("unblocked", "fleet:ops")]
    assert refused("a") == 1 and refused("b") == 1
    listed = json.loads(b.as_user(READER, "list", "--json").stdout)
    assert all(x["ip"] != target for x in listed)


def test_a_wider_network_from_a_member_replaces_the_narrower_one_in_the_kernel(
    fleet: Fleet,
) -> None:
    """x (a member without a daemon) publishes a /64, then a /48 around it, then another /64
    inside: b's interval set (which refuses overlapping elements) ends with the /48 alone,
    the first /64 superseded, the second kept as history; x's lift of the /48 empties it."""
    narrow, wide, inner = "2001:db8:78::/64", "2001:db8:78::/48", "2001:db8:78:5::/64"
    key = fleet.root / "x.key"
    with fleet.hub.entered():
        admin = Redis(
            host=hub_address(0),
            port=fleet.port,
            username="admin",
            password="adminpw",  # noqa: S106 - the test Redis's admin (fleet_harness)
            ssl=True,
            ssl_ca_certs=str(fleet.redis.ca),
        )
        admin.xadd("imr:fleet:x", _signed(key, 100, narrow))  # type: ignore[arg-type]
    assert wait(lambda: narrow in fleet.networks("b", 6), 10)
    with fleet.hub.entered():
        admin.xadd("imr:fleet:x", _signed(key, 101, wide))  # type: ignore[arg-type]
        admin.xadd("imr:fleet:x", _signed(key, 102, inner))  # type: ignore[arg-type]
    assert wait(lambda: fleet.active("b", inner) == [] and fleet.rows("b", _ended(inner)) != [], 10)

    def settled(name: str) -> bool:
        return (
            {n for n in fleet.networks(name, 6) if "78" in n} == {wide}
            and fleet.rows(name, _ended(narrow)) == [("superseded",)]
            and fleet.rows(name, _ended(inner)) == [("covered",)]
        )

    for name in ("a", "b", "c", "ops"):
        assert wait(lambda n=name: settled(n), 10), name  # type: ignore[misc]
    with fleet.hub.entered():
        admin.xadd("imr:fleet:x", _signed(key, 103, wide, kind="lift", expires_at=0.0))  # type: ignore[arg-type]
        admin.close()
    assert wait(lambda: all(wide not in fleet.networks(n, 6) for n in ("a", "b")), 10)
    no_drift(fleet)


def _ended(ip: str) -> str:
    return f"SELECT lift_reason FROM blocks WHERE ip = '{ip}' AND lifted_at IS NOT NULL"  # noqa: S608
