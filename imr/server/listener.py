"""The Unix socket listener: the socket file, its group and mode, peer credentials, and
the fast lane for `block` lines (fast_lane.py); every other line goes to the shared
conversation (conversation.py). No policy here.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Protocol

from imr.config import AccessConfig, Config, ServerConfig
from imr.protocol import (
    ProtocolError,
)
from imr.server.access import Identities, peer_credentials
from imr.server.conversation import Admission, Conversations, Handler, close_quietly
from imr.server.fast_lane import FastConnection, Submit
from imr.server.files import FileError, bind_unix_socket, make_dirs

log = logging.getLogger("imr.listener")


class ListenerError(Exception):
    """The socket cannot be set up (another daemon runs, bad group, no permission)."""


class Listener(Protocol):
    async def start(self) -> None: ...

    def apply_config(self, config: Config) -> None: ...

    async def close(self) -> None: ...


class UnixListener:
    def __init__(
        self,
        config: ServerConfig,
        access: AccessConfig,
        handler: Handler,
        error_type: type[ProtocolError],
        inherited: socket.socket | None = None,
        submit_block: Submit | None = None,
    ) -> None:
        self._config = config
        self._error_type = error_type
        # Broker.submit_block: `block` requests go through the fast lane (fast_lane.py).
        self._submit_block = submit_block
        # A listening socket made by someone else (systemd's imr.socket): used
        # as it is (its mode and group are the socket unit's), never unlinked.
        self._inherited = inherited
        self._access = access
        self._conversations = Conversations(config, handler, error_type)
        self._identities = Identities(access)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._inherited is not None:
            await self._start_inherited(self._inherited)
            return
        path = self._config.socket
        group_id = self._group_id()
        try:
            make_dirs(path.parent, 0o755)  # clients must reach the socket; the umask is 077
        except FileError as exc:
            raise ListenerError(str(exc)) from None
        await self._remove_stale_socket(path)
        # Bound, chowned and chmodded in a private directory, then renamed into place
        # (files.py): nobody can swap the path between the bind and the chmod.
        try:
            sock = bind_unix_socket(path, self._config.socket_mode_bits, group_id)
        except OSError as exc:
            # e.g. under imr.service without CAP_CHOWN: there imr.socket makes the socket.
            raise ListenerError(
                f"cannot listen on {path} with its group and mode: {exc.strerror}"
                " (under systemd, start imr.socket: it makes the socket)"
            ) from None
        self._server = await self._listen(sock)
        log.info(
            "listening on %s (mode %s, group %s)",
            path,
            self._config.socket_mode,
            self._config.socket_group or "root",
        )

    async def _listen(self, sock: socket.socket, **extra: Any) -> asyncio.AbstractServer:
        limit = self._config.max_line_bytes
        submit = self._submit_block
        if submit is None:
            return await asyncio.start_unix_server(self._serve, sock=sock, limit=limit, **extra)
        loop = asyncio.get_running_loop()
        settings = (limit, self._config.idle_timeout, submit, self._error_type)

        def connection() -> FastConnection:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return FastConnection(reader, self._serve, settings, loop)

        return await loop.create_unix_server(connection, sock=sock, **extra)

    def apply_config(self, config: Config) -> None:
        """A reloaded configuration: new roles for the next clients (reload.py)."""
        self._access = config.access
        self._identities.replace_access(config.access)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            if self._inherited is None:
                with contextlib.suppress(FileNotFoundError):
                    self._config.socket.unlink()

    async def _start_inherited(self, sock: socket.socket) -> None:
        path = self._config.socket
        extra: dict[str, Any] = {}
        if sys.version_info >= (3, 13):
            extra["cleanup_socket"] = False  # 3.13+ would unlink the socket unit's file
        self._server = await self._listen(sock, **extra)
        with contextlib.suppress(OSError):
            info = path.stat()
            group_id = self._group_id()
            wrong_group = group_id is not None and info.st_gid != group_id
            if stat.S_IMODE(info.st_mode) != self._config.socket_mode_bits or wrong_group:
                log.warning(
                    "%s (from systemd) has mode %04o gid %d, the config says %s group %s:"
                    " make SocketMode=/SocketGroup= in imr.socket match the config",
                    path,
                    stat.S_IMODE(info.st_mode),
                    info.st_gid,
                    self._config.socket_mode,
                    self._config.socket_group or "root",
                )
        log.info("listening on %s (socket passed by systemd)", path)

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
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
            peer = await self._identities.identify(pid, uid, gid)
        except Exception:
            log.exception("cannot identify a client of the Unix socket")
            await close_quietly(writer)
            return
        protocol = writer.transport.get_protocol()
        lane = protocol if isinstance(protocol, FastConnection) else None
        await self._conversations.serve(reader, writer, Admission(peer.describe(), peer), lane)
