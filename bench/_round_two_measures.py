"""What bench/round_two.py measures: the bench scripts it runs and how it reads their rows.

Not a benchmark itself. A *measure* is one bench script with fixed arguments, run once per
build and round; it appends JSON lines to the `--rows` file it is given, which `parse` turns
into *figures* (name -> number). `derive` then adds figures computed over every run of the
measure (ratios against the one fail2ban run). A *row* of a target's table names a measure
and a figure and, where issue #18 sets one, the target.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Figures = dict[str, float]
Rows = list[dict[str, object]]


@dataclass(frozen=True)
class Measure:
    key: str
    script: str
    args: tuple[str, ...]
    parse: Callable[[Rows], Figures]
    timeout: float
    daemon: bool = False  # its daemons print "daemon PID: PYTHONPATH=..." (bench/_common.py)
    fail2ban_once: bool = False  # "--skip-fail2ban" left out of the first "after" run only
    prepare: bool = False  # one uncounted run first (writes the log file the runs share)
    derive: Callable[[list[Figures]], None] = lambda runs: None


@dataclass(frozen=True)
class Row:
    label: str
    measure: str
    figure: str
    unit: str  # "/s", "ms", "µs", "x", "lines/s", ""
    at_least: float | None = None
    at_most: float | None = None
    lower_than_before: bool = False


@dataclass(frozen=True)
class Target:
    title: str
    measures: tuple[str, ...]
    rows: tuple[Row, ...]
    note: str = ""


@dataclass(frozen=True)
class Sizes:
    count: int = 3000  # one_address: 1-client blocks a form
    many: int = 30000  # one_address: 50-client blocks a form
    ipset: int = 4000  # daemon_blocks --count, ipset
    iptables: int = 150  # daemon_blocks --count, per-address iptables
    lines: int = 1_000_000  # logscan_bench --lines
    hook_runs: int = 30  # modsecurity --breakdown --runs
    work: Path = field(default_factory=lambda: Path("/tmp"))


QUICK = Sizes(count=300, many=3000, ipset=300, iptables=30, lines=100_000, hook_runs=5)

_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")


def numbers(text: object) -> list[float]:
    """The numbers of a printed figure ("1,523 blocks/s (p50 4.1 ms, ...)"), in order; the
    digits of names such as p50 are not numbers."""
    return [float(n.replace(",", "")) for n in _NUMBER.findall(str(text))]


def parse_one_address(rows: Rows) -> Figures:
    figures: Figures = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, int | float):
                figures[f"{row['form']}_{key}"] = float(value)
    return figures


# daemon_blocks' measure (after "BACKEND: ") -> (figure names by position in its text)
_DAEMON_BLOCKS = {
    "single-block latency p50 / p99 (1 client)": ("p50_ms", "p99_ms"),
    "throughput, 1 client": ("rate1",),
    "throughput, 50 clients": ("rate", "p50n_ms", "p99n_ms"),
    "daemon CPU per block, 50 clients": ("cpu_us",),
    "throughput, 1 client, block_many of 100": ("many1", "many1_p50_ms", "many1_cpu_us"),
    "throughput, 50 clients, block_many of 100": ("many", "many_p50_ms", "many_cpu_us"),
}


def parse_daemon_blocks(rows: Rows) -> Figures:
    figures: Figures = {}
    for row in rows:
        measure = str(row["measure"])
        what = measure.split(": ", 1)[-1]
        for name, value in zip(_DAEMON_BLOCKS.get(what, ()), numbers(row.get("imr")), strict=False):
            figures[name] = value
        f2b = numbers(row.get("fail2ban", ""))
        if measure.startswith("single-block p50:") and f2b:
            figures["f2b_p50_ms"] = f2b[0]
        elif measure.startswith("throughput:") and f2b:
            figures["f2b_rate"] = f2b[0]
    return figures


def parse_logscan(rows: Rows) -> Figures:
    figures: Figures = {}
    lines = 0.0
    for row in rows:
        if row["what"] == "imr":
            lines = float(str(row["lines"]))
            figures["wall"] = float(str(row["lines_per_s"]))
            figures["cpu"] = float(str(row["cpu_lines_per_s"]))
            figures["hits"] = float(str(row["hits"]))
        elif row["what"] == "fail2ban" and lines:
            figures["f2b_wall"] = lines / float(str(row["seconds"]))
            figures["f2b_cpu"] = lines / float(str(row["cpu"]))
            figures["f2b_matched"] = float(str(row["matched"]))
    return figures


def parse_modsecurity(rows: Rows) -> Figures:
    figures: Figures = {}
    for row in rows:
        for unit in ("wall", "cpu"):
            if f"{unit}_ms" in row:
                figures[f"{row['case']}|{unit}"] = float(str(row[f"{unit}_ms"]))
    # What a deployment runs: the console script before, the launcher (new) after; both
    # through mod_security2's /bin/sh.
    for unit in ("wall", "cpu"):
        shipped = figures.get(f"{LAUNCHER}|{unit}", figures.get(f"{CONSOLE}|{unit}"))
        if shipped is not None:
            figures[f"shipped|{unit}"] = shipped
    return figures


LAUNCHER = "sh -c launcher (what exec runs)"
CONSOLE = "sh -c console script"


def ratios(pairs: Sequence[tuple[str, str, str, bool]]) -> Callable[[list[Figures]], None]:
    """Figures `name` = imr's figure over fail2ban's (or the inverse), for every run, against
    the one run that also ran fail2ban."""

    def derive(runs: list[Figures]) -> None:
        for name, imr, f2b, f2b_over_imr in pairs:
            theirs = next((r[f2b] for r in runs if f2b in r), None)
            for run in runs:
                ours = run.get(imr)
                if theirs and ours:
                    run[name] = theirs / ours if f2b_over_imr else ours / theirs

    return derive


SKIP = "--skip-fail2ban"


def measures(sizes: Sizes) -> list[Measure]:
    """Every measure, in the order they run."""
    one = ("--count", str(sizes.count), "--many", str(sizes.many))
    ipset = ("--backend", "ipset", "--count", str(sizes.ipset), SKIP)
    return [
        Measure("one_address", "one_address.py", one, parse_one_address, 900, daemon=True),
        Measure("ipset", "daemon_blocks.py", ipset, parse_daemon_blocks, 900, daemon=True),
        *(_iptables(flavour, sizes) for flavour in ("nft", "legacy")),
        *(_logscan(kind, sizes) for kind in ("ordinary", "hostile")),
        Measure(
            "hook",
            "modsecurity.py",
            ("--breakdown", "--runs", str(sizes.hook_runs)),
            parse_modsecurity,
            600,
        ),
    ]


def _iptables(flavour: str, sizes: Sizes) -> Measure:
    args = ("--backend", "iptables", "--flavour", flavour, "--count", str(sizes.iptables), SKIP)
    derive = ratios(
        [("p50_ratio", "p50_ms", "f2b_p50_ms", True), ("rate_ratio", "rate", "f2b_rate", False)]
    )
    return Measure(
        f"iptables-{flavour}",
        "daemon_blocks.py",
        args,
        parse_daemon_blocks,
        1200,
        daemon=True,
        fail2ban_once=True,
        derive=derive,
    )


def _logscan(kind: str, sizes: Sizes) -> Measure:
    """One log, written by the uncounted first run into the run's work directory."""
    args = ("--lines", str(sizes.lines), "--log", str(sizes.work / f"{kind}.log"))
    args += ("--skip-follow", *(("--hostile",) if kind == "hostile" else ()), SKIP)
    derive = ratios(
        [("ratio_cpu", "cpu", "f2b_cpu", False), ("ratio_wall", "wall", "f2b_wall", False)]
    )
    return Measure(
        f"logscan-{kind}",
        "logscan_bench.py",
        args,
        parse_logscan,
        1500,
        fail2ban_once=True,
        prepare=True,
        derive=derive,
    )


