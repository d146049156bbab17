"""bench/round_two.py's markdown: one table per issue #18 target, its runs and commands.

Not a benchmark itself. A cell shows the range over the rounds (min to max) of one build's
figure; "met?" says whether every "after" round met the target ("in k of N" when some did).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from _round_two_measures import Figures, Row, Target

DASH = "\u2013"  # en dash: ranges, and "no figure"


@dataclass
class Run:
    """One bench script run for one build and round."""

    measure: str
    build: str
    round: int
    command: str  # exact, shell-quoted, with its PYTHONPATH
    started: str = ""  # UTC, HH:MM:SS
    load_start: str = ""  # /proc/loadavg's 1, 5 and 15 minutes
    load_end: str = ""
    seconds: float = 0.0
    figures: Figures = field(default_factory=dict)
    error: str = ""


def number(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "x":
        return f"{value:.1f}x"
    if unit == "µs":
        return f"{value:,.0f} µs"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "lines/s":
        return f"{value:,.0f} lines/s"
    return f"{value:,.0f}"


def cell(values: list[float], unit: str) -> str:
    if not values:
        return DASH
    low, high = number(min(values), unit), number(max(values), unit)
    if low == high:
        return low
    # "1.20-1.45 ms" (en dash), not "1.20 ms-1.45 ms"
    suffix = next((s for s in (" lines/s", " ms", " µs", "/s", "x") if low.endswith(s)), "")
    return f"{low.removesuffix(suffix)}{DASH}{high}"


def target_text(row: Row) -> str:
    if row.at_least is not None:
        return f"≥ {number(row.at_least, row.unit)}"
    if row.at_most is not None:
        return f"≤ {number(row.at_most, row.unit)}"
    return "lower" if row.lower_than_before else DASH


def met(row: Row, before: list[float], after: list[float]) -> str:
    if not after or (row.lower_than_before and not before):
        return DASH if row.at_least is None and row.at_most is None else "n/a"
    if row.lower_than_before:
        return "**yes**" if statistics.median(after) < statistics.median(before) else "no"
    if row.at_least is not None:
        good = sum(1 for v in after if v >= row.at_least)
    elif row.at_most is not None:
        good = sum(1 for v in after if v <= row.at_most)
    else:
        return DASH
    if good == len(after):
        return "**yes**"
    return "no" if good == 0 else f"in {good} of {len(after)}"


def values(runs: list[Run], measure: str, build: str, figure: str) -> list[float]:
    return [
        r.figures[figure]
        for r in runs
        if r.measure == measure and r.build == build and not r.error and figure in r.figures
    ]


def target_section(target: Target, runs: list[Run]) -> list[str]:
    mine = [r for r in runs if r.measure in target.measures]
    out = [f"### {target.title}", ""]
    out += ["| measure | before | after | target | met? |", "|---|---|---|---|---|"]
    missing = []
    for row in target.rows:
        before = values(mine, row.measure, "before", row.figure)
        after = values(mine, row.measure, "after", row.figure)
        if not before and not after and row.at_least is None and row.at_most is None:
            continue  # a figure neither build has (the old tree's missing launcher, say)
        if not after and any(r.measure == row.measure and not r.error for r in mine):
            missing.append(row.label)
        out.append(
            f"| {row.label} | {cell(before, row.unit)} | {cell(after, row.unit)}"
            f" | {target_text(row)} | {met(row, before, after)} |"
        )
    if target.note:
        out += ["", target.note]
    if missing:
        out += ["", f"**No figure from the bench for:** {', '.join(missing)}."]
    out += ["", "| run | measure | build | round | start (UTC) | load at start | at end | s |"]
    out.append("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(mine, 1):
        failed = f" **failed: {r.error}**" if r.error else ""
        out.append(
            f"| {i} | {r.measure} | {r.build}{failed} | {r.round} | {r.started}"
            f" | {r.load_start} | {r.load_end} | {r.seconds:.0f} |"
        )
    out += ["", "Commands:", ""]
    seen: list[str] = []
    for r in mine:
        if r.command not in seen:
            seen.append(r.command)
            out.append(f"    {r.command}")
    return [*out, ""]
