"""Cron mode: reruns, rotation by rename, copytruncate and compression never skip
or repeat a line. Each attack line has its own address, so the blocked addresses
across all runs must be exactly the attack lines written, each once."""

from __future__ import annotations

import gzip
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imr.client import DaemonUnavailable
from imr.logscan.engine import Scanner
from imr.logscan.reader import StateError, StateStore
from imr.logscan.runner import Report, scan_files
from imr.logscan.signatures import BUILTIN

from daemon_harness import NOBODY, require_unprivileged_access
from logscan_helpers import FakeClient, benign, combined

SCANNER = Scanner(BUILTIN)


class Log:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.serial = 0
        self.written: list[str] = []

    def attack(self, count: int = 1, benign_between: int = 3) -> None:
        with open(self.path, "a") as f:
            for _ in range(count):
                self.serial += 1
                ip = f"203.0.{self.serial // 250}.{self.serial % 250 + 1}"
                self.written.append(ip)
                f.write(combined(ip, "/mail/bin/msgimport"))
                for i in range(benign_between):
                    f.write(benign(self.serial * 10 + i))

    def partial(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text)


def run(log: Log, state: Path, client: FakeClient) -> Report:
    with StateStore(state) as store:
        report = scan_files([log.path], SCANNER, store, client, max_line=65536)
        store.save()
    return report


@pytest.fixture
def log(tmp_path: Path) -> Log:
    return Log(tmp_path / "access.log")


def test_rerun_reads_only_new_lines(log: Log, tmp_path: Path, fake_client: FakeClient) -> None:
    state = tmp_path / "state"
    log.attack(3)
    first = run(log, state, fake_client)
    assert first.stats.lines == 12
    again = run(log, state, fake_client)
    assert again.stats.lines == 0 and again.outcomes == []
    log.attack(2)
    third = run(log, state, fake_client)
    assert third.stats.lines == 8
    assert fake_client.ips == log.written


def test_a_half_written_line_is_read_once_when_complete(
    log: Log, tmp_path: Path, fake_client: FakeClient
) -> None:
    state = tmp_path / "state"
    log.attack(1)
    line = combined("198.51.100.99", "/w00tw00t.at.ISC.SANS.DFind:)")
    log.partial(line[:30])
    run(log, state, fake_client)
    assert fake_client.ips == log.written
    log.partial(line[30:])
    run(log, state, fake_client)
    run(log, state, fake_client)
    assert fake_client.ips == [*log.written, "198.51.100.99"]


def test_rename_rotation(log: Log, tmp_path: Path, fake_client: FakeClient) -> None:
    state = tmp_path / "state"
    log.attack(2)
    run(log, state, fake_client)
    log.attack(2)  # written after the run, before rotation: only in access.log.1
    os.rename(log.path, log.path.with_name("access.log.1"))
    log.attack(2)  # the new file
    run(log, state, fake_client)
    log.attack(1)
    run(log, state, fake_client)
    assert fake_client.ips == log.written


def test_copytruncate_rotation(log: Log, tmp_path: Path, fake_client: FakeClient) -> None:
    state = tmp_path / "state"
    log.attack(2)
    run(log, state, fake_client)
    log.attack(3)
    shutil.copyfile(log.path, log.path.with_name("access.log.1"))
    with open(log.path, "r+") as f:
        f.truncate(0)
    log.attack(1)
    run(log, state, fake_client)
    assert fake_client.ips == log.written


def test_copytruncate_when_new_file_outgrew_old_offset(
    log: Log, tmp_path: Path, fake_client: FakeClient
) -> None:
    state = tmp_path / "state"
    log.attack(1)
    run(log, state, fake_client)
    shutil.copyfile(log.path, log.path.with_name("access.log.1"))
    with open(log.path, "r+") as f:
        f.truncate(0)
    log.attack(5)  # same inode, larger than the saved offset: only the first line tells
    run(log, state, fake_client)
    assert fake_client.ips == log.written


def test_compressed_rotations_not_yet_finished(
    log: Log, tmp_path: Path, fake_client: FakeClient
) -> None:
    state = tmp_path / "state"
    log.attack(2)
    run(log, state, fake_client)
    log.attack(2)
    # Two rotations before the next run: the file we were reading is now .2.gz,
    # and .1.gz was never seen at all.
    for name in ("access.log.2.gz", "access.log.1.gz"):
        with open(log.path, "rb") as src, gzip.open(log.path.with_name(name), "wb") as dst:
            shutil.copyfileobj(src, dst)
        log.path.unlink()
        if name.endswith("2.gz"):
            log.attack(2)
    log.attack(1)
    run(log, state, fake_client)
    assert fake_client.ips == log.written


