"""A `block` change's answer as the writer leaves it: the row, the decision and the time.

The fast lane writes its `block` replies from the row itself with one template
(encode_json_answer, encode_text_answer: ~3.5 µs a request less than the JSON encoder
over the reply dict; docs/performance.md "Per request, round three"); the dict is built
only for the streams path (Broker._dispatch) and whoever else asks (`result`), and for
a row the template cannot write (a field of an unexpected type). The bytes are the
encoders' own: tests/test_reply_encoder.py compares both ways.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii

from imr.core.durations import format_duration
from imr.core.policy import Action, Decision
from imr.protocol import BlockResult, encode_json_reply, encode_text_reply, ok_reply, wire_time
from imr.store import BlockRecord

# Each action's wire name (a dict read: the enum's `value` is a property, slower).
_VALUES = {action: action.value for action in Action}
_TOLD = {action.value: action.told for action in Action}  # protocol_replies._summarise's words


class BlockAnswer:
    """The outcome of a `block` (not block_many's compact one) before it becomes a reply."""

    __slots__ = ("decision", "now", "record")

    def __init__(self, record: BlockRecord, decision: Decision, now: float) -> None:
        self.record, self.decision, self.now = record, decision, now

    @property
    def action(self) -> str:
        return _VALUES[self.decision.action]

    def result(self) -> BlockResult:
        return block_result(self.record, self.decision, self.now)


def block_result(record: BlockRecord, decision: Decision, now: float) -> BlockResult:
    """A block request's answer: the block as it is now, and what the policy did.

    block_info's keys and values, then the decision's, written out as one dict (every
    request's; ~0.7 µs less than block_info and an update: bench/one_address.py)."""
    blocked_at, expires_at, lifted_at = record.blocked_at, record.expires_at, record.lifted_at
    return {
        "ip": record.ip,
        "blocked_at": wire_time(blocked_at),
        "expires_at": wire_time(expires_at),
        "duration": format_duration(expires_at - blocked_at),
        "remaining_seconds": max(0, round(expires_at - now)) if lifted_at is None else 0,
        "rung": record.rung,
        "offence": record.offence,
        "reason": record.reason,
        "source": record.source,
        "uid": record.uid,
        "pid": record.pid,
        "lifted_at": None if lifted_at is None else wire_time(lifted_at),
        "lift_reason": record.lift_reason,
        "lifted_by": record.lifted_by,
        "origin": record.origin,
        "kind": "block",
        "action": _VALUES[decision.action],
        "why": decision.why,
    }


def encode_json_answer(request_id: str | None, answer: BlockAnswer) -> bytes:
    """encode_json_reply(ok_reply(request_id, answer.result())), byte for byte, without the
    dict: exact ints (not bool) where the reply has numbers, else that path; the encoder's
    own string quoting (ensure_ascii), and a TypeError from it for a non-string sends the
    row that path too."""
    record, decision, quote = answer.record, answer.decision, encode_basestring_ascii
    blocked_at, expires_at, lifted_at = record.blocked_at, record.expires_at, record.lifted_at
    remaining = max(0, round(expires_at - answer.now)) if lifted_at is None else 0
    rung, offence, uid, pid = record.rung, record.offence, record.uid, record.pid
    if (
        type(remaining) is not int
        or type(rung) is not int
        or type(offence) is not int
        or (uid is not None and type(uid) is not int)
        or (pid is not None and type(pid) is not int)
    ):
        return encode_json_reply(ok_reply(request_id, answer.result()))
    blocked, expires = wire_time(blocked_at), wire_time(expires_at)
    duration, action = format_duration(expires_at - blocked_at), _VALUES[decision.action]
    lift_reason, lifted_by, origin = record.lift_reason, record.lifted_by, record.origin
    try:
        return (
            f'{{"v":1,"id":{"null" if request_id is None else quote(request_id)},"ok":true,'
            f'"result":{{"ip":{quote(record.ip)},"blocked_at":{quote(blocked)},'
            f'"expires_at":{quote(expires)},"duration":{quote(duration)},'
            f'"remaining_seconds":{remaining},"rung":{rung},"offence":{offence},'
            f'"reason":{quote(record.reason)},"source":{quote(record.source)},'
            f'"uid":{"null" if uid is None else uid},"pid":{"null" if pid is None else pid},'
            f'"lifted_at":{"null" if lifted_at is None else quote(wire_time(lifted_at))},'
            f'"lift_reason":{"null" if lift_reason is None else quote(lift_reason)},'
            f'"lifted_by":{"null" if lifted_by is None else quote(lifted_by)},'
            f'"origin":{"null" if origin is None else quote(origin)},'
            f'"kind":"block","action":{quote(action)},"why":{quote(decision.why)}}}}}\n'
        ).encode()
    except TypeError:  # a string field that is not one: the encoder says what it says
        return encode_json_reply(ok_reply(request_id, answer.result()))


def encode_text_answer(request_id: str | None, answer: BlockAnswer) -> bytes:
    """encode_text_reply(ok_reply(request_id, answer.result())), byte for byte, without the
    dict or the control-character pass when the line has nothing that pass would change."""
    record, action = answer.record, _VALUES[answer.decision.action]
    line = (
        f"ok {_TOLD.get(action, action)} {record.ip} until {wire_time(record.expires_at)}"
        f" (rung {record.rung}, offence {record.offence})"
    )
    if line.isprintable():  # no C0 or DEL to replace; it ends in ")": nothing to strip
        return line.encode() + b"\n"
    return encode_text_reply(ok_reply(request_id, answer.result()))
