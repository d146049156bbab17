"""The ModSecurity integration against the real web servers, in throwaway namespaces.

A scanner request from the attacker namespace trips an imr rule; the hook
(imr-hook via exec, or imr.lua in-process) reports the client to the real
daemon, which makes the kernel reject the attacker's next connection while an
innocent client still gets pages. And whatever state the daemon is in, the
web server answers at once and stays up.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import pytest

from daemon_harness import ATTACKER_V4, INNOCENT_V4, SERVER_SIDE_V4, SERVER_V4, Daemon
from modsec_harness import (
    CRS_LOAD,
    apache_missing,
    get,
    hung_daemon,
    nginx_missing,
    web_server,
    world,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

# (web server, hook): v3/nginx accepts only Lua for exec.
SETUPS = [
    pytest.param(
        "apache",
        "exec",
        marks=pytest.mark.skipif(bool(apache_missing()), reason=f"{apache_missing()}"),
    ),
    pytest.param(
        "apache",
        "exec-direct",
        marks=pytest.mark.skipif(bool(apache_missing()), reason=f"{apache_missing()}"),
    ),
    pytest.param(
        "apache",
        "lua",
        marks=pytest.mark.skipif(bool(apache_missing()), reason=f"{apache_missing()}"),
    ),
    pytest.param(
        "nginx", "lua", marks=pytest.mark.skipif(bool(nginx_missing()), reason=f"{nginx_missing()}")
    ),
    pytest.param(  # the shipped launcher, contrib/modsecurity/imr-hook
        "apache",
        "exec-launcher",
        marks=pytest.mark.skipif(bool(apache_missing()), reason=f"{apache_missing()}"),
    ),
]


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with world() as d:
        yield d


def start_daemon(daemon: Daemon) -> None:
    result = daemon.start()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("kind", "hook"), SETUPS)
def test_scanner_is_blocked_in_the_kernel_and_innocent_client_is_not(
    daemon: Daemon, kind: str, hook: str
) -> None:
    start_daemon(daemon)
    with web_server(daemon, kind, hook) as web:
        assert get(daemon.attacker, SERVER_V4, "/").status == 200

        first = get(daemon.attacker, SERVER_V4, "/roundcube/bin/msgimport")
        assert first.status == 403
        assert first.seconds < 1.0

        # The report is made in phase 5, just after the answer; give it a moment.
        def listed() -> bool:
            return ATTACKER_V4 in daemon.as_root("list", "--json").stdout

        assert daemon.wait_for(listed, 5), web.error_log.read_text(errors="replace")
        shown = json.loads(daemon.as_root("show", ATTACKER_V4, "--json").stdout)
        assert shown["active"] is not None
        assert shown["blocks"][0]["source"] == "modsecurity:99901"
        assert shown["blocks"][0]["reason"] == "ModSecurity rule 99901"

        assert daemon.probe(daemon.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
        again = get(daemon.attacker, SERVER_V4, "/")
        assert again.status == 0 and again.curl_exit == 7  # kernel rejected the connection
        assert get(daemon.innocent, SERVER_SIDE_V4, "/").status == 200
        assert web.alive()


@pytest.mark.parametrize(("kind", "hook"), SETUPS)
@pytest.mark.parametrize("state", ["stopped", "hung"])
def test_fails_open_when_the_daemon_is_down_or_hung(
    daemon: Daemon, kind: str, hook: str, state: str
) -> None:
    hung = hung_daemon(daemon.socket) if state == "hung" else contextlib.nullcontext()
    with hung, web_server(daemon, kind, hook) as web:
        for path in ("/mail/bin/msgimport", "/user/soapCaller.bs"):
            answer = get(daemon.attacker, SERVER_V4, path)
            assert answer.status == 403
            assert answer.seconds < 1.0, f"{kind}/{hook} took {answer.seconds:.2f}s"
        assert get(daemon.attacker, SERVER_V4, "/").status == 200  # not blocked
        assert get(daemon.innocent, SERVER_SIDE_V4, "/").status == 200
        assert web.alive()

        # The hook runs after the answer; its one-line complaint follows shortly.
        def complained() -> bool:
            return "not blocked" in web.error_log.read_text(errors="replace")

        assert daemon.wait_for(complained, 3), web.error_log.read_text(errors="replace")


@pytest.mark.skipif(not CRS_LOAD.exists(), reason="modsecurity-crs is not installed")
@pytest.mark.parametrize(("kind", "hook"), [SETUPS[0], SETUPS[3]])
def test_crs_anomaly_score_over_the_threshold_is_reported(
    daemon: Daemon, kind: str, hook: str
) -> None:
    start_daemon(daemon)
    with web_server(daemon, kind, hook, crs=True) as web:
        assert get(daemon.innocent, SERVER_SIDE_V4, "/?q=hello").status == 200
        attack = get(daemon.attacker, SERVER_V4, "/?id=1%27%20OR%20%271%27%3D%271%27--")
        assert attack.status == 403

        def listed() -> bool:
            return ATTACKER_V4 in daemon.as_root("list", "--json").stdout

        assert daemon.wait_for(listed, 5), web.error_log.read_text(errors="replace")
        shown = json.loads(daemon.as_root("show", ATTACKER_V4, "--json").stdout)
        assert shown["blocks"][0]["source"] == "modsecurity:99910"
        assert daemon.as_root("show", INNOCENT_V4, "--json").stdout.count('"active": null') == 1