def test_daemon_down_means_nothing_is_remembered(log: Log, tmp_path: Path) -> None:
    state = tmp_path / "state"
    log.attack(2)
    down = FakeClient(down=True)
    with pytest.raises(DaemonUnavailable), StateStore(state) as store:
        scan_files([log.path], SCANNER, store, down, max_line=65536)
    up = FakeClient()
    run(log, state, up)
    assert up.ips == log.written


def test_refusals_are_reported_not_fatal(log: Log, tmp_path: Path) -> None:
    log.attack(2)
    client = FakeClient(refuse={"203.0.0.2": "allowlisted"})
    report = run(log, tmp_path / "s", client)
    assert [(o.ip, o.status) for o in report.outcomes] == [
        ("203.0.0.2", "refused"),
        ("203.0.0.3", "blocked"),
    ]
    assert report.outcomes[0].detail.startswith("allowlisted")


def test_overlong_line_is_skipped_and_counted(
    log: Log, tmp_path: Path, fake_client: FakeClient
) -> None:
    log.attack(1)
    log.partial(combined("198.51.100.7", "/bin/msgimport?" + "A" * 200_000))
    log.attack(1)
    with StateStore(tmp_path / "s") as store:
        report = scan_files([log.path], SCANNER, store, fake_client, max_line=8192)
    assert fake_client.ips == log.written
    assert report.stats.bad == 1


def test_two_runs_at_once_are_refused(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s"), pytest.raises(StateError, match="another imr scan"):
        StateStore(tmp_path / "s").__enter__()


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="unreadable state"), StateStore(tmp_path / "s"):
        pass


# --- rule sets and ownership (issue #15 item 6) -----------------------------------------


def test_offsets_are_kept_per_rule_set(log: Log, tmp_path: Path) -> None:
    """A scan with another rule set does not move the built-in signatures' offset."""
    log.attack(3)
    other, builtin = FakeClient(), FakeClient()
    with StateStore(tmp_path / "s") as store:
        scan_files([log.path], SCANNER, store, other, max_line=65536, rule_set="fail2ban:x")
        store.save()
    with StateStore(tmp_path / "s") as store:
        scan_files([log.path], SCANNER, store, builtin, max_line=65536)
        store.save()
    assert other.ips == builtin.ips == log.written
    raw = json.loads((tmp_path / "s" / "state.json").read_text())
    assert list(raw["files"]) == list(raw["rule_sets"]["fail2ban:x"]["files"])


def _as_user(user: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


_OPEN_STATE = """
import sys
from pathlib import Path
from imr.logscan.reader import StateError, StateStore
try:
    with StateStore(Path(sys.argv[1])) as store:
        print(len(store.files))
        store.save()
except StateError as exc:
    print(exc)
"""


@pytest.fixture
def user_state(test_users: None) -> Iterator[tuple[Path, pwd.struct_passwd]]:
    """A state directory owned by an unprivileged user, in a world-traversable place."""
    require_unprivileged_access()
    root = Path(tempfile.mkdtemp(prefix="imrtest-scan-", dir="/tmp"))
    root.chmod(0o755)
    user = pwd.getpwnam(NOBODY)
    state = root / "logscan"
    state.mkdir(mode=0o750)
    os.chown(state, user.pw_uid, user.pw_gid)
    try:
        yield state, user
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_root_run_keeps_the_state_owned_by_the_scanner_user(
    log: Log, user_state: tuple[Path, pwd.struct_passwd]
) -> None:
    state, user = user_state
    log.attack(2)
    run(log, state, FakeClient())  # as root, e.g. an admin trying `imr scan` by hand
    for name in ("state.json", "lock"):
        st = (state / name).stat()
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), name
    after = _as_user(NOBODY, _OPEN_STATE, str(state))
    assert after.returncode == 0 and after.stdout.strip() == "1", after.stderr


def test_a_state_file_root_took_over_is_refused_with_the_fix(
    user_state: tuple[Path, pwd.struct_passwd],
) -> None:
    state, _ = user_state
    (state / "state.json").write_text('{"version": 1, "files": {}, "pending": []}')
    (state / "state.json").chmod(0o600)  # root's, as an older imr left it
    result = _as_user(NOBODY, _OPEN_STATE, str(state))
    assert result.returncode == 0, result.stderr
    assert "permission denied" in result.stdout
    assert f"As root, run: chown -R {NOBODY}: {state}" in result.stdout
