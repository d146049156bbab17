"""The Unix socket listener: framing, limits, peer identity. No policy here.

Every connection is identified once by SO_PEERCRED; then each line is one
request and gets one reply line. Limits keep a hostile or broken client from
hurting anyone else: bounded line length, bounded connections, an idle
timeout, and a write timeout for clients that never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from imr.config import AccessConfig, ServerConfig
from imr.protocol import (
    ProtocolError,
    Request,
    encode_json_reply,
    encode_text_reply,
    error_reply,
    ok_reply,
    parse_request,
)
from imr.server.access import Peer, identify, peer_credentials

log = logging.getLogger("imr.listener")

Handler = Callable[[Request, Peer], Awaitable[dict[str, Any]]]
WRITE_TIMEOUT = 5.0
DISCARD_SECONDS = 1.0


class ListenerError(Exception):
    """The socket cannot be set up (another daemon runs, bad group, no permission)."""


class UnixListener:
    def __init__(
        self,
        config: ServerConfig,
        access: AccessConfig,
        handler: Handler,
        error_type: type[Exception],
    ) -> None:
        self._config = config
        self._access = access
        self._handler = handler
        self._error_type = error_type  # exceptions with .code/.message that become error replies
        self._server: asyncio.AbstractServer | None = None
        self._connections = 0

    async def start(self) -> None:
        path = self._config.socket
        group_id = self._group_id()
        path.parent.mkdir(parents=True, exist_ok=True)
        await self._remove_stale_socket(path)
        # Create the socket owner-only, then open it up: no moment where it is
        # wider than configured.
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=self._config.max_line_bytes
            )
        except OSError as exc:
            raise ListenerError(f"cannot listen on {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        if group_id is not None:
            os.chown(path, -1, group_id)
        path.chmod(self._config.socket_mode_bits)
        log.info(
            "listening on %s (mode %s, group %s)",
            path,
            self._config.socket_mode,
            self._config.socket_group or "root",
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self._config.socket.unlink()

    def _group_id(self) -> int | None:
        name = self._config.socket_group
        if name is None:
            return None
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise ListenerError(f"server.socket_group: no group named {name!r}") from None

    @staticmethod
    async def _remove_stale_socket(path: Path) -> None:
        if not path.exists():
            return
        if not path.is_socket():
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a daemon that died
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise ListenerError(f"another imr daemon is already listening on {path}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > self._config.max_connections:
                log.warning("refused a connection: %d connections open", self._connections - 1)
                await self._send(
                    writer,
                    encode_text_reply(error_reply(None, "busy", "too many connections; try again")),
                )
                return
            sock = writer.get_extra_info("socket")
            pid, uid, gid = peer_credentials(sock)
            peer = identify(pid, uid, gid, self._access)
            await self._conversation(reader, writer, peer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self._config.idle_timeout)
            except TimeoutError:
                return
            except ValueError:
                # Longer than max_line_bytes: the rest of the line cannot be
                # trusted to be framed, so answer and hang up.
                log.warning("line too long from %s", peer.describe())
                await self._send(
                    writer,
                    encode_text_reply(
                        error_reply(
                            None,
                            "line_too_long",
                            f"a request line may be at most {self._config.max_line_bytes} bytes",
                        )
                    ),
                )
                return
            if not line:
                return
            if not line.endswith(b"\n"):
                return  # the client closed mid-line: nothing complete to answer
            await self._send(writer, await self._answer(line, peer))

    async def _answer(self, line: bytes, peer: Peer) -> bytes:
        is_json = line.lstrip().startswith(b"{")
        encode = encode_json_reply if is_json else encode_text_reply
        request_id = None
        try:
            request, is_json = parse_request(line.rstrip(b"\r\n"))
            request_id = request.id
            result = await self._handler(request, peer)
            reply = ok_reply(request_id, result)
        except ProtocolError as exc:
            log.info("bad request from %s: %s", peer.describe(), exc.message)
            reply = error_reply(None, exc.code, exc.message)
        except self._error_type as exc:
            reply = error_reply(
                request_id, getattr(exc, "code", "error"), getattr(exc, "message", str(exc))
            )
        except Exception:
            log.exception("request from %s failed", peer.describe())
            reply = error_reply(request_id, "internal_error", "the daemon failed; see its log")
        return encode(reply)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


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
