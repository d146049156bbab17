"""The click commands, run as the main CLI will run them (CliContext in ctx.obj)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from imr.cli_context import CliContext
from imr.config import Config, ServerConfig
from imr.logscan.cli import rules, scan
from imr.logscan.settings import LogscanConfig

from logscan_helpers import FakeDaemon, benign, combined

ATTACK = combined("203.0.113.50", "/mail/bin/msgimport")


def _ctx(socket: Path) -> CliContext:
    return CliContext(Config(server=ServerConfig(socket=socket)), Path("imr.toml"))


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "access.log"
    path.write_text(benign(1) + ATTACK + benign(2))
    return path


def test_scan_dry_run_json(log: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        scan,
        [str(log), "--dry-run", "--json", "--state-dir", str(tmp_path / "st")],
        obj=_ctx(tmp_path / "none.sock"),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["lines"] == 3 and report["hits"] == 1
    assert report["blocks"][0]["ip"] == "203.0.113.50"
    assert report["blocks"][0]["status"] == "dry-run"
    assert not (tmp_path / "st" / "state.json").exists()  # a dry run remembers nothing


def test_scan_blocks_through_the_daemon(log: Path, tmp_path: Path, fake_daemon: FakeDaemon) -> None:
    args = [str(log), "--state-dir", str(tmp_path / "st")]
    result = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert result.exit_code == 0, result.output
    assert "blocked 203.0.113.50 roundcube-msgimport" in result.output
    request = fake_daemon.requests[0][1]
    assert request["op"] == "block" and request["ip"] == "203.0.113.50"
    assert request["source"] == "logscan:roundcube-msgimport" and request["severity"] == 6
    again = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert again.exit_code == 0 and len(fake_daemon.requests) == 1  # nothing new


def test_daemon_down_exits_3_without_traceback(log: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        scan, [str(log), "--state-dir", str(tmp_path / "st")], obj=_ctx(tmp_path / "none.sock")
    )
    assert result.exit_code == 3
    assert "not running" in result.output and "Traceback" not in result.output
    # Every imr command fails the same way (was "Error: ..." before issue #17).
    assert result.stderr.startswith("imr: ") and "retries" in result.stderr


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        scan,
        [str(tmp_path / "nope.log"), "--dry-run", "--state-dir", str(tmp_path)],
        obj=_ctx(tmp_path / "s"),
    )
    assert result.exit_code == 1 and "no such file" in result.output
    bad_filter = tmp_path / "bad.conf"
    bad_filter.write_text("[Definition]\nfailregex = ^(<HOST>\n")
    result = CliRunner().invoke(
        scan,
        [
            str(tmp_path / "x.log"),
            "--dry-run",
            "--fail2ban-filter",
            str(bad_filter),
            "--state-dir",
            str(tmp_path),
        ],
        obj=_ctx(tmp_path / "s"),
    )
    assert result.exit_code == 1 and "does not compile" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_state_dir_not_writable(log: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(
        scan, [str(log), "--dry-run", "--state-dir", str(blocker / "sub")], obj=_ctx(tmp_path / "s")
    )
    assert result.exit_code == 1 and "state directory" in result.output


def test_rules_list_and_test(tmp_path: Path) -> None:
    listed = CliRunner().invoke(rules, ["list", "--json"], obj=_ctx(tmp_path / "s"))
    assert listed.exit_code == 0
    names = [r["name"] for r in json.loads(listed.output)]
    assert {"code-red", "code-red-ii", "nimda", "dfind", "roundcube-msgimport", "morfeus"} <= set(
        names
    )
    tested = CliRunner().invoke(rules, ["test", ATTACK.strip()], obj=_ctx(tmp_path / "s"))
    assert tested.exit_code == 0
    assert "match roundcube-msgimport ip=203.0.113.50" in tested.output
    assert "bin/msgimport" in tested.output  # the evidence says why
    miss = CliRunner().invoke(
        rules, ["test", benign(3).strip(), "garbage"], obj=_ctx(tmp_path / "s")
    )
    assert miss.exit_code == 1
    assert "no match" in miss.output and "unparsed: garbage" in miss.output


def test_scan_with_a_fail2ban_filter(tmp_path: Path) -> None:
    flt = tmp_path / "probe.conf"
    flt.write_text(
        '[Definition]\nfailregex = ^<HOST> -.*"GET /mail/bin/msgimport\n'
        "ignoreregex =\ndatepattern = ^[^\\[]*\\[({DATE})\n"
    )
    log = tmp_path / "a.log"
    log.write_text(ATTACK * 5 + benign(1))
    result = CliRunner().invoke(
        scan,
        [
            str(log),
            "--dry-run",
            "--json",
            "--fail2ban-filter",
            str(flt),
            "--state-dir",
            str(tmp_path / "st"),
        ],
        obj=_ctx(tmp_path / "s"),
    )
    assert result.exit_code == 0, result.output
    blocks = json.loads(result.output)["blocks"]
    assert [(b["ip"], b["signature"], b["hits"]) for b in blocks] == [("203.0.113.50", "probe", 5)]


# --- cron: quiet when there is nothing to say (issue #15 item 6) ---------------------

PROBE_FILTER = (
    '[Definition]\nfailregex = ^<HOST> -.*"GET /mail/bin/msgimport\n'
    "ignoreregex =\ndatepattern = ^[^\\[]*\\[({DATE})\n"
)


def test_an_empty_cron_run_prints_nothing(
    log: Path, tmp_path: Path, fake_daemon: FakeDaemon
) -> None:
    args = [str(log), "--state-dir", str(tmp_path / "st")]
    first = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("blocked 203.0.113.50") and first.stderr == ""
    with open(log, "a") as f:
        f.write(benign(7))  # new lines, nothing to report
    again = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert again.exit_code == 0 and again.output == ""  # cron mails nothing
    verbose = CliRunner().invoke(scan, [*args, "--verbose"], obj=_ctx(fake_daemon.path))
    assert verbose.exit_code == 0 and "0 lines" in verbose.stderr and verbose.stdout == ""


def test_quiet_prints_only_errors(log: Path, tmp_path: Path, fake_daemon: FakeDaemon) -> None:
    missing = tmp_path / "nginx-access.log"
    args = [str(log), str(missing), "--state-dir", str(tmp_path / "st"), "-q"]
    result = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert result.exit_code == 0 and result.output == ""
    assert fake_daemon.requests[0][1]["ip"] == "203.0.113.50"  # blocked all the same
    down = CliRunner().invoke(
        scan, [str(log), "-q", "--state-dir", str(tmp_path / "s2")], obj=_ctx(tmp_path / "x.sock")
    )
    assert down.exit_code == 3 and "not running" in down.stderr


def test_a_missing_log_among_several_is_a_warning(
    log: Path, tmp_path: Path, fake_daemon: FakeDaemon
) -> None:
    """A host with Apache only still runs the shipped unit, which names both logs."""
    missing = tmp_path / "nginx" / "access.log"
    args = [str(missing), str(log), "--state-dir", str(tmp_path / "st")]
    result = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert result.exit_code == 0, result.output
    assert result.stderr == f"warning: {missing}: no such file (said once, until it appears)\n"
    assert result.stdout.startswith("blocked 203.0.113.50")
    assert json.loads((tmp_path / "st" / "state.json").read_text())["files"]  # remembered
    again = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert again.exit_code == 0 and again.output == ""  # said once: cron mails once
    missing.parent.mkdir()
    missing.write_text(benign(1))
    back = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert back.exit_code == 0 and back.output == ""
    missing.unlink()
    gone = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert gone.exit_code == 0 and gone.stderr.startswith("warning: ")  # gone again: told
    still = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert still.exit_code == 0 and still.output == ""
    alone = CliRunner().invoke(scan, args[:1] + args[2:], obj=_ctx(fake_daemon.path))
    assert alone.exit_code == 1 and "no such file" in alone.output  # all missing: an error
    assert alone.stderr == f"imr: {missing}: no such file\n"  # one line, as every imr command


def _blocked(daemon: FakeDaemon) -> list[tuple[str, str]]:
    return [(r["ip"], r["source"]) for _, r in daemon.requests]


def test_two_rule_sets_on_one_log_each_see_every_line(
    tmp_path: Path, fake_daemon: FakeDaemon
) -> None:
    """A built-in scan and a fail2ban-filter scan of the same log keep their own offsets."""
    flt = tmp_path / "probe.conf"
    flt.write_text(PROBE_FILTER)
    log = tmp_path / "a.log"
    log.write_text(ATTACK * 5 + benign(1))
    state = ["--state-dir", str(tmp_path / "st")]
    f2b = CliRunner().invoke(
        scan, [str(log), "--fail2ban-filter", str(flt), *state], obj=_ctx(fake_daemon.path)
    )
    assert f2b.exit_code == 0, f2b.output
    assert _blocked(fake_daemon) == [("203.0.113.50", "fail2ban:probe")]
    builtin = CliRunner().invoke(scan, [str(log), *state], obj=_ctx(fake_daemon.path))
    assert builtin.exit_code == 0, builtin.output
    # roundcube-msgimport blocks at the first hit: one request per attack line, all 5 seen.
    assert _blocked(fake_daemon)[1:] == [("203.0.113.50", "logscan:roundcube-msgimport")] * 5
    for extra in ([], ["--fail2ban-filter", str(flt)]):  # each has read everything now
        rerun = CliRunner().invoke(scan, [str(log), *state, *extra], obj=_ctx(fake_daemon.path))
        assert rerun.exit_code == 0 and rerun.output == ""
    assert len(fake_daemon.requests) == 6


def test_builtin_and_fail2ban_filters_in_one_pass(tmp_path: Path, fake_daemon: FakeDaemon) -> None:
    filter_dir = tmp_path / "filter.d"
    filter_dir.mkdir()
    (filter_dir / "probe.conf").write_text(PROBE_FILTER)
    log = tmp_path / "a.log"
    log.write_text(ATTACK * 5)
    config = Config(
        server=ServerConfig(socket=fake_daemon.path),
        logscan=LogscanConfig(fail2ban_filter_dir=filter_dir),
    )
    obj = CliContext(config, Path("imr.toml"))
    args = [
        str(log),
        "--builtin",
        "--fail2ban-filter",
        "probe",
        "--state-dir",
        str(tmp_path / "st"),
    ]
    result = CliRunner().invoke(scan, args, obj=obj)
    assert result.exit_code == 0, result.output
    assert sorted(_blocked(fake_daemon)) == [
        ("203.0.113.50", "fail2ban:probe"),
        *[("203.0.113.50", "logscan:roundcube-msgimport")] * 5,
    ]
    unknown = CliRunner().invoke(scan, [str(log), "--fail2ban-filter", "nope"], obj=obj)
    assert unknown.exit_code == 1
    assert f"nope: no such filter file, and no {filter_dir}/nope.conf" in unknown.output


@pytest.mark.parametrize("server", ["apache2", "nginx"])
def test_the_shipped_scan_unit_runs_on_a_host_with_one_web_server(
    server: str, tmp_path: Path, fake_daemon: FakeDaemon
) -> None:
    """imr-scan.service names both servers' logs; a host has one of them."""
    unit = Path(__file__).parents[2] / "contrib" / "systemd" / "imr-scan.service"
    (exec_start,) = [
        line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")
    ]
    argv = exec_start.split()[2:]  # after "ExecStart=/usr/local/bin/imr scan"
    logs = [a for a in argv if a.startswith("/var/log/")]
    assert {Path(p).parent.name for p in logs} == {"apache2", "nginx"}
    args = [a.replace("/var/", f"{tmp_path}/var/") for a in argv]
    present = tmp_path / "var" / "log" / server / "access.log"
    present.parent.mkdir(parents=True)
    present.write_text(ATTACK)
    result = CliRunner().invoke(scan, args, obj=_ctx(fake_daemon.path))
    assert result.exit_code == 0, result.output
    assert _blocked(fake_daemon) == [("203.0.113.50", "logscan:roundcube-msgimport")]
