"""The CLI an admin reaches for (issue #15 item 10) and the doctor's [access] checks (item 9).

The daemon tests run the real daemon (nftables backend, in its own namespace) and the CLI
as root (admin) and as the unprivileged test users (block, read), as docs/operations.md
says an admin would.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from test_broker import addr, running

from imr.cli_admin import summarise
from imr.core.listing import source_matcher
from imr.protocol import BlockRequest, timestamp
from imr.server.broker import BrokerError

from daemon_harness import BLOCKER, IMR, READER, REPO, Daemon, daemon_world
from fakes import ROOT, WEB

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


# Pure pieces ---------------------------------------------------------------------------


def test_source_filter_is_a_tag_with_its_subtags_or_a_glob() -> None:
    tags = ["logscan", "logscan:nginx-404", "logscanner", "cli", "modsecurity:99999"]
    assert [t for t in tags if source_matcher("logscan")(t)] == ["logscan", "logscan:nginx-404"]
    assert [t for t in tags if source_matcher("logscan*")(t)] == tags[:3]
    assert [t for t in tags if source_matcher("modsec*:9*")(t)] == ["modsecurity:99999"]
    assert [t for t in tags if source_matcher("Logscan*")(t)] == []  # tags are case-sensitive


def test_stats_count_by_source_rung_backend_and_hour() -> None:
    now = datetime.fromisoformat("2026-12-07T05:30:00+00:00").timestamp()
    blocks = [
        {"source": "logscan:a", "rung": 1, "blocked_at": "2026-12-07T05:01:02Z"},
        {"source": "logscan:a", "rung": 2, "blocked_at": "2026-12-07T04:59:59Z"},
        {"source": "", "rung": 1, "blocked_at": "2026-12-01T00:00:00Z"},  # before the window
    ]
    summary = summarise(blocks, {"backend": "nftables"}, now, 3)
    assert summary["by_source"] == {"logscan:a": 2, "-": 1}
    assert summary["by_rung"] == {"rung 1": 2, "rung 2": 1}
    assert summary["by_backend"] == {"nftables": 3}
    assert summary["per_hour"] == {
        "2026-12-07T03:00Z": 0,
        "2026-12-07T04:00Z": 1,
        "2026-12-07T05:00Z": 1,
    }


def test_the_broker_takes_a_duration_from_admins_only(tmp_path: Path) -> None:
    def request(duration: str) -> BlockRequest:
        return BlockRequest(op="block", ip="203.0.113.5", duration=duration)

    async def scenario() -> None:
        async with running(tmp_path) as (broker, backend, clock, store):
            with pytest.raises(BrokerError) as refused:
                await broker.handle(request("1w"), WEB)
            assert refused.value.code == "forbidden"
            assert store.active_blocks() == [] and backend.kernel == {}
            made = await broker.handle(request("2h"), ROOT)
            assert made["expires_at"] == timestamp(clock.now() + 7200) and made["rung"] == 1
            assert backend.kernel == {addr("203.0.113.5"): clock.now() + 7200}
            clock.advance(60)
            later = await broker.handle(request("30m"), ROOT)  # an active block: ends again
            assert later["action"] == "escalate"
            assert backend.kernel == {addr("203.0.113.5"): clock.now() + 1800}
            (row,) = store.active_blocks()
            assert row.expires_at == clock.now() + 1800

    asyncio.run(scenario())


# Man page and completion -------------------------------------------------------------------


def imr(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IMR, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def test_the_shipped_man_page_is_the_one_the_commands_make() -> None:
    made = imr("man")
    assert made.returncode == 0, made.stderr
    assert made.stdout == (REPO / "docs" / "man" / "imr.1").read_text(), (
        "docs/man/imr.1 is out of date: imr man > docs/man/imr.1"
    )
    for command in ("block", "unblock", "list", "show", "stats", "completion", "doctor"):
        assert f'.SS "imr {command} ' in made.stdout
    assert "\\-\\-duration" in made.stdout and "\\-\\-check" in made.stdout
    rendered = subprocess.run(
        ["man", "-l", "-"], input=made.stdout, capture_output=True, text=True, check=False
    )
    assert rendered.returncode == 0 and "imr unblock" in rendered.stdout
    assert "warning" not in rendered.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_printed(shell: str) -> None:
    script = imr("completion", shell)
    assert script.returncode == 0, script.stderr
    assert "_IMR_COMPLETE" in script.stdout


def test_bash_completion_completes_commands_and_options() -> None:
    words = imr(_IMR_COMPLETE="bash_complete", COMP_WORDS="imr unb", COMP_CWORD="1")
    assert "plain,unblock" in words.stdout.splitlines()
    options = imr(_IMR_COMPLETE="bash_complete", COMP_WORDS="imr unblock --a", COMP_CWORD="2")
    assert "plain,--all" in options.stdout.splitlines()


def test_usage_errors_have_the_one_error_style() -> None:
    unknown = imr("list", "--bogus")
    assert unknown.returncode == 2
    assert unknown.stderr == "imr: No such option '--bogus'. (see imr list --help)\n"
    missing = imr("show")
    assert missing.returncode == 2 and missing.stderr.startswith("imr: Missing argument 'IP'")
    bad = imr("list", "--since", "3x")
    assert bad.returncode == 2 and bad.stderr.startswith("imr: Invalid value for '--since'")
    assert imr("--help").returncode == 0 and imr("--version").returncode == 0


# Doctor: [access] and the logscan state directory -----------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the test users can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="imrtest-admin-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.usefixtures("test_users")  # runs as imrtest-reader; imrtest-web is named
def test_doctor_warns_about_unknown_and_unreachable_roles_and_the_logscan_dir(
    open_dir: Path,
) -> None:
    tmp_path = open_dir
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)  # root's: the read-only user cannot make logscan/ in it
    config = tmp_path / "imr.toml"
    config.write_text(f"""
