"""A fleet member's catch-up through the bulk path (docs/fleet.md, Retention and catch-up):
thousands of missed events read 50 entries at a time and handed to the writer 5,000 at a
time (imr/fleet/member.py CHUNK), each still verified and trust-checked.

Two daemons, each in its own namespace with its own state file and nftables table, and one
redis-server (ACLs on) in a hub namespace: hub 192.0.2.(16i+1) <-> member i 192.0.2.(16i+2).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from redis import Redis

from imr.client import Client
from imr.fleet import events

from daemon_harness import Daemon, require_unprivileged_access
from fleet_harness import (
    RedisServer,
    fleet_hub,
    fleet_section,
    hub_address,
    member_address,
    write_member_config,
)
from netns import Netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
    pytest.mark.usefixtures("test_users"),
]

MEMBERS = ("a", "b")


@dataclass
class Pair:
    hub: Netns
    redis: RedisServer
    root: Path
    a: Daemon
    b: Daemon

    def status(self, daemon: Daemon) -> dict[str, Any]:
        result = daemon.as_root("fleet", "status", "--json")
        assert result.returncode == 0, result.stderr
        found: dict[str, Any] = json.loads(result.stdout)
        return found

    def kernel(self, daemon: Daemon) -> set[str]:
        """The IPv6 addresses in the member's nftables set, read back from its kernel."""
        out = daemon.server.run("nft", "-j", "list", "set", "inet", "imr", "blocked_v6")
        found: set[str] = set()
        for item in json.loads(out.stdout)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                found.add(str(elem["elem"]["val"] if isinstance(elem, dict) else elem))
        return found

    def published(self) -> bool:
        status = self.status(self.a)
        return bool(status["outbox_depth"] == 0 and status["published"] > 0)

    def admin(self) -> Redis:
        password = "adminpw"  # noqa: S105 - the test server's own user (fleet_harness)
        return Redis(host=hub_address(0), port=self.redis.port, username="admin", password=password)


