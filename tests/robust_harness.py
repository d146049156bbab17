"""The real daemon under abuse: raw connections as real users, kernel and state read-back.

Shared by the fuzz, hostile-input and crash-durability tests and by bench/fuzz.py.
Builds on daemon_harness (namespaces, test users, the daemon's life cycle) and adds:

- connection factories: a raw socket whose peer is a real unprivileged user
  (the connect happens in a forked child that has become that user, so
  SO_PEERCRED and the socket file's permissions see that user, exactly as for
  a separate program), and TCP connections to the daemon's TCP listener, with
  a block-role token or without one;
- an independent oracle (the `ipaddress` module and `ip -j addr` in the
  daemon's namespace, not imr's own code) for which addresses must never be
  blocked;
- read-back of the kernel (nftables sets or the iptables chain) and of the
  state file, with the checks every test needs: no partial rows, kernel and
  state agree, nothing blocked that was refused or never asked for.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import re
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from imr.protocol import BlockRequest, ProtocolError, parse_request

from daemon_harness import BLOCKER, GROUP, NOBODY, READER, Daemon, daemon_world, ensure_test_users

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ALLOWLIST = ipaddress.ip_network("198.51.100.0/24")  # as daemon_harness writes it
REFUSAL_CODES = frozenset(
    {
        "invalid_address",
        "network_not_allowed",
        "unspecified_address",
        "multicast_address",
        "broadcast_address",
        "loopback_address",
        "link_local_address",
        "own_address",
        "allowlisted",
        "network_too_wide",
    }
)
# A network from a block-role client is refused, whichever check sees it first.
NETWORK_CODES = frozenset(
    {"network_not_allowed", "network_too_wide", "invalid_address", "forbidden"}
)


# Connections ----------------------------------------------------------------------


def connect_unix_as(user: str, path: Path, timeout: float = 10.0) -> socket.socket:
    """A connected Unix socket whose peer credentials are `user`'s (uid, gid, groups).

    A forked child drops to the user (as login does: supplementary groups,
    gid, uid), connects, hands the descriptor back over SCM_RIGHTS and exits.
    The kernel checks the socket file's mode against the child and records
    its credentials for SO_PEERCRED at connect time, so the daemon sees that
    user and nothing else.
    """
    entry = pwd.getpwnam(user)
    groups = os.getgrouplist(user, entry.pw_gid)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            ours.close()
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(timeout)
            conn.connect(str(path))
            socket.send_fds(theirs, [b"k"], [conn.fileno()])
            status = 0
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                theirs.sendall(b"e" + f"{type(exc).__name__}: {exc}".encode()[:500])
        finally:
            os._exit(status)
    theirs.close()
    try:
        ours.settimeout(timeout)
        message, fds, _, _ = socket.recv_fds(ours, 1024, 1)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    if not fds:
        raise ConnectionError(f"connect as {user} failed: {message[1:].decode(errors='replace')}")
    conn = socket.socket(fileno=fds[0])
    conn.settimeout(timeout)
    return conn


TCP_PORT = 7700  # the TCP listener, on loopback inside the daemon's namespace
FUZZ_TOKEN = "imr_fuzz-robustness-test-token-0123456789abcdef"  # noqa: S105 - a test token


def connect_tcp(
    world: Daemon, token: str | None, port: int = TCP_PORT, timeout: float = 10.0
) -> socket.socket:
    """A TCP connection to the daemon's listener, authenticated with `token` unless None."""
    with world.server.entered():
        conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if token is not None:
        conn.sendall(f"auth {token}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):  # byte by byte: leave nothing after it unread
            byte = conn.recv(1)
            assert byte, f"the daemon hung up after auth: {reply!r}"
            reply += byte
        assert reply.startswith(b"ok authenticated token:"), reply
    return conn


Connector = Callable[[], socket.socket]


class LineConnection:
    """One client connection: send bytes, read reply lines (None once the daemon hung up)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""

    def send(self, data: bytes) -> bool:
        """Send everything; False if the daemon closed the connection first."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def reply(self) -> bytes | None:
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def request(self, line: bytes) -> bytes | None:
        self.send(line)  # a refused send may still leave the daemon's last reply to read
        return self.reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LineConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def reply_code(reply: bytes) -> str:
    """'ok', or the error code of a JSON or text reply; raises if the reply is malformed."""
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply[:200]
    if reply.startswith(b"{"):
        data = json.loads(reply)
        assert data["v"] == 1, data
        if data["ok"]:
            assert isinstance(data["result"], dict), data
            return "ok"
        assert set(data["error"]) == {"code", "message"}, data
        return str(data["error"]["code"])
    text = reply.decode()
    if text.startswith("ok "):
        return "ok"
    assert text.startswith("error ") and ":" in text, text
    return text.removeprefix("error ").partition(":")[0]


# The oracle -----------------------------------------------------------------------


def single_address(text: str) -> IPAddress | None:
    """What a block request's `ip` names, by the standard library alone (no imr code).

    A single IPv4 or IPv6 address in a form `ipaddress` accepts, without a
    zone index; IPv4-mapped IPv6 counts as its IPv4 address.
    """
    if "%" in text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_prefix(text: str) -> IPAddress | None:
    """The address of a full-length prefix ("203.0.113.9/32", "2001:db8::9/128"), else None.

    imr may read such a "network" as the one address it names (or refuse it
    as a network): either is right, blocking anything else is not.
    """
    address_text, slash, prefix = text.partition("/")
    address = single_address(address_text)
    if not slash or address is None or not re.fullmatch(r"[1-9][0-9]{0,2}", prefix):
        return None
    return address if int(prefix) == ipaddress.ip_address(address_text).max_prefixlen else None


@dataclass
class Protected:
    """Addresses the daemon must never block: its own, its broadcasts, the allowlist, specials."""

    own: frozenset[IPAddress]
    broadcast: frozenset[IPAddress]

    def refuses(self, address: IPAddress) -> bool:
        inner = _embedded_ipv4(address)
        if inner is not None and self.refuses(inner):
            return True  # an IPv6 form of a protected IPv4 address (issue #12)
        return (
            address.is_loopback
            or address.is_unspecified
            or (address.version == 4 and address.packed[0] == 0)  # 0.0.0.0/8
            or address.is_multicast
            or address.is_link_local
            or address == ipaddress.IPv4Address("255.255.255.255")
            or address in self.own
            or address in self.broadcast
            or (address.version == ALLOWLIST.version and address in ALLOWLIST)
        )


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside NAT64, SIIT, IPv4-compatible, IPv4-mapped, 6to4 or Teredo."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    value = int(address)
    if value >> 32 in (0x64FF9B << 64, 0xFFFF0000, 0, 0xFFFF):  # NAT64, SIIT, compatible, mapped
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    return address.teredo[1] if address.teredo is not None else None


def protected_addresses(world: Daemon) -> Protected:
    """The server namespace's addresses and broadcasts, as `ip -j addr` reports them."""
    own: set[IPAddress] = set()
    broadcast: set[IPAddress] = set()
    for link in json.loads(world.server.run("ip", "-j", "addr", "show").stdout):
        for info in link.get("addr_info", []):
            own.add(ipaddress.ip_address(info["local"]))
            if "broadcast" in info:
                broadcast.add(ipaddress.ip_address(info["broadcast"]))
    return Protected(frozenset(own), frozenset(broadcast))


@dataclass
class Ledger:
    """What the clients asked for: the addresses a well-formed block request named."""

    requested: set[IPAddress] = field(default_factory=set)
    lines: int = 0

    def note_sent(self, data: bytes) -> None:
        """Record every complete line in `data` that the daemon would read as a block request."""
        *complete, _partial = data.split(b"\n")
        for line in complete:
            self.lines += 1
            requested = block_target(line)
            if requested is not None:
                self.requested.add(requested)


def block_target(line: bytes) -> IPAddress | None:
    """The address a block request line names, or None if it is not a block of one address.

    Framing and field validation are the protocol's (imr.protocol is the
    specification of what a request is); the address check is the oracle's.
    """
    try:
        request, _ = parse_request(line.rstrip(b"\r\n"))
    except ProtocolError:
        return None
    if not isinstance(request, BlockRequest):
        return None
    return host_prefix(request.ip) if "/" in request.ip else single_address(request.ip)


# Kernel and state read-back -----------------------------------------------------


def kernel_entries(world: Daemon, backend: str) -> Counter[IPAddress | IPNetwork]:
    """Each address (or network) imr blocks in the kernel, counted: above 1 is a duplicate."""
    found: Counter[IPAddress | IPNetwork] = Counter()
    if backend == "nftables":
        listed = world.server.run("nft", "-j", "list", "table", "inet", "imr", check=False)
        if listed.returncode != 0:
            return found  # no table (yet)
        for item in json.loads(listed.stdout)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                target = _nft_element(element)
                if target not in nft_markers():
                    found[target] += 1
        return found
    for family in (4, 6):
        tool = {4: "iptables", 6: "ip6tables"}[family]
        listed = world.server.run(f"{tool}-{world.flavour}", "-S", "IMR", check=False)
        for line in listed.stdout.splitlines():
            words = line.split()
            if words[:2] == ["-A", "IMR"] and "-s" in words:
                network = ipaddress.ip_network(words[words.index("-s") + 1])
                found[network.network_address if network.num_addresses == 1 else network] += 1
    return found


def _nft_element(element: object) -> IPAddress | IPNetwork:
    value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
    if isinstance(value, str):
        return ipaddress.ip_address(value)
    if isinstance(value, dict) and "prefix" in value:
        prefix = value["prefix"]
        return ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}")
    if isinstance(value, dict) and "range" in value:
        low, high = (ipaddress.ip_address(a) for a in value["range"])
        # The range's first network stands for it: enough to show the range is there.
        return cast(IPNetwork, next(ipaddress.summarize_address_range(low, high)))
    raise AssertionError(f"unexpected nftables set element {element!r}")