[server]
socket = "{tmp_path / "imr.sock"}"
socket_group = "imrtest"
[access.users]
"{BLOCKER}" = "block"
"admincli-no-such-user" = "admin"
root = "read"
[access.groups]
"admincli-no-such-group" = "read"
nogroup = "read"
[access.tokens]
web1 = {{ sha256 = "{"0" * 64}", role = "block" }}
[logscan]
state_dir = "{locked / "logscan"}"
""")
    config.chmod(0o644)
    argv = [IMR, "--config", str(config), "doctor", "--no-kernel-probe", "--json"]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", READER, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    findings = json.loads(result.stdout)
    warned = [f["message"] for f in findings if f["level"] == "warning"]
    text = "\n".join(warned)
    assert "no user named 'admincli-no-such-user'" in text
    assert "no group named 'admincli-no-such-group'" in text
    assert "group nogroup has role read but" in text and "nobody can use that role" in text
    assert f"{BLOCKER} has role" not in text  # a member of the socket's group
    assert "root has role" not in text  # root always connects
    assert f"logscan.state_dir {locked / 'logscan'} is not writable" in text
    assert "[access.tokens] name 1 TCP client(s) but server.tcp is off" in text
    fixes = [f["fix"] for f in findings if f["level"] == "warning"]
    assert any("adduser <member> imrtest" in fix for fix in fixes)


# Against the real daemon ---------------------------------------------------------------


@pytest.fixture(scope="module")
def world(test_users: None) -> Iterator[Daemon]:
    if os.geteuid() != 0:
        pytest.skip("needs root for namespaces")
    with daemon_world() as daemon:
        daemon.write_config()
        text = daemon.config_file.read_text()
        daemon.config_file.write_text(text.replace('backend = "iptables"', 'backend = "nftables"'))
        started = daemon.start()
        assert started.returncode == 0, started.stderr
        yield daemon


def kernel_timeouts(world: Daemon) -> dict[str, int]:
    """imr's IPv4 set: address -> seconds until the kernel lifts it."""
    result = world.server.run("nft", "-j", "list", "set", "inet", "imr", "blocked_v4")
    (item,) = [i for i in json.loads(result.stdout)["nftables"] if "set" in i]
    found = {}
    for element in item["set"].get("elem", []):
        if isinstance(element, dict):
            found[element["elem"]["val"]] = int(element["elem"].get("expires", 0))
    return found


