"""Firewall backends: the only code that changes the kernel's packet filter.

`BACKENDS` is the one place that names every backend (uvicorn's
`HTTP_PROTOCOLS` table in config.py is the model): the daemon's `auto`
selection, `imr server status` (which shows the daemon's `Selection.why`) and
`imr doctor` (through `auto_choice`) all read it, so they cannot disagree.
A new backend is one module, one line here, and the conformance suite.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from imr.backends.base import Backend, BackendError
from imr.config import FirewallConfig


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend's class lives, and the harmless listing `auto` probes it with."""

    target: str  # "module:Class", imported only when the backend is chosen
    probe: tuple[str, ...] = ()  # () with auto: the last resort, taken without a probe
    auto: bool = True  # whether `auto` may choose it


# In `auto`'s order of preference: fastest first, per-address iptables rules last.
BACKENDS: dict[str, BackendEntry] = {
    "nftables": BackendEntry("imr.backends.nftables:NftablesBackend", ("nft", "list", "tables")),
    "ipset": BackendEntry("imr.backends.ipset:IpsetBackend", ("ipset", "list", "-n")),
    "iptables": BackendEntry("imr.backends.iptables:IptablesBackend"),
    "dryrun": BackendEntry("imr.backends.dryrun:DryRunBackend", auto=False),
}
AUTO_ORDER = tuple(name for name, entry in BACKENDS.items() if entry.auto)


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


def backend_class(name: str) -> Callable[[FirewallConfig], Backend]:
    """The class `BACKENDS` names, imported now."""
    module, _, attribute = BACKENDS[name].target.partition(":")
    cls: Callable[[FirewallConfig], Backend] = getattr(importlib.import_module(module), attribute)
    return cls


def auto_choice(usable: Callable[[str], bool]) -> str | None:
    """The backend `auto` takes when `usable` says which would work: the first in AUTO_ORDER."""
    return next((name for name in AUTO_ORDER if usable(name)), None)


def _construct(name: str, config: FirewallConfig) -> Backend:
    return backend_class(name)(config)


def _auto(config: FirewallConfig) -> Selection:
    """nftables where the kernel and tools allow, else ipset, else per-address iptables rules.

    Each candidate is probed with a harmless read (listing), never a change.
    """
    refused: list[str] = []
    for name in AUTO_ORDER:
        argv = BACKENDS[name].probe
        if not argv:
            why = f"auto: falling back to per-address iptables rules ({'; '.join(refused)})"
            return Selection(_construct(name, config), why)
        problem = _probe(list(argv), argv[0])
        if problem is None:
            try:
                backend = _construct(name, config)
            except BackendError as exc:
                refused.append(f"{name}: {exc}")
                continue
            earlier = f" ({'; '.join(refused)})" if refused else ""
            return Selection(backend, f"auto: {name} is available{earlier}")
        refused.append(f"{name}: {problem}")
    raise BackendError("auto: no backend is available: " + "; ".join(refused))


def _probe(argv: list[str], tool: str) -> str | None:
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{tool} did not run: {exc}"
    if result.returncode != 0:
        return f"{tool} failed: {result.stderr.strip()[:200]}"
    return None
