"""Durations as people read them ("7d", "1d 2h", "45s"), and as the config writes them back."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from imr import cli
from imr.config import Config, load_config
from imr.core import durations
from imr.core.durations import format_duration, parse_duration
from imr.server.replies import block_info
from imr.store import BlockRecord

DAY = 86400
T0 = 1_700_000_000.0


# (seconds, shown): the largest unit and the next one, rounded; weeks print as days.
SHOWN = [
    (0, "0s"),
    (45, "45s"),
    (90, "1m 30s"),
    (3600, "1h"),
    (DAY, "1d"),
    (DAY + 2 * 3600 + 3 * 60 + 4, "1d 2h"),  # the minutes and seconds are rounded off
    (7 * DAY, "7d"),
    (7 * DAY + 32, "7d"),  # a block escalated 32 s into its life
    (30 * DAY, "30d"),
    (DAY - 1, "1d"),  # 23h 59m 59s rounds up into the next unit
    (2 * 3600 + 29 * 60 + 31, "2h 30m"),
]


def test_format_duration_largest_unit_and_the_next() -> None:
    assert [format_duration(seconds) for seconds, _ in SHOWN] == [shown for _, shown in SHOWN]


@pytest.mark.parametrize("seconds", [1, 90, 3599, DAY + 1, 7 * DAY + 32, 93784, 30 * DAY])
def test_exact_duration_reads_back(seconds: int) -> None:
    assert parse_duration(durations.exact_duration(seconds)) == seconds


@pytest.mark.parametrize(
    "text, seconds", [("1d 2h", 93600), ("1d2h", 93600), ("7d 32s", 7 * DAY + 32)]
)
def test_parse_duration_takes_several_units_and_still_refuses_junk(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    for junk in ("", "1d 2", "d", "1x", "0s", "0d 0h", text + " 5"):
        with pytest.raises(ValueError):
            parse_duration(junk)


def _escalated_show(now: float) -> dict[str, Any]:
    """The daemon's `show` reply for a block escalated to 7d 32 s after it began."""
    record = BlockRecord(1, "203.0.113.9", T0, T0 + 32 + 7 * DAY, 2, 1, "scan", "cli", 33, 1)
    info = block_info(record, now)
    return {"kind": "show", "ip": record.ip, "active": info, "blocks": [info], "hits": []}


def test_imr_show_prints_block_lengths_in_days_not_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = T0 + DAY + 2 * 3600  # 5d 22h and 32 s left
    monkeypatch.setattr(cli, "call", lambda _ctx, _op, **_fields: _escalated_show(now))
    result = CliRunner().invoke(cli.main, ["show", "203.0.113.9"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.endswith("(rung 2, offence 1, 7d, 5d 22h left)"), first
    assert "604832s" not in result.output
    header, row = result.output.split("blocks:\n")[1].splitlines()[:2]
    assert header.split()[4] == "LENGTH"
    assert "  7d  " in row


def test_config_show_writes_odd_durations_exactly(tmp_path: Path) -> None:
    path = tmp_path / "imr.toml"
    path.write_text("[policy]\nescalate_after = 90061\nrepeat_window = 93600\n")
    result = CliRunner().invoke(cli.main, ["--config", str(path), "config", "show"])
    assert result.exit_code == 0, result.output
    assert 'escalate_after = "1d 1h 1m 1s"' in result.output
    assert 'repeat_window = "1d 2h"' in result.output
    body = result.output.split("\n", 2)[2]
    assert Config.model_validate(tomllib.loads(body)) == load_config(path, missing_ok=False)
    assert "# first offence by reporter severity: 1-10: rung 1 (1d)" in body
