"""The broker's replies: the dicts a client reads, built from state rows and the index.

docs/protocol.md describes every field. Times go out as ISO text (`timestamp`), durations
as the ladder writes them (`format_duration`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from imr import __version__
from imr.core.durations import format_duration
from imr.core.listing import Listing
from imr.core.policy import Action, Decision
from imr.protocol import (
    BlockedItem,
    BlockInfo,
    BlockManyItem,
    BlockManyResult,
    ExportPage,
    HitInfo,
    ListResult,
    PongResult,
    RefusedItem,
    ShowResult,
    StatusResult,
    timestamp,
    wire_time,
)
from imr.server.block_answer import block_result
from imr.server.changes import BrokerError
from imr.store import SCHEMA_VERSION, BlockRecord, HitRecord

# block_many's counts: each action's count, by the action's name.
_COUNTED = {action.value: action.counted for action in Action}
# Each action's wire name (a dict read: the enum's `value` is a property, slower).
_VALUES = {action: action.value for action in Action}


def block_info(record: BlockRecord, now: float) -> BlockInfo:
    return {
        "ip": record.ip,
        "blocked_at": timestamp(record.blocked_at),
        "expires_at": timestamp(record.expires_at),
        "duration": format_duration(record.expires_at - record.blocked_at),
        "remaining_seconds": max(0, round(record.expires_at - now))
        if record.lifted_at is None
        else 0,
        "rung": record.rung,
        "offence": record.offence,
        "reason": record.reason,
        "source": record.source,
        "uid": record.uid,
        "pid": record.pid,
        "lifted_at": timestamp(record.lifted_at),
        "lift_reason": record.lift_reason,
        "lifted_by": record.lifted_by,
        "origin": record.origin,  # the fleet member it came from; None: made here
    }


def hit_info(hit: HitRecord) -> HitInfo:
    return {
        "id": hit.id,  # show's `before` cursor
        "ip": hit.ip,
        "at": timestamp(hit.at),
        "outcome": hit.outcome,
        "reason": hit.reason,
        "source": hit.source,
        "uid": hit.uid,
        "pid": hit.pid,
        "block_id": hit.block_id,
    }


# A `block`'s reply dict, from its row and decision (block_answer.py: the writer leaves a
# BlockAnswer, which the fast lane writes without the dict).
block_reply = block_result


def compact_block_item(ip: str, record: BlockRecord, decision: Decision) -> BlockedItem:
    """block_many's short answer for one address that went through."""
    return {
        "ip": ip,
        "ok": True,
        "action": _VALUES[decision.action],
        "expires_at": wire_time(record.expires_at),
        "rung": record.rung,
        "offence": record.offence,
    }


def refused_item(ip: str, exc: BrokerError) -> RefusedItem:
    """block_many's answer for one address that was refused or failed."""
    return {"ip": ip, "ok": False, "error": {"code": exc.code, "message": exc.message}}


def block_many_reply(items: list[BlockManyItem]) -> BlockManyResult:
    counts = dict.fromkeys(("blocked", "escalated", "recorded", "refused"), 0)
    for item in items:
        counts[_COUNTED[item["action"]] if item["ok"] else "refused"] += 1
    return {"kind": "block_many", "results": items, "counts": counts}


def list_reply(listing: Listing[BlockRecord], now: float, active: int) -> ListResult:
    return {
        "kind": "list",
        "blocks": [block_info(r, now) for r in listing.rows],
        "matched": listing.matched,
        "active": active,
    }


def show_reply(
    ip: str,
    active: BlockRecord | None,
    page: tuple[list[BlockRecord], list[HitRecord]],
    rows: int,
    now: float,
) -> ShowResult:
    """One page of an address's history; `page` was read with one row more than `rows`."""
    blocks, hits = page
    return {
        "kind": "show",
        "ip": ip,
        "active": block_info(active, now) if active else None,
        "blocks": [block_info(b, now) for b in blocks[:rows]],
        "hits": [hit_info(h) for h in hits[:rows]],
        "more_blocks": len(blocks) > rows,
        "next_before": hits[rows - 1].id if len(hits) > rows else None,
    }


def export_reply(blocks: list[BlockInfo], hits: list[HitInfo], following: str | None) -> ExportPage:
    return {
        "kind": "export",
        "schema_version": SCHEMA_VERSION,
        "blocks": blocks,
        "hits": hits,
        "next": following,
    }


def status_reply(
    started_at: float,
    backend: tuple[str, str, str],
    socket: str,
    state_file: str,
    active: int,
    fleet: dict[str, Any] | None = None,
) -> StatusResult:
    """`backend` is the backend's name, its description, and why it was chosen."""
    name, detail, choice = backend
    reply: StatusResult = {
        "kind": "status",
        "version": __version__,
        "pid": os.getpid(),
        "started_at": timestamp(started_at),
        "uptime_seconds": round(time.time() - started_at, 1),
        "backend": name,
        "backend_detail": detail,
        "backend_choice": choice,
        "socket": socket,
        "state_file": state_file,
        "active_blocks": active,
    }
    if fleet is not None:
        reply["fleet"] = fleet
    return reply


def pong() -> PongResult:
    return {"kind": "pong", "version": __version__}
