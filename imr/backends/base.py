"""The one small interface every firewall backend implements.

Like the backends of CrowdSec's firewall bouncer, a backend knows nothing of
policy, clients or the state file: the broker tells it which addresses must be
blocked, and it makes the kernel agree. Everything a backend creates lives in
objects it owns (a chain, a table, a set); it never touches anything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from imr.core.addresses import IPAddress


class BackendError(Exception):
    """The kernel or the firewall tool refused a change; the message says what and why."""


@dataclass(frozen=True)
class KernelBlock:
    address: IPAddress
    expires_at: float  # epoch seconds; set backends turn it into a kernel timeout


class Backend(ABC):
    name: str

    @abstractmethod
    def describe(self) -> str:
        """One line for `imr server status`: mechanism and why it was chosen."""

    @abstractmethod
    def prepare(self) -> None:
        """Create imr's own chains/tables and hook them into INPUT. Idempotent."""

    @abstractmethod
    def apply(self, add: Sequence[KernelBlock], remove: Sequence[IPAddress]) -> None:
        """Add and remove blocks in one kernel transaction where the mechanism allows.

        Adding an address that is already blocked must not create a duplicate;
        removing an address that is not blocked is not an error. On failure
        nothing of the batch may be left half-applied, as far as the
        mechanism allows, and BackendError is raised.
        """

    @abstractmethod
    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        """Make imr's kernel state exactly `blocks` (start-up reconcile), atomically if possible."""

    @abstractmethod
    def installed(self) -> set[IPAddress]:
        """The addresses imr's objects in the kernel block now (for reconcile and tests)."""

    @abstractmethod
    def teardown(self) -> None:
        """Remove everything imr created (uninstall, tests). Never called on a normal stop."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release handles; the kernel state stays as it is."""
