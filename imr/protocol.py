"""The wire protocol: versioned newline-delimited JSON, plus a one-line text form.

A request is one line. If it starts with "{" it is JSON and the reply is one
JSON line; otherwise it is the text form ("block 203.0.113.7 some reason") and
the reply is one text line ("ok ..." or "error CODE: message"), so socat and
`nc -U` keep working as the original shell tool did. docs/protocol.md is the
specification; keep the two in step.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Annotated, Any, Literal, overload

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from imr.config_types import Duration

# The replies live in imr/protocol_replies.py; callers keep importing them from here.
from imr.protocol_replies import CONTROL_CHARACTERS
from imr.protocol_replies import PROTOCOL_VERSION as PROTOCOL_VERSION
from imr.protocol_replies import AuthResult as AuthResult
from imr.protocol_replies import BlockedItem as BlockedItem
from imr.protocol_replies import BlockInfo as BlockInfo
from imr.protocol_replies import BlockManyItem as BlockManyItem
from imr.protocol_replies import BlockManyResult as BlockManyResult
from imr.protocol_replies import BlockResult as BlockResult
from imr.protocol_replies import ErrorInfo as ErrorInfo
from imr.protocol_replies import ExportPage as ExportPage
from imr.protocol_replies import HitInfo as HitInfo
from imr.protocol_replies import ListResult as ListResult
from imr.protocol_replies import PongResult as PongResult
from imr.protocol_replies import RefusedItem as RefusedItem
from imr.protocol_replies import Result as Result
from imr.protocol_replies import ShowResult as ShowResult
from imr.protocol_replies import StatusResult as StatusResult
from imr.protocol_replies import UnblockResult as UnblockResult
from imr.protocol_replies import encode_json_reply as encode_json_reply
from imr.protocol_replies import encode_text_reply as encode_text_reply
from imr.protocol_replies import error_reply as error_reply
from imr.protocol_replies import ok_reply as ok_reply
from imr.terminal import UNSAFE, escape
from imr.wire_codes import WireCode

MAX_REASON = 200
MAX_SOURCE = 64
MAX_LIST_LIMIT = 100_000
MAX_BLOCK_MANY = 1000  # addresses in one block_many (the line limit usually binds first)
# Rows one `show` or `export` page may ask for; the daemon may answer fewer
# (state.page_rows) and says where to go on.
MAX_PAGE_ROWS = 10_000

_SOURCE_PATTERN = r"^[A-Za-z0-9_.:/@+-]*$"
# list's source filter: a tag, or a glob of one (imr.core.listing.source_matcher).
_SOURCE_FILTER_PATTERN = r"^[A-Za-z0-9_.:/@+*?!\[\]-]*$"


def _printable(text: str) -> str:
    # A reason ends up on an admin's terminal (imr list/show) and in log lines:
    # no control characters (C0, C1) and no bidi overrides (imr/terminal.py).
    if UNSAFE.search(text) is not None:
        raise ValueError("control characters and bidi overrides are not allowed")
    return text


# Length limits inside the annotation, before the check: pydantic then words a violation
# as "String should have at most 200 characters", not as a count of items.
Reason = Annotated[str, Field(max_length=MAX_REASON), AfterValidator(_printable)]
ReasonFilter = Annotated[
    str, Field(min_length=1, max_length=MAX_REASON), AfterValidator(_printable)
]


class ProtocolError(Exception):
    """A request that fails for a reason the client should hear: a line that cannot be
    understood (here), or a refusal (the broker, which calls it BrokerError). `code` goes on
    the wire; `message` is for the user."""

    def __init__(self, code: WireCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = 1
    id: str | None = Field(None, max_length=64)


class BlockRequest(_Request):
    op: Literal["block"]
    ip: str = Field(max_length=64)
    reason: Reason = ""
    source: str = Field("", max_length=MAX_SOURCE, pattern=_SOURCE_PATTERN)
    severity: int = Field(1, ge=1, le=10)
    # Admins only (others: forbidden): the block lasts this long from now, whatever the
    # ladder says; its rung is still the ladder's, so a repeat escalates from there.
    duration: Duration | None = None


class BlockManyRequest(_Request):
    """Many addresses, one reason: a log scanner's or a scan wave's batch (docs/protocol.md).

    Each address is decided, admitted, recorded and answered on its own, exactly as a
    `block` of it would be; only the framing is shared.
    """

    op: Literal["block_many"]
    ips: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=MAX_BLOCK_MANY)
    reason: Reason = ""
    source: str = Field("", max_length=MAX_SOURCE, pattern=_SOURCE_PATTERN)
    severity: int = Field(1, ge=1, le=10)

    @field_validator("ips")
    @classmethod
    def _distinct(cls, ips: list[str]) -> list[str]:
        seen: set[str] = set()
        for ip in ips:
            if ip in seen:
                raise ValueError(f"{ip!r} is given twice; list each address once")
            seen.add(ip)
        return ips


class UnblockRequest(_Request):
    op: Literal["unblock"]
    ip: str = Field(max_length=64)
    reason: Reason = ""


class ShowRequest(_Request):
    """An address's history, newest first, a page at a time (docs/protocol.md)."""

    op: Literal["show"]
    ip: str = Field(max_length=64)
    limit: int | None = Field(None, ge=1, le=MAX_PAGE_ROWS)  # blocks and hits, each
    before: int | None = Field(None, ge=1)  # only hits older than this hit id (`next_before`)


