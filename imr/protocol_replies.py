"""The wire protocol's replies: what `result` holds for each op, and the two encodings.

Split out of imr/protocol.py (requests and their parsing), which re-exports every name
here; docs/protocol.md is the specification of both.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, NotRequired, TypedDict

from imr.core.policy import Action
from imr.wire_codes import WireCode

PROTOCOL_VERSION = 1
# Control characters: refused in a text-form request, replaced in a text-form reply (a
# reply is one line, and a terminal must not act on a client's bytes).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


# --- Replies ---
# What `result` holds for each op (docs/protocol.md describes every field). TypedDicts cost
# nothing at run time; they let mypy check each reader's keys. Times are `timestamp` text.


class ErrorInfo(TypedDict):
    code: str  # a WireCode (imr/wire_codes.py)
    message: str  # for people


class BlockInfo(TypedDict):
    """One block, active or lifted: list, show, export and block itself."""

    ip: str
    blocked_at: str
    expires_at: str
    duration: str  # as the ladder writes it ("1d")
    remaining_seconds: int  # 0 once lifted
    rung: int
    offence: int
    reason: str
    source: str
    uid: int | None
    pid: int | None
    lifted_at: str | None
    lift_reason: str | None
    lifted_by: str | None
    origin: str | None  # the fleet member it came from; None: made here (docs/fleet.md)


class BlockResult(BlockInfo):
    kind: Literal["block"]
    action: str  # an Action (imr/core/policy.py): block, escalate or record
    why: str  # the ladder's reason for the rung


class BlockedItem(TypedDict):
    """block_many's short answer for one address that went through."""

    ip: str
    ok: Literal[True]
    action: str
    expires_at: str
    rung: int
    offence: int


class RefusedItem(TypedDict):
    """block_many's answer for one address that was refused or failed."""

    ip: str
    ok: Literal[False]
    error: ErrorInfo


BlockManyItem = BlockedItem | RefusedItem


class BlockManyResult(TypedDict):
    kind: Literal["block_many"]
    results: list[BlockManyItem]  # in request order
    counts: dict[str, int]  # blocked, escalated, recorded, refused (Action.counted)


class UnblockResult(TypedDict):
    kind: Literal["unblock"]
    ip: str


class HitInfo(TypedDict):
    id: int  # show's `before` cursor
    ip: str
    at: str
    outcome: str
    reason: str
    source: str
    uid: int | None
    pid: int | None
    block_id: int | None


class ShowResult(TypedDict):
    kind: Literal["show"]
    ip: str
    active: BlockInfo | None
    blocks: list[BlockInfo]  # newest first, one page
    hits: list[HitInfo]  # newest first, one page
    more_blocks: bool
    next_before: int | None  # the next page's `before`; None on the last page
    covered_by: NotRequired[str | None]  # the network block holding it out of the kernel


class ListResult(TypedDict):
    kind: Literal["list"]
    blocks: list[BlockInfo]
    matched: int  # active blocks the filters matched, before `limit`
    active: int  # all active blocks


class ExportPage(TypedDict):
    kind: Literal["export"]
    schema_version: int
    blocks: list[BlockInfo]
    hits: list[HitInfo]
    next: str | None  # the next page's `after`; None after the last page


class StatusResult(TypedDict):
    kind: Literal["status"]
    version: str
    pid: int
    started_at: str
    uptime_seconds: float
    backend: str
    backend_detail: str
    backend_choice: str  # why this backend was chosen
    socket: str
    state_file: str
    active_blocks: int
    fleet: NotRequired[dict[str, Any]]  # fleet mode only (docs/fleet.md)


class PongResult(TypedDict):
    kind: Literal["pong"]
    version: str


class AuthResult(TypedDict):
    kind: Literal["auth"]
    principal: str
    roles: list[str]


Result = (
    BlockResult
    | BlockManyResult
    | UnblockResult
    | ShowResult
    | ListResult
    | ExportPage
    | StatusResult
    | PongResult
    | AuthResult
)


def ok_reply(request_id: str | None, result: Result) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: str | None, code: WireCode, message: str) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": message},
    }


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps makes one per call


def encode_json_reply(reply: dict[str, Any]) -> bytes:
    return _COMPACT.encode(reply).encode() + b"\n"


def encode_text_reply(reply: dict[str, Any]) -> bytes:
    """The text form: "ok <summary>" or "error <code>: <message>", one line."""
    if not reply["ok"]:
        error = reply["error"]
        line = f"error {error['code']}: {error['message']}"
    else:
        line = "ok " + _summarise(reply["result"])
    return CONTROL_CHARACTERS.sub(" ", line).strip().encode() + b"\n"


_TOLD = {action.value: action.told for action in Action}


def _summarise(result: dict[str, Any]) -> str:
    kind = result.get("kind")
    if kind == "block":
        return (
            f"{_TOLD.get(result['action'], result['action'])} {result['ip']}"
            f" until {result['expires_at']}"
            f" (rung {result['rung']}, offence {result['offence']})"
        )
    if kind == "unblock":
        return f"unblocked {result['ip']}"
    if kind == "show":
        active = result.get("active")
        state = f"blocked until {active['expires_at']}" if active else "not blocked"
        return f"{result['ip']} {state}; {len(result['blocks'])} blocks, {len(result['hits'])} hits"
    if kind == "list":
        entries = " ".join(f"{b['ip']}@{b['expires_at']}" for b in result["blocks"])
        return f"{len(result['blocks'])} active" + (f": {entries}" if entries else "")
    if kind == "status":
        return (
            f"running pid {result['pid']} backend {result['backend']}"
            f" active {result['active_blocks']}"
        )
    if kind == "pong":
        return "pong"
    if kind == "auth":
        return f"authenticated {result['principal']} (roles {','.join(result['roles']) or 'none'})"
    return json.dumps(result, separators=(",", ":"))
