"""A new state file beside a kernel that holds imr blocks: refuse, or adopt them.

The daemon makes the kernel match the state file at start (Broker.reconcile). A
state file that is *new* (it never held a block: it was missing, empty, or
made by a start that refused) beside a kernel
that still holds imr's blocks means the state was lost, not that there are no
blocks: reconciling would lift them all, silently. So the daemon refuses to
start and names the way out; with `imr server start --adopt-kernel` it records
the kernel's entries as blocks of the first rung instead.
"""

from __future__ import annotations

import logging

from imr.backends.base import Backend
from imr.config import Config
from imr.core.addresses import Target
from imr.protocol import timestamp
from imr.store import BlockRecord, Store

log = logging.getLogger("imr.daemon")

ADOPTED_REASON = "adopted from the kernel: the state file was new"


class KernelNotEmpty(Exception):
    """The state file is new but the kernel holds imr blocks; the message says what to do."""


def check_kernel_against_state(
    config: Config, store: Store, backend: Backend, now: float, adopt: bool
) -> None:
    """Refuse to start with a new state file while the kernel holds imr blocks.

    Reconciling would make the kernel match the empty state: every block lifted,
    silently. With `adopt`, the kernel's entries become blocks of the first rung
    instead (their original times and reasons are lost with the old state file).
    """
    if not store.is_new():
        return
    found = backend.installed()
    if not found:
        return
    path = config.state.path
    if not adopt:
        raise KernelNotEmpty(
            f"the state file {path} is new (it has never held a block), but {backend.name} holds"
            f" {len(found)} imr block(s); starting would lift them all. Restore {path} from a"
            " backup, or start once with `imr server start --adopt-kernel` to keep them as new"
            " blocks (docs/operations.md, state-file recovery)"
        )
    ladder = config.policy.to_ladder()
    expires_at = now + ladder.duration(1)
    with store.transaction():
        first = store.next_block_id()
        store.insert_blocks(
            [
                BlockRecord(
                    first + n,
                    str(target),
                    now,
                    expires_at,
                    1,
                    1,
                    ADOPTED_REASON,
                    "kernel",
                    None,
                    None,
                )
                for n, target in enumerate(sorted(found, key=_target_order))
            ]
        )
    log.warning(
        "adopted %d block(s) found in %s into the new state file %s (rung 1, until %s)",
        len(found),
        backend.name,
        path,
        timestamp(expires_at),
    )


def _target_order(target: Target) -> tuple[int, str]:
    return (target.version, str(target))