class ListRequest(_Request):
    """Active blocks from the daemon's memory; every filter given must match (docs/protocol.md)."""

    op: Literal["list"]
    limit: int | None = Field(None, ge=1, le=MAX_LIST_LIMIT)
    since: Duration | None = None  # blocked within: "1h", "30m", or whole seconds
    reason: ReasonFilter | None = None  # substring, any case
    source: str | None = Field(
        None, min_length=1, max_length=MAX_SOURCE, pattern=_SOURCE_FILTER_PATTERN
    )
    networks: bool = False  # only network blocks (an admin's, and the escalated ones)
    # The fleet member a block came from; "local": made on this host (docs/fleet.md).
    origin: str | None = Field(None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")


class StatusRequest(_Request):
    op: Literal["status"]


class PingRequest(_Request):
    op: Literal["ping"]


class ExportRequest(_Request):
    """One page of the whole state: blocks by id, then hits by id (docs/protocol.md)."""

    op: Literal["export"]
    after: str | None = Field(None, pattern=r"^(blocks|hits):[0-9]{1,18}$")  # a reply's `next`
    limit: int | None = Field(None, ge=1, le=MAX_PAGE_ROWS)


class AuthRequest(_Request):
    """The first line of a TCP connection without a client certificate (not on the socket)."""

    op: Literal["auth"]
    token: str = Field(min_length=1, max_length=256)


Request = Annotated[
    BlockRequest
    | BlockManyRequest
    | UnblockRequest
    | ShowRequest
    | ListRequest
    | StatusRequest
    | PingRequest
    | ExportRequest,
    Field(discriminator="op"),
]
_REQUEST = TypeAdapter(Request)

OPS = ("block", "block_many", "unblock", "show", "list", "status", "ping", "export")


@overload
def timestamp(epoch: float) -> str: ...
@overload
def timestamp(epoch: None) -> None: ...
@overload
def timestamp(epoch: float | None) -> str | None: ...
def timestamp(epoch: float | None) -> str | None:
    """Wire form of a time: ISO 8601 in UTC, to the second."""
    if epoch is None:
        return None
    return _timestamp(epoch)


@functools.lru_cache(maxsize=256)  # a batch's blocks share their times: one strftime each
def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))  # 2x datetime's speed


# timestamp() of a time that is never None (a block's start and end): one call less, ~0.1 µs
# a reply (docs/performance.md, "Per request, round three").
wire_time = _timestamp


def parse_request(line: bytes) -> tuple[Request, bool]:
    """Parse one request line (without its newline). Returns (request, is_json)."""
    message, is_json = _parse(line, allow_auth=False)
    if isinstance(message, AuthRequest):  # pragma: no cover - allow_auth=False never makes one
        raise ProtocolError(WireCode.BAD_REQUEST, "auth is not a request")
    return message, is_json


def parse_message(line: bytes) -> tuple[Request | AuthRequest, bool]:
    """parse_request, and also the `auth` line (docs/protocol.md, "TCP and authentication")."""
    return _parse(line, allow_auth=True)


def _parse(line: bytes, *, allow_auth: bool) -> tuple[Request | AuthRequest, bool]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(WireCode.BAD_REQUEST, "request is not valid UTF-8") from None
    text = text.strip()
    if not text:
        raise ProtocolError(WireCode.BAD_REQUEST, "empty request")
    if text.startswith("{"):
        return _parse_json(text, allow_auth), True
    return _parse_text(text, allow_auth), False


