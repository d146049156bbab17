"""Network escalation in the kernel (issue #16): the real daemon with nftables in namespaces.

The attacker namespace holds many addresses of one IPv6 /64 and of one IPv4 /24, besides
its own; the unprivileged block-role user reports them one at a time. After K reports the
daemon blocks the prefix: a TCP connect from a fresh address of it is rejected, while a
neighbour prefix still connects. An allowlisted address inside a would-be prefix keeps
the prefix unblocked.
"""

from __future__ import annotations

import json
import os

import pytest

from daemon_harness import (
    ATTACKER_V4,
    BLOCKER,
    PYTHON,
    SERVER_V4,
    SERVER_V6,
    Daemon,
    daemon_world,
)
from netns import Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

NET6, NET4 = "2001:db8:66::/64", "198.51.100.0/24"
GUARDED6 = "2001:db8:67::/64"  # holds the allowlisted 2001:db8:67::ffff
NEIGHBOUR6 = "2001:db8:68::1"
PORT = 80
# What the default reject_with_ipv4/_ipv6 (host/address unreachable) look like to a client.
REJECTED = {"EHOSTUNREACH", "ECONNREFUSED", "EADDRNOTAVAIL", "ENETUNREACH"}
# Connect from one source address (the attacker namespace holds many).
PROBE = """
import errno, socket, sys
source, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_STREAM)
sock.settimeout(2.0)
try:
    sock.bind((source, 0))
    sock.connect((host, port))
    print("connected")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno or 0, str(exc)))
"""


def device_of(ns: Netns, address: str) -> str:
    out = ns.run("ip", "-o", "addr", "show").stdout
    (line,) = [x for x in out.splitlines() if f" {address}/" in x]
    return str(line.split()[1])


def add_attacker_addresses(world: Daemon) -> None:
    """The attacker's /64, /24, guarded /64 and neighbour /64, routed from the server."""
    attacker_dev = device_of(world.attacker, ATTACKER_V4)
    server_dev = device_of(world.server, SERVER_V4)
    extra = [f"2001:db8:66::{n:x}/64" for n in (*range(1, 6), 0x99)]
    extra += [f"2001:db8:67::{n:x}/64" for n in (*range(1, 6), 0x99)]
    extra += [f"{NEIGHBOUR6}/64"]
    extra += [f"198.51.100.{n}/24" for n in (*range(1, 10), 99)]
    for address in extra:
        flags = ["nodad"] if ":" in address else []
        world.attacker.run("ip", "addr", "add", address, "dev", attacker_dev, *flags)
    for network in ("2001:db8:66::/48", "2001:db8:67::/48", "2001:db8:68::/48", NET4):
        world.server.run("ip", "route", "add", network, "dev", server_dev)


def probe(world: Daemon, source: str) -> str:
    host = SERVER_V6 if ":" in source else SERVER_V4
    result = world.attacker.run(PYTHON, "-c", PROBE, source, host, str(PORT), check=False)
    return result.stdout.strip()


def networks(world: Daemon) -> list[str]:
    listed = world.as_root("list", "--networks", "--json")
    assert listed.returncode == 0, listed.stderr
    return [b["ip"] for b in json.loads(listed.stdout)]


def net_elements(world: Daemon, family: int) -> list[str]:
    result = world.server.run("nft", "-j", "list", "set", "inet", "imr", f"blocked_net_v{family}")
    (item,) = [i for i in json.loads(result.stdout)["nftables"] if "set" in i]
    found = []
    for element in item["set"].get("elem", []):
        value = element["elem"]["val"] if isinstance(element, dict) else element
        prefix = value.get("prefix", value) if isinstance(value, dict) else value
        if isinstance(prefix, dict):
            found.append(f"{prefix['addr']}/{prefix['len']}")
    return found


def report(world: Daemon, address: str) -> None:
    done = world.as_user(BLOCKER, "block", address, "--reason", "rotating scanner")
    assert done.returncode == 0, done.stderr


def test_a_rotating_attacker_is_blocked_as_a_prefix(test_users: None) -> None:
    with daemon_world() as world:
        world.escalation = True
        world.write_config()
        text = world.config_file.read_text()
        text = text.replace('backend = "iptables"', 'backend = "nftables"', 1)
        # The harness allowlists 198.51.100.0/24; here one address of a /64 is allowlisted.
        text = text.replace('["198.51.100.0/24"]', '["2001:db8:67::ffff/128"]', 1)
        world.config_file.write_text(text)
        add_attacker_addresses(world)
        started = world.start()
        assert started.returncode == 0, started.stderr
        world.listen(PORT)
        assert probe(world, "2001:db8:66::99") == "connected"
        assert probe(world, "198.51.100.99") == "connected"

        for n in range(1, 4):  # K = 3 for an IPv6 /64
            report(world, f"2001:db8:66::{n}")
        for n in range(1, 9):  # K = 8 for an IPv4 /24
            report(world, f"198.51.100.{n}")
        for n in range(1, 6):  # 5 of a /64 holding an allowlisted address: no escalation
            report(world, f"2001:db8:67::{n}")

        assert sorted(networks(world)) == sorted([NET6, NET4])
        assert net_elements(world, 6) == [NET6] and net_elements(world, 4) == [NET4]
        # Fresh addresses of the blocked prefixes: never reported, rejected all the same.
        assert probe(world, "2001:db8:66::99") in REJECTED
        assert probe(world, "198.51.100.99") in REJECTED
        # Neighbours still connect: the next /64, the attacker's own /24, the guarded /64.
        assert probe(world, NEIGHBOUR6) == "connected"
        assert probe(world, ATTACKER_V4) == "connected"
        assert probe(world, "2001:db8:67::99") == "connected"
        # The members are in the state file, and an admin's unblock pardons the prefix.
        shown = world.as_root("show", NET6, "--json")
        assert shown.returncode == 0 and "2001:db8:66::3" in shown.stdout, shown.stderr
        assert world.as_user(BLOCKER, "unblock", NET6).returncode != 0  # block role only
        assert world.as_root("unblock", NET6).returncode == 0
        assert probe(world, "2001:db8:66::99") == "connected"
        assert probe(world, "2001:db8:66::1") in REJECTED  # its own block is back
