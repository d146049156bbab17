"""A real redis-server for fleet tests (its own process, temporary config, ACLs on), key
and config helpers for fleet members, and the hub every multi-member test builds around it
(fleet_hub: the Redis namespace, a namespace per member, teardown).

The server is started by the test (optionally inside a namespace it created) and stopped
by its pid; it never touches a host service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imr.fleet.keys import public_text

from daemon_harness import GROUP, Daemon
from netns import Netns, connect, create_netns

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
PREFIX = "imr:fleet:"


def acl_lines(members: Sequence[str]) -> list[str]:
    """The documented ACLs (docs/fleet.md): each member appends only to its own stream and
    reads all of them."""
    lines = ["user default off", "user admin on >adminpw ~* &* +@all"]
    for name in members:
        lines.append(
            f"user {name} on >pw-{name} resetkeys %R~{PREFIX}* %RW~{PREFIX}{name}"
            " resetchannels -@all +ping +xread +xrange +xlen +xadd +xtrim +wait +client|setname"
        )
    return lines


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    root: Path
    ca: Path | None = None  # TLS only: the CA that signed the server's certificate

    def url(self) -> str:
        return f"{'rediss' if self.ca else 'redis'}://{self.host}:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(
    members: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    netns: str | None = None,
    root: Path | None = None,
    tls_names: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> RedisServer:
    """A redis-server; with `tls_names` (the addresses clients use) TLS only, with a
    certificate for them from a fresh CA (root/ca.pem; reused by a restart). `extra`:
    more lines for its config (replication, more ACL users)."""
    root = root or Path(tempfile.mkdtemp(prefix="imrtest-redis-", dir="/tmp"))
    port = port or free_port()
    config = root / "redis.conf"
    ca: Path | None = None
    listen = [f"port {port}"]
    if tls_names:
        ca = root / "ca.pem"
        if not ca.exists():
            authority = trustme.CA()
            authority.cert_pem.write_to_path(str(ca))
            server_cert = authority.issue_cert(*tls_names)
            server_cert.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
            server_cert.private_key_pem.write_to_path(str(root / "server.key"))
        listen = [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {root / 'server.pem'}",
            f"tls-key-file {root / 'server.key'}",
            f"tls-ca-cert-file {ca}",
            "tls-auth-clients no",
        ]
    config.write_text(
        "\n".join(
            [
                f"bind {host}",
                *listen,
                "protected-mode no",
                'save ""',
                # Durable like a production Redis: a restart keeps the streams.
                "appendonly yes",
                "appendfsync always",
                f"dir {root}",
                "daemonize no",
                f"logfile {root / 'redis.log'}",
                *acl_lines(members),
                *extra,
                "",
            ]
        )
    )
    argv = [REDIS, str(config)]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(process, host, port, root, ca)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(root / 'redis.log').read_text()[-500:]}")
        if "Ready to accept connections" in _read(root / "redis.log"):
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError("redis-server did not start in 10 s")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@contextlib.contextmanager
def redis_server(members: Sequence[str], **kwargs: object) -> Iterator[RedisServer]:
    server = start_redis(members, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def make_key(path: Path) -> str:
    """A member's private key file; returns its public key."""
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    return public_text(key.public_key())


def fleet_section(
    name: str,
    url: str,
    root: Path,
    publics: dict[str, str],
    addresses: dict[str, list[str]],
    admins: Sequence[str] = (),
    extra: str = "",
    tls_ca: Path | None = None,
) -> str:
    """The [fleet] section of member `name`'s config (its key in root/NAME.key)."""
    (root / f"{name}.pw").write_text(f"pw-{name}\n")
    (root / f"{name}.pw").chmod(0o600)
    lines = [
        "[fleet]",
        "enabled = true",
        f'name = "{name}"',
        f'redis_url = "{url}"' if url else "",  # no URL: `extra` names the sentinels
        f'password_file = "{root / f"{name}.pw"}"',
        f'private_key = "{root / f"{name}.key"}"',
        f'tls_ca = "{tls_ca}"' if tls_ca else "",
        extra,
    ]
    for member, public in publics.items():
        lines += [
            f"[fleet.members.{member}]",
            f'public_key = "{public}"',
            f"addresses = {addresses.get(member, [])!r}".replace("'", '"'),
            f"admin = {'true' if member in admins else 'false'}",
        ]
    return "\n".join(lines) + "\n"