def no_tty(world: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as root with standard input not a terminal (cron, a pipe)."""
    return subprocess.run(
        world.imr_argv(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def on_tty(world: Daemon, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as root with a terminal on standard input that types `answer`."""
    main, replica = pty.openpty()
    try:
        os.write(main, answer.encode() + b"\n")
        return subprocess.run(
            world.imr_argv(*args), stdin=replica, capture_output=True, text=True, timeout=60
        )
    finally:
        os.close(main)
        os.close(replica)


def active(world: Daemon, *args: str) -> set[str]:
    listed = world.as_user(READER, "list", "--json", *args)
    assert listed.returncode == 0, listed.stderr
    return {b["ip"] for b in json.loads(listed.stdout)}


def block(world: Daemon, *args: str) -> None:
    result = world.as_root("block", *args)
    assert result.returncode == 0, result.stderr


@needs_root
def test_block_duration_is_for_admins(world: Daemon) -> None:
    refused = world.as_user(BLOCKER, "block", "203.0.113.30", "--duration", "2h")
    assert refused.returncode == 1
    assert refused.stderr.startswith("imr: ") and "[forbidden]" in refused.stderr
    assert "203.0.113.30" not in kernel_timeouts(world)
    assert world.state_rows("SELECT id FROM blocks WHERE ip = '203.0.113.30'") == []

    block(world, "203.0.113.30", "--duration", "2h")  # the ladder's first rung is 1d
    shown = world.as_user(READER, "show", "203.0.113.30", "--json")
    info = json.loads(shown.stdout)["active"]
    at, until = (datetime.fromisoformat(info[k]) for k in ("blocked_at", "expires_at"))
    assert (until - at).total_seconds() == pytest.approx(7200, abs=1)
    assert info["duration"] == "2h" and info["rung"] == 1
    assert 7000 < kernel_timeouts(world)["203.0.113.30"] <= 7200
    # On an active block an admin's duration sets the end again (shorter too).
    block(world, "203.0.113.30", "--duration", "10m")
    assert 500 < kernel_timeouts(world)["203.0.113.30"] <= 600


@needs_root
def test_list_source_takes_a_tag_prefix_or_a_glob(world: Daemon) -> None:
    block(world, "203.0.113.40", "--source", "logscan:nginx-404")
    block(world, "203.0.113.41", "--source", "logscanner")
    by_web = world.as_user(BLOCKER, "block", "203.0.113.42", "--source", "modsecurity:99999")
    assert by_web.returncode == 0, by_web.stderr
    assert active(world, "--source", "logscan*") == {"203.0.113.40", "203.0.113.41"}
    assert active(world, "--source", "logscan") == {"203.0.113.40"}
    assert active(world, "--source", "logscan:*") == {"203.0.113.40"}
    assert active(world, "--source", "modsec*") == {"203.0.113.42"}
    # The README's example: the log scanner's blocks of the last hour.
    readme = world.as_user(READER, "list", "--since", "1h", "--source", "logscan")
    assert readme.returncode == 0 and "203.0.113.40" in readme.stdout
    # Who asked: the user's name, not a bare uid.
    table = world.as_user(READER, "list", "--source", "modsec*").stdout
    assert f"{BLOCKER} pid" in table and "uid " not in table


@needs_root
def test_show_check_exit_status_says_whether_blocked(world: Daemon) -> None:
    block(world, "203.0.113.50")
    blocked = world.as_user(READER, "show", "--check", "203.0.113.50")
    assert blocked.returncode == 0, blocked.stderr
    free = world.as_user(READER, "show", "--check", "203.0.113.51")
    assert free.returncode == 1 and "203.0.113.51 is not blocked" in free.stdout
    assert world.as_user(READER, "show", "203.0.113.51").returncode == 0  # without --check


@needs_root
def test_stats_counts_the_active_blocks(world: Daemon) -> None:
    block(world, "203.0.113.60", "--source", "stats-test")
    block(world, "203.0.113.61", "--source", "stats-test")
    result = world.as_user(READER, "stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    everything = active(world)
    assert stats["active"] == len(everything) >= 2
    assert stats["by_source"]["stats-test"] == 2
    assert stats["by_backend"] == {"nftables": len(everything)}
    assert sum(stats["by_rung"].values()) == len(everything)
    assert sum(stats["per_hour"].values()) == len(everything)  # all made within the hour
    text = world.as_user(READER, "stats").stdout
    assert "by source:" in text and "stats-test" in text and "by rung:" in text


@needs_root
def test_unblock_several_addresses_and_a_file(world: Daemon, open_dir: Path) -> None:
    for ip in ("203.0.113.70", "203.0.113.71", "203.0.113.72", "203.0.113.73"):
        block(world, ip)
    refused = world.as_user(BLOCKER, "unblock", "203.0.113.70")
    assert refused.returncode == 1 and "[forbidden]" in refused.stderr
    both = world.as_root("unblock", "203.0.113.70", "203.0.113.71")
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == ["unblocked 203.0.113.70", "unblocked 203.0.113.71"]
    listing = open_dir / "lift.txt"
    listing.write_text("# from the report\n203.0.113.72 seen twice\n\n203.0.113.73\n")
    listing.chmod(0o644)
    from_file = world.as_root("unblock", "--from-file", str(listing), "203.0.113.79")
    assert from_file.returncode == 1  # 203.0.113.79 was not blocked
    assert "unblocked 203.0.113.72" in from_file.stdout
    assert "unblocked 203.0.113.73" in from_file.stdout
    assert "imr: unblock 203.0.113.79: 203.0.113.79 is not blocked" in from_file.stderr
    kernel = kernel_timeouts(world)
    assert not {f"203.0.113.7{i}" for i in range(4)} & (set(kernel) | active(world))


@needs_root
def test_unblock_by_source_asks_on_a_terminal_and_needs_yes_elsewhere(world: Daemon) -> None:
    block(world, "203.0.113.80", "--source", "wave:1")
    block(world, "203.0.113.81", "--source", "wave:2")
    wave = {"203.0.113.80", "203.0.113.81"}
    quiet = no_tty(world, "unblock", "--source", "wave")
    assert quiet.returncode == 2
    assert quiet.stderr.strip() == (
        "imr: refusing to unblock 2 active block(s) of source 'wave' without --yes"
        " (no terminal to ask on)"
    )
    assert active(world, "--source", "wave") == wave
    declined = on_tty(world, "n", "unblock", "--source", "wave")
    assert declined.returncode == 1 and "unblock 2 active block(s)" in declined.stderr
    assert active(world, "--source", "wave") == wave
    agreed = on_tty(world, "y", "unblock", "--source", "wave*")
    assert agreed.returncode == 0, agreed.stderr
    assert active(world, "--source", "wave") == set()
    assert not wave & set(kernel_timeouts(world))


@needs_root
def test_unblock_all_with_yes_lifts_every_block(world: Daemon) -> None:
    block(world, "203.0.113.90")
    assert no_tty(world, "unblock", "--all").returncode == 2
    assert "203.0.113.90" in active(world)
    lifted = no_tty(world, "unblock", "--all", "--yes", "--reason", "maintenance")
    assert lifted.returncode == 0, lifted.stderr
    assert active(world) == set()
    assert kernel_timeouts(world) == {}
