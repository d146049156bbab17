"""The reverse-proxy case end to end (issue #14, docs/fleet.md "Enforce-only members behind
a reverse proxy"): attacker → a real nginx or HAProxy reverse proxy whose host runs an
enforce-only member → a web host whose ModSecurity hook reports the client named by
X-Forwarded-For → the fleet → the proxy host's kernel rejects the attacker's next
connection.

The topology is tests/proxy_harness.py's, built once per proxy (nginx, HAProxy) and web
server kind (Apache with mod_remoteip, nginx with realip); each test uses its own attacker
address.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from daemon_harness import BLOCKER
from modsec_harness import apache_missing, get, nginx_missing
from proxy_harness import (
    ATTACKERS,
    INNOCENT,
    PROXY,
    PROXY_ADDRESSES,
    PROXY_ATTACKER_SIDE,
    PROXY_INNOCENT_SIDE,
    ProxyWorld,
    documented,
    proxy_world,
    wait,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
    pytest.mark.usefixtures("test_users"),
]

SCANNER = "/roundcube/bin/msgimport"  # imr-rules.conf, rule 99901


def _cases() -> list[Any]:
    """(proxy, web server) pairs: nginx or HAProxy in front of Apache or nginx."""
    missing = {"apache": apache_missing(), "nginx": nginx_missing()}
    return [
        pytest.param(
            (proxy, kind),
            id=f"{proxy}-{kind}",
            marks=pytest.mark.skipif(bool(missing[kind]), reason=f"{missing[kind]}"),
        )
        for proxy in ("nginx", "haproxy")
        for kind in ("apache", "nginx")
    ]


@pytest.fixture(scope="module", params=_cases())
def world(request: pytest.FixtureRequest, test_users: None) -> Iterator[ProxyWorld]:
    proxy, kind = request.param
    if shutil.which(proxy) is None:
        pytest.skip(f"{proxy} is not installed (the reverse proxy; scripts/bootstrap.sh)")
    with proxy_world(kind, proxy) as built:
        yield built


def reported(world: ProxyWorld, attacker: str, sent: list[str]) -> None:
    """The web host's member blocked `attacker` (the hook's report), and the fleet put it
    in the proxy host's kernel."""

    def on_web() -> bool:
        return world.show(world.web, attacker)["active"] is not None

    access = (world.site.directory / "access.log").read_text(errors="replace")
    assert wait(on_web, 5), (
        f"sent {sent}; web1 saw:\n{access}\n"
        + world.site.error_log.read_text(errors="replace")[-2000:]
    )
    block = world.show(world.web, attacker)["active"]
    assert block["source"] == "modsecurity:99901"
    assert wait(lambda: attacker in world.kernel(world.lb), 10), world.fleet_status(world.lb)
    rows = world.lb.state_rows(f"SELECT origin FROM blocks WHERE ip = '{attacker}'")  # noqa: S608
    assert rows == [("web1",)]


def nobody_else_blocked(world: ProxyWorld) -> None:
    """Neither the proxy nor the innocent client is blocked anywhere, and the innocent
    client still gets pages through the proxy."""
    for daemon in (world.web, world.lb):
        held = world.blocked_ips(daemon) | world.kernel(daemon)
        assert not held & {*PROXY_ADDRESSES, INNOCENT}, (daemon.root.name, held)
    assert get(world.innocent, PROXY_INNOCENT_SIDE, "/").status == 200
    assert world.proxy.alive() and world.site.alive()


def test_the_attacker_behind_the_proxy_is_rejected_by_the_proxy_hosts_kernel(
    world: ProxyWorld,
) -> None:
    attacker = ATTACKERS[0]
    assert get(world.attacker, PROXY_ATTACKER_SIDE, "/", source=attacker).status == 200
    assert world.lb.probe(world.attacker, PROXY_ATTACKER_SIDE, 80) == "connected"

    answer = get(world.attacker, PROXY_ATTACKER_SIDE, SCANNER, source=attacker)
    assert answer.status == 403  # ModSecurity on web1, through the proxy
    reported(world, attacker, [SCANNER])

    # The next connection ends at the proxy host's kernel (tcp_probe uses .66, the first).
    assert world.lb.probe(world.attacker, PROXY_ATTACKER_SIDE, 80) in (
        "EHOSTUNREACH",
        "ECONNREFUSED",
    )
    again = get(world.attacker, PROXY_ATTACKER_SIDE, "/", source=attacker)
    assert (again.status, again.curl_exit) == (0, 7)
    nobody_else_blocked(world)


