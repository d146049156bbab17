"""The iptables tools that the iptables and ipset backends both drive.

A host runs one of two iptables *flavours*, and mixing them is never right:

* nft: iptables-nft, the Debian 12 default, which writes nf_tables rules;
* legacy: iptables-legacy, the old x_tables kernel interface.

This module runs the tools (`run_tool`), tells which flavour the host uses
(`detect_flavour`), and resolves the configured flavour to one of the two
(`resolve_flavour`). It knows no backend: the backends import it, never each
other (cs-firewall-bouncer keeps its shared tool code apart the same way).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from imr.backends.base import BackendError
from imr.config import FirewallConfig

log = logging.getLogger("imr.backend")

Flavour = Literal["nft", "legacy"]

# Runs one command and returns its result; raises FileNotFoundError for a missing tool.
Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]

TOOL_TIMEOUT = 30.0  # seconds; iptables tools normally answer in milliseconds
PACKAGE_HINT = "install the Debian package 'iptables' (apt-get install iptables)"
FLAVOUR_LABELS: dict[Flavour, str] = {"nft": "nf_tables", "legacy": "legacy"}
_SAVE_TOOLS: dict[Flavour, tuple[str, str]] = {
    "nft": ("iptables-nft-save", "ip6tables-nft-save"),
    "legacy": ("iptables-legacy-save", "ip6tables-legacy-save"),
}

# New connections only: a block never refuses a reply to the host's own outbound connection.
CONNTRACK_NEW = ("-m", "conntrack", "--ctstate", "NEW")


def run_tool(
    argv: Sequence[str], input_text: str | None = None, timeout: float = TOOL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a firewall tool with an argument list (never a shell) and capture its output."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, input=input_text, timeout=timeout, check=False
    )


def trim(text: str, limit: int = 400) -> str:
    """A tool's complaint without usage hints, short enough for one log line."""
    lines = [line.strip() for line in text.strip().splitlines()]
    kept = [line for line in lines if line and not line.startswith("Try `")]
    message = " / ".join(kept) or "(no message)"
    return message if len(message) <= limit else message[: limit - 3] + "..."


def resolve_flavour(
    config: FirewallConfig, flavour: str | None = None, run: Runner = run_tool
) -> tuple[Flavour, str]:
    """The flavour a backend drives and where it came from, for its describe() line.

    `flavour` overrides config.iptables_flavour: "auto", "nft" or "legacy".
    """
    requested = flavour if flavour is not None else config.iptables_flavour
    if requested == "auto":
        chosen, why = detect_flavour(run, chain=config.chain)
        return chosen, f"auto-detected, {why}"
    if requested in ("nft", "legacy"):
        origin = "set by the caller" if flavour is not None else "set in the config"
        return ("nft" if requested == "nft" else "legacy"), origin
    raise BackendError(f"unknown iptables flavour {requested!r}: expected auto, nft or legacy")


# --- Flavour detection ---


@dataclass(frozen=True)
class _SaveSummary:
    rules: int  # "-A" lines over both address families and all tables
    has_chain: bool  # imr's chain exists in a filter table


def detect_flavour(run: Runner = run_tool, chain: str = "IMR") -> tuple[Flavour, str]:
    """Pick the iptables flavour the host uses; returns (flavour, why) for the status line.

    The order follows Kubernetes' iptables-wrapper: first stay where imr already
    is, then go where the rules are, and on a tie believe `iptables -V`.
    """
    summaries = {
        flavour: _summarise_saves(run, tools, chain) for flavour, tools in _SAVE_TOOLS.items()
    }
    nft, legacy = summaries["nft"], summaries["legacy"]
    if nft is None and legacy is None:
        raise BackendError(
            f"neither iptables-nft-save nor iptables-legacy-save found: {PACKAGE_HINT}"
        )
    if nft is None or legacy is None:
        only: Flavour = "legacy" if nft is None else "nft"
        return only, f"only the {FLAVOUR_LABELS[only]} tools are installed"
    if nft.has_chain != legacy.has_chain:
        where: Flavour = "nft" if nft.has_chain else "legacy"
        return where, f"chain {chain} already exists in the {FLAVOUR_LABELS[where]} tables"
    if nft.rules != legacy.rules:
        more: Flavour = "nft" if nft.rules > legacy.rules else "legacy"
        return more, f"nf_tables holds {nft.rules} rules, legacy {legacy.rules}"
    return _flavour_from_version(run)


def _summarise_saves(run: Runner, tools: Sequence[str], chain: str) -> _SaveSummary | None:
    """Rule count and chain presence over the given *-save tools; None if one is missing."""
    rules, has_chain = 0, False
    for tool in tools:
        result = _run_for_detection(run, [tool])
        if result is None:
            return None
        if result.returncode != 0:
            # e.g. the legacy kernel modules cannot be loaded: that flavour holds nothing.
            log.debug("%s failed during flavour detection: %s", tool, trim(result.stderr))
            continue
        table = ""
        for line in result.stdout.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            elif line.startswith("-A "):
                rules += 1
            elif table == "filter" and line.startswith(f":{chain} "):
                has_chain = True
    return _SaveSummary(rules, has_chain)


def _flavour_from_version(run: Runner) -> tuple[Flavour, str]:
    result = _run_for_detection(run, ["iptables", "-V"])
    if result is None:
        raise BackendError(
            f"cannot tell which iptables flavour this host uses: 'iptables' not found; "
            f"{PACKAGE_HINT}, or set firewall.iptables_flavour to 'nft' or 'legacy'"
        )
    version = result.stdout + result.stderr
    if "(nf_tables)" in version:
        return "nft", "iptables -V says nf_tables"
    if "(legacy)" in version:
        return "legacy", "iptables -V says legacy"
    raise BackendError(
        f"cannot tell which iptables flavour this host uses: iptables -V said "
        f"{trim(version)!r}; set firewall.iptables_flavour to 'nft' or 'legacy'"
    )


def _run_for_detection(run: Runner, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return run(argv)
    except FileNotFoundError:
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"{argv[0]} could not be run: {exc}") from None
