"""docs/modsecurity.md's step-by-step, followed literally, beside Debian's OWASP CRS as shipped.

Each seed probe comes from its own attacker address and must get that address
blocked under imr's own rule for it (not the CRS's 949110 through 99910),
with the kernel rejecting its next connection, on the vhost the admin left in
Debian's DetectionOnly as well as on one set to block. And the DetectionOnly
vhost stays so: a request the CRS would block is answered normally there.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from documented import BLOCK, DETECT, debian_crs_missing, documented_server

from imr.logscan.formats import parse_line

from daemon_harness import ATTACKER_V4, SERVER_V4, Daemon
from modsec_harness import WebServer, apache_missing, get, nginx_missing, world

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.skipif(bool(debian_crs_missing()), reason=f"{debian_crs_missing()}"),
]

APACHE = pytest.mark.skipif(bool(apache_missing()), reason=f"{apache_missing()}")
NGINX = pytest.mark.skipif(bool(nginx_missing()), reason=f"{nginx_missing()}")
SETUPS = [
    pytest.param("apache", "lua", marks=APACHE),
    pytest.param("apache", "exec", marks=APACHE),
    pytest.param("nginx", "lua", marks=NGINX),
]


class Probe(NamedTuple):
    name: str
    path: str
    agent: str
    rule: int


PROBES = [
    Probe("msgimport", "/roundcube/bin/msgimport", "", 99901),
    Probe("DFind", "/w00tw00t.at.ISC.SANS.DFind:)", "", 99902),
    Probe("Morfeus", "/", "Morfeus Fucking Scanner", 99903),
    Probe("soapCaller", "/user/soapCaller.bs", "", 99904),
    Probe("Code Red", "/default.ida?" + "N" * 224 + "%u9090%u6858%ucbd3%u7801%u9090", "", 99905),
    Probe("Nimda", "/scripts/..%c1%1c../winnt/system32/cmd.exe?/c+dir", "", 99906),
]
SQLI = "/?id=1%27%20OR%20%271%27%3D%271%27--"


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with world() as d:
        result = d.start()
        assert result.returncode == 0, result.stderr
        yield d


def extra_attackers(daemon: Daemon, count: int) -> list[str]:
    """More attacker addresses (203.0.113.100...) on the attacker's link, one per probe."""
    dev = daemon.attacker.run("ip", "-o", "-4", "addr", "show").stdout
    (link,) = re.findall(rf"^\d+: (\S+)\s+inet {re.escape(ATTACKER_V4)}/", dev, re.M)
    addresses = [f"203.0.113.{100 + i}" for i in range(count)]
    for address in addresses:
        daemon.attacker.run("ip", "addr", "add", f"{address}/24", "dev", link)
    return addresses


def shown(daemon: Daemon, address: str) -> dict[str, Any]:
    result = daemon.as_root("show", address, "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def blocked_as(daemon: Daemon, web: WebServer, address: str, rule: int) -> None:
    """The address is blocked under `rule`: in `imr show`, in the kernel, on the wire."""

    def listed() -> bool:
        return shown(daemon, address)["active"] is not None

    assert daemon.wait_for(listed, 5), web.error_log.read_text(errors="replace")[-3000:]
    block = shown(daemon, address)["active"]  # the block just made: `blocks` is its history
    assert (block["source"], block["reason"]) == (f"modsecurity:{rule}", f"ModSecurity rule {rule}")
    assert f"-A IMR -s {address}/32 " in daemon.rules(4)
    again = get(daemon.attacker, SERVER_V4, "/", source=address)
    assert (again.status, again.curl_exit) == (0, 7)  # the kernel rejected it


@pytest.mark.parametrize(("kind", "hook"), SETUPS)
def test_each_seed_probe_is_blocked_under_its_own_rule_on_both_vhosts(
    daemon: Daemon, kind: str, hook: str
) -> None:
    addresses = iter(extra_attackers(daemon, 2 * len(PROBES)))
    with documented_server(daemon, kind, hook) as web:
        for vhost in (DETECT, BLOCK):
            for probe in PROBES:
                address = next(addresses)
                answer = get(
                    daemon.attacker,
                    SERVER_V4,
                    probe.path,
                    agent=probe.agent,
                    vhost=vhost,
                    source=address,
                )
                assert answer.status == 403, f"{probe.name} on {vhost}: {answer}"
                blocked_as(daemon, web, address, probe.rule)
        assert web.alive()


@pytest.mark.parametrize(("kind", "hook"), SETUPS)
def test_the_detection_only_vhost_stays_detection_only(
    daemon: Daemon, kind: str, hook: str
) -> None:
    with documented_server(daemon, kind, hook) as web:
        # The CRS scores it over the threshold on both vhosts, but only block.test blocks.
        for _ in range(2):
            assert get(daemon.attacker, SERVER_V4, SQLI, vhost=DETECT).status == 200
        # A scanner matched there gets its 403 without leaving the vhost blocking.
        assert get(daemon.attacker, SERVER_V4, "/x/soapCaller.bs", vhost=DETECT).status == 403
        assert shown(daemon, ATTACKER_V4)["active"]["source"] == "modsecurity:99904"
        assert daemon.as_root("unblock", ATTACKER_V4).returncode == 0
        time.sleep(0.5)
        assert get(daemon.attacker, SERVER_V4, SQLI, vhost=DETECT).status == 200
        time.sleep(0.5)
        assert shown(daemon, ATTACKER_V4)["active"] is None, "reported from a DetectionOnly vhost"

        assert get(daemon.attacker, SERVER_V4, SQLI, vhost=BLOCK).status == 403
        blocked_as(daemon, web, ATTACKER_V4, 99910)


@pytest.mark.parametrize(
    "kind", [pytest.param("apache", marks=APACHE), pytest.param("nginx", marks=NGINX)]
)
def test_the_lua_hooks_complaint_carries_the_time_and_the_client(kind: str) -> None:
    """The daemon is not running: imr.lua's one line must say when, and for whom."""
    with world() as daemon, documented_server(daemon, kind, "lua") as web:
        before = time.time()
        assert get(daemon.attacker, SERVER_V4, "/default.ida?NNNN").status == 403

        def complaint() -> str | None:
            lines = web.error_log.read_text(errors="replace").splitlines()
            return next((line for line in lines if "imr: not blocked" in line), None)

        assert daemon.wait_for(complaint, 3), web.error_log.read_text(errors="replace")[-2000:]
        line = complaint()
        assert line is not None
        if kind == "nginx":
            # nginx's own format: "2026/12/07 04:41:05 [warn] ..., client: ADDR".
            stamp = re.match(r"(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[warn\] imr: not blocked: ", line)
            assert stamp, line
            logged = time.mktime(time.strptime(stamp[1], "%Y/%m/%d %H:%M:%S"))
            assert line.endswith(f", client: {ATTACKER_V4}"), line
            assert parse_line(line) is None  # imr logscan never blames the client for it
        else:
            stamp = re.match(r"\[(\w{3} \w{3} \d\d \d\d:\d\d:\d\d)\.\d+ (\d{4})\] ", line)
            assert stamp, line
            logged = time.mktime(time.strptime(f"{stamp[1]} {stamp[2]}", "%a %b %d %H:%M:%S %Y"))
            assert f"[client {ATTACKER_V4}:" in line, line
        assert before - 2 <= logged <= time.time() + 1
        assert "cannot connect to " in line