def test_a_forged_x_forwarded_for_still_blames_the_attacker(world: ProxyWorld) -> None:
    attacker = ATTACKERS[1]
    forged = f"X-Forwarded-For: {INNOCENT}"
    answer = get(world.attacker, PROXY_ATTACKER_SIDE, SCANNER, source=attacker, headers=[forged])
    assert answer.status == 403
    reported(world, attacker, [forged])
    # The forged address reached web1, first in its X-Forwarded-For (Apache's log shows
    # what mod_remoteip left of it, nginx's the whole list), yet web1 took the attacker as
    # the client: it believed only the part its one trusted proxy added.
    site = (world.site.directory / "access.log").read_text(errors="replace")
    atk, proxy, inn = (re.escape(ip) for ip in (attacker, PROXY, INNOCENT))
    assert re.search(
        rf'^{atk} peer={proxy} "GET {SCANNER} HTTP/1\.[01]" 403 xff="{inn}[,"]', site, re.M
    ), site
    if world.proxy.kind == "nginx":  # one header line: the client's value, then the peer
        access = (world.proxy.directory / "access.log").read_text(errors="replace")
        assert f'xff="{INNOCENT}, {attacker}"' in access, access
    else:  # HAProxy's option forwardfor adds its own line after the client's (captured)
        log = world.proxy.error_log.read_text(errors="replace")
        assert re.search(rf'^{atk}:\d+ .* {{{inn}}} "GET {SCANNER} ', log, re.M), log
    again = get(world.attacker, PROXY_ATTACKER_SIDE, "/", source=attacker)
    assert (again.status, again.curl_exit) == (0, 7)
    nobody_else_blocked(world)


def test_the_enforce_only_member_has_no_local_clients(world: ProxyWorld) -> None:
    assert "[access" not in world.lb.config_file.read_text()  # the premise: no roles at all
    # A user who can reach its socket (socket_group) has no role there.
    refused = world.lb.as_user(BLOCKER, "block", "203.0.113.99")
    assert refused.returncode != 0
    assert "not allowed to block [forbidden]" in refused.stderr, refused.stderr
    assert "203.0.113.99" not in world.kernel(world.lb)
    assert world.lb.state_rows("SELECT count(*) FROM blocks WHERE origin IS NULL") == [(0,)]
    # ... yet it applies the fleet's blocks (the tests above) and reports on them to root.
    status = world.fleet_status(world.lb)
    assert status["follower_connected"] and status["refused"] == {}
    assert status["published"] == 0  # it decides nothing itself


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
@pytest.mark.skipif(bool(nginx_missing()), reason=f"{nginx_missing()}")
def test_haproxy_forwardfor_if_none_lets_a_forged_header_blame_the_innocent(
    test_users: None,
) -> None:
    """Why docs/fleet.md warns against `option forwardfor if-none`: HAProxy then adds
    nothing when the client sent the header, and web1 believes the forged address."""
    if_none = f"{documented()['haproxy']} if-none"
    with proxy_world("nginx", "haproxy", forwardfor=if_none) as world:
        attacker = ATTACKERS[1]
        forged = f"X-Forwarded-For: {INNOCENT}"
        answer = get(
            world.attacker, PROXY_ATTACKER_SIDE, SCANNER, source=attacker, headers=[forged]
        )
        assert answer.status == 403
        assert wait(lambda: INNOCENT in world.kernel(world.lb), 10), world.fleet_status(world.lb)
        assert world.show(world.web, INNOCENT)["active"]["source"] == "modsecurity:99901"
        assert world.show(world.web, attacker)["active"] is None
        # The innocent client is cut off at the proxy; the attacker still gets pages.
        assert get(world.innocent, PROXY_INNOCENT_SIDE, "/").curl_exit == 7
        assert get(world.attacker, PROXY_ATTACKER_SIDE, "/", source=attacker).status == 200
