"""bench/round_two.py reads the bench scripts' rows and words its tables right (no root, no
daemon: the rows below are the scripts' own output, copied from a run)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from _round_two_measures import (
    Row,
    numbers,
    parse_daemon_blocks,
    parse_logscan,
    parse_modsecurity,
    ratios,
)
from _round_two_report import cell, met


def test_numbers_skip_the_digits_of_names() -> None:
    assert numbers("1,523 blocks/s (p50 4.1 ms, p99 10.9 ms)") == [1523, 4.1, 10.9]
    assert numbers("0.61 ms / 0.80 ms") == [0.61, 0.80]
    assert numbers("") == []


def test_daemon_blocks_rows_with_fail2ban() -> None:
    rows: list[dict[str, object]] = [
        {
            "measure": "iptables: single-block latency p50 / p99 (1 client)",
            "imr": "6.25 ms / 13.74 ms",
        },
        {"measure": "iptables: throughput, 1 client", "imr": "155 blocks/s"},
        {
            "measure": "iptables: throughput, 50 clients",
            "imr": "1,863 blocks/s (p50 35.4 ms, p99 52.9 ms)",
        },
        {"measure": "iptables: daemon CPU per block, 50 clients", "imr": "1000 µs"},
        {
            "measure": "single-block p50: imr iptables vs fail2ban 1.0.2 iptables-multiport",
            "imr": "6.2 ms",
            "fail2ban": "79.0 ms",
        },
        {"measure": "throughput: imr iptables, 50 clients, vs fail2ban", "fail2ban": "164 bans/s"},
    ]
    figures = parse_daemon_blocks(rows)
    assert figures == {
        "p50_ms": 6.25,
        "p99_ms": 13.74,
        "rate1": 155,
        "rate": 1863,
        "p50n_ms": 35.4,
        "p99n_ms": 52.9,
        "cpu_us": 1000,
        "f2b_p50_ms": 79.0,
        "f2b_rate": 164,
    }
    other = {"p50_ms": 3.0, "rate": 1000.0}
    ratios([("p50_ratio", "p50_ms", "f2b_p50_ms", True), ("r", "rate", "f2b_rate", False)])(
        [other, figures]
    )
    assert round(other["p50_ratio"], 2) == 26.33  # against the one run that ran fail2ban
    assert round(other["r"], 2) == 6.10


def test_daemon_blocks_block_many_row() -> None:
    row: dict[str, object] = {
        "measure": "ipset: throughput, 50 clients, block_many of 100",
        "imr": "3,192 blocks/s (request p50 99.7 ms; daemon CPU 300 µs a block)",
    }
    assert parse_daemon_blocks([row]) == {"many": 3192, "many_p50_ms": 99.7, "many_cpu_us": 300}


def test_logscan_and_hook_rows() -> None:
    imr = {"what": "imr", "lines": 1000, "lines_per_s": 500.0, "cpu_lines_per_s": 800.0}
    f2b = {"what": "fail2ban", "seconds": 10.0, "cpu": 20.0, "matched": 5.0}
    assert parse_logscan([{**imr, "hits": 5}, f2b]) == {
        "wall": 500,
        "cpu": 800,
        "hits": 5,
        "f2b_wall": 100,
        "f2b_cpu": 50,
        "f2b_matched": 5,
    }
    console = {"case": "sh -c console script", "wall_ms": 30.0, "cpu_ms": 28.0}
    launcher = {"case": "sh -c launcher (what exec runs)", "wall_ms": 12.0, "cpu_ms": 11.0}
    assert parse_modsecurity([console])["shipped|cpu"] == 28.0
    assert parse_modsecurity([console, launcher])["shipped|cpu"] == 11.0


def test_cells_and_verdicts() -> None:
    assert cell([], "/s") == "\u2013"
    assert cell([1200.0, 1450.0], "/s") == "1,200\u20131,450/s"
    assert cell([641713.0, 668126.0], "lines/s") == "641,713\u2013668,126 lines/s"
    floor = Row("x", "m", "f", "/s", at_least=1000)
    assert met(floor, [], [1200.0, 1450.0]) == "**yes**"
    assert met(floor, [], [900.0, 1450.0]) == "in 1 of 2"
    assert met(floor, [], [900.0]) == "no"
    assert met(floor, [5000.0], []) == "n/a"
    lower = Row("x", "m", "f", "ms", lower_than_before=True)
    assert met(lower, [30.0, 28.0], [11.0, 12.0]) == "**yes**"
    assert met(lower, [10.0], [11.0]) == "no"