def _one_address_rows() -> tuple[Row, ...]:
    rows: list[Row] = []
    for form, name in (("json", "JSON"), ("text", "text")):
        rows += [
            Row(f"50 clients, {name}", "one_address", f"{form}_rate", "/s", at_least=20_000),
            Row(f"1 client, {name}", "one_address", f"{form}_rate1", "/s", at_least=3_000),
            Row(
                f"daemon CPU a request, 50 clients, {name}",
                "one_address",
                f"{form}_cpu_us",
                "µs",
                at_most=50,
            ),
            Row(f"single block p50, {name}", "one_address", f"{form}_p50_ms", "ms", at_most=1),
            Row(f"single block p99, {name}", "one_address", f"{form}_p99_ms", "ms", at_most=3),
            Row(f"of which system CPU, 50 clients, {name}", "one_address", f"{form}_sys_us", "µs"),
            Row(f"daemon CPU a request, 1 client, {name}", "one_address", f"{form}_cpu1_us", "µs"),
            Row(f"50 clients p99, {name}", "one_address", f"{form}_p99n_ms", "ms"),
        ]
    return tuple(rows)


def _iptables_rows(flavour: str) -> tuple[Row, ...]:
    key = f"iptables-{flavour}"
    return (
        Row(f"{flavour}: single-block p50, 1 client", key, "p50_ms", "ms", at_most=20),
        Row(f"{flavour}: single-block p99, 1 client", key, "p99_ms", "ms"),
        Row(f"{flavour}: 1 client", key, "rate1", "/s"),
        Row(f"{flavour}: 50 clients", key, "rate", "/s"),
        Row(f"{flavour}: daemon CPU a block, 50 clients", key, "cpu_us", "µs"),
        Row(f"{flavour}: fail2ban iptables-multiport, single-ban p50", key, "f2b_p50_ms", "ms"),
        Row(f"{flavour}: fail2ban iptables-multiport, bans/s (500 a call)", key, "f2b_rate", "/s"),
        Row(f"{flavour}: p50, fail2ban / imr", key, "p50_ratio", "x"),
        Row(f"{flavour}: 50 clients, imr / fail2ban", key, "rate_ratio", "x"),
    )


