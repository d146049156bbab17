"""A small synchronous client for the daemon (CLI, log scanner, scripts).

The Unix socket by default; or TCP (`TcpTarget`), with TLS and a client
certificate, or a bearer token sent as the first line. Standard library only,
so short-lived callers start fast.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the client stays light: no pydantic at run time
    from imr.protocol import BlockManyItem, BlockResult, ExportPage, UnblockResult


class ClientError(Exception):
    """Base of every error a client call raises; the message is for the user."""


class DaemonUnavailable(ClientError):
    """No daemon answers on the socket (not running, wrong path, or too slow)."""


class RequestFailed(ClientError):
    """The daemon answered with an error reply (refused, forbidden, bad request...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TcpTarget:
    """A daemon's TCP listener: tcp://HOST:PORT (loopback, token) or tls://HOST:PORT."""

    host: str
    port: int
    tls: bool
    ca_file: Path | None = None  # trust this CA for the daemon's certificate (else the system's)
    cert_file: Path | None = None  # client certificate (PEM), mapped in access.certificates
    key_file: Path | None = None  # its key, unless inside cert_file
    token: str | None = None  # sent as the first line when there is no certificate

    @classmethod
    def from_url(cls, url: str, **options: Any) -> TcpTarget:
        """Parse tcp://HOST:PORT or tls://HOST:PORT ([::1]:7700 for IPv6); ValueError if bad."""
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "tls"):
            raise ValueError(f"{url!r}: expected tcp://HOST:PORT or tls://HOST:PORT")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"{url!r}: expected tcp://HOST:PORT or tls://HOST:PORT")
        return cls(parts.hostname, port, parts.scheme == "tls", **options)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self.tls else 'tcp'}://{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


