"""Findings, what every `imr doctor` check returns, and the runner the checks share.

A finding is ok, a warning, or a problem; every warning and problem carries a fix.
"""

from __future__ import annotations

import grp
import pwd
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from imr.backends.xtables import run_tool

PROBE_TIMEOUT = 15.0
APT_HINT = {
    "iptables": "apt-get install iptables",
    "nftables": "apt-get install nftables",
    "ipset": "apt-get install ipset",
    "util-linux": "apt-get install util-linux",
}


class Level(StrEnum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str
    fix: str = ""


def ok(check: str, message: str) -> Finding:
    return Finding(check, Level.OK, message)


def warning(check: str, message: str, fix: str) -> Finding:
    return Finding(check, Level.WARNING, message, fix)


def problem(check: str, message: str, fix: str) -> Finding:
    return Finding(check, Level.PROBLEM, message, fix)


Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


def run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool with an argument list (never a shell); a missing or hung tool is a result."""
    try:
        return run_tool(argv, stdin, timeout=PROBE_TIMEOUT)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: not found")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(argv), 126, "", f"{argv[0]}: {exc}")


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else "(no message)"


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)