def _logscan_rows(kind: str, floor: float) -> tuple[Row, ...]:
    key = f"logscan-{kind}"
    return (
        Row(f"{kind}: imr, CPU", key, "cpu", "lines/s", at_least=floor),
        Row(f"{kind}: imr, wall", key, "wall", "lines/s", at_least=floor),
        Row(f"{kind}: imr hits", key, "hits", ""),
        Row(f"{kind}: fail2ban-regex, CPU", key, "f2b_cpu", "lines/s"),
        Row(f"{kind}: fail2ban-regex, wall", key, "f2b_wall", "lines/s"),
        Row(f"{kind}: fail2ban-regex matches", key, "f2b_matched", ""),
        Row(f"{kind}: imr / fail2ban-regex, CPU", key, "ratio_cpu", "x"),
        Row(f"{kind}: imr / fail2ban-regex, wall", key, "ratio_wall", "x"),
    )


def _hook_rows() -> tuple[Row, ...]:
    cases = [
        ("what exec runs: `sh -c` console script (before), `sh -c` launcher (after)", "shipped"),
        ("`python3 -I -S hook.py`", "python3 -I -S hook.py"),
        ("`sh -c 'python3 -I -S hook.py'`", "sh -c python3 -I -S hook.py"),
        ("virtualenv console script `imr-hook`", "console script (venv imr-hook)"),
        ("`sh -c` console script", CONSOLE),
        ("launcher `contrib/modsecurity/imr-hook` (new)", "launcher contrib/modsecurity/imr-hook"),
        ("`python3 -I -S -c pass` (the floor, no hook)", "python3 -I -S -c pass"),
    ]
    rows: list[Row] = []
    for label, case in cases:
        for unit in ("cpu", "wall"):
            lower = case.startswith(("shipped", "python3 -I -S hook", "sh -c python3"))
            rows.append(
                Row(
                    f"{label}, {unit.upper() if unit == 'cpu' else unit}",
                    "hook",
                    f"{case}|{unit}",
                    "ms",
                    lower_than_before=lower,
                )
            )
    return tuple(rows)


TARGETS = (
    Target(
        "1. One address per request, nftables, Unix socket (`bench/one_address.py`)",
        ("one_address",),
        _one_address_rows(),
    ),
    Target(
        "2. ipset, 50 clients (`bench/daemon_blocks.py --backend ipset`)",
        ("ipset",),
        (
            Row("50 clients, one address a request", "ipset", "rate", "/s", at_least=10_000),
            Row("50 clients, `block_many` of 100", "ipset", "many", "/s", at_least=10_000),
            Row("1 client, one address a request", "ipset", "rate1", "/s"),
            Row("1 client, `block_many` of 100", "ipset", "many1", "/s"),
            Row("single-block p50, 1 client", "ipset", "p50_ms", "ms"),
            Row("single-block p99, 1 client", "ipset", "p99_ms", "ms"),
            Row("daemon CPU a block, 50 clients", "ipset", "cpu_us", "µs"),
            Row("daemon CPU a block, `block_many`, 50 clients", "ipset", "many_cpu_us", "µs"),
        ),
    ),
    Target(
        "3. Per-address iptables rules, beside fail2ban's iptables-multiport"
        " (`bench/daemon_blocks.py --backend iptables`)",
        ("iptables-nft", "iptables-legacy"),
        _iptables_rows("nft") + _iptables_rows("legacy"),
        'fail2ban ran once per flavour, in the first "after" run; both builds\' ratios are'
        " against that run.",
    ),
    Target(
        "4. Log scanning, 1 file each (`bench/logscan_bench.py`)",
        ("logscan-ordinary", "logscan-hostile"),
        _logscan_rows("ordinary", 500_000) + _logscan_rows("hostile", 250_000),
        'fail2ban-regex ran once per log, in the first "after" run; both builds\' ratios are'
        " against that run. CPU is the scan's process time, wall its elapsed time.",
    ),
    Target(
        "5. The ModSecurity exec hook (`bench/modsecurity.py --breakdown`, fake daemon)",
        ("hook",),
        _hook_rows(),
        "Medians in ms of the runs of each program; CPU is the child's user + system time."
        ' "before" runs the before tree\'s imr/hook.py (it has no launcher).',
    ),
)
