"""`imr doctor`: each broken condition is made for real and must be named, with its fix.

The command is invoked directly with click's CliRunner (it is registered on the
real CLI by imr/cli.py). Kernel probes run with the test inside a throwaway
namespace of its own, on top of the doctor's own `unshare --net`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imr.backends import make_backend
from imr.cli_context import CliContext
from imr.config import Config, load_config
from imr.doctor import doctor
from imr.doctor.clock import check_clock
from imr.doctor.daemon import check_socket
from imr.doctor.findings import Finding, Level
from imr.doctor.kernel import check_kernel, kernel_probes, throwaway_netns
from imr.doctor.state import check_state
from imr.doctor.tools import Tools, check_flavour
from imr.store import SCHEMA_VERSION, Store

from daemon_harness import Daemon, daemon_world, ensure_test_users, remove_test_users
from netns import netns

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, chown)")


def make_config(tmp_path: Path, **firewall: str) -> Config:
    lines = [
        "[server]",
        f'socket = "{tmp_path / "imr.sock"}"',
        'socket_mode = "0660"',
        'socket_group = "adm"',
        f'pid_file = "{tmp_path / "imr.pid"}"',
        "[state]",
        f'path = "{tmp_path / "state.db"}"',
        "[firewall]",
        *(f'{key} = "{value}"' for key, value in firewall.items()),
    ]
    path = tmp_path / "imr.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, missing_ok=False)


def invoke(config: Config, *args: str, env: dict[str, str] | None = None) -> Result:
    ctx = CliContext(config, Path("test.toml"))
    return CliRunner().invoke(doctor, list(args), obj=ctx, env=env)


def bound_socket(path: Path, mode: int, gid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    os.chown(path, 0, gid)
    path.chmod(mode)
    return sock


def problems(findings: list[Finding], check: str) -> list[str]:
    return [f.message for f in findings if f.level is Level.PROBLEM and f.check == check]


# The socket -----------------------------------------------------------------------


@needs_root
def test_socket_with_the_wrong_mode_and_group_is_named_with_the_fix(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    with contextlib.closing(bound_socket(config.server.socket, 0o666, 0)):
        findings = check_socket(config)
        messages = problems(findings, "socket")
        assert any("mode 0666" in m and "'0660'" in m for m in messages), findings
        assert any("group root (0)" in m and "'adm'" in m for m in messages), findings
        fixes = " ".join(f.fix for f in findings)
        assert f"chmod 0660 {config.server.socket}" in fixes and "SocketGroup=adm" in fixes

        result = invoke(config, "--no-kernel-probe")
        assert result.exit_code == 1, result.output
        assert "PROBLEM  socket:" in result.output and "fix: chmod 0660" in result.output


@needs_root
def test_a_correct_socket_passes_unless_its_directory_is_closed(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    tmp_path.chmod(0o700)
    with contextlib.closing(bound_socket(config.server.socket, 0o660, 4)):  # group adm
        (message,) = problems(check_socket(config), "socket")
        assert f"{tmp_path} (mode 0700) cannot be searched" in message
    open_dir = Path(tempfile.mkdtemp(prefix="imrdoc-", dir="/tmp"))
    try:
        open_dir.chmod(0o755)
        config = make_config(open_dir, backend="dryrun")
        with contextlib.closing(bound_socket(config.server.socket, 0o660, 4)):
            findings = check_socket(config)
        assert [f.level for f in findings] == [Level.OK], findings
    finally:
        shutil.rmtree(open_dir)


def test_a_plain_file_where_the_socket_should_be(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    config.server.socket.write_text("not a socket")
    (message,) = problems(check_socket(config), "socket")
    assert "is not a socket" in message


# The daemon -----------------------------------------------------------------------


def test_no_daemon_is_a_problem_and_exit_1(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    result = invoke(config, "--no-kernel-probe", "--json")
    assert result.exit_code == 1
    import json

    findings = json.loads(result.output)
    daemon = [f for f in findings if f["check"] == "daemon"]
    assert daemon and daemon[0]["level"] == "problem"
    assert "does not answer" in daemon[0]["message"]
    assert "systemctl start imr.service" in daemon[0]["fix"]


def test_a_stale_pid_file_is_named(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    config.server.pid_file.write_text(f"{os.getppid()}\n")  # pytest's parent: not imr
    result = invoke(config, "--no-kernel-probe")
    assert "stale pid file" in result.output and result.exit_code == 1


# The state file -------------------------------------------------------------------


def test_garbage_state_file_is_damaged(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    config.state.path.write_bytes(b"this is not SQLite\n" * 100)
    config.state.path.chmod(0o640)
    (message,) = problems(check_state(config, 2e9), "state file")
    assert "is damaged" in message
    result = invoke(config, "--no-kernel-probe")
    assert result.exit_code == 1 and ".recover" in result.output


def _state_with_blocks(config: Config, count: int, at: float) -> None:
    store = Store(config.state.path)
    with store.transaction():
        for n in range(count):
            store._db.execute(
                "INSERT INTO blocks (ip, blocked_at, expires_at, rung, offence, reason, source)"
                " VALUES (?, ?, ?, 1, 1, ?, 'test')",
                (
                    f"203.0.113.{n % 250}" if n < 250 else f"2001:db8::{n:x}",
                    at,
                    at + 86400,
                    "x" * 200,
                ),
            )
            if n >= 1:
                store._db.execute("UPDATE blocks SET lifted_at = ? WHERE id = ?", (at, n))
    store.close()


def test_a_corrupted_page_fails_the_integrity_check(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    _state_with_blocks(config, 2000, 1.9e9)
    with contextlib.closing(sqlite3.connect(config.state.path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    assert check_state(config, 1.9e9)[0].level is Level.OK
    # Scribble over an index page in the middle of the file, keeping the header valid.
    with open(config.state.path, "r+b") as f:
        f.seek(page_size * (pages - 3) + 8)
        f.write(os.urandom(page_size - 16))
    (message,) = problems(check_state(config, 1.9e9), "state file")
    assert "is damaged" in message


def test_a_newer_schema_and_future_times_are_problems(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    _state_with_blocks(config, 1, 2.0e9)
    findings = check_state(config, 1.9e9)  # the clock is 100 million seconds behind the file
    assert any("the clock went back" in m for m in problems(findings, "clock"))
    with contextlib.closing(sqlite3.connect(config.state.path)) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    (message,) = problems(check_state(config, 2.0e9), "state file")
    assert f"schema version {SCHEMA_VERSION + 1}" in message


def test_a_state_file_others_can_write_is_a_problem(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="dryrun")
    _state_with_blocks(config, 1, 1.9e9)
    config.state.path.chmod(0o666)
    (message,) = problems(check_state(config, 1.9e9), "state file")
    assert "mode 0666" in message


# Tools, flavour, kernel ------------------------------------------------------------


def path_without(tmp_path: Path, *missing: str) -> str:
    """A PATH directory with every firewall tool of this host except `missing`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (
        "iptables",
        "ip6tables",
        "iptables-nft",
        "ip6tables-nft",
        "iptables-nft-restore",
        "ip6tables-nft-restore",
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy",
        "ip6tables-legacy",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-legacy-restore",
        "ip6tables-legacy-restore",
        "nft",
        "ipset",
        "unshare",
        "nsenter",
        "sleep",
    ):
        found = shutil.which(tool)
        if found and tool not in missing:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_a_missing_tool_is_named_with_the_package(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="iptables", iptables_flavour="nft")
    path = path_without(tmp_path, "iptables-nft-restore", "ip6tables-nft-restore")
    result = invoke(config, "--no-kernel-probe", env={"PATH": path})
    assert result.exit_code == 1
    assert "needs iptables-nft-restore, ip6tables-nft-restore, not found" in result.output
    assert "apt-get install iptables" in result.output


