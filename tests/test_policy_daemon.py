"""One incident, several reporters, against the real daemon: it counts once, at rung 1.

The ModSecurity hook (imr-hook, no severity) and the log scanner (`imr scan`, the
code-red signature: severity 8) both run as the unprivileged user with the block role,
over the daemon's socket; the daemon is root with the iptables backend in a throwaway
namespace (tests/daemon_harness.py). The default ladder is 1d, 7d.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from imr.logscan.signatures import BUILTIN

from daemon_harness import ATTACKER_V4, BLOCKER, Daemon, daemon_world

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]

HOOK = str(Path(sys.executable).parent / "imr-hook")
SECOND = "203.0.113.67"  # blocked only, never probed: needs no namespace
DAY = 86400


def _code_red(ip: str) -> str:
    signature = next(s for s in BUILTIN if s.name == "code-red")
    assert signature.severity == 8
    sample = signature.samples[0]
    return sample.replace(sample.split(" ", 1)[0], ip, 1) + "\n"


def _hook(world: Daemon, ip: str, action: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "IMR_IP": ip, "IMR_RULE": "941100"}
    env["IMR_SOCKET"] = str(world.socket)
    argv = ["runuser", "-u", BLOCKER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items())]
    result = subprocess.run([*argv, HOOK], capture_output=True, text=True, timeout=30)
    assert result.stdout == f"imr-hook: {action} {ip}\n", (result.stdout, result.stderr)


def _scan(world: Daemon, ip: str) -> None:
    log, state = world.root / f"access-{ip}.log", world.root / f"scan-{ip}"
    log.write_text(_code_red(ip))
    log.chmod(0o644)
    state.mkdir()
    subprocess.run(["chown", BLOCKER, str(state)], check=True)
    argv = world.imr_argv("scan", "--state-dir", str(state), str(log))
    result = subprocess.run(
        ["runuser", "-u", BLOCKER, "--", *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"{ip} code-red severity=8" in result.stdout, result.stdout


def _assert_one_incident_at_rung_one(world: Daemon, ip: str, sources: list[str]) -> None:
    shown = world.as_root("show", ip, "--json")
    assert shown.returncode == 0, shown.stderr
    reply = json.loads(shown.stdout)
    active = reply["active"]
    assert (active["rung"], active["offence"], active["duration"]) == (1, 1, "1d")
    length = datetime.fromisoformat(active["expires_at"]) - datetime.fromisoformat(
        active["blocked_at"]
    )
    assert length.total_seconds() == DAY
    # show lists hits newest first.
    assert [h["source"] for h in reply["hits"]] == sources[::-1]
    assert [h["outcome"] for h in reply["hits"]] == ["record", "block"]
    columns = "rung, offence, expires_at - blocked_at, lifted_at"
    rows = world.state_rows(f"SELECT {columns} FROM blocks WHERE ip = '{ip}'")  # noqa: S608
    assert rows == [(1, 1, DAY, None)]
    text = world.as_root("show", ip).stdout.splitlines()[0]
    assert text.startswith(f"{ip} is blocked until {active['expires_at']} (rung 1, offence 1, 1d,")


def test_hook_then_scanner_and_scanner_then_hook_stay_at_rung_one() -> None:
    with daemon_world() as world:
        world.write_config()
        started = world.start()
        assert started.returncode == 0, started.stderr

        _hook(world, ATTACKER_V4, "block")  # ModSecurity denies the request at once ...
        _scan(world, ATTACKER_V4)  # ... and the scanner finds it in the log moments later
        _assert_one_incident_at_rung_one(
            world, ATTACKER_V4, ["modsecurity:941100", "logscan:code-red"]
        )

        _scan(world, SECOND)  # severity 8 first: still a first offence, rung 1
        _hook(world, SECOND, "record")
        _assert_one_incident_at_rung_one(world, SECOND, ["logscan:code-red", "modsecurity:941100"])

        log = world.log_file.read_text()
        assert "(first offence; severity 8 does not skip rungs)" in log, log
        assert "(same incident, counted once)" in log, log
