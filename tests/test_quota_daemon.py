"""Quotas through the real daemon: real unprivileged users, the kernel and the state file.

A block-role user who exhausts a (small) quota is refused with the code, the
kernel and the state hold exactly the quota's worth, the refusal is logged
(once, not once per request), and many concurrent requests in flight from
two users cannot get past the limits.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from daemon_harness import (
    BLOCKER,
    NOBODY,
    PYTHON,
    Daemon,
    daemon_world,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]

# Run as a test user: open one connection per address, send every request before
# reading any reply (all in flight at once), print one error code or "ok" per line.
BURST = r"""
import json, socket, sys
path, addresses = sys.argv[1], sys.argv[2:]
conns = []
for ip in addresses:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    conns.append(s)
for s, ip in zip(conns, addresses):
    s.sendall(json.dumps({"op": "block", "ip": ip, "reason": "burst"}).encode() + b"\n")
for s, ip in zip(conns, addresses):
    reply = json.loads(s.makefile("rb").readline())
    print(ip, "ok" if reply["ok"] else reply["error"]["code"])
"""


@pytest.fixture
def world() -> Iterator[Daemon]:
    with daemon_world() as daemon:
        yield daemon


def start(world: Daemon, quota: str, json_logs: bool = False) -> None:
    world.extra_config = f"\n[quota]\n{quota}\n"
    world.write_config()
    if json_logs:
        text = world.config_file.read_text()
        world.config_file.write_text(text.replace("[server]\n", '[server]\nlog_format = "json"\n'))
    result = world.start()
    assert result.returncode == 0, result.stderr


def kernel_sources(world: Daemon) -> set[str]:
    return set(re.findall(r"-A IMR -s (\S+)/32 ", world.rules(4)))


def active_rows(world: Daemon) -> list[tuple[object, ...]]:
    return world.state_rows("SELECT ip, uid FROM blocks WHERE lifted_at IS NULL ORDER BY ip")


def burst(world: Daemon, user: str, addresses: list[str]) -> dict[str, str]:
    argv = ["runuser", "-u", user, "--", PYTHON, "-c", BURST, str(world.socket), *addresses]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return dict(line.split() for line in result.stdout.splitlines())


def json_log(world: Daemon) -> list[dict[str, object]]:
    return [json.loads(line) for line in world.log_file.read_text().splitlines() if line]


def test_a_block_user_is_refused_past_its_rate_and_the_kernel_holds_exactly_the_quota(
    world: Daemon,
) -> None:
    start(world, "blocks_per_minute = 3", json_logs=True)
    for i in range(3):
        result = world.as_user(BLOCKER, "block", f"203.0.113.{10 + i}", "--reason", "scan")
        assert result.returncode == 0, result.stderr

    refused = world.as_user(BLOCKER, "block", "203.0.113.13", "--reason", "scan")
    assert refused.returncode == 1
    assert "rate_limited" in refused.stderr
    assert "at most 3 new blocks per minute" in refused.stderr and "retry in" in refused.stderr
    # Trying harder does not help: many more, concurrently.
    outcomes = burst(world, BLOCKER, [f"203.0.113.{20 + i}" for i in range(15)])
    assert set(outcomes.values()) == {"rate_limited"}

    expected = {f"203.0.113.{10 + i}" for i in range(3)}
    assert kernel_sources(world) == expected
    blocker_uid = pwd.getpwnam(BLOCKER).pw_uid
    assert active_rows(world) == [(ip, blocker_uid) for ip in sorted(expected)]

    # A hit on an address it already blocked makes no new block: never refused by the rate.
    hit = world.as_user(BLOCKER, "block", "203.0.113.10", "--reason", "again")
    assert hit.returncode == 0, hit.stderr
    assert kernel_sources(world) == expected

    # Logged as a JSON line with the fields, and once, not 16 times (a flood cannot flood the log).
    refusals = [r for r in json_log(world) if r.get("event") == "quota_refused"]
    assert len(refusals) == 1, refusals
    (line,) = refusals
    assert line["level"] == "warning" and line["logger"] == "imr.broker"
    assert line["principal"] == f"uid:{blocker_uid}"
    assert (line["code"], line["limit"], line["ip"]) == (
        "rate_limited",
        "blocks_per_minute",
        "203.0.113.13",
    )
    assert "at most 3 new blocks per minute" in str(line["message"])
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in json_log(world))


def test_concurrent_clients_cannot_pass_the_client_and_global_caps(world: Daemon) -> None:
    # Both test users get the block role through the socket group; each may make
    # 4 blocks, but only 6 may be active in all.
    world.extra_config = '\n[access.groups]\nimrtest = "block"\n'
    world.extra_config += (
        "\n[quota]\nblocks_per_minute = 0\nactive_per_client = 4\nactive_global = 6\n"
    )
    world.write_config()
    result = world.start()
    assert result.returncode == 0, result.stderr

    outcomes: dict[str, dict[str, str]] = {}

    def send(user: str, prefix: str) -> None:
        outcomes[user] = burst(world, user, [f"{prefix}.{100 + i}" for i in range(25)])

    threads = [
        threading.Thread(target=send, args=(BLOCKER, "203.0.113")),
        threading.Thread(target=send, args=(NOBODY, "192.0.2")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    codes = Counter(code for user in outcomes.values() for code in user.values())
    assert codes["ok"] == 6, codes
    assert set(codes) <= {"ok", "quota_exceeded"}
    for user in (BLOCKER, NOBODY):
        assert Counter(outcomes[user].values())["ok"] <= 4
    granted = {ip for user in outcomes.values() for ip, code in user.items() if code == "ok"}
    assert kernel_sources(world) == granted
    rows = active_rows(world)
    assert {ip for ip, _ in rows} == granted
    assert max(Counter(uid for _, uid in rows).values()) <= 4

    # Full: one more is refused. The caps count active blocks: once the admin
    # lifts one of a client's blocks, that client may make one more.
    full = world.as_user(BLOCKER, "block", "203.0.113.200")
    assert full.returncode == 1 and "quota_exceeded" in full.stderr
    victim = sorted(granted)[0]
    assert world.as_root("unblock", victim).returncode == 0
    owner, prefix = (BLOCKER, "203.0.113") if victim.startswith("203.") else (NOBODY, "192.0.2")
    again = world.as_user(owner, "block", f"{prefix}.201")
    assert again.returncode == 0, again.stderr
    assert kernel_sources(world) == (granted - {victim}) | {f"{prefix}.201"}

    # 45 refusals, but at most one line per client and limit in 10 seconds.
    lines = [line for line in world.log_file.read_text().splitlines() if "refused block" in line]
    assert 1 <= len(lines) <= 4, lines
