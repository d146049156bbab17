"""The fleet's signed event: what a member publishes to its stream and others apply.

A stream entry has two fields: `e`, the event as compact JSON (sorted keys), and `s`, the
Ed25519 signature of DOMAIN + `e` by the origin's key. The JSON carries the origin's name,
which must match the stream it was read from, so an event signed by one member cannot be
passed off as another's even by someone who can write to every stream.

Pure: encode() and decode() do no I/O; the keys are handed in.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, NamedTuple

VERSION = 1
DOMAIN = b"imr-fleet-event-v1\n"
MAX_EVENT_BYTES = 2048
# An entry may carry a JSON array of up to this many events under one signature: a member
# catching up verifies one signature per entry, not per event (the costly part).
MAX_ENTRY_EVENTS = 100
KINDS = ("block", "escalate", "lift")


class EventRefusal(StrEnum):
    """Why an event was refused (a metric label and a log word each)."""

    MALFORMED = "malformed"
    VERSION = "unknown_version"
    UNKNOWN_ORIGIN = "unknown_origin"
    ORIGIN_MISMATCH = "origin_mismatch"
    SIGNATURE = "bad_signature"
    PROTECTED = "protected_target"
    TOO_WIDE = "too_wide"
    NEVER_AGGREGATE = "never_aggregate"  # a non-admin origin's network this host never blocks
    QUOTA = "origin_quota"
    FUTURE = "future_entry"  # stamped ahead of this host's clock (core/fleet.FUTURE_SLACK)
    LIFT_NOT_ALLOWED = "lift_not_allowed"


class Event(NamedTuple):
    """Immutable; a named tuple, not a frozen dataclass: made twice as fast (~1 µs less an
    event, 100,000 of them in a catch-up; bench/fleet.py)."""

    origin: str  # the member that decided it
    seq: int  # the origin's outbox number: increasing, so a replayed event is seen as one
    kind: str  # block | escalate | lift
    ip: str  # canonical text of an address or CIDR network
    at: float  # when the origin decided it (its wall clock)
    expires_at: float  # block / escalate: the end of the block; lift: 0
    rung: int
    offence: int
    reason: str
    source: str
    v: int = VERSION

    def to_json(self) -> bytes:
        return json.dumps(self._asdict(), sort_keys=True, separators=(",", ":")).encode()


# Exact types: json.loads makes no subclasses, and `type(x) is int` leaves out bool.
_FIELDS: dict[str, frozenset[type]] = {
    "origin": frozenset({str}),
    "seq": frozenset({int}),
    "kind": frozenset({str}),
    "ip": frozenset({str}),
    "at": frozenset({int, float}),
    "expires_at": frozenset({int, float}),
    "rung": frozenset({int}),
    "offence": frozenset({int}),
    "reason": frozenset({str}),
    "source": frozenset({str}),
    "v": frozenset({int}),
}
_NAMES = frozenset(_FIELDS)
# An event's values and their types, in Event's field order.
_values = operator.itemgetter(*Event._fields)
_KINDS = tuple(_FIELDS[name] for name in Event._fields)


def sign(event_json: bytes, signer: Callable[[bytes], bytes]) -> dict[str, bytes]:
    """The stream entry's fields for an event (signer: the private key's sign)."""
    return {"e": event_json, "s": signer(DOMAIN + event_json)}


def decode(
    fields: Mapping[bytes, bytes],
    stream_origin: str,
    verifiers: Mapping[str, Callable[[bytes, bytes], bool]],
) -> Event | EventRefusal:
    """The one event of a stream entry (see decode_entry), or why it is refused."""
    found = decode_entry(fields, stream_origin, verifiers)
    return found[0] if len(found) == 1 else EventRefusal.MALFORMED


def decode_entry(
    fields: Mapping[bytes, bytes],
    stream_origin: str,
    verifiers: Mapping[str, Callable[[bytes, bytes], bool]],
) -> list[Event | EventRefusal]:
    """The events of one stream entry read from `stream_origin`'s stream (one JSON object,
    or an array of up to MAX_ENTRY_EVENTS), each an Event or why it is refused; a refusal of
    the whole entry (its signature, its size) is one item.

    `verifiers` maps a member's name to its check(signature, message). The signature is
    checked before the JSON is trusted beyond its size, so a forger learns nothing more.
    """
    body, signature = fields.get(b"e"), fields.get(b"s")
    too_big = body is not None and len(body) > MAX_EVENT_BYTES * MAX_ENTRY_EVENTS
    if body is None or signature is None or too_big or len(fields) != 2:
        return [EventRefusal.MALFORMED]
    verifier = verifiers.get(stream_origin)
    if verifier is None:
        return [EventRefusal.UNKNOWN_ORIGIN]
    if not verifier(signature, DOMAIN + body):
        return [EventRefusal.SIGNATURE]
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return [EventRefusal.MALFORMED]
    items = data if isinstance(data, list) else [data]
    if not 1 <= len(items) <= MAX_ENTRY_EVENTS:
        return [EventRefusal.MALFORMED]
    return [_one(item, stream_origin) for item in items]


def _one(data: Any, stream_origin: str) -> Event | EventRefusal:
    if not isinstance(data, dict):
        return EventRefusal.MALFORMED
    if data.get("v") != VERSION:
        return EventRefusal.VERSION
    return _checked(data, stream_origin)


def _checked(data: dict[str, Any], stream_origin: str) -> Event | EventRefusal:
    # Spelled for speed: a catch-up checks 100,000 of these (~4.8 µs each before, ~1.3 µs
    # now; bench/fleet.py's catch-up profile).
    if data.keys() != _NAMES:
        return EventRefusal.MALFORMED
    values = _values(data)
    for value, kinds in zip(values, _KINDS, strict=True):
        if type(value) not in kinds:
            return EventRefusal.MALFORMED
    origin, seq, kind, ip, at, expires_at, rung, offence, reason, source, _ = values
    if kind not in KINDS or not (math.isfinite(at) and math.isfinite(expires_at)):
        return EventRefusal.MALFORMED
    if not 1 <= rung <= 64 or seq < 1 or offence < 0:
        return EventRefusal.MALFORMED
    if len(reason) > 512 or len(source) > 128 or len(ip) > 64:
        return EventRefusal.MALFORMED
    if origin != stream_origin:
        return EventRefusal.ORIGIN_MISMATCH
    return tuple.__new__(Event, values)  # Event(**data) without its keyword binding


def outbox_body(
    origin: str,
    kind: str,
    ip: str,
    at: float,
    expires_at: float,
    rung: int,
    offence: int,
    reason: str,
    source: str,
) -> bytes:
    """An event as the writer stores it in the outbox: everything but its seq, which the
    outbox row's number becomes when the publisher signs it."""
    return json.dumps(
        {
            "origin": origin,
            "kind": kind,
            "ip": ip,
            "at": at,
            "expires_at": expires_at,
            "rung": rung,
            "offence": offence,
            "reason": reason[:512],
            "source": source[:128],
            "v": VERSION,
        },
        separators=(",", ":"),
    ).encode()
