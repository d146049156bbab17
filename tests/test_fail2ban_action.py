"""The shipped fail2ban action with the real fail2ban: a jail's ban becomes an imr block.

fail2ban-server (Debian's) runs as this test's own process inside the server
namespace, with a configuration directory, socket, pid file and in-memory
database of its own under the test's directory; never the host's service. Its
jail watches a temp log with the polling backend and bans through
contrib/fail2ban/action.d/imr.conf, which calls the real imr CLI as root
(fail2ban's user): imr's admin principal. The block is read back from the
kernel (iptables -S in the namespace), the state file and `imr show --json`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import (
    ATTACKER_V4,
    IMR,
    INNOCENT_V4,
    REPO,
    SERVER_V4,
    Daemon,
    daemon_world,
)

F2B_SERVER = shutil.which("fail2ban-server") or "fail2ban-server"
F2B_CLIENT = shutil.which("fail2ban-client") or "fail2ban-client"
JAIL = "imrtest"
ALLOWLISTED = "198.51.100.9"  # the harness allowlists 198.51.100.0/24

pytestmark = [
    pytest.mark.skipif(shutil.which("fail2ban-server") is None, reason="fail2ban not installed"),
    pytest.mark.usefixtures("test_users"),
]


def rule_for(address: str, rules: str) -> list[str]:
    return [line for line in rules.splitlines() if f"-s {address}/" in line]


def _write_fail2ban_config(conf: Path, daemon: Daemon, log: Path) -> None:
    (conf / "action.d").mkdir(parents=True)
    (conf / "filter.d").mkdir()
    shutil.copy(REPO / "contrib" / "fail2ban" / "action.d" / "imr.conf", conf / "action.d")
    (conf / "fail2ban.conf").write_text(f"""[Definition]
loglevel = INFO
logtarget = {conf / "fail2ban.log"}
socket = {conf / "fail2ban.sock"}
pidfile = {conf / "fail2ban.pid"}
dbfile = :memory:
""")
    (conf / "filter.d" / f"{JAIL}.conf").write_text(
        "[Definition]\nfailregex = ^auth failure from <HOST>$\ndatepattern = {NONE}\n"
    )
    (conf / "jail.conf").write_text(f"""[DEFAULT]
backend = polling
[{JAIL}]
enabled = true
filter = {JAIL}
logpath = {log}
maxretry = 3
findtime = 60
bantime = 600
action = imr[imr="{IMR}", imr_config="{daemon.config_file}"]
""")


@contextlib.contextmanager
def fail2ban(daemon: Daemon, log: Path) -> Iterator[Path]:
    """fail2ban-server in the foreground, in the server namespace; stopped by its pid."""
    conf = daemon.root / "fail2ban"
    _write_fail2ban_config(conf, daemon, log)
    argv = [F2B_SERVER, "-f", "-x", "-c", str(conf)]
    argv += ["-s", str(conf / "fail2ban.sock"), "-p", str(conf / "fail2ban.pid")]
    server = subprocess.Popen(
        daemon.server.argv(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        status = [F2B_CLIENT, "-s", str(conf / "fail2ban.sock"), "status", JAIL]
        ready = daemon.wait_for(
            lambda: subprocess.run(status, capture_output=True, timeout=10).returncode == 0,
            timeout=20,
        )
        assert ready, (conf / "fail2ban.log").read_text(errors="replace")[-2000:]
        yield conf
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def _fail(log: Path, address: str, times: int) -> None:
    with open(log, "a") as f:
        f.writelines(f"auth failure from {address}\n" for _ in range(times))


def test_a_jail_bans_through_imr_into_the_kernel() -> None:
    started = time.monotonic()
    with daemon_world() as world:
        world.write_config()
        assert world.start().returncode == 0
        world.listen(80)
        log = world.root / "auth.log"
        log.write_text("")
        with fail2ban(world, log) as conf:
            _fail(log, INNOCENT_V4, 1)  # below maxretry: no ban
            _fail(log, ALLOWLISTED, 3)  # banned by fail2ban, refused by imr's allowlist
            _fail(log, ATTACKER_V4, 3)
            assert world.wait_for(lambda: rule_for(ATTACKER_V4, world.rules(4)), timeout=20), (
                conf / "fail2ban.log"
            ).read_text(errors="replace")[-2000:]
            assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
            f2b_log = conf / "fail2ban.log"
            assert world.wait_for(lambda: "allowlisted" in f2b_log.read_text(), timeout=10)
            assert rule_for(ALLOWLISTED, world.rules(4)) == []
            shown = world.as_root("show", ATTACKER_V4, "--json")
            assert shown.returncode == 0, shown.stderr
            active = json.loads(shown.stdout)["active"]
            assert active["source"] == f"fail2ban:{JAIL}"
            assert active["reason"] == f"fail2ban jail {JAIL}: 3 failures"
            assert world.state_rows("SELECT ip, source, uid FROM blocks") == [
                (ATTACKER_V4, f"fail2ban:{JAIL}", 0)  # root: imr's admin principal
            ]
            # fail2ban's unban leaves the block to imr's ladder (action.d/imr.conf says why).
            client = [F2B_CLIENT, "-s", str(conf / "fail2ban.sock")]
            unban = subprocess.run(
                [*client, "set", JAIL, "unbanip", ATTACKER_V4], capture_output=True, timeout=10
            )
            assert unban.returncode == 0, unban.stderr
            time.sleep(1)
        assert rule_for(ATTACKER_V4, world.rules(4))  # fail2ban stopped; still blocked
        assert rule_for(INNOCENT_V4, world.rules(4)) == []
    assert time.monotonic() - started < 60
