"""The fast lane's `block` reply encoders write what the general ones write, byte for byte.

encode_json_answer and encode_text_answer (imr/server/block_answer.py) write a `block`
reply from the row with a template; the reference is encode_json_reply /
encode_text_reply of ok_reply over the reply dict, which every other reply goes through.
Hostile strings (escapes, control characters, non-ASCII, lone surrogates), both address
families, every action, and rows with a field of an unexpected type.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from imr.core.policy import Action, Decision
from imr.protocol import Result, encode_json_reply, encode_text_reply, ok_reply
from imr.server.block_answer import BlockAnswer, encode_json_answer, encode_text_answer
from imr.server.replies import block_info, block_reply
from imr.store import BlockRecord

texts = st.text(st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", "sqli", 'a"b\\c', "\x00\x1f\x7f\x85", "\u2028\u202e", "é€😀", "\ud800x"]
)
addresses = st.ip_addresses().map(str) | st.sampled_from(["2001:db8::/48", "192.0.2.0/24"])
ids = st.none() | texts
ints = st.integers(min_value=-(2**70), max_value=2**70)
optional_ints = st.none() | ints


@st.composite
def block_answers(draw: st.DrawFn) -> BlockAnswer:
    """A row, a decision and a time, as the writer leaves them for the fast lane."""
    now = draw(st.floats(min_value=0, max_value=4e9))
    blocked = draw(st.floats(min_value=0, max_value=4e9))
    expires = blocked + draw(st.floats(min_value=1, max_value=1e8))
    lifted = draw(st.none() | st.just(now))
    record = BlockRecord(
        draw(st.integers(1, 2**40)),
        draw(addresses),
        blocked,
        expires,
        draw(st.integers(1, 20)),
        draw(st.integers(1, 10**6)),
        draw(texts),
        draw(texts),
        draw(optional_ints),
        draw(optional_ints),
        lifted,
        draw(st.none() | texts) if lifted is not None else None,
        draw(st.none() | texts) if lifted is not None else None,
        draw(st.none() | texts),
    )
    decision = Decision(draw(st.sampled_from(list(Action))), record.rung, expires, draw(texts))
    return BlockAnswer(record, decision, now)


def outcome(encode: Callable[[], bytes]) -> bytes | type[Exception]:
    """The bytes, or the type of the exception (a lone surrogate cannot be UTF-8 text)."""
    try:
        return encode()
    except Exception as exc:
        return type(exc)


@settings(max_examples=500, deadline=None)
@given(block_answers())
def test_the_reply_dict_is_block_info_and_the_decision(answer: BlockAnswer) -> None:
    """block_result writes block_info's keys out again (one dict, not two): the same keys
    in the same order and the same values, then the decision's."""
    record, decision, now = answer.record, answer.decision, answer.now
    expected = {**block_info(record, now), "kind": "block"}
    expected |= {"action": decision.action.value, "why": decision.why}
    result = block_reply(record, decision, now)
    assert list(result.items()) == list(expected.items())


# The fast lane's replies from the row (block_answer.py): the same bytes as the encoders
# write for the reply dict, for rows with any field of an unexpected type too.
def same_from_row(request_id: str | None, answer: BlockAnswer) -> None:
    def result() -> Result:
        return cast(Result, block_reply(answer.record, answer.decision, answer.now))

    json_reply = outcome(lambda: encode_json_answer(request_id, answer))
    assert json_reply == outcome(lambda: encode_json_reply(ok_reply(request_id, result())))
    text_reply = outcome(lambda: encode_text_answer(request_id, answer))
    assert text_reply == outcome(lambda: encode_text_reply(ok_reply(request_id, result())))


@settings(max_examples=3000, deadline=None)
@given(ids, block_answers())
def test_replies_from_the_row_are_the_encoders_bytes(
    request_id: str | None, answer: BlockAnswer
) -> None:
    same_from_row(request_id, answer)


_ROW_FIELDS: tuple[str, ...] = ("ip", "rung", "offence", "reason", "source", "uid", "pid")
_ROW_FIELDS += ("lift_reason", "lifted_by", "origin")


@settings(max_examples=1000, deadline=None)
@given(
    ids,
    block_answers(),
    st.sampled_from(_ROW_FIELDS),
    st.none() | st.booleans() | st.floats(allow_nan=True) | ints | texts | st.just([1, "x"]),
)
def test_a_row_field_of_the_wrong_type_still_encodes_as_the_encoder_does(
    request_id: str | None, answer: BlockAnswer, key: str, value: Any
) -> None:
    answer.record = replace(answer.record, **{key: value})
    same_from_row(request_id, answer)


def test_a_typical_reply_from_the_row() -> None:
    now = time.time()
    record = BlockRecord(7, "2001:db8::7", now, now + 86400, 1, 1, "sqli", "hook", 33, 4242)
    answer = BlockAnswer(record, Decision(Action.BLOCK, 1, now + 86400, "first offence"), now)
    line = encode_json_answer("r1", answer)
    assert line.startswith(b'{"v":1,"id":"r1","ok":true,"result":{"ip":"2001:db8::7",')
    assert line.endswith(b'"kind":"block","action":"block","why":"first offence"}}\n')
    assert encode_text_answer(None, answer).startswith(b"ok blocked 2001:db8::7 until ")
    same_from_row(None, answer)