class Client:
    def __init__(
        self, socket_path: Path | str = "", timeout: float = 10.0, *, tcp: TcpTarget | None = None
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.tcp = tcp

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one JSON request; return the `result` of an ok reply or raise.

        `export` without a cursor is fetched page by page and joined (the daemon answers
        one page per request): callers that need the whole state in memory get it; a
        caller that streams uses export_pages() and holds one page at a time.
        """
        if op == "export" and fields.get("after") is None:
            return _joined(self.export_pages(fields.get("limit")))
        return self._request(op, **fields)

    def export_pages(self, limit: int | None = None) -> Iterator[ExportPage]:
        """The daemon's whole state, one `export` page after the other (docs/protocol.md):
        blocks by id, then hits by id; each page's `next` asks for the following one."""
        after: str | None = None
        while True:
            page = cast("ExportPage", self._request("export", after=after, limit=limit))
            yield page
            after = page.get("next")
            if after is None:
                return

    def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        payload = {"v": 1, "op": op, **{k: v for k, v in fields.items() if v is not None}}
        line = json.dumps(payload).encode() + b"\n"
        reply = self._round_trip(line)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise RequestFailed(str(error.get("code", "error")), str(error.get("message", "")))
        result = reply.get("result")
        if not isinstance(result, dict):
            raise ClientError("the daemon sent a reply without a result")
        return result

    def block(
        self, ip: str, reason: str = "", source: str = "", severity: int | None = None
    ) -> BlockResult:
        result = self.request("block", ip=ip, reason=reason, source=source, severity=severity)
        return cast("BlockResult", result)

    def block_many(
        self,
        ips: Sequence[str],
        reason: str = "",
        source: str = "",
        severity: int | None = None,
    ) -> list[BlockManyItem]:
        """Block every address; one result per distinct address, in order (`ok` false: refused).

        Sent as `block_many` requests that each fit the daemon's default line limit, so a
        list of any length works; RequestFailed only for a request refused as a whole
        (forbidden, say), and then nothing of that request was done.
        """
        results: list[BlockManyItem] = []
        for chunk in _chunks(ips, reason, source):
            reply = self.request(
                "block_many", ips=chunk, reason=reason, source=source, severity=severity
            )
            results.extend(reply["results"])
        return results

    def unblock(self, ip: str, reason: str = "") -> UnblockResult:
        return cast("UnblockResult", self.request("unblock", ip=ip, reason=reason))

    def _round_trip(self, line: bytes) -> dict[str, Any]:
        sock = self._connect_tcp() if self.tcp is not None else self._connect_unix()
        try:
            if self.tcp is not None and self.tcp.token is not None:
                auth = {"v": 1, "op": "auth", "token": self.tcp.token}
                sock.sendall(json.dumps(auth).encode() + b"\n")
                reply = _decode(_read_line(sock, self.timeout))
                if not reply.get("ok"):
                    error = reply.get("error") or {}
                    raise RequestFailed(
                        str(error.get("code", "error")), str(error.get("message", ""))
                    )
            sock.sendall(line)
            data = _read_line(sock, self.timeout)
        except ssl.SSLError as exc:
            # TLS 1.3: a refused client certificate shows up here, on the first read.
            raise ClientError(
                f"{self.tcp}: the daemon refused the TLS session: {_tls_reason(exc)}"
            ) from None
        except DaemonUnavailable:
            if self.tcp is not None and self.tcp.tls:
                # It accepted the handshake, then hung up without a word: it
                # refused our certificate (or lack of one).
                raise ClientError(
                    f"{self.tcp}: the daemon refused the TLS session: it hung up without a"
                    " reply (a missing, unknown or expired client certificate?)"
                ) from None
            raise
        finally:
            sock.close()
        return _decode(data)

    def _connect_unix(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except FileNotFoundError:
            sock.close()
            raise DaemonUnavailable(
                f"the imr daemon is not running (no socket at {self.socket_path})"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnavailable(
                f"the imr daemon is not running (nothing listens on {self.socket_path})"
            ) from None
        except PermissionError:
            sock.close()
            raise ClientError(
                f"permission denied on {self.socket_path}: this user is not in the socket's group"
            ) from None
        except TimeoutError:
            sock.close()
            raise DaemonUnavailable(
                f"the imr daemon did not accept within {self.timeout}s"
            ) from None
        return sock

    def _connect_tcp(self) -> socket.socket:
        target = self.tcp
        assert target is not None  # noqa: S101 - only called with a target
        try:
            context = target.ssl_context() if target.tls else None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ClientError(f"cannot load the TLS files for {target}: {exc}") from None
        try:
            sock = socket.create_connection((target.host, target.port), timeout=self.timeout)
        except ConnectionRefusedError:
            raise DaemonUnavailable(f"nothing listens on {target}") from None
        except TimeoutError:
            raise DaemonUnavailable(f"{target} did not accept within {self.timeout}s") from None
        except OSError as exc:
            raise DaemonUnavailable(f"cannot connect to {target}: {exc.strerror or exc}") from None
        if context is None:
            return sock
        try:
            return context.wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise ClientError(
                f"{target}: the daemon's certificate does not verify: {exc.verify_message}"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ClientError(f"{target}: TLS handshake failed: {_tls_reason(exc)}") from None


# What a block_many line may hold: the daemon's default server.max_line_bytes (4096) with
# room for the fields around the addresses, and the protocol's cap on addresses.
_LINE_BUDGET = 3800
_MAX_ADDRESSES = 1000  # protocol.MAX_BLOCK_MANY (not imported: this module is stdlib only)


def _chunks(ips: Sequence[str], reason: str, source: str) -> Iterator[list[str]]:
    """Split addresses into block_many requests that each fit one line."""
    fixed = len(json.dumps(reason)) + len(json.dumps(source)) + 100
    chunk: list[str] = []
    size = fixed
    for ip in dict.fromkeys(ips):  # each address once: the daemon refuses repeats
        cost = len(json.dumps(ip)) + 1
        if chunk and (size + cost > _LINE_BUDGET or len(chunk) == _MAX_ADDRESSES):
            yield chunk
            chunk, size = [], fixed
        chunk.append(ip)
        size += cost
    if chunk:
        yield chunk


def _joined(pages: Iterator[ExportPage]) -> dict[str, Any]:
    """Export pages as one result, as a daemon before paging answered it."""
    whole: dict[str, Any] = {"kind": "export", "blocks": [], "hits": []}
    for page in pages:
        whole["schema_version"] = page.get("schema_version")
        whole["blocks"] += page.get("blocks", [])
        whole["hits"] += page.get("hits", [])
    return whole


def _decode(data: bytes) -> dict[str, Any]:
    if data.startswith(b"error "):  # the daemon answers in text before it knows the form
        code, _, message = data[6:].decode("utf-8", "replace").strip().partition(": ")
        raise RequestFailed(code, message)
    try:
        reply = json.loads(data)
    except ValueError:
        raise ClientError(f"the daemon sent something that is not JSON: {data[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ClientError("the daemon sent a reply that is not a JSON object")
    return reply


def _tls_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else str(exc)


def _read_line(sock: socket.socket, timeout: float) -> bytes:
    chunks: list[bytes] = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    except TimeoutError:
        raise DaemonUnavailable(f"the imr daemon did not answer within {timeout}s") from None
    except ConnectionResetError:
        raise DaemonUnavailable("the imr daemon closed the connection") from None
    data = b"".join(chunks)
    if not data:
        raise DaemonUnavailable("the imr daemon closed the connection without a reply")
    return data
