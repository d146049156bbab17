"""SIGHUP and `imr server reload` (issue #15 item 5): reopen the log, read the config again.

A real daemon (tests/daemon_harness.py): its log renamed as logrotate does, then
SIGHUP; the daemon keeps serving, writes to the new file, and applies a changed
allowlist and roles. A bad configuration is refused and the old one stays.
"""

from __future__ import annotations

import grp
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import BLOCKER, IMR, NOBODY, REPO, Daemon, daemon_world

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]

RELOADED = "reload: configuration read again"


@pytest.fixture
def world() -> Iterator[Daemon]:
    with daemon_world() as daemon:
        daemon.write_config()
        result = daemon.start()
        assert result.returncode == 0, result.stderr
        yield daemon


def _edit(world: Daemon, old: str, new: str) -> None:
    text = world.config_file.read_text()
    assert old in text
    world.config_file.write_text(text.replace(old, new))


def _logged(path: Path, text: str, count: int = 1) -> bool:
    try:
        return path.read_text().count(text) >= count
    except FileNotFoundError:
        return False


def test_sighup_after_a_rename_rotation_reopens_the_log_and_applies_the_allowlist(
    world: Daemon,
) -> None:
    pid = world.pid()
    assert pid is not None
    rotated = world.log_file.with_name("imr.log.1")
    world.log_file.rename(rotated)
    _edit(world, '["198.51.100.0/24"]', '["198.51.100.0/24", "203.0.113.66/32"]')
    _edit(world, f'"{BLOCKER}" = "block"', f'"{BLOCKER}" = "block"\n"{NOBODY}" = "block"')

    os.kill(pid, signal.SIGHUP)  # what logrotate's postrotate does

    assert world.wait_for(lambda: _logged(world.log_file, RELOADED))
    assert world.pid() == pid and Path(f"/proc/{pid}").exists()
    info = world.log_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    refused = world.as_user(BLOCKER, "block", "203.0.113.66")
    assert refused.returncode == 1
    assert "protected" in refused.stderr or "allowlist" in refused.stderr, refused.stderr
    allowed = world.as_user(NOBODY, "block", "203.0.113.77")  # a role it got by the reload
    assert allowed.returncode == 0, allowed.stderr
    assert "-s 203.0.113.77/32" in world.rules(4)
    assert "203.0.113.77" in world.log_file.read_text()
    assert "203.0.113.77" not in rotated.read_text()


def test_a_bad_config_on_reload_is_refused_and_the_old_one_stays(world: Daemon) -> None:
    pid = world.pid()
    assert pid is not None
    good = world.config_file.read_text()
    world.config_file.write_text(
        good.replace('["198.51.100.0/24"]', '["198.51.100.0/24", "203.0.113.66/32"]')
        + "\n[quota]\nblocks_per_minute = -1\n"
    )
    result = world.as_root("server", "reload")
    assert result.returncode == 2
    assert "quota.blocks_per_minute" in result.stderr

    os.kill(pid, signal.SIGHUP)  # the daemon, asked directly, refuses it too
    assert world.wait_for(lambda: _logged(world.log_file, "reload refused"))
    assert "quota.blocks_per_minute" in world.log_file.read_text()
    assert world.pid() == pid
    world.config_file.write_text(good)  # the clients read it too (the socket path)
    # The old allowlist is in force: the address the bad file would protect is blockable.
    blocked = world.as_user(BLOCKER, "block", "203.0.113.66")
    assert blocked.returncode == 0, blocked.stderr


def test_imr_server_reload_names_settings_that_need_a_restart(world: Daemon) -> None:
    _edit(world, 'backend = "iptables"', 'backend = "nftables"')
    _edit(world, '["198.51.100.0/24"]', '["198.51.100.0/24", "203.0.113.66/32"]')
    result = world.as_root("server", "reload")
    assert result.returncode == 0, result.stderr
    assert world.wait_for(lambda: _logged(world.log_file, RELOADED))
    log = world.log_file.read_text()
    assert "firewall.backend changed but take effect only at a restart" in log
    status = world.as_root("server", "status", "--json")
    assert '"iptables' in status.stdout or "iptables" in status.stdout  # still the old backend
    assert world.as_user(BLOCKER, "block", "203.0.113.66").returncode == 1  # allowlist is live


def test_merge_keeps_fixed_settings_and_names_them() -> None:
    from imr.config import Config
    from imr.server.reload import merge

    old = Config.model_validate({"server": {"socket": "/run/a.sock"}})
    new = Config.model_validate(
        {
            "server": {"socket": "/run/b.sock", "log_changes_per_second": 5},
            "firewall": {"backend": "nftables"},
            "protect": {"allowlist": ["192.0.2.0/24"]},
            "quota": {"blocks_per_minute": 7},
        }
    )
    effective, fixed = merge(old, new)
    assert fixed == ["server.socket", "firewall.backend"]
    assert str(effective.server.socket) == "/run/a.sock"
    assert effective.firewall.backend == old.firewall.backend
    assert effective.server.log_changes_per_second == 5
    assert [str(n) for n in effective.protect.allowlist] == ["192.0.2.0/24"]
    assert effective.quota.blocks_per_minute == 7


def test_reload_without_a_daemon_exits_3(world: Daemon) -> None:
    assert world.stop().returncode == 0
    result = world.as_root("server", "reload")
    assert result.returncode == 3
    assert "not running" in result.stderr


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="needs logrotate")
def test_the_shipped_logrotate_file_rotates_and_the_daemon_follows(world: Daemon) -> None:
    """contrib/logrotate/imr as it ships, with this test's paths: a forced rotation."""
    shipped = (REPO / "contrib" / "logrotate" / "imr").read_text()
    assert "/var/log/imr/imr.log {" in shipped and "/usr/local/bin/imr server reload" in shipped
    conf = world.root / "logrotate.conf"
    conf.write_text(
        shipped.replace("/var/log/imr/imr.log", str(world.log_file)).replace(
            "/usr/local/bin/imr server reload", f"{IMR} --config {world.config_file} server reload"
        )
    )
    conf.chmod(0o644)
    argv = ["logrotate", "--force", "--state", str(world.root / "logrotate.state"), str(conf)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    rotated = world.log_file.with_name("imr.log.1")
    assert rotated.exists()  # delaycompress: the first rotation stays plain
    assert world.wait_for(lambda: _logged(world.log_file, RELOADED))
    info = world.log_file.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o640, 0)
    assert info.st_gid == grp.getgrnam("adm").gr_gid
    assert world.as_user(BLOCKER, "block", "203.0.113.88").returncode == 0
    assert "203.0.113.88" in world.log_file.read_text()
    assert "203.0.113.88" not in rotated.read_text()