def _parse_json(text: str, allow_auth: bool = False) -> Request | AuthRequest:
    try:
        data = _DECODER.decode(text)
        # "\ud800" escapes decode to lone surrogates, which no UTF-8 writer (the
        # state file, the log, a text reply) can encode. pydantic refuses them in
        # string fields too; this refuses them anywhere, with a message that says so.
        # Only an escape can make one (the line was strict UTF-8): plain lines skip it.
        if "\\u" in text:
            json.dumps(data, ensure_ascii=False).encode()
    except _DuplicateKey as exc:
        raise ProtocolError(WireCode.BAD_REQUEST, str(exc)) from None
    except UnicodeEncodeError:
        raise ProtocolError(WireCode.BAD_REQUEST, "request holds a lone surrogate escape") from None
    except (ValueError, RecursionError):
        raise ProtocolError(WireCode.BAD_REQUEST, "request is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(WireCode.BAD_REQUEST, "a JSON request must be an object")
    version = data.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            WireCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported;"
            f" this daemon speaks v{PROTOCOL_VERSION}",
        )
    op = data.get("op")
    if allow_auth and op == "auth":
        try:
            return AuthRequest.model_validate(data)
        except ValidationError as exc:
            raise ProtocolError(WireCode.BAD_REQUEST, _first_error(exc, nested=False)) from None
    if op not in OPS:
        raise ProtocolError(
            WireCode.BAD_REQUEST, f"unknown op {str(op)[:32]!r}; known: {', '.join(OPS)}"
        )
    try:
        return _REQUEST.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(WireCode.BAD_REQUEST, _first_error(exc)) from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a repeated key: parsers disagree on which one wins."""
    data = dict(pairs)
    if len(data) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise _DuplicateKey(f"duplicate key {repeated[:32]!r}: each key may appear once")
    return data


# Made once: json.loads with a hook builds a new decoder for every line.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


_TEXT_VERBS = {
    "block": (1, True),  # (address args, free text allowed after)
    "unblock": (1, True),
    "show": (1, False),
    "list": (0, False),
    "status": (0, False),
    "ping": (0, False),
}


def _parse_text(text: str, allow_auth: bool = False) -> Request | AuthRequest:
    if CONTROL_CHARACTERS.search(text):
        raise ProtocolError(WireCode.BAD_REQUEST, "control characters are not allowed")
    verb, _, rest = text.partition(" ")
    verb = verb.lower()
    if allow_auth and verb == "auth":
        token = rest.strip()
        if not token or " " in token or len(token) > 256:
            raise ProtocolError(WireCode.BAD_REQUEST, "usage: auth TOKEN")
        return AuthRequest(op="auth", token=token)
    if verb not in _TEXT_VERBS:
        raise ProtocolError(
            WireCode.BAD_REQUEST, f"unknown command {verb[:32]!r}; known: {', '.join(_TEXT_VERBS)}"
        )
    needs_ip, free_text = _TEXT_VERBS[verb]
    data: dict[str, Any] = {"op": verb}
    rest = rest.strip()
    if needs_ip:
        ip, _, tail = rest.partition(" ")
        if not ip:
            raise ProtocolError(
                WireCode.BAD_REQUEST, f"usage: {verb} ADDRESS" + (" [REASON]" if free_text else "")
            )
        data["ip"] = ip
        if tail.strip():
            if not free_text:
                raise ProtocolError(WireCode.BAD_REQUEST, f"usage: {verb} ADDRESS")
            data["reason"] = tail.strip()
    elif verb == "list" and rest:
        data.update(_list_options(rest))
    elif rest:
        raise ProtocolError(WireCode.BAD_REQUEST, f"usage: {verb}")
    try:
        return _REQUEST.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(WireCode.BAD_REQUEST, _first_error(exc)) from None


_LIST_OPTIONS = ("since", "reason", "source", "limit")


def _list_options(rest: str) -> dict[str, str]:
    """`list since=1h source=logscan reason=ssh limit=50`: each KEY=VALUE once, no spaces."""
    options: dict[str, str] = {}
    for word in rest.split():
        key, sep, value = word.partition("=")
        if not sep or key not in _LIST_OPTIONS or key in options or not value:
            raise ProtocolError(
                WireCode.BAD_REQUEST,
                "usage: list [since=DURATION] [reason=TEXT] [source=TAG] [limit=N]",
            )
        options[key] = value
    return options


def _first_error(exc: ValidationError, nested: bool = True) -> str:
    error = exc.errors()[0]
    # A union's errors start with the member's tag ("block"); a plain model's do not.
    key = ".".join(str(p) for p in error["loc"][1 if nested else 0 :]) or "request"
    # An unknown key is the client's text: escaped, or it could end a log line and forge the next.
    return escape(f"{key[:64]}: {error['msg'].removeprefix('Value error, ')}")