def test_auto_with_no_firewall_tool_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, backend="auto")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("imr.doctor.tools._has_libnftables", lambda: False)
    result = invoke(config, "--no-kernel-probe")
    assert result.exit_code == 1
    assert "no firewall backend has its tools" in result.output
    assert "'iptables' is not installed" in result.output


def test_rules_in_both_iptables_flavours_are_a_problem(tmp_path: Path) -> None:
    config = make_config(tmp_path, backend="iptables")
    saves = {
        "iptables": "iptables v1.8.9 (nf_tables)\n",
        "iptables-nft-save": "*filter\n-A INPUT -s 192.0.2.9/32 -j DROP\nCOMMIT\n",
        "iptables-legacy-save": "*filter\n-A INPUT -s 192.0.2.8/32 -j DROP\nCOMMIT\n",
    }

    def fake(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        name = argv[0]
        return subprocess.CompletedProcess([name], 0, saves[name], "")

    finding = check_flavour(config, Tools.find(), fake)
    assert finding.level is Level.PROBLEM and "both the nf_tables and the legacy" in finding.message
    saves["iptables-legacy-save"] = ""
    config = make_config(tmp_path, backend="iptables", iptables_flavour="legacy")
    finding = check_flavour(config, Tools.find(), fake)
    assert finding.level is Level.PROBLEM and "set firewall.iptables_flavour = 'nft'" in finding.fix


def test_a_backend_the_kernel_refuses_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    config = make_config(tmp_path, backend="nftables")
    findings = check_kernel(config, lambda: {"nftables": "nft -f: Could not process rule"})
    (finding,) = findings
    assert finding.level is Level.PROBLEM and "Could not process rule" in finding.message
    assert "modules-load" in finding.fix or "imr-modules.conf" in finding.fix
    auto = make_config(tmp_path, backend="auto")
    findings = check_kernel(auto, lambda: {"nftables": "refused", "ipset": None})
    assert [f.message for f in findings if f.check == "backend"] == ["auto would choose ipset"]


@needs_root
def test_kernel_probes_run_in_a_throwaway_namespace_only() -> None:
    with netns("imrdoc") as ns, ns.entered():
        tools = Tools.find()
        with throwaway_netns() as inside:
            links = inside(["ip", "-o", "link"], None).stdout
            results = kernel_probes(tools, inside)
            # While the probe namespace lives, its objects are there, and only there.
            assert "imr_doctor" in inside(["nft", "list", "tables"], None).stdout
        assert links.count("\n") == 1 and "lo" in links  # a fresh namespace: loopback only
        assert results["nftables"] is None, results
        assert results["iptables-nft"] is None, results
        assert results["ipset"] is None, results
        assert "imr_doctor" not in ns.run("nft", "list", "tables").stdout
        assert "IMR_DOCTOR" not in ns.run("iptables-nft-save").stdout
        assert "imr-doctor" not in ns.run("ipset", "list", "-n", check=False).stdout


@needs_root
@pytest.mark.parametrize(
    ("missing", "legacy_chain", "expected"),
    [
        ((), False, "nftables"),
        (("nft",), False, "ipset"),
        (("nft", "ipset"), False, "iptables-nft"),
        # imr's chain already in the legacy tables: the daemon stays there, and doctor says so.
        (("nft", "ipset"), True, "iptables-legacy"),
    ],
)
def test_doctor_names_the_backend_the_daemon_chooses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    missing: tuple[str, ...],
    legacy_chain: bool,
    expected: str,
) -> None:
    config = make_config(tmp_path, backend="auto")
    path = path_without(tmp_path, *missing)
    with netns("imrdoc") as ns, ns.entered(), monkeypatch.context() as patch:
        if legacy_chain:
            ns.run("iptables-legacy", "-N", "IMR")
        patch.setenv("PATH", path)  # only now: `ip` makes and deletes the namespace
        tools = Tools.find()
        with throwaway_netns() as inside:
            results = kernel_probes(tools, inside)
        said = [f.message for f in check_kernel(config, lambda: results) if f.check == "backend"]
        chosen = make_backend(config.firewall).backend
    flavour = getattr(chosen, "flavour", "")
    name = f"iptables-{flavour}" if chosen.name == "iptables" else chosen.name
    assert said == [f"auto would choose {name}"]
    assert name == expected