def wait(predicate: Callable[[], bool], timeout: float = 30.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def write_config(daemon: Daemon, fleet_text: str) -> None:
    write_member_config(
        daemon,
        f"""
[policy]
ladder = ["3s", "1h"]
repeat_window = "1d"
severity_skips_rungs = true

[quota]
blocks_per_minute = 0
active_per_client = 0

[escalation]
enabled = false

{fleet_text}
""",
    )


@pytest.fixture(scope="module")
def pair(test_users: None) -> Iterator[Pair]:
    require_unprivileged_access()
    with fleet_hub("fcu", MEMBERS, MEMBERS) as hub:
        addresses = {name: [member_address(i)] for i, name in enumerate(MEMBERS)}
        for name, ns in hub.members.items():
            # No test traffic: no client namespaces.
            hub.daemons[name] = Daemon(ns, hub.ns, hub.ns, hub.root / name)
            text = fleet_section(
                name,
                hub.url(name, tls=False),
                hub.root,
                hub.publics,
                addresses,
                extra="per_origin_per_minute = 1000000",
            )
            write_config(hub.daemons[name], text)
        for daemon in hub.daemons.values():
            result = daemon.start()
            assert result.returncode == 0, result.stderr
        world = Pair(hub.ns, hub.server, hub.root, hub.daemons["a"], hub.daemons["b"])
        assert wait(
            lambda: all(world.status(d)["follower_connected"] for d in hub.daemons.values())
        )
        yield world


def ips(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{n:x}" for n in range(1, count + 1)]


def block(daemon: Daemon, addresses: list[str], source: str, severity: int) -> None:
    results = Client(daemon.socket, timeout=60).block_many(
        addresses, reason="catch-up test", source=source, severity=severity
    )
    assert all(item["ok"] for item in results), [r for r in results if not r["ok"]][:3]


def signed_by_a(pair: Pair, **fields: object) -> dict[str, bytes]:
    """An entry a's key signed (the test writes a's stream beside a's own publisher)."""
    body = {
        "origin": "a",
        "seq": 10**9,
        "kind": "block",
        "ip": member_address(1),  # b's own address: protected
        "at": time.time(),
        "expires_at": time.time() + 600,
        "rung": 1,
        "offence": 1,
        "reason": "hostile",
        "source": "test",
        "v": 1,
        **fields,
    }
    key = serialization.load_pem_private_key((pair.root / "a.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return events.sign(json.dumps([body]).encode(), key.sign)


def count(daemon: Daemon, source: str, where: str = "1") -> int:
    query = f"SELECT COUNT(*) FROM blocks WHERE source = '{source}' AND {where}"  # noqa: S608
    found = daemon.state_rows(query)[0][0]
    assert isinstance(found, int)
    return found


def test_a_catch_up_applies_exactly_what_was_missed(pair: Pair) -> None:
    """Over 6,000 missed events (more than one read and one writer change): the blocks in
    force in state and kernel, the expired ones as history, the lifts lifted, and the
    forged and hostile entries among them refused."""
    a, b = pair.a, pair.b
    refused_before = pair.status(b)["refused"]
    assert b.stop().returncode == 0
    # One address a /64: a's ladder counts an IPv6 /64's offences (issue #16).
    short = [f"2001:db8:c1:{n:x}::1" for n in range(1, 301)]
    long = ips(6000, "2001:db8:c2::")
    block(a, short, "fcu-short", 1)  # rung 1: 3 s, over before b is back
    over_at = time.time() + 3
    block(a, long, "fcu-long", 2)  # rung 2: 1 h
    lifted = long[::60]  # 100 of them, unblocked on a: lift events
    for ip in lifted:
        assert a.as_root("unblock", ip, "--reason", "false positive").returncode == 0
    with pair.hub.entered():
        admin = pair.admin()
        admin.xadd("imr:fleet:a", signed_by_a(pair))  # type: ignore[arg-type]
        forged = signed_by_a(pair, ip="2001:db8:c3::1")
        admin.xadd("imr:fleet:a", {"e": forged["e"], "s": bytes(64)})
        admin.close()
    assert wait(pair.published)
    time.sleep(max(0.0, over_at + 1 - time.time()))
    assert b.start().returncode == 0
    wanted = set(long) - set(lifted)
    assert wait(lambda: count(b, "fcu-long", "lifted_at IS NULL") == len(wanted), 60)
    assert wait(lambda: count(b, "fcu-short") == len(short), 10)
    # Each event once, with its origin; the expired ones as history only.
    rows = b.state_rows(
        "SELECT source, COUNT(*), COUNT(DISTINCT ip), MIN(origin), MAX(origin) FROM blocks"
        " WHERE source LIKE 'fcu-%' GROUP BY source ORDER BY source"
    )
    assert rows == [("fcu-long", 6000, 6000, "a", "a"), ("fcu-short", 300, 300, "a", "a")]
    history = b.state_rows(
        "SELECT lift_reason, lifted_by, COUNT(*) FROM blocks WHERE lifted_at IS NOT NULL"
        " AND source LIKE 'fcu-%' GROUP BY source, lift_reason, lifted_by ORDER BY source"
    )
    assert history == [("unblocked", "fleet:a", 100), ("expired", "imr", 300)]
    kernel = pair.kernel(b)
    assert kernel & set(long) == wanted
    assert not kernel & set(short)
    assert "2001:db8:c3::1" not in kernel and member_address(1) not in kernel
    refused = pair.status(b)["refused"]
    for reason in ("protected_target", "bad_signature"):
        assert refused.get(reason, 0) == refused_before.get(reason, 0) + 1, refused


def test_sigkill_during_a_bulk_catch_up_loses_and_duplicates_nothing(pair: Pair) -> None:
    """b is SIGKILLed once part of 30,500 missed events is committed (some of the writer's
    changes of 5,000, not all), then started again: every event is applied once. The first
    500 are over before b is back: history rows, which an event applied twice would repeat
    (a block in force would only be merged)."""
    a, b = pair.a, pair.b
    assert b.stop().returncode == 0
    short = [f"2001:db8:c5:{n:x}::1" for n in range(1, 501)]
    block(a, short, "fcu-kill", 1)  # rung 1: 3 s
    over_at = time.time() + 3
    wanted = short + ips(30_000, "2001:db8:c4::")
    block(a, wanted[len(short) :], "fcu-kill", 2)
    assert wait(pair.published, 60)
    time.sleep(max(0.0, over_at + 1 - time.time()))
    assert b.start().returncode == 0
    pid = b.pid()
    assert pid is not None
    seen: list[int] = []

    def part_committed() -> bool:
        seen.append(count(b, "fcu-kill"))
        return 0 < seen[-1] < len(wanted)

    assert wait(part_committed, 60, every=0.005), seen[-5:]
    time.sleep(0.06)  # into the next change's work, not just after a commit
    os.kill(pid, signal.SIGKILL)
    assert wait(lambda: not os.path.exists(f"/proc/{pid}"), 10)
    assert count(b, "fcu-kill") < len(wanted)  # killed during the catch-up
    assert b.start().returncode == 0
    query = "SELECT COUNT(*), COUNT(DISTINCT ip) FROM blocks WHERE source = 'fcu-kill'"
    assert wait(lambda: b.state_rows(query) == [(30_500, 30_500)], 120), b.state_rows(query)
    assert count(b, "fcu-kill", "lift_reason = 'expired'") >= len(short)
    assert pair.kernel(b) >= set(wanted[len(short) :])
    time.sleep(1)  # nothing more arrives later
    assert b.state_rows(query) == [(30_500, 30_500)]
