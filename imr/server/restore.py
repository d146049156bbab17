"""Start-up: which stored blocks come back, and the memory start-up leaves behind.

Split out of broker.py (Broker.reconcile loads what this returns into the kernel and
the index).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable

from imr.backends.base import KernelBlock
from imr.core.addresses import Refusal, Target, address_of_packed, canonical_packed
from imr.protocol import timestamp
from imr.server.changes import stored_target
from imr.server.metrics import Metrics
from imr.store import BlockRecord, Store

log = logging.getLogger("imr.broker")


def rows_to_restore(
    store: Store,
    now: float,
    plain: Callable[[bytes], bool],
    protected: Callable[[Target | Refusal], Refusal | None],
    metrics: Metrics,
) -> tuple[list[BlockRecord], list[KernelBlock]]:
    """The active rows that stay, with their kernel entries (parsed once here: 100,000
    parses cost seconds). In one transaction, the rest are lifted: those that expired while
    the daemon was down, and those whose address became protected (allowlist or own
    address) since they were blocked."""
    keep: list[BlockRecord] = []
    kernel: list[KernelBlock] = []
    with store.transaction():
        for record in store.active_blocks():
            # Nearly every row: the canonical text of an address that is still due and
            # that nothing protects, checked on its packed bytes (~0.1 s for 100,000
            # rows; ~0.3 s through ipaddress objects). The rest: the full checks below.
            ip, expires_at = record.ip, record.expires_at
            packed = canonical_packed(ip)
            if packed is not None and expires_at > now and plain(packed):
                keep.append(record)
                kernel.append(KernelBlock(address_of_packed(packed), expires_at, ip))
                continue
            address, text = stored_target(record.ip)
            refusal = protected(address)
            if record.expires_at <= now:
                store.lift(record.id, now, "expired", "imr")
                metrics.expired(1)
                log.info(
                    "expired %s while the daemon was down (due %s)",
                    record.ip,
                    timestamp(record.expires_at),
                )
            elif refusal is not None:
                store.lift(record.id, now, "protected", "imr")
                log.warning("lifted %s at start: %s", record.ip, refusal.message)
            else:
                keep.append(record)
                kernel.append(KernelBlock(address, record.expires_at, text))
    return keep, kernel


def release_free_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim).

    Start-up with 100,000 blocks allocates and frees tens of MB (rows, the kernel script, its
    parsing); glibc would otherwise keep ~10 MB of it for the daemon's whole life.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)
