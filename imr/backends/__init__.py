"""Firewall backends: the only code that changes the kernel's packet filter."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from imr.backends.base import Backend, BackendError
from imr.config import FirewallConfig


@dataclass(frozen=True)
class Selection:
    backend: Backend
    why: str  # for `imr server status` and the log


def make_backend(config: FirewallConfig) -> Selection:
    """The backend the config names; "auto" picks the fastest the host supports.

    Imports lazily: dryrun needs no firewall libraries.
    """
    if config.backend == "auto":
        return _auto(config)
    return Selection(
        _construct(config.backend, config), f"backend = {config.backend!r} in the config"
    )


def _construct(name: str, config: FirewallConfig) -> Backend:
    if name == "dryrun":
        from imr.backends.dryrun import DryRunBackend

        return DryRunBackend(config)
    if name == "nftables":
        from imr.backends.nftables import NftablesBackend

        return NftablesBackend(config)
    if name == "ipset":
        from imr.backends.ipset import IpsetBackend

        return IpsetBackend(config)
    from imr.backends.iptables import IptablesBackend

    return IptablesBackend(config)


def _auto(config: FirewallConfig) -> Selection:
    """nftables where the kernel and tools allow, else ipset, else per-address iptables rules.

    Each candidate is probed with a harmless read (listing), never a change.
    """
    probes: list[tuple[str, Callable[[], str | None]]] = [
        ("nftables", lambda: _probe(["nft", "list", "tables"], "nft")),
        ("ipset", lambda: _probe(["ipset", "list", "-n"], "ipset")),
    ]
    refused: list[str] = []
    for name, probe in probes:
        problem = probe()
        if problem is None:
            try:
                backend = _construct(name, config)
            except BackendError as exc:
                refused.append(f"{name}: {exc}")
                continue
            earlier = f" ({'; '.join(refused)})" if refused else ""
            return Selection(backend, f"auto: {name} is available{earlier}")
        refused.append(f"{name}: {problem}")
    return Selection(
        _construct("iptables", config),
        f"auto: falling back to per-address iptables rules ({'; '.join(refused)})",
    )


def _probe(argv: list[str], tool: str) -> str | None:
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{tool} did not run: {exc}"
    if result.returncode != 0:
        return f"{tool} failed: {result.stderr.strip()[:200]}"
    return None