def nft_markers() -> frozenset[IPAddress]:
    """Elements the nftables backend keeps in its sets on purpose (drift markers), if any."""
    from imr.backends import nftables

    return frozenset(getattr(nftables, "MARKERS", {}).values())


def nftables_duplicate_rules(world: Daemon) -> list[str]:
    """Rules of imr's chain that appear more than once (a restore must never add twins)."""
    listed = world.server.run("nft", "-j", "list", "chain", "inet", "imr", "input")
    rules = [
        json.dumps(item["rule"]["expr"], sort_keys=True)
        for item in json.loads(listed.stdout)["nftables"]
        if "rule" in item
    ]
    assert rules, "imr's chain has no rules"
    return [rule for rule, n in Counter(rules).items() if n > 1]


def state_rows(world: Daemon, query: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{world.state_file}?mode=ro", uri=True)) as db:
        return db.execute(query).fetchall()


def check_state_file(world: Daemon, ladder_rungs: int = 2) -> dict[IPAddress, int]:
    """Assert the state file is whole and every row complete; return active blocks by address."""
    assert state_rows(world, "PRAGMA integrity_check") == [("ok",)]
    assert state_rows(world, "PRAGMA foreign_key_check") == []
    blocks = state_rows(
        world,
        "SELECT id, ip, blocked_at, expires_at, rung, offence, reason, source,"
        " lifted_at, lift_reason, lifted_by FROM blocks",
    )
    active: dict[IPAddress, int] = {}
    for row in blocks:
        block_id, ip, blocked_at, expires_at, rung, offence, reason, source, *lift = row
        address = single_address(str(ip))
        assert address is not None and str(address) == ip, row
        assert isinstance(blocked_at, float) and isinstance(expires_at, float), row
        assert blocked_at < expires_at, row
        assert isinstance(rung, int) and 1 <= rung <= ladder_rungs, row
        assert isinstance(offence, int) and offence >= 1, row
        assert isinstance(reason, str) and isinstance(source, str), row
        assert lift == [None, None, None] or None not in lift, row  # lifted wholly or not
        if lift[0] is None:
            assert address not in active, f"two active blocks for {ip}"
            active[address] = int(str(block_id))
    hits = state_rows(world, "SELECT ip, outcome, block_id FROM hits")
    block_ip = {row[0]: row[1] for row in blocks}
    made = Counter(block_id for _, outcome, block_id in hits if outcome == "block")
    for ip, outcome, block_id in hits:
        assert outcome in ("block", "escalate", "record"), (ip, outcome)
        assert block_ip.get(block_id) == ip, (ip, outcome, block_id)
    # Every block row was made by exactly one "block" hit, in the same transaction.
    assert all(made[row[0]] == 1 for row in blocks), made
    return active


def check_consistent(
    world: Daemon, backend: str, protected: Protected, allowed: Iterable[IPAddress]
) -> set[IPAddress]:
    """Kernel == state's active blocks, no duplicates, nothing protected or never requested."""
    active = set(check_state_file(world))
    kernel = kernel_entries(world, backend)
    duplicates = {a: n for a, n in kernel.items() if n > 1}
    assert not duplicates, f"duplicate kernel entries: {duplicates}"
    assert set(kernel) == active, (
        f"kernel only: {set(kernel) - active}; state only: {active - set(kernel)}"
    )
    wrongly = {a for a in active if protected.refuses(a)}
    assert not wrongly, f"blocked protected addresses: {wrongly}"
    unasked = active - set(allowed)
    assert not unasked, f"blocked addresses nobody asked for: {unasked}"
    if backend == "nftables":
        assert nftables_duplicate_rules(world) == []
    return active


def daemon_alive(world: Daemon, pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def log_failures(world: Daemon) -> list[str]:
    """Tracebacks in the daemon's log: an unexpected exception (a bug), never a refusal.

    Client text in log lines is quoted, so it cannot start a line.
    """
    text = world.log_file.read_text(errors="replace") if world.log_file.exists() else ""
    return [line for line in text.splitlines() if line.startswith("Traceback")]


# The daemon under test -------------------------------------------------------------


def ensure_users() -> list[str]:
    """daemon_harness's test users, each in the socket group; returns what to remove later.

    Runs of daemon tests create and delete these users; when two overlap, a
    user can outlive its group and come back without membership. Put it back.
    """
    created = ensure_test_users()
    for user in (BLOCKER, READER, NOBODY):
        if user not in grp.getgrnam(GROUP).gr_mem:
            subprocess.run(["gpasswd", "-a", user, GROUP], check=True, capture_output=True)
    return created


@dataclass(frozen=True)
class Options:
    """How the robustness tests' daemon differs from daemon_harness's."""

    backend: str = "nftables"
    max_connections: int = 64
    tcp: bool = False  # the TCP listener on loopback, with FUZZ_TOKEN as a block-role token
    blocker: str = BLOCKER  # the block-role user
    group: str = GROUP  # the socket's group


def write_config(world: Daemon, options: Options) -> None:
    """daemon_harness's config with another backend and without quotas.

    Quotas are switched off where the daemon has them: these tests are about
    validation and durability, and a quota refusal would hide a wrong
    acceptance (quotas have their own tests).
    """
    from imr.config import Config  # here: the parser-only fuzz must not need the config

    world.write_config()
    text = world.config_file.read_text()
    text = text.replace('backend = "iptables"', f'backend = "{options.backend}"', 1)
    text = text.replace("[server]\n", f"[server]\nmax_connections = {options.max_connections}\n", 1)
    text = text.replace(f'socket_group = "{GROUP}"', f'socket_group = "{options.group}"', 1)
    text = text.replace(f'"{BLOCKER}" = "block"', f'"{options.blocker}" = "block"', 1)
    if "quota" in Config.model_fields:
        text += "\n[quota]\nblocks_per_minute = 0\nactive_per_client = 0\nactive_global = 0\n"
    if options.tcp:  # plain TCP on loopback with a block-role token (docs/security.md)
        from imr.server.access import hash_token

        text += (
            f'\n[server.tcp]\nenabled = true\nlisten = "127.0.0.1"\nport = {TCP_PORT}\n'
            f'\n[access.tokens.fuzz]\nsha256 = "{hash_token(FUZZ_TOKEN)}"\nrole = "block"\n'
        )
    world.config_file.write_text(text)


def start(world: Daemon, options: Options) -> int:
    """Start the daemon; return its pid."""
    write_config(world, options)
    result = world.start()
    assert result.returncode == 0, result.stderr
    pid = world.pid()
    assert pid is not None
    return pid


@contextlib.contextmanager
def running(options: Options, flavour: str = "nft") -> Iterator[Daemon]:
    """A daemon with these options in fresh namespaces, stopped and removed afterwards."""
    with daemon_world(flavour) as world:
        start(world, options)
        yield world


@contextlib.contextmanager
def dedicated_user(user: str, group: str) -> Iterator[None]:
    """A block-role user and socket group of one's own, for long runs (bench/fuzz.py).

    The daemon tests share daemon_harness's users, which each run creates and
    deletes; a run of several minutes beside other test runs would lose them.
    """
    subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
    try:
        shell = "/usr/sbin/nologin"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", shell, "--groups", group, user],
            check=True,
            capture_output=True,
        )
        try:
            yield
        finally:
            subprocess.run(["userdel", user], check=False, capture_output=True)
    finally:
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def unix_connector(world: Daemon, user: str = BLOCKER) -> Connector:
    return lambda: connect_unix_as(user, world.socket)


def tcp_connector(world: Daemon, token: str | None = FUZZ_TOKEN) -> Connector:
    return lambda: connect_tcp(world, token)


def wait_until_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        # A killed daemon is reaped by init (it was daemonised), not by us.
        with contextlib.suppress(OSError):
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return
        assert time.monotonic() < deadline, f"pid {pid} still there after {timeout} s"
        time.sleep(0.02)
