"""The whole slice, for real: root daemon + iptables in a namespace, unprivileged clients.

Every test builds its own namespaces (tests/daemon_harness.py) and removes them.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator

import pytest

from imr.store import SCHEMA_VERSION

from daemon_harness import (
    ATTACKER_V4,
    ATTACKER_V6,
    BLOCKER,
    GROUP,
    INNOCENT_V4,
    NOBODY,
    READER,
    SERVER_SIDE_V4,
    SERVER_V4,
    SERVER_V6,
    Daemon,
    daemon_world,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]


@pytest.fixture
def world() -> Iterator[Daemon]:
    with daemon_world() as daemon:
        yield daemon


def started(daemon: Daemon) -> Daemon:
    daemon.write_config()
    result = daemon.start()
    assert result.returncode == 0, result.stderr
    return daemon


def rule_for(address: str, rules: str) -> list[str]:
    return [line for line in rules.splitlines() if f"-s {address}/" in line]


@pytest.mark.parametrize("flavour", ["nft", "legacy"])
def test_unprivileged_block_rejects_real_packets_on_listed_ports_only(flavour: str) -> None:
    with daemon_world(flavour) as world:
        _block_and_probe(world)


def _block_and_probe(world: Daemon) -> None:
    world.ports = (80,)
    started(world)
    world.listen(80, 8080)
    assert world.probe(world.attacker, SERVER_V4, 80) == "connected"

    result = world.as_user(
        BLOCKER, "block", ATTACKER_V4, "--reason", "msgimport scan", "--source", "modsecurity:99999"
    )
    assert result.returncode == 0, result.stderr
    assert f"blocked {ATTACKER_V4}" in result.stdout

    (rule,) = rule_for(ATTACKER_V4, world.rules(4))
    assert "-p tcp" in rule and "--dports 80" in rule
    assert "--reject-with icmp-host-unreachable" in rule
    assert "-A INPUT -j IMR" in world.rules(4)
    assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
    assert world.probe(world.attacker, SERVER_V4, 8080) == "connected"  # port not listed
    assert world.probe(world.innocent, SERVER_SIDE_V4, 80) == "connected"

    rows = world.state_rows("SELECT ip, rung, offence, source, uid FROM blocks")
    assert rows == [(ATTACKER_V4, 1, 1, "modsecurity:99999", _uid(BLOCKER))]


def test_ipv6_block_rejects_with_address_unreachable(world: Daemon) -> None:
    started(world)
    world.listen(80)
    assert world.probe(world.attacker, SERVER_V6, 80) == "connected"
    result = world.as_user(BLOCKER, "block", ATTACKER_V6)
    assert result.returncode == 0, result.stderr
    (rule,) = rule_for(ATTACKER_V6, world.rules(6))
    assert "--reject-with icmp6-addr-unreachable" in rule
    assert world.probe(world.attacker, SERVER_V6, 80) == "EHOSTUNREACH"
    assert rule_for(ATTACKER_V6, world.rules(4)) == []


def test_refusals_change_nothing(world: Daemon) -> None:
    started(world)
    before4, before6 = world.rules(4), world.rules(6)

    unblock = world.as_user(BLOCKER, "unblock", ATTACKER_V4)
    assert unblock.returncode == 1
    assert "not allowed to unblock" in unblock.stderr and "Traceback" not in unblock.stderr

    nobody = world.as_user(NOBODY, "block", ATTACKER_V4)
    assert nobody.returncode == 1
    assert "not allowed to block" in nobody.stderr

    reader = world.as_user(READER, "block", ATTACKER_V4)
    assert reader.returncode == 1

    for address, why in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        (SERVER_V4, "address of this host"),
        (SERVER_V6, "address of this host"),
        ("198.51.100.23", "allowlist"),
        ("1.2.3.4; rm -rf /", "not an IP address"),
        ("203.0.113.0/24", "network"),
        ("example.com", "host name"),
    ]:
        refused = world.as_user(BLOCKER, "block", address)
        assert refused.returncode == 1, address
        assert why in refused.stderr, (address, refused.stderr)
        assert "Traceback" not in refused.stderr

    assert world.rules(4) == before4 and world.rules(6) == before6
    assert world.state_rows("SELECT COUNT(*) FROM blocks") == [(0,)]
    log = world.log_file.read_text()
    assert "refused block" in log and "refused unblock" in log


def test_list_and_show_for_reader(world: Daemon) -> None:
    started(world)
    assert world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "w00tw00t").returncode == 0
    listed = world.as_user(READER, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert (entry["ip"], entry["offence"], entry["reason"]) == (ATTACKER_V4, 1, "w00tw00t")
    assert entry["uid"] == _uid(BLOCKER)
    shown = json.loads(world.as_user(READER, "show", ATTACKER_V4, "--json").stdout)
    assert shown["active"]["ip"] == ATTACKER_V4 and len(shown["hits"]) == 1
    assert world.as_user(BLOCKER, "list").returncode == 1  # block role cannot read


def test_admin_unblock_removes_the_rule(world: Daemon) -> None:
    started(world)
    assert world.as_root("block", ATTACKER_V4).returncode == 0
    assert rule_for(ATTACKER_V4, world.rules(4))
    result = world.as_root("unblock", ATTACKER_V4)
    assert result.returncode == 0, result.stderr
    assert rule_for(ATTACKER_V4, world.rules(4)) == []
    assert world.state_rows("SELECT lift_reason FROM blocks") == [("unblocked",)]


def test_restart_keeps_blocks_and_stop_leaves_them_in_force(world: Daemon) -> None:
    started(world)
    assert world.as_root("block", ATTACKER_V4).returncode == 0
    assert world.as_root("block", ATTACKER_V6).returncode == 0
    stop = world.stop()
    assert stop.returncode == 0, stop.stderr
    assert rule_for(ATTACKER_V4, world.rules(4)), "stop must not flush the kernel"
    status = world.as_root("server", "status")
    assert status.returncode == 3 and "not running" in status.stderr

    assert world.start().returncode == 0
    listed = json.loads(world.as_root("list", "--json").stdout)
    assert {b["ip"] for b in listed} == {ATTACKER_V4, ATTACKER_V6}
    assert len(rule_for(ATTACKER_V4, world.rules(4))) == 1  # no duplicate after restore
    assert len(rule_for(ATTACKER_V6, world.rules(6))) == 1
    status = world.as_root("server", "status")
    assert status.returncode == 0 and "active blocks: 2" in status.stdout


def test_blocks_that_expired_while_down_are_gone_after_start(world: Daemon) -> None:
    world.ladder = '["2s", "7d"]'
    started(world)
    assert world.as_root("block", ATTACKER_V4).returncode == 0
    assert world.stop().returncode == 0
    time.sleep(2.5)
    assert rule_for(ATTACKER_V4, world.rules(4)), "still in the kernel while the daemon is down"
    assert world.start().returncode == 0
    assert rule_for(ATTACKER_V4, world.rules(4)) == []
    assert world.state_rows("SELECT lift_reason FROM blocks") == [("expired",)]
    assert "expired 203.0.113.66 while the daemon was down" in world.log_file.read_text()


def test_a_real_short_block_expires_by_itself(world: Daemon) -> None:
    world.ladder = '["2s", "5s"]'
    started(world)
    world.listen(80)
    assert world.as_user(BLOCKER, "block", ATTACKER_V4).returncode == 0
    assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
    blocked_at = time.monotonic()
    assert world.wait_for(lambda: not rule_for(ATTACKER_V4, world.rules(4)), timeout=6)
    assert time.monotonic() - blocked_at < 2 + 1.5  # lifted within a second of due
    assert world.probe(world.attacker, SERVER_V4, 80) == "connected"
    assert world.state_rows("SELECT lift_reason FROM blocks") == [("expired",)]
    # Back within the repeat window: the second rung.
    again = json.loads(world.as_root("block", ATTACKER_V4, "--json").stdout)
    assert (again["rung"], again["duration"], again["offence"]) == (2, "5s", 2)


def test_kill_9_right_after_ok_loses_nothing(world: Daemon) -> None:
    started(world)
    addresses = [f"203.0.113.{i}" for i in range(10, 20)]
    for address in addresses:
        assert world.as_user(BLOCKER, "block", address).returncode == 0
    pid = world.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert world.wait_for(lambda: not os.path.exists(f"/proc/{pid}/status"), timeout=5)
    rows = world.state_rows("SELECT ip FROM blocks WHERE lifted_at IS NULL")
    assert {r[0] for r in rows} == set(addresses)

    result = world.start()  # stale socket and pid file from the killed daemon
    assert result.returncode == 0, result.stderr
    rules = world.rules(4)
    for address in addresses:
        assert len(rule_for(address, rules)) == 1, address


def test_second_daemon_refuses_to_start(world: Daemon) -> None:
    started(world)
    second = world.start()
    assert second.returncode == 1
    assert "already running" in second.stderr


def test_text_protocol_over_socat(world: Daemon) -> None:
    started(world)
    reply = subprocess.run(
        ["runuser", "-u", BLOCKER, "--", "socat", "-", f"UNIX-CONNECT:{world.socket}"],
        input=f"block {ATTACKER_V4} soapCaller.bs probe\n",
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert reply.stdout.startswith(f"ok blocked {ATTACKER_V4} until "), reply.stdout
    assert rule_for(ATTACKER_V4, world.rules(4))


def test_daemon_not_running_is_a_clear_error(world: Daemon) -> None:
    world.write_config()
    for args in (("list",), ("block", ATTACKER_V4), ("server", "status")):
        result = world.as_user(BLOCKER, *args)
        assert result.returncode == 3, args
        assert "not running" in result.stderr and "Traceback" not in result.stderr
    assert INNOCENT_V4  # the topology is built even when the daemon is down


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def test_socket_mode_group_and_addresses_added_while_running(world: Daemon) -> None:
    started(world)
    info = world.socket.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert grp.getgrgid(info.st_gid).gr_name == GROUP

    # An address the host gains while imr runs is protected at once (netlink events).
    world.server.run("ip", "addr", "add", "203.0.113.200/32", "dev", "lo")
    assert world.wait_for(
        lambda: "address of this host" in world.as_user(BLOCKER, "block", "203.0.113.200").stderr,
        timeout=5,
    )
    assert rule_for("203.0.113.200", world.rules(4)) == []


def test_export_dumps_blocks_and_reports(world: Daemon) -> None:
    started(world)
    assert world.as_user(BLOCKER, "block", ATTACKER_V4, "--reason", "scan").returncode == 0
    assert world.as_root("unblock", ATTACKER_V4).returncode == 0
    exported = world.as_user(READER, "export")
    assert exported.returncode == 0, exported.stderr
    data = json.loads(exported.stdout)
    assert data["schema_version"] == SCHEMA_VERSION
    assert [(b["ip"], b["lift_reason"]) for b in data["blocks"]] == [(ATTACKER_V4, "unblocked")]
    assert [(h["ip"], h["reason"]) for h in data["hits"]] == [(ATTACKER_V4, "scan")]
