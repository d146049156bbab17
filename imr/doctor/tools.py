"""Which tools the host has for each backend, and which iptables flavour it uses."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from imr.config import Config
from imr.doctor.findings import (
    APT_HINT,
    Finding,
    Runner,
    ok,
    problem,
    run,
)

IPTABLES_NFT = ("iptables-nft-restore", "ip6tables-nft-restore", "iptables-nft", "ip6tables-nft")
IPTABLES_LEGACY = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-legacy")


def _missing(tools: Sequence[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def _has_libnftables() -> bool:
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return False
    return True


def _has_python_iptables() -> bool:
    try:
        import iptc  # noqa: F401  (python-iptables; loads libiptc)
    except Exception:  # ImportError, or its own errors when libxtables is missing
        return False
    return True


@dataclass(frozen=True)
class Tools:
    """What the host has, for each way imr can talk to the kernel."""

    iptables_nft: list[str]  # missing tools
    iptables_legacy: list[str]
    python_iptables: bool
    nft: bool
    libnftables: bool
    ipset: bool

    @classmethod
    def find(cls) -> Tools:
        return cls(
            iptables_nft=_missing(IPTABLES_NFT),
            iptables_legacy=_missing(IPTABLES_LEGACY),
            python_iptables=_has_python_iptables(),
            nft=shutil.which("nft") is not None,
            libnftables=_has_libnftables(),
            ipset=shutil.which("ipset") is not None,
        )


def check_tools(config: Config, tools: Tools, run_tool: Runner = run) -> list[Finding]:
    findings: list[Finding] = []
    have = []
    if not tools.iptables_nft:
        have.append("iptables-nft")
    if not tools.iptables_legacy and tools.python_iptables:
        have.append("iptables-legacy (python-iptables)")
    if tools.libnftables or tools.nft:
        have.append("nftables (" + ("libnftables" if tools.libnftables else "nft") + ")")
    if tools.ipset:
        have.append("ipset")
    backend = config.firewall.backend
    if backend == "dryrun":
        return [ok("tools", "backend 'dryrun' needs no firewall tools")]
    needs: dict[str, list[str]] = {
        "nftables": [] if (tools.libnftables or tools.nft) else ["nft or libnftables.so.1"],
        "ipset": (["ipset"] if not tools.ipset else []) + tools.iptables_nft,
        "iptables": _iptables_needs(config, tools),
    }
    if backend == "auto":
        usable = [name for name, missing in needs.items() if not missing]
        if not usable:
            findings.append(
                problem(
                    "tools",
                    "no firewall backend has its tools: "
                    + "; ".join(f"{name} needs {', '.join(m)}" for name, m in needs.items()),
                    f"{APT_HINT['nftables']} (or {APT_HINT['iptables']})",
                )
            )
        else:
            findings.append(ok("tools", f"found {', '.join(have) or 'nothing'}"))
    elif needs[backend]:
        package = {"nftables": "nftables", "ipset": "ipset", "iptables": "iptables"}[backend]
        findings.append(
            problem(
                "tools",
                f"firewall.backend = {backend!r} needs {', '.join(needs[backend])}, not found"
                f" on PATH ({os.environ.get('PATH', '')})",
                f"{APT_HINT[package]}"
                + (" and iptables" if backend == "ipset" and tools.iptables_nft else "")
                + "; or choose another firewall.backend",
            )
        )
    else:
        findings.append(ok("tools", f"found {', '.join(have)}"))
    if backend in ("auto", "iptables", "ipset"):
        findings.append(check_flavour(config, tools, run_tool))
    return findings


def _iptables_needs(config: Config, tools: Tools) -> list[str]:
    flavour = config.firewall.iptables_flavour
    nft_ok, legacy_ok = not tools.iptables_nft, not tools.iptables_legacy and tools.python_iptables
    if flavour == "nft" or (flavour == "auto" and not legacy_ok):
        return tools.iptables_nft
    if flavour == "legacy" or (flavour == "auto" and not nft_ok):
        legacy = list(tools.iptables_legacy)
        return legacy + ([] if tools.python_iptables else ["python-iptables (pip)"])
    return []


def check_flavour(config: Config, tools: Tools, run_tool: Runner = run) -> Finding:
    """Which iptables the host uses, and whether rules sit in both (never right)."""
    version = run_tool(["iptables", "-V"], None)
    says = (version.stdout + version.stderr).strip()
    if version.returncode == 127:
        return problem("iptables flavour", "'iptables' is not installed", APT_HINT["iptables"])
    counts: dict[str, int | None] = {}
    for flavour, tool in (("nf_tables", "iptables-nft-save"), ("legacy", "iptables-legacy-save")):
        result = run_tool([tool], None)
        counts[flavour] = (
            sum(line.startswith("-A ") for line in result.stdout.splitlines())
            if result.returncode == 0
            else None
        )
    configured = config.firewall.iptables_flavour
    host = "nft" if "(nf_tables)" in says else "legacy" if "(legacy)" in says else None
    detail = f"{says or 'iptables -V said nothing'}; rules: " + ", ".join(
        f"{k} {'?' if v is None else v}" for k, v in counts.items()
    )
    if counts["nf_tables"] and counts["legacy"]:
        return problem(
            "iptables flavour",
            f"rules exist in both the nf_tables and the legacy tables ({detail}):"
            " the two do not see each other",
            "move every rule to one flavour (Debian: update-alternatives --config iptables),"
            " then set firewall.iptables_flavour to it",
        )
    if configured != "auto" and host is not None and configured != host:
        return problem(
            "iptables flavour",
            f"firewall.iptables_flavour = {configured!r} but the host's iptables is {host}"
            f" ({detail}): imr's rules would be invisible to `iptables -L`",
            f"set firewall.iptables_flavour = {host!r} (or 'auto')",
        )
    return ok("iptables flavour", detail)
