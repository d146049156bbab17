"""The listeners' shared conversation. No policy here.

A listener accepts a connection and works out who the client is (an
`Admission`); from then on `Conversations` runs the same protocol for every
listener (the Unix socket in listener.py, TCP in tcp_listener.py): each line is
one request and gets one reply line. Limits keep a hostile or broken client from
hurting anyone else: bounded line length, connection slots (imr/core/slots.py:
per client, and a reserve for admins), an idle timeout that only real requests
renew (not `ping`), a write timeout for clients that never read, fair turns
between connections, and at most one log line per client and kind of trouble
every 10 s, with client text escaped (imr/terminal.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from imr.config import ServerConfig
from imr.core.quota import LogThrottle
from imr.core.slots import Slots
from imr.protocol import (
    AuthRequest,
    AuthResult,
    PingRequest,
    ProtocolError,
    Request,
    Result,
    encode_json_reply,
    encode_text_reply,
    error_reply,
    ok_reply,
    parse_message,
)
from imr.server.access import Peer
from imr.server.fast_lane import FastConnection
from imr.terminal import escape
from imr.wire_codes import WireCode

log = logging.getLogger("imr.listener")

Handler = Callable[[Request, Peer], Awaitable[Result]]
TokenCheck = Callable[[str], Peer | None]
WRITE_TIMEOUT = 5.0
DISCARD_SECONDS = 1.0
REFUSAL_WAIT = 1.0  # how long a refused client may take to send the line `busy` answers
IDENTIFY_TIMEOUT = 10.0  # for the `auth` line of a TCP client (sshd's LoginGraceTime)
LOG_INTERVAL = 10.0  # one line per client and kind of trouble this often (Conversations.note)


@dataclass(frozen=True)
class Admission:
    """What a listener knows about a client when it connects, before any line."""

    who: str  # for log lines: the peer's description, or its address until it authenticates
    peer: Peer | None = None  # known at once (Unix socket, mapped certificate)
    authenticate: TokenCheck | None = None  # set when the client may send `auth TOKEN`
    refusal: str | None = None  # why a client that is not identified cannot be served
    source: str | None = None  # what log lines about an unidentified client are throttled by
    identified: Callable[[], None] | None = None  # called once `auth` identifies the client


class Conversations:
    """The per-connection protocol every listener shares: framing, limits, answers."""

    def __init__(
        self, config: ServerConfig, handler: Handler, error_type: type[ProtocolError]
    ) -> None:
        self._config = config
        self._handler = handler
        self._error_type = error_type  # refusals that become error replies (ProtocolError)
        self.slots = Slots(config.slot_limits())
        self._refusing = 0  # connections being told `busy`
        self._log = LogThrottle(LOG_INTERVAL)

    def note(self, key: Hashable, level: int, message: str, *args: object) -> None:
        """Log a line about a client at most once per key every 10 s, counting the rest.

        Keys are (principal or source, kind): a flood of bad lines, refusals or
        connections writes one line every 10 s, not one per request.
        """
        suppressed = self._log.allow(key, time.monotonic())
        if suppressed is None:
            return
        if suppressed:
            message += "; %d more like it since the last such line"
            args = (*args, suppressed)
        log.log(level, message, *args)

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admission: Admission,
        lane: FastConnection | None = None,
    ) -> None:
        """Converse until the client leaves, idles out or breaks a rule; then close.

        With a `lane` (the Unix socket's, fast_lane.py) the conversation starts there and
        comes back here for good at the first line the lane does not take."""
        try:
            peer = admission.peer
            if peer is None:
                peer = await self._identify(reader, writer, admission)
            elif (why := self._claim(peer)) is not None:
                await self.refuse_busy(reader, writer, peer.principal, peer.describe(), why)
                peer = None
            if peer is not None:
                try:
                    idle_until: float | None = None
                    if lane is not None:
                        start = asyncio.get_running_loop().time() + self._config.idle_timeout
                        idle_until = await lane.run(peer, start)
                        if idle_until is None:
                            return  # over in the lane: closed or idled out
                        await self.send(writer, b"")  # the lane's last reply may wait unread
                    await self._conversation(reader, writer, peer, idle_until)
                finally:
                    self.slots.release(peer.principal)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            await close_quietly(writer)

    def _claim(self, peer: Peer) -> str | None:
        return self.slots.claim(peer.principal, admin=peer.is_admin, has_role=bool(peer.roles))

    async def refuse_busy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        key: str,
        who: str,
        why: str,
    ) -> None:
        """Answer the client's first line `busy`, in its own form (the hook speaks JSON)."""
        self.note(
            (key, WireCode.BUSY), logging.WARNING, "refused a connection from %s: %s", who, why
        )
        if self._refusing >= self._config.max_connections:
            return  # a flood of connections: close them without waiting for a line
        self._refusing += 1
        try:
            line = b""
            with contextlib.suppress(TimeoutError, ValueError, ConnectionError):
                async with asyncio.timeout(REFUSAL_WAIT):
                    line = await reader.readline()
            await self.send(writer, _busy_reply(line, why))
        finally:
            self._refusing -= 1

    async def _identify(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, admission: Admission
    ) -> Peer | None:
        """Until it is identified a client gets one line: a good `auth`, or goodbye."""
        line = await self._read_line(
            reader,
            writer,
            admission.source or admission.who,
            min(IDENTIFY_TIMEOUT, self._config.idle_timeout),
        )
        if line is None:
            return None
        reply, peer = self._authenticate(line, admission)
        if peer is not None:
            if admission.identified is not None:
                admission.identified()
            if (why := self._claim(peer)) is not None:
                self.note(
                    (peer.principal, WireCode.BUSY),
                    logging.WARNING,
                    "refused %s: %s",
                    peer.describe(),
                    why,
                )
                reply, peer = _busy_reply(line, why), None
        await self.send(writer, reply)
        return peer

    async def _conversation(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        idle_until: float | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        # A ping does not renew the idle time, or pinging every few seconds would keep
        # a slot forever; only a request that did something does.
        if idle_until is None:
            idle_until = loop.time() + self._config.idle_timeout
        while True:
            line = await self._read_line(reader, writer, peer.principal, idle_until - loop.time())
            if line is None:
                return
            reply, renews = await self._answer(line, peer)
            await self.send(writer, reply)
            if renews:
                idle_until = loop.time() + self._config.idle_timeout
            # Fair turns: a client with more lines buffered yields to the others after each.
            # (Without one, the next read waits anyway: no extra turn of the loop for it.)
            if b"\n" in _buffered(reader):
                await asyncio.sleep(0)

    async def _read_line(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str, timeout: float
    ) -> bytes | None:
        """The next complete line, or None when the connection is over (closed, idle, too long)."""
        try:
            # asyncio.timeout, not wait_for: no task per line (~20 us a request).
            async with asyncio.timeout(max(timeout, 0.0)):
                line = await reader.readline()
        except TimeoutError:
            return None
        except ValueError:
            # Longer than max_line_bytes: the rest of the line cannot be
            # trusted to be framed, so answer and hang up.
            self.note(
                (key, WireCode.LINE_TOO_LONG), logging.WARNING, "line too long from %s", escape(key)
            )
            limit = self._config.max_line_bytes
            await self.send(
                writer,
                encode_text_reply(
                    error_reply(
                        None, WireCode.LINE_TOO_LONG, f"a request line may be at most {limit} bytes"
                    )
                ),
            )
            # Closing with the rest of that line unread would reset the connection,
            # and the client would lose this reply and those before it.
            await _discard_then_close(reader, writer)
            return None
        if not line.endswith(b"\n"):
            return None  # closed, or closed mid-line: nothing complete to answer
        return line

    def _authenticate(self, line: bytes, admission: Admission) -> tuple[bytes, Peer | None]:
        encode = _encoder(line)
        refusal = admission.refusal or "send `auth TOKEN` first"
        source = admission.source or admission.who
        try:
            message, _ = parse_message(line.rstrip(b"\r\n"))
        except ProtocolError as exc:
            self.note(
                (source, WireCode.UNAUTHENTICATED),
                logging.WARNING,
                "refused %s: not authenticated, sent a bad line",
                admission.who,
            )
            return encode(
                error_reply(None, WireCode.UNAUTHENTICATED, f"{refusal} ({exc.message})")
            ), None
        if not isinstance(message, AuthRequest) or admission.authenticate is None:
            self.note(
                (source, WireCode.UNAUTHENTICATED),
                logging.WARNING,
                "refused %s %s: %s",
                message.op,
                admission.who,
                refusal,
            )
            return encode(error_reply(message.id, WireCode.UNAUTHENTICATED, refusal)), None
        peer = admission.authenticate(message.token)
        if peer is None:
            self.note(
                (source, "unknown_token"),
                logging.WARNING,
                "refused %s: unknown token",
                admission.who,
            )
            return encode(error_reply(message.id, WireCode.UNAUTHENTICATED, "unknown token")), None
        # Once per client every 10 s: a client that reconnects in a loop cannot flood the log.
        self.note(
            (peer.principal, "authenticated"),
            logging.INFO,
            "authenticated %s (roles %s)",
            peer.describe(),
            _roles(peer),
        )
        result: AuthResult = {
            "kind": "auth",
            "principal": peer.principal,
            "roles": sorted(peer.roles),
        }
        return encode(ok_reply(message.id, result)), peer

    async def _answer(self, line: bytes, peer: Peer) -> tuple[bytes, bool]:
        """The reply, and whether the request renews the idle time (done something, not ping)."""
        encode = _encoder(line)
        request_id = None
        # Two tries, though one error type: a line that cannot be parsed is logged as a bad
        # request; a refusal of a parsed request is the handler's to log.
        try:
            message, _ = parse_message(line.rstrip(b"\r\n"))
            request_id = message.id
            if isinstance(message, AuthRequest):
                raise ProtocolError(
                    WireCode.BAD_REQUEST,
                    f"this connection is already identified as {peer.principal}",
                )
        except ProtocolError as exc:
            self.note(
                (peer.principal, WireCode.BAD_REQUEST),
                logging.INFO,
                "bad request from %s: %s",
                peer.describe(),
                escape(exc.message),
            )
            return encode(error_reply(request_id, exc.code, exc.message)), False
        try:
            result = await self._handler(message, peer)
            return encode(ok_reply(request_id, result)), not isinstance(message, PingRequest)
        except self._error_type as exc:
            reply = error_reply(request_id, exc.code, exc.message)
        except Exception:
            log.exception("request from %s failed", peer.describe())
            reply = error_reply(
                request_id, WireCode.INTERNAL_ERROR, "the daemon failed; see its log"
            )
        return encode(reply), False

    @staticmethod
    async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        if writer.transport.get_write_buffer_size():  # only then can drain() wait at all
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _buffered(reader: asyncio.StreamReader) -> bytes | bytearray:
    """What the reader holds unread (StreamReader has no public way to ask)."""
    buffer: bytes | bytearray = getattr(reader, "_buffer", b"\n")  # unknown: assume a line
    return buffer


def _busy_reply(line: bytes, why: str) -> bytes:
    """`busy` in the form of the client's first line (empty: the text form), echoing its id."""
    return _encoder(line)(error_reply(_request_id(line), WireCode.BUSY, f"{why}; try again later"))


def _request_id(line: bytes) -> str | None:
    """The id of a JSON request line, to echo in a refusal; None if it has none or is not one."""
    if not line.lstrip().startswith(b"{"):
        return None
    try:
        message, _ = parse_message(line.rstrip(b"\r\n"))
    except ProtocolError:
        return None
    return message.id


def _encoder(line: bytes) -> Callable[[dict[str, Any]], bytes]:
    """A JSON line is answered in JSON, anything else in the text form."""
    return encode_json_reply if line.lstrip().startswith(b"{") else encode_text_reply


def _roles(peer: Peer) -> str:
    return ",".join(sorted(peer.roles)) or "none"


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def _discard_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then swallow what the client is still sending, briefly.

    Closing a socket with unread input resets it, and the client would lose
    the error reply it is about to read; so read and drop for up to a second.
    """
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
    deadline = asyncio.get_running_loop().time() + DISCARD_SECONDS
    with contextlib.suppress(TimeoutError, ConnectionError):
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            if not await asyncio.wait_for(reader.read(65536), left):
                break
