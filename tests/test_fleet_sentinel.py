"""Fleet mode through Sentinel, for real: a primary and a replica redis-server (TLS, ACLs),
three redis-sentinel processes (TLS, a password of their own), and two member daemons whose
configuration names only the sentinels. The primary is SIGKILLed while the replica lags,
Sentinel promotes the replica, and member b, which was down meanwhile, ends with every
block member a acknowledged (fleet.wait_replicas = 1).

Topology (documentation addresses only):
  hub (namespace): 192.0.2.200 on lo: the primary and the three sentinels
  replica (namespace): 192.0.2.210, a /30 link to the hub (192.0.2.209), so the test can cut
      replication alone, with an nftables rule in the replica's own namespace
  members a, b: 192.0.2.(16i+2)/28 links to the hub (192.0.2.(16i+1)), which routes
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from pydantic import ValidationError
from redis import Redis

from imr.config import Config
from imr.fleet.doctor import check_fleet
from imr.fleet.settings import FleetSettings, sentinel_address

from daemon_harness import Daemon, require_unprivileged_access
from fleet_harness import RedisServer, fleet_section, free_port, make_key, start_redis
from netns import Netns, connect, create_netns

SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
MEMBERS = ("a", "b")
SERVICE = "imr"
PRIMARY, REPLICA = "192.0.2.200", "192.0.2.210"
HUB_TO_REPLICA = "192.0.2.209"
SENTINEL_PASSWORD = "sentinel-secret"  # noqa: S105 (a test server's)
# Both data servers: the users Sentinel and the replica use (Redis's documented minimum).
SERVER_CONFIG = [
    "user sentinel on >sentinel-pw allchannels +multi +slaveof +ping +exec +subscribe"
    " +config|rewrite +role +publish +info +client|setname +client|kill +script|kill",
    "user replica on >replica-pw +psync +replconf +ping",
    "masteruser replica",
    "masterauth replica-pw",
    "tls-replication yes",
    "repl-diskless-sync-delay 0",  # a replica syncs at once (Redis 7.0's default waits 5 s)
]


# --- Configuration (no Redis needed) ---


def settings(**fields: object) -> FleetSettings:
    base: dict[str, object] = {
        "enabled": True,
        "name": "a",
        "members": {"a": {"public_key": "x"}},
    }
    return FleetSettings.model_validate(base | fields)


def test_sentinel_addresses_are_host_and_port() -> None:
    assert sentinel_address("192.0.2.5:26379") == ("192.0.2.5", 26379)
    assert sentinel_address("[2001:db8::5]:26380") == ("2001:db8::5", 26380)
    assert sentinel_address("sentinel-1.example.org:26379") == ("sentinel-1.example.org", 26379)
    for bad, why in [
        ("192.0.2.5", "HOST:PORT"),
        ("192.0.2.5:0", "HOST:PORT"),
        ("192.0.2.5:70000", "HOST:PORT"),
        ("2001:db8::5:26379", "brackets"),
        ("[2001:db8::zz]:26379", "not an IPv6 address"),
        ("bad_host:26379", "not a host name"),
        (":26379", "not a host name"),
    ]:
        with pytest.raises(ValueError, match=why):
            sentinel_address(bad)


def test_the_config_names_one_server_or_the_sentinels_never_both() -> None:
    found = settings(sentinels=["192.0.2.5:26379", "[2001:db8::6]:26379"], sentinel_service="imr")
    assert found.sentinel_addresses == [("192.0.2.5", 26379), ("2001:db8::6", 26379)]
    assert not found.data_tls
    assert settings(sentinels=["h:1"], sentinel_service="s", tls=True).data_tls
    assert settings(redis_url="rediss://192.0.2.5:6380/0").data_tls
    refused: list[tuple[dict[str, Any], str]] = [
        ({}, "set redis_url"),
        ({"redis_url": "redis://h:1/0", "sentinels": ["h:2"], "sentinel_service": "s"}, "both"),
        ({"sentinels": ["h:2"]}, "sentinel_service"),
        ({"sentinels": ["h"], "sentinel_service": "s"}, "HOST:PORT"),
        ({"redis_url": "redis://h:1/0", "sentinel_service": "s"}, "Sentinel only"),
        ({"redis_url": "redis://h:1/0", "tls": True}, "rediss://"),
        ({"redis_url": "redis://h:1/0", "wait_replicas": -1}, "greater than or equal"),
    ]
    for fields, why in refused:
        with pytest.raises(ValidationError, match=why):
            settings(**fields)
    assert settings(redis_url="redis://h:1/0").redis_url
    assert not FleetSettings().enabled  # a disabled section needs neither


def test_doctor_says_which_sentinel_does_not_answer(tmp_path: Path) -> None:
    public = make_key(tmp_path / "a.key")
    ports = [free_port() for _ in range(3)]  # loopback, nothing listens: refused at once
    (tmp_path / "sentinel.pw").write_text("secret\n")
    fleet = {
        "enabled": True,
        "name": "a",
        "sentinels": [f"127.0.0.1:{port}" for port in ports],
        "sentinel_service": "imr",
        "sentinel_password_file": str(tmp_path / "sentinel.pw"),
        "tls": True,
        "private_key": str(tmp_path / "a.key"),
        "members": {"a": {"public_key": public}},
    }
    (tmp_path / "sentinel.pw").chmod(0o644)
    found = check_fleet(Config.model_validate({"fleet": fleet}))
    levels = ["ok", "problem", "warning", "warning", "warning", "problem"]
    assert [f.level for f in found] == levels, found
    assert found[1].fix == f"chmod 600 {tmp_path / 'sentinel.pw'}"
    assert f"sentinel 127.0.0.1:{ports[1]}" in found[3].message
    assert found[-1].message == "no sentinel answers" and found[-1].fix


# --- The real thing ---


def needs_root_and_redis(test: Callable[..., None]) -> Callable[..., None]:
    for mark in [
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
        pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
        pytest.mark.skipif(shutil.which("redis-sentinel") is None, reason="needs redis-sentinel"),
        pytest.mark.usefixtures("test_users"),
    ]:
        test = mark(test)
    return test


@dataclass
class World:
    hub: Netns
    replica_ns: Netns
    root: Path
    ca: Path
    primary: RedisServer
    replica: RedisServer
    sentinel_ports: list[int]
    daemons: dict[str, Daemon] = field(default_factory=dict)
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @contextlib.contextmanager
    def client(
        self, ns: Netns, host: str, port: int, password: str, username: str | None = None
    ) -> Iterator[Redis]:
        """A TLS client of a server that listens in namespace `ns`."""
        with ns.entered():
            client = Redis(
                host,
                port,
                username=username,
                password=password,
                ssl=True,
                ssl_ca_certs=str(self.ca),
                socket_timeout=3,
            )
            try:
                yield client
            finally:
                client.close()

    def sentinel(self) -> contextlib.AbstractContextManager[Redis]:
        """The first sentinel, with Sentinel's password."""
        return self.client(self.hub, PRIMARY, self.sentinel_ports[0], SENTINEL_PASSWORD)

    def admin(self, server: RedisServer, ns: Netns) -> contextlib.AbstractContextManager[Redis]:
        """A data server, as fleet_harness.acl_lines's admin user."""
        return self.client(ns, server.host, server.port, "adminpw", "admin")

    def primary_named(self) -> str:
        with self.sentinel() as client:
            reply: Any = client.sentinel_get_master_addr_by_name(SERVICE)
        return f"{reply[0].decode()}:{reply[1]}"

    def blocked(self, name: str, ips: list[str]) -> set[str]:
        """Which of `ips` member `name` blocks in its kernel and holds in its state file."""
        rules = self.daemons[name].rules(4)
        query = "SELECT ip FROM blocks WHERE lifted_at IS NULL AND origin = 'a'"
        rows = {str(row[0]) for row in self.daemons[name].state_rows(query)}
        return {ip for ip in ips if f"-s {ip}/32 " in rules and ip in rows}

    def status(self, name: str) -> dict[str, Any]:
        result = self.daemons[name].as_root("fleet", "status", "--json")
        assert result.returncode == 0, result.stderr
        found: dict[str, Any] = json.loads(result.stdout)
        return found


def wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # a server not up yet, a daemon not answering
            if predicate():
                return True
        time.sleep(0.1)
    return False


def certificates(root: Path) -> Path:
    """One CA; one certificate for both data servers and the sentinels."""
    authority = trustme.CA()
    ca = root / "ca.pem"
    authority.cert_pem.write_to_path(str(ca))
    cert = authority.issue_cert(PRIMARY, REPLICA)
    for name in ("primary", "replica", "sentinels"):
        home = root / name
        home.mkdir()
        shutil.copy(ca, home / "ca.pem")
        cert.cert_chain_pems[0].write_to_path(str(home / "server.pem"))
        cert.private_key_pem.write_to_path(str(home / "server.key"))
    return ca


def start_sentinel(root: Path, port: int, primary_port: int, hub: Netns) -> subprocess.Popen[bytes]:
    home = root / "sentinels"
    config = home / f"sentinel-{port}.conf"  # Sentinel rewrites it: its own file
    config.write_text(
        "\n".join(
            [
                f"bind {PRIMARY}",
                "port 0",
                f"tls-port {port}",
                f"tls-cert-file {home / 'server.pem'}",
                f"tls-key-file {home / 'server.key'}",
                f"tls-ca-cert-file {home / 'ca.pem'}",
                "tls-auth-clients no",
                "tls-replication yes",  # TLS to the data servers and to the other sentinels
                "daemonize no",
                f"dir {home}",
                f"logfile {home / f'sentinel-{port}.log'}",
                f"requirepass {SENTINEL_PASSWORD}",
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
                f"sentinel announce-ip {PRIMARY}",
                f"sentinel announce-port {port}",
                f"sentinel monitor {SERVICE} {PRIMARY} {primary_port} 2",
                f"sentinel auth-user {SERVICE} sentinel",
                f"sentinel auth-pass {SERVICE} sentinel-pw",
                # Small on purpose: the test waits for a failover (Debian's: 30 s, 180 s).
                f"sentinel down-after-milliseconds {SERVICE} 1000",
                f"sentinel failover-timeout {SERVICE} 5000",
                "",
            ]
        )
    )
    return subprocess.Popen(
        hub.argv(SENTINEL, str(config)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def start_primary(root: Path, hub: Netns, port: int | None = None) -> RedisServer:
    return start_redis(
        MEMBERS,
        host=PRIMARY,
        port=port,
        netns=hub.name,
        root=root / "primary",
        tls_names=[PRIMARY],
        extra=SERVER_CONFIG,
    )


def start_replica(root: Path, replica_ns: Netns, primary: RedisServer) -> RedisServer:
    return start_redis(
        MEMBERS,
        host=REPLICA,
        netns=replica_ns.name,
        root=root / "replica",
        tls_names=[REPLICA],
        extra=[
            *SERVER_CONFIG,
            f"replicaof {PRIMARY} {primary.port}",
            f"replica-announce-ip {REPLICA}",
        ],
    )


def network(members: dict[str, Netns]) -> tuple[Netns, Netns]:
    hub, replica_ns = create_netns("fhahub"), create_netns("fharep")
    hub.run("ip", "addr", "add", f"{PRIMARY}/32", "dev", "lo")
    hub.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    connect(hub, replica_ns, [f"{HUB_TO_REPLICA}/30"], [f"{REPLICA}/30"])
    replica_ns.run("ip", "route", "add", "default", "via", HUB_TO_REPLICA)
    for i, ns in enumerate(members.values()):
        connect(hub, ns, [f"192.0.2.{16 * i + 1}/28"], [f"192.0.2.{16 * i + 2}/28"])
        ns.run("ip", "route", "add", "192.0.2.192/27", "via", f"192.0.2.{16 * i + 1}")
    return hub, replica_ns


def member_texts(world: World, wait_replicas: int) -> dict[str, str]:
    """Each member's [fleet] section: the sentinels only, TLS to them and to the primary."""
    password = world.root / "sentinel.pw"
    password.write_text(SENTINEL_PASSWORD + "\n")
    password.chmod(0o600)
    sentinels = ", ".join(f'"{PRIMARY}:{port}"' for port in world.sentinel_ports)
    extra = "\n".join(
        [
            f"sentinels = [{sentinels}]",
            f'sentinel_service = "{SERVICE}"',
            f'sentinel_password_file = "{password}"',
            "sentinel_tls = true",
            "tls = true",
            f"wait_replicas = {wait_replicas}",
        ]
    )
    publics = {m: make_key(world.root / f"{m}.key") for m in MEMBERS}
    addresses = {m: [f"192.0.2.{16 * i + 2}"] for i, m in enumerate(MEMBERS)}
    return {
        m: fleet_section(m, "", world.root, publics, addresses, extra=extra, tls_ca=world.ca)
        for m in MEMBERS
    }


@contextlib.contextmanager
def sentinel_world(wait_replicas: int) -> Iterator[World]:
    """Everything above, torn down by pid and namespace whatever happens."""
    require_unprivileged_access()
    root = Path(tempfile.mkdtemp(prefix="imrtest-fha-", dir="/tmp"))
    root.chmod(0o755)
    spaces: list[Netns] = []
    servers: list[RedisServer] = []
    world: World | None = None
    try:
        members = {m: create_netns(f"fham{m}") for m in MEMBERS}
        spaces += members.values()
        hub, replica_ns = network(members)
        spaces += [hub, replica_ns]
        ca = certificates(root)
        servers.append(primary := start_primary(root, hub))
        servers.append(replica := start_replica(root, replica_ns, primary))
        ports = [free_port() for _ in range(3)]
        world = World(hub, replica_ns, root, ca, primary, replica, ports)
        assert wait(lambda: _replicating(world, replica), 10)
        world.sentinels = [start_sentinel(root, p, primary.port, hub) for p in ports]
        assert wait(lambda: _sentinels_ready(world), 15), "the sentinels did not find each other"
        for name, text in member_texts(world, wait_replicas).items():
            (root / name).mkdir(mode=0o755)
            daemon = Daemon(members[name], members[name], members[name], root / name)
            daemon.extra_config = text
            daemon.write_config()
            world.daemons[name] = daemon
            result = daemon.start()
            assert result.returncode == 0, result.stderr
        yield world
    except BaseException:
        _print_logs(root)  # pytest shows them with the failure
        raise
    finally:
        if world is not None:
            for daemon in world.daemons.values():
                daemon.stop()
                daemon.kill_everything()
            for process in world.sentinels:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait(10)
            servers += [world.primary, world.replica]
        for server in servers:
            server.stop()
        for ns in spaces:
            ns.delete()
        shutil.rmtree(root, ignore_errors=True)


def _print_logs(root: Path) -> None:
    for log in sorted([*root.glob("*/*.log"), *root.glob("*/redis.log")]):
        print(f"--- {log.relative_to(root)}")
        print("\n".join(log.read_text(errors="replace").splitlines()[-25:]))


def _replicating(world: World, replica: RedisServer) -> bool:
    with world.admin(replica, world.replica_ns) as client:
        return bool(client.info("replication").get("master_link_status") == "up")


def _sentinels_ready(world: World) -> bool:
    with world.sentinel() as client:
        state: Any = client.sentinel_master(SERVICE)
    return bool(state["num-other-sentinels"] == 2 and state["num-slaves"] == 1)


def batch(n: int) -> list[str]:
    return [f"203.0.113.{10 * n + i}" for i in range(1, 6)]


@pytest.mark.parametrize("wait_replicas", [1])
@needs_root_and_redis
def test_a_failover_loses_no_acknowledged_block(wait_replicas: int) -> None:
    with sentinel_world(wait_replicas) as world:
        a, b = world.daemons["a"], world.daemons["b"]
        first = f"{PRIMARY}:{world.primary.port}"
        assert wait(lambda: world.status("b")["follower_connected"], 15)
        assert wait(lambda: world.status("a")["redis_primary"] == first, 10)
        assert f"redis primary {first} (named by Sentinel)" in a.as_root("fleet", "status").stdout
        one = batch(1)
        assert a.as_root("block", *one, "--severity", "2").returncode == 0
        assert wait(lambda: world.blocked("b", one) == set(one), 10)
        assert wait(lambda: world.status("a")["outbox_depth"] == 0, 10)  # a replica has them

        # b goes down; replication is cut (the replica does not notice: repl-timeout 60 s).
        assert b.stop().returncode == 0
        world.replica_ns.run("nft", "-f", "-", input=CUT.format(port=world.primary.port))
        two = batch(2)
        assert a.as_root("block", *two, "--severity", "2").returncode == 0
        stream = "imr:fleet:a"

        def on_primary() -> int:
            with world.admin(world.primary, world.hub) as client:
                return int(client.xlen(stream))

        with world.admin(world.replica, world.replica_ns) as client:
            replicated = int(client.xlen(stream))
        assert wait(lambda: on_primary() > replicated, 10)  # the primary took them ...
        time.sleep(1.5)  # ... and a's publisher would have deleted them by now
        with world.admin(world.replica, world.replica_ns) as client:
            assert int(client.xlen(stream)) == replicated  # ... and no replica has them
        assert world.status("a")["outbox_depth"] == len(two)  # so a keeps them

        # The primary dies; a block made during the failover, and one after it.
        world.primary.stop()
        three = batch(3)
        assert a.as_root("block", *three, "--severity", "2").returncode == 0
        second = f"{REPLICA}:{world.replica.port}"
        assert wait(lambda: world.primary_named() == second, 20), "no failover"
        four = batch(4)
        assert a.as_root("block", *four, "--severity", "2").returncode == 0
        assert wait(lambda: world.status("a")["redis_primary"] == second, 15)

        # b comes back and finds its way to the new primary through the sentinels.
        assert b.start().returncode == 0
        everything = one + two + three + four
        assert wait(lambda: world.blocked("b", everything) == set(everything), 20), sorted(
            set(everything) - world.blocked("b", everything)
        )
        # Nothing applied twice (two was published twice: to each primary).
        counted = b.state_rows("SELECT COUNT(*), COUNT(DISTINCT ip) FROM blocks WHERE origin='a'")
        assert counted == [(20, 20)]
        # a's follower, connected all along, found the new primary too.
        assert b.as_root("block", "203.0.113.99").returncode == 0
        assert wait(lambda: "-s 203.0.113.99/32 " in a.rules(4), 10)
        # With no replica, a keeps the rows the new primary holds alone ...
        assert world.status("a")["outbox_depth"] >= len(two + three + four)
        assert "replica(s) confirmed" in a.log_file.read_text()
        # ... until the old primary is back, as the new one's replica (Sentinel makes it so).
        world.replica_ns.run("nft", "delete", "table", "inet", "fha")
        world.primary = start_primary(world.root, world.hub, world.primary.port)
        assert wait(lambda: world.status("a")["outbox_depth"] == 0, 20)

        doctor = a.server.run(*a.imr_argv("doctor", "--no-kernel-probe", "--json"), check=False)
        found = [f for f in json.loads(doctor.stdout) if f["check"] == "fleet"]
        assert [f["level"] for f in found] == ["ok", "ok"], found
        assert f"{second} (Sentinel's primary of 'imr') answers a" in found[1]["message"]


# Drops the replication stream (the primary's side of it) in the replica's namespace.
CUT = """table inet fha {{
  chain input {{
    type filter hook input priority 0;
    ip saddr 192.0.2.200 tcp sport {port} drop
  }}
}}
"""
