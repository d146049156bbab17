"""The Unix socket's fast lane: `block` requests answered from callbacks, not a coroutine.

Most clients of the socket (a web server's hook, a log scanner) send nothing but
`block` lines. Through asyncio streams each one costs three turns of a task, a
future and a timer for the idle timeout besides the work itself (py-spy of
bench/one_address.py, docs/performance.md "Speed round two"). Here the
connection's protocol reads the lines itself, parses them, and hands a `block`
straight to the broker (Broker.submit_block); when the writer has committed it
(state file fsynced, kernel entry made) a callback writes the reply.

The lane only ever takes the common case. The first line that is anything else
(another op, a line the parser refuses, `auth`), a line longer than
server.max_line_bytes, the end of the input, or a client that stops reading its
replies hands the connection back to Conversations (conversation.py) for good, with
every unread byte: from then on the streams path answers exactly as it always
did, with its messages, log lines, limits and timeouts. So the lane changes no
answer; it keeps its own only of the idle timeout (a `block` answered "ok"
renews it; the connection is closed when it runs out while waiting for a line),
of fair turns (after each reply with more lines buffered, the others go first),
and of the bound on what it buffers (reading pauses beyond twice the line limit).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from imr.protocol import (
    BlockRequest,
    ProtocolError,
    encode_json_reply,
    encode_text_reply,
    error_reply,
    ok_reply,
    parse_message,
)
from imr.server.access import Peer
from imr.server.block_answer import BlockAnswer, encode_json_answer, encode_text_answer
from imr.wire_codes import WireCode

log = logging.getLogger("imr.listener")

# Broker.submit_block: checks and queues a `block` (raises the error type for a refusal),
# and calls the callback with its outcome: (result, None), or (None, the error).
Answered = Callable[[Any, BaseException | None], object]
Submit = Callable[[BlockRequest, Peer, Answered], None]


class FastConnection(asyncio.StreamReaderProtocol):
    """One Unix socket connection: streams until `run` takes it, then the lane until it
    hands the connection back (or it ends)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        settings: tuple[int, float, Submit, type[ProtocolError]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(reader, connected, loop)
        self._ev, self._reader = loop, reader
        self._tx: asyncio.Transport | None = None
        self._writing_paused = False  # the client's replies wait unread (pause_writing)
        self._limit, self._idle_timeout, self._submit, self._error_type = settings
        self._lane: asyncio.Future[float | None] | None = None  # set while the lane runs
        self._buffer = bytearray()
        self._eof = False
        self._reading_paused = False
        self._in_flight = False
        self._peer: Peer | None = None
        self._idle_until = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- taking over and handing back ------------------------------------------------

    def run(self, peer: Peer, idle_until: float) -> asyncio.Future[float | None]:
        """Run the lane for an identified peer (its slot claimed). The future says how it
        ended: None, the connection is over (closed, idled out); else the idle deadline,
        and the streams path goes on from there with every unread byte in its reader."""
        lane: asyncio.Future[float | None] = self._ev.create_future()
        self._peer, self._idle_until = peer, idle_until
        reader = self._reader
        buffered = getattr(reader, "_buffer", None)
        if (
            reader is None
            or self._tx is None
            or not isinstance(buffered, bytearray)
            or reader.at_eof()
            or reader.exception() is not None
            or getattr(reader, "_eof", True)
        ):
            lane.set_result(idle_until)  # nothing the lane can take: streams as before
            return lane
        self._lane = lane
        # What arrived during identification: the reader's (its pause of reading too).
        self._buffer += buffered
        buffered.clear()
        if getattr(reader, "_paused", False):
            reader._paused = False  # type: ignore[attr-defined,unused-ignore]
            self._reading_paused = True
        self._next()
        return lane

    def _hand_back(self) -> None:
        """Give the connection to the streams path, with everything not answered yet."""
        lane, reader = self._lane, self._reader
        if lane is None:
            return
        self._lane = None
        self._cancel_timer()
        if self._reading_paused:
            self._reading_paused = False
            if self._tx is not None:
                self._tx.resume_reading()
        if reader is not None:
            if self._buffer:
                reader.feed_data(bytes(self._buffer))
            if self._eof:
                reader.feed_eof()
        self._buffer.clear()
        if not lane.done():
            lane.set_result(self._idle_until)

    def _end(self) -> None:
        """The connection is over (idle, or lost): the conversation releases and closes."""
        lane = self._lane
        self._lane = None
        self._cancel_timer()
        if lane is not None and not lane.done():
            lane.set_result(None)

    # -- the protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            self._tx = transport
        super().connection_made(transport)

    def pause_writing(self) -> None:
        self._writing_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        super().resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._lane is None:
            super().data_received(data)
            return
        self._buffer += data
        if not self._in_flight:
            self._next()
        elif len(self._buffer) > 2 * self._limit and not self._reading_paused:
            self._reading_paused = True  # as StreamReader does: the client waits
            if self._tx is not None:
                self._tx.pause_reading()

    def eof_received(self) -> bool:
        if self._lane is None:
            return bool(super().eof_received())
        self._eof = True
        if not self._in_flight:
            self._hand_back()  # the streams path answers what is complete, then closes
        return True  # half-closed: the replies still go out

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lane is not None:
            self._end()
        super().connection_lost(exc)

    # -- one line at a time ---------------------------------------------------------

    def _next(self) -> None:
        """With nothing in flight: answer the next line, wait for one, or hand back."""
        if self._lane is None or self._in_flight:
            return
        buffer = self._buffer
        newline = buffer.find(b"\n")
        if newline < 0 or newline > self._limit:
            if self._eof or newline > self._limit or len(buffer) > self._limit:
                self._hand_back()  # the end, or a line too long: streams say so as before
            else:
                self._wait_for_line()
            return
        end = newline + 1
        whole = end == len(buffer)  # the usual case: one line, as one client writes it
        line = bytes(buffer) if whole else bytes(buffer[:end])
        message = parse_block(line.rstrip(b"\r\n"))
        peer = self._peer
        if type(message) is not BlockRequest or peer is None:
            self._hand_back()  # the streams path parses it again and answers it
            return
        if whole:
            buffer.clear()
        else:
            del buffer[:end]
        self._answer(line, message, peer)

    def _wait_for_line(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._tx is not None:
                self._tx.resume_reading()
        if self._ev.time() >= self._idle_until:
            self._end()  # as a read with no time left: the connection has idled out
        elif self._timer is None:
            self._timer = self._ev.call_at(self._idle_until, self._idle_check)

    def _idle_check(self) -> None:
        """The idle timer: one per connection, moved on only when it fires (no timer per line)."""
        self._timer = None
        if self._lane is None or self._in_flight:
            return  # a request's end looks at the deadline again
        if self._ev.time() >= self._idle_until:
            self._end()
        else:
            self._timer = self._ev.call_at(self._idle_until, self._idle_check)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _answer(self, line: bytes, request: BlockRequest, peer: Peer) -> None:
        """Conversations._answer for a `block`: the same replies, from a callback."""
        in_json = line.startswith(b"{") or line.lstrip().startswith(b"{")
        encode = encode_json_reply if in_json else encode_text_reply
        self._in_flight = True
        try:
            self._submit(
                request,
                peer,
                lambda result, error: self._answered(result, error, request.id, in_json, peer),
            )
        except self._error_type as exc:
            self._in_flight = False
            self._send(encode(error_reply(request.id, exc.code, exc.message)), False)
            return
        except Exception:
            self._in_flight = False
            log.exception("request from %s failed", peer.describe())
            self._send(encode(_internal_error(request.id)), False)

    def _answered(
        self,
        result: Any,
        error: BaseException | None,
        request_id: str | None,
        in_json: bool,
        peer: Peer,
    ) -> None:
        self._in_flight = False
        if self._lane is None:
            return  # the client went away meanwhile
        encode = encode_json_reply if in_json else encode_text_reply
        try:
            if error is not None:
                raise error
            if type(result) is BlockAnswer:  # from the row, without the reply dict
                encode_answer = encode_json_answer if in_json else encode_text_answer
                reply, renews = encode_answer(request_id, result), True
            else:
                reply, renews = encode(ok_reply(request_id, result)), True
        except self._error_type as exc:
            reply, renews = encode(error_reply(request_id, exc.code, exc.message)), False
        except Exception:
            log.exception("request from %s failed", peer.describe())
            reply, renews = encode(_internal_error(request_id)), False
        self._send(reply, renews)

    def _send(self, reply: bytes, renews: bool) -> None:
        transport = self._tx
        if transport is None or self._lane is None:
            return
        transport.write(reply)
        if renews:
            self._idle_until = self._ev.time() + self._idle_timeout
        if self._writing_paused:  # FlowControlMixin: the client does not read its replies
            self._hand_back()  # the streams path waits for it, WRITE_TIMEOUT at most
        elif b"\n" in self._buffer:
            self._ev.call_soon(self._next)  # fair turns: the others first
        else:
            self._next()


# The `block` lines clients write (imr/hook.py; imr/client.py's json.dumps spacing; the
# text form without a reason), with addresses that need no escape: their JSON decodes to
# exactly these keys and strings, so the model's own validator sees what it would have.
_JSON_BLOCK = re.compile(
    rb'\{"v": ?1, ?"op": ?"block", ?"ip": ?"([0-9A-Fa-f:.]{1,45})"'
    rb'(?:, ?"reason": ?"([^"\\\x00-\x1f]*)")?(?:, ?"source": ?"([A-Za-z0-9_.:/@+-]*)")?\}'
)
_TEXT_BLOCK = re.compile(rb"block ([0-9A-Fa-f:.]{1,45})")
_VALIDATE = BlockRequest.__pydantic_validator__.validate_python


def parse_block(line: bytes) -> BlockRequest | None:
    """The `block` request of a line (without its newline), or None if it is anything else.

    parse_message's answer, ~2.5 µs cheaper for the common shapes (no JSON decoder, no
    union dispatch; bench/one_address.py): a line of another shape takes parse_message, and
    one that either refuses is None, so the streams path answers it with its message."""
    data: dict[str, Any] | None = None
    if (match := _JSON_BLOCK.fullmatch(line)) is not None:
        ip, reason, source = match.groups()
        data = {"v": 1, "op": "block", "ip": ip.decode()}
        try:
            if reason is not None:
                data["reason"] = reason.decode()
        except UnicodeDecodeError:
            return None
        if source is not None:
            data["source"] = source.decode()
    elif (match := _TEXT_BLOCK.fullmatch(line)) is not None:
        data = {"op": "block", "ip": match.group(1).decode()}
    try:
        if data is not None:
            request: BlockRequest = _VALIDATE(data)
            return request
        message, _ = parse_message(line)
    except (ValidationError, ProtocolError):
        return None
    return message if type(message) is BlockRequest else None


def _internal_error(request_id: str | None) -> dict[str, Any]:
    return error_reply(request_id, WireCode.INTERNAL_ERROR, "the daemon failed; see its log")