def write_member_config(
    daemon: Daemon, body: str, socket_group: str = GROUP, firewall: str = ""
) -> None:
    """A member daemon's configuration: its own files, nftables on TCP port 80 (plus the
    `firewall` lines), then `body`: the test's own [policy], [quota], [escalation], [access],
    [protect] and [fleet] sections."""
    daemon.config_file.write_text(f"""
[server]
socket = "{daemon.socket}"
socket_group = "{socket_group}"
socket_mode = "0660"
pid_file = "{daemon.root / "run" / "imr.pid"}"
log_file = "{daemon.log_file}"

[state]
path = "{daemon.state_file}"

[firewall]
backend = "nftables"
protocol = "tcp"
ports = [80]
{firewall}
{body}
""")
    daemon.config_file.chmod(0o644)


def hub_address(i: int) -> str:
    """The hub's side of member i's link (a /28 each)."""
    return f"192.0.2.{16 * i + 1}"


def member_address(i: int) -> str:
    """Member i's own address on its link to the hub."""
    return f"192.0.2.{16 * i + 2}"


@dataclass
class Hub:
    """What fleet_hub built: a namespace running one Redis, every member's key, a namespace
    and an empty home directory per member linked to the hub. The test adds its daemons to
    `daemons` and any further namespace through `netns`, and all of it goes at the end."""

    root: Path
    ns: Netns
    server: RedisServer  # a test that restarts Redis puts the new one here
    port: int
    publics: dict[str, str]  # member name -> public key text
    members: dict[str, Netns]
    daemons: dict[str, Daemon]
    namespaces: list[Netns]  # every one made, the hub's and the members' too

    def netns(self, prefix: str) -> Netns:
        """A further namespace (attacker, innocent), deleted with the hub."""
        ns = create_netns(prefix)
        self.namespaces.append(ns)
        return ns

    def url(self, name: str, *, tls: bool = True) -> str:
        """The Redis URL member `name` reaches the hub at."""
        i = list(self.members).index(name)
        return f"{'rediss' if tls else 'redis'}://{hub_address(i)}:{self.port}/0"


@contextlib.contextmanager
def fleet_hub(
    prefix: str,
    members: Sequence[str],
    keys: Sequence[str],
    tls_names: Sequence[str] = (),
) -> Iterator[Hub]:
    """A hub namespace with its Redis (ACL users for `keys`; TLS when `tls_names` name its
    certificate), a key for each of `keys`, and for each of `members` a namespace
    `{prefix}{name}` linked to the hub (member_address(i) / hub_address(i)) and a home
    directory. Daemons the test puts in `hub.daemons` are stopped, then Redis, then every
    namespace is deleted and the directory removed, however the test ends."""
    root = Path(tempfile.mkdtemp(prefix=f"imrtest-{prefix}-", dir="/tmp"))
    root.chmod(0o755)
    made: list[Netns] = []
    hub: Hub | None = None
    try:
        ns = create_netns(f"{prefix}hub")
        made.append(ns)
        port = free_port()
        (root / "redis").mkdir()
        server = start_redis(
            keys, host="0.0.0.0", port=port, netns=ns.name, root=root / "redis", tls_names=tls_names
        )
        publics = {name: make_key(root / f"{name}.key") for name in keys}
        hub = Hub(root, ns, server, port, publics, {}, {}, made)
        for i, name in enumerate(members):
            member = create_netns(f"{prefix}{name}")
            made.append(member)
            connect(ns, member, [f"{hub_address(i)}/28"], [f"{member_address(i)}/28"])
            (root / name).mkdir(mode=0o755)
            hub.members[name] = member
        yield hub
    finally:
        if hub is not None:
            for daemon in hub.daemons.values():
                daemon.stop()
                daemon.kill_everything()
            hub.server.stop()
        for netns in made:
            netns.delete()
        shutil.rmtree(root, ignore_errors=True)
