"""Firewall backends: the only code that changes the kernel's packet filter."""

from __future__ import annotations

from imr.backends.base import Backend
from imr.config import FirewallConfig


def make_backend(config: FirewallConfig) -> Backend:
    """The backend the config names. Imports lazily: dryrun needs no firewall libraries."""
    if config.backend == "dryrun":
        from imr.backends.dryrun import DryRunBackend

        return DryRunBackend()
    from imr.backends.iptables import IptablesBackend

    return IptablesBackend(config)
