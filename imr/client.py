"""A small synchronous client for the daemon's Unix socket (CLI, log scanner, scripts).

Standard library only, so short-lived callers start fast.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


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


class Client:
    def __init__(self, socket_path: Path | str, timeout: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one JSON request; return the `result` of an ok reply or raise."""
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
    ) -> dict[str, Any]:
        return self.request("block", ip=ip, reason=reason, source=source, severity=severity)

    def unblock(self, ip: str, reason: str = "") -> dict[str, Any]:
        return self.request("unblock", ip=ip, reason=reason)

    def _round_trip(self, line: bytes) -> dict[str, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.socket_path))
            except FileNotFoundError:
                raise DaemonUnavailable(
                    f"the imr daemon is not running (no socket at {self.socket_path})"
                ) from None
            except ConnectionRefusedError:
                raise DaemonUnavailable(
                    f"the imr daemon is not running (nothing listens on {self.socket_path})"
                ) from None
            except PermissionError:
                raise ClientError(
                    f"permission denied on {self.socket_path}:"
                    " this user is not in the socket's group"
                ) from None
            except TimeoutError:
                raise DaemonUnavailable(
                    f"the imr daemon did not accept within {self.timeout}s"
                ) from None
            sock.sendall(line)
            data = _read_line(sock, self.timeout)
        finally:
            sock.close()
        try:
            reply = json.loads(data)
        except ValueError:
            raise ClientError(
                f"the daemon sent something that is not JSON: {data[:80]!r}"
            ) from None
        if not isinstance(reply, dict):
            raise ClientError("the daemon sent a reply that is not a JSON object")
        return reply


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
