"""The configuration file: defaults, validation messages, and the CLI's handling of both."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from imr.cli import main
from imr.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imr.toml"
    path.write_text(text)
    return path


def test_defaults_are_one_day_then_seven_days() -> None:
    config = Config()
    assert config.policy.ladder == [86400, 7 * 86400]
    assert config.firewall.backend == "auto"
    assert str(config.server.socket) == "/run/imr/imr.sock"


def test_durations_and_allowlist_are_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[policy]\nladder = ["1h", "1d", "7d", "30d"]\nrepeat_window = "2w"\n'
        '[protect]\nallowlist = ["192.0.2.0/24", "2001:db8::1"]\n',
    )
    config = load_config(path, missing_ok=False)
    assert config.policy.ladder == [3600, 86400, 7 * 86400, 30 * 86400]
    assert config.policy.repeat_window == 14 * 86400
    assert [str(n) for n in config.protect.allowlist] == ["192.0.2.0/24", "2001:db8::1/128"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[policy]\nladder = ["1d", "x7d"]\n', "policy.ladder.1 = 'x7d': 'x7d' is not a duration"),
        ('[policy]\nladder = ["7d", "1d"]\n', "ascending order"),
        ("[firewall]\nports = [99999]\n", "firewall.ports.0 = 99999: ports are 1 to 65535"),
        ('[firewall]\nbackend = "pf"\n', "firewall.backend = 'pf': Input should be"),
        ('[firewall]\nprotocol = "all"\nports = [80]\n', "ports need protocol"),
        ('[access.users]\nwww-data = "root"\n', "access.users.www-data"),
        ('[protect]\nallowlist = ["not-a-net"]\n', "expected an address or network"),
        ("[server]\nsokcet = '/tmp/x'\n", "server.sokcet: unknown key"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_files_name_key_value_and_expectation(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path, missing_ok=False)
    assert expected in str(error.value)
    assert str(path) in str(error.value)


def test_cli_reports_a_bad_file_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\nladder = ["soon"]\n')
    result = CliRunner().invoke(main, ["--config", str(path), "config", "show"])
    assert result.exit_code == 2
    assert "policy.ladder.0 = 'soon'" in result.output
    assert "Traceback" not in result.output


def test_cli_reports_a_missing_explicit_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.toml"), "list"])
    assert result.exit_code == 2
    assert "no such file" in result.output


def test_config_show_prints_the_effective_config_which_reads_back(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\nladder = ["1h", "7d"]\n[access.users]\nwww-data = "block"\n')
    result = CliRunner().invoke(main, ["--config", str(path), "config", "show"])
    assert result.exit_code == 0, result.output
    body = result.output.split("\n", 2)[2]
    again = Config.model_validate(tomllib.loads(body))
    assert again == load_config(path, missing_ok=False)
    assert 'ladder = ["1h", "7d"]' in body


def test_imr_config_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[server]\nsocket = "/tmp/elsewhere.sock"\n')
    monkeypatch.setenv("IMR_CONFIG", str(path))
    result = CliRunner().invoke(main, ["config", "show", "--json"])
    assert result.exit_code == 0
    assert '"/tmp/elsewhere.sock"' in result.output


@pytest.mark.parametrize(
    ("text", "ports"),
    [
        ("", ["80", "443"]),  # the web ports, as the original rule (issue #12)
        ("[firewall]\nports = []\n", []),  # every port, as before
        ('[firewall]\nports = "all"\n', []),
        ('[firewall]\nprotocol = "all"\n', []),  # every packet: no ports to default to
        ('[firewall]\nprotocol = "udp"\nports = [53]\n', ["53"]),
    ],
)
def test_which_ports_a_block_covers(tmp_path: Path, text: str, ports: list[str]) -> None:
    assert load_config(write(tmp_path, text), missing_ok=False).firewall.ports == ports
