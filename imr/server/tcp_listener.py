"""The TCP listener: clients on other hosts (off by default; docs/security.md).

The same protocol, limits and roles as the Unix socket (conversation.Conversations);
only accepting and identifying differ. A client is identified by a client
certificate that server.tcp.client_ca signed and access.certificates maps,
or, without a certificate, by a first line `auth TOKEN` whose SHA-256 is in
access.tokens. The config refuses a non-loopback address unless it is allowed
explicitly and TLS is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from imr.config import AccessConfig, Config, ServerConfig, TcpConfig
from imr.core.addresses import endpoint_text
from imr.core.slots import Startups, source_of
from imr.protocol import ProtocolError, encode_text_reply, error_reply
from imr.server.access import (
    certificate_subject,
    identify_certificate,
    identify_token,
    subject_text,
)
from imr.server.conversation import Admission, Conversations, Handler
from imr.server.listener import ListenerError
from imr.terminal import escape
from imr.wire_codes import WireCode

log = logging.getLogger("imr.listener.tcp")

HANDSHAKE_TIMEOUT = 10.0
TLS_HANDSHAKE_RECORD = 0x16  # the first byte a TLS client sends


class TcpListener:
    def __init__(
        self,
        config: ServerConfig,
        access: AccessConfig,
        handler: Handler,
        error_type: type[ProtocolError],
    ) -> None:
        self._config = config
        self._tcp: TcpConfig = config.tcp
        self._access = access
        self._conversations = Conversations(config, handler, error_type)
        self._startups = Startups(self._tcp.startup_limits())
        self._tls: ssl.SSLContext | None = None
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the kernel chose for port 0)."""
        if self._sock is None:
            return self._tcp.port
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        self._check_someone_can_authenticate()
        self._tls = self._tls_context() if self._tcp.tls else None
        family = socket.AF_INET6 if ":" in self._tcp.listen else socket.AF_INET
        try:
            sock = socket.create_server((self._tcp.listen, self._tcp.port), family=family)
        except OSError as exc:
            raise ListenerError(
                f"server.tcp: cannot listen on {self._where()}: {exc.strerror}"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock), name="imr-tcp-accept")
        log.info(
            "listening on tcp %s (%s; identities: %s)",
            self._where(),
            "TLS" if self._tls else "plain TCP, loopback only",
            self._methods(),
        )

    def apply_config(self, config: Config) -> None:
        """A reloaded configuration: new certificate and token roles for the next clients
        (whether a certificate is required stays as it was at start; reload.py)."""
        self._access = config.access

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._clients) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # Set-up ---------------------------------------------------------------------------

    def _where(self) -> str:
        host = f"[{self._tcp.listen}]" if ":" in self._tcp.listen else self._tcp.listen
        return f"{host}:{self.port}"

    def _certificates_usable(self) -> bool:
        return self._tcp.client_ca is not None and bool(self._access.certificates)

    def _methods(self) -> str:
        methods = []
        if self._certificates_usable():
            methods.append(f"{len(self._access.certificates)} certificate subjects")
        if self._access.tokens:
            methods.append(f"{len(self._access.tokens)} tokens")
        return ", ".join(methods)

    def _check_someone_can_authenticate(self) -> None:
        if not self._certificates_usable() and not self._access.tokens:
            raise ListenerError(
                "server.tcp is enabled but no client could authenticate: set server.tcp.client_ca"
                " and map subjects in [access.certificates], or add [access.tokens]"
                " (imr token new NAME --role ROLE)"
            )

    def _tls_context(self) -> ssl.SSLContext:
        tcp = self._tcp
        assert tcp.tls_cert is not None  # noqa: S101 - tcp.tls says so
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _readable("server.tcp.tls_cert", tcp.tls_cert)
        if tcp.tls_key is not None:
            _readable("server.tcp.tls_key", tcp.tls_key)
        try:
            context.load_cert_chain(tcp.tls_cert, tcp.tls_key)
        except (ssl.SSLError, ValueError) as exc:
            raise ListenerError(
                f"server.tcp.tls_cert/tls_key: cannot load the certificate and key"
                f" ({tcp.tls_cert}, {tcp.tls_key or 'key in the same file'}): {exc}"
            ) from None
        if tcp.client_ca is not None:
            _readable("server.tcp.client_ca", tcp.client_ca)
            try:
                context.load_verify_locations(cafile=tcp.client_ca)
            except ssl.SSLError as exc:
                raise ListenerError(
                    f"server.tcp.client_ca: {tcp.client_ca} holds no usable CA certificate: {exc}"
                ) from None
            # Without tokens a certificate is the only way in: refuse the handshake
            # without one. With tokens, a client without a certificate must `auth`.
            context.verify_mode = ssl.CERT_OPTIONAL if self._access.tokens else ssl.CERT_REQUIRED
        else:
            context.verify_mode = ssl.CERT_NONE
        return context

    # Connections ------------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.warning("tcp accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._client(conn, address))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _client(
        self, conn: socket.socket, address: tuple[str, int] | tuple[str, int, int, int]
    ) -> None:
        remote, source = _address_text(address), source_of(address[0])
        why = self._startups.admit(source, random.random())  # noqa: S311 - not for secrets
        if why is not None:
            self._conversations.note(
                (source, WireCode.BUSY), logging.WARNING, "refused %s: %s", remote, why
            )
            if self._tls is None:
                _send_now(
                    conn, encode_text_reply(error_reply(None, WireCode.BUSY, f"{why}; try again"))
                )
            conn.close()
            return
        identified = False

        def on_identified() -> None:
            nonlocal identified
            if not identified:
                identified = True
                self._startups.identified()

        try:
            streams = None
            try:
                streams = await self._open(conn, remote, source)
            except Exception:
                log.exception("tcp connection from %s failed", remote)
            finally:
                if streams is None:
                    conn.close()
            if streams is not None:  # the transport owns the socket now
                reader, writer = streams
                admission = self._admit(writer, remote, source, on_identified)
                await self._conversations.serve(reader, writer, admission)
        finally:
            self._startups.closed(source, identified=identified)

    async def _open(
        self, conn: socket.socket, remote: str, source: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Streams over the connection, after the TLS handshake; None if it failed (logged)."""
        loop = asyncio.get_running_loop()
        timeout = min(HANDSHAKE_TIMEOUT, self._config.idle_timeout)
        if self._tls is not None:
            try:
                first = await asyncio.wait_for(_peek(conn), timeout)
            except (TimeoutError, OSError):
                return None
            if not first:
                return None
            if first[0] != TLS_HANDSHAKE_RECORD:
                # Someone typed at the TLS port with nc: say so in plain text.
                self._conversations.note(
                    (source, WireCode.TLS_REQUIRED),
                    logging.WARNING,
                    "refused %s: plain text on the TLS port",
                    remote,
                )
                await _send_plain(
                    conn,
                    WireCode.TLS_REQUIRED,
                    "this port speaks TLS (use tls:// and a certificate)",
                )
                return None
        reader = asyncio.StreamReader(limit=self._config.max_line_bytes, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self._tls,
                ssl_handshake_timeout=timeout if self._tls is not None else None,
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # No certificate, one from another CA, an expired one, or a client
            # that gave up: nothing was read, nothing to answer.
            reason = _reason(exc)  # OpenSSL's words: a small set, each worth a line
            self._conversations.note(
                (source, "handshake", reason),
                logging.WARNING,
                "refused %s: TLS handshake failed: %s",
                remote,
                reason,
            )
            return None
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    def _admit(
        self,
        writer: asyncio.StreamWriter,
        remote: str,
        source: str,
        identified: Callable[[], None],
    ) -> Admission:
        peercert = writer.get_extra_info("peercert")
        if peercert:  # verified by the handshake against client_ca
            subject = certificate_subject(peercert)
            peer = identify_certificate(subject, remote, self._access)
            if peer is None:
                text = subject_text(subject)
                # The subject is the client's text: escaped, so it cannot forge a log line.
                self._conversations.note(
                    (source, "unmapped"),
                    logging.WARNING,
                    "refused %s: certificate subject %s is not mapped",
                    remote,
                    escape(repr(text)),
                )
                return Admission(
                    f"cert:{escape(text)} from {remote}",
                    refusal=f"certificate subject {text!r} is not mapped in access.certificates",
                    source=source,
                )
            identified()
            self._conversations.note(
                (peer.principal, "connected"),
                logging.INFO,
                "connection from %s (roles %s)",
                peer.describe(),
                _roles(peer.roles),
            )
            return Admission(peer.describe(), peer)
        if not self._access.tokens:
            return Admission(
                remote, refusal="this listener needs a client certificate", source=source
            )
        access = self._access
        return Admission(
            remote,
            authenticate=lambda token: identify_token(token, remote, access),
            refusal='not authenticated: send `auth TOKEN` (or {"op":"auth",...}) first',
            source=source,
            identified=identified,
        )


def _readable(key: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ListenerError(f"{key}: cannot read {path}: {exc.strerror}") from None


async def _peek(conn: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket for the TLS handshake."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn.fileno(), ready)
    try:
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv(1, socket.MSG_PEEK)


async def _send_plain(conn: socket.socket, code: WireCode, message: str) -> None:
    with contextlib.suppress(OSError, TimeoutError):
        loop = asyncio.get_running_loop()
        data = encode_text_reply(error_reply(None, code, message))
        await asyncio.wait_for(loop.sock_sendall(conn, data), 2.0)
        # Drop what the client is still sending, so closing does not reset
        # the connection before it reads the reply.
        conn.shutdown(socket.SHUT_WR)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loop.sock_recv(conn, 65536), 1.0)


def _send_now(conn: socket.socket, data: bytes) -> None:
    """Send a short reply if the socket takes it at once; never wait (a flood is being refused)."""
    with contextlib.suppress(OSError):
        conn.send(data)


def _address_text(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    return endpoint_text(address[0], address[1])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _roles(roles: frozenset[str]) -> str:
    return ",".join(sorted(roles)) or "none"