# The clock ------------------------------------------------------------------------


def test_an_implausible_clock_is_a_problem() -> None:
    findings = check_clock(wall=lambda: 86400.0, synchronised=lambda: True)
    assert any("1970-01-02" in m for m in problems(findings, "clock"))


def test_an_unsynchronised_clock_is_a_warning() -> None:
    findings = check_clock(synchronised=lambda: False)
    assert [f.level for f in findings] == [Level.WARNING]
    assert "timedatectl set-ntp true" in findings[0].fix
    assert [f.level for f in check_clock(synchronised=lambda: True)] == [Level.OK]


def test_a_stepping_wall_clock_is_noticed() -> None:
    jumps = iter([1.8e9, 1.8e9, 1.8e9 + 5])
    findings = check_clock(wall=lambda: next(jumps), synchronised=lambda: True)
    assert any("moved +4." in f.message for f in findings), findings


def test_usage_error_exits_2(tmp_path: Path) -> None:
    result = invoke(make_config(tmp_path, backend="dryrun"), "--no-such-option")
    assert result.exit_code == 2


# Everything healthy: the real daemon -------------------------------------------------


@pytest.fixture
def world() -> Iterator[Daemon]:
    created = ensure_test_users()
    try:
        with daemon_world() as daemon:
            daemon.write_config()
            yield daemon
    finally:
        remove_test_users(created)


@needs_root
def test_a_healthy_daemon_passes_then_a_broken_socket_mode_fails(world: Daemon) -> None:
    started = world.start()
    assert started.returncode == 0, started.stderr
    config = load_config(world.config_file, missing_ok=False)
    with world.server.entered():
        result = invoke(config)
        assert result.exit_code == 0, result.output
        assert "0 problem(s)" in result.output
        assert "ok       daemon: answers ping" in result.output
        assert "ok       kernel: iptables-nft" in result.output
        world.socket.chmod(0o666)
        broken = invoke(config, "--no-kernel-probe")
    assert broken.exit_code == 1
    assert "has mode 0666" in broken.output
