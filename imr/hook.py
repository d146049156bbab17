"""imr-hook: report an address to the imr daemon from a ModSecurity v2 `exec` action.

ModSecurity runs this synchronously in an Apache worker for every matching
request, so it must start fast (standard library only), never take more than
a fraction of a second (one deadline covers connect, send and reply), and fail
open: whatever goes wrong, the request is answered and one line goes to
stderr, which is Apache's error log. It always prints one line to stdout,
because ModSecurity logs an error when an exec script prints nothing.

Input comes only from the environment, never from the command line:

  IMR_IP      the address to block (set with `setenv:IMR_IP=%{REMOTE_ADDR}`);
              REMOTE_ADDR (from the CGI environment) when unset
  IMR_RULE    the id of the rule that matched (`setenv:IMR_RULE=%{tx.imr_rule}`)
  IMR_SOCKET  the daemon's socket (default /run/imr/imr.sock)
  IMR_TIMEOUT seconds for the whole exchange (default 0.3, at most 1)

The request's own headers arrive as HTTP_* variables and are never read.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
import time
from collections.abc import Mapping

DEFAULT_SOCKET = "/run/imr/imr.sock"
DEFAULT_TIMEOUT = 0.3
MAX_TIMEOUT = 1.0
_RULE_ID = re.compile(r"[0-9]{1,10}")


class HookError(Exception):
    """Why the block was not made; one line for the error log."""


def parse_timeout(raw: str | None) -> float:
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT
    # NaN fails both comparisons, so it falls back to the default as well.
    return value if 0 < value <= MAX_TIMEOUT else DEFAULT_TIMEOUT


def build_request(env: Mapping[str, str]) -> bytes:
    """The JSON request line for the daemon, from the hook's environment."""
    raw_ip = (env.get("IMR_IP") or env.get("REMOTE_ADDR") or "").strip()
    try:
        ip = str(ipaddress.ip_address(raw_ip))
    except ValueError:
        raise HookError(f"no valid client address (got {raw_ip[:64]!r})") from None
    rule = (env.get("IMR_RULE") or "").strip()
    # Only a plain rule id may reach the daemon's records; anything else is dropped.
    rule = rule if _RULE_ID.fullmatch(rule) else ""
    request = {
        "v": 1,
        "op": "block",
        "ip": ip,
        "reason": f"ModSecurity rule {rule}" if rule else "ModSecurity rule",
        "source": f"modsecurity:{rule}" if rule else "modsecurity",
    }
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


def send(path: str, line: bytes, timeout: float) -> dict[str, object]:
    """One round trip to the daemon within `timeout` seconds overall; the decoded reply."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HookError(f"the imr daemon did not answer within {timeout:g}s")
        return left

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(remaining())
        sock.connect(path)
        sock.settimeout(remaining())
        sock.sendall(line)
        data = b""
        while not data.endswith(b"\n") and len(data) < 65536:
            sock.settimeout(remaining())
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise HookError(f"the imr daemon did not answer within {timeout:g}s") from None
    except FileNotFoundError:
        raise HookError(f"the imr daemon is not running (no socket at {path})") from None
    except ConnectionRefusedError:
        raise HookError(f"the imr daemon is not running (nothing listens on {path})") from None
    except PermissionError:
        raise HookError(
            f"permission denied on {path}: this user is not in the socket's group"
        ) from None
    except OSError as exc:
        raise HookError(f"cannot talk to the imr daemon on {path}: {exc.strerror}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        # An older daemon answered `busy` in the text form even to JSON: say what it said.
        if data.startswith(b"error "):
            text = data.decode("utf-8", "replace").strip()
            raise HookError(
                f"the imr daemon refused: {_one_line(text.removeprefix('error '))}"
            ) from None
        raise HookError("the imr daemon sent no reply or an unreadable one") from None
    if not isinstance(reply, dict):
        raise HookError("the imr daemon sent a reply that is not a JSON object")
    return reply


def run(env: Mapping[str, str]) -> tuple[str, str | None]:
    """(line for stdout, line for stderr or None). Never raises for expected failures."""
    try:
        line = build_request(env)
        reply = send(
            env.get("IMR_SOCKET") or DEFAULT_SOCKET, line, parse_timeout(env.get("IMR_TIMEOUT"))
        )
    except HookError as exc:
        return "imr-hook: not blocked", f"imr-hook: not blocked: {exc}"
    if reply.get("ok") is True:
        result = reply.get("result")
        action = result.get("action", "ok") if isinstance(result, dict) else "ok"
        ip = json.loads(line)["ip"]
        return f"imr-hook: {action} {ip}", None
    error = reply.get("error")
    if isinstance(error, dict):
        detail = f"{error.get('code', 'error')}: {error.get('message', '')}"
    else:
        detail = "error reply without details"
    return "imr-hook: refused", f"imr-hook: the imr daemon refused the block: {_one_line(detail)}"


def _one_line(text: str) -> str:
    """The reply may echo parts of the request; keep the log entry on one line."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)[:300]


def main() -> None:
    out, err = run(os.environ)
    if err is not None:
        print(err, file=sys.stderr, flush=True)
    print(out, flush=True)
    # Exit 0 even on failure: fail open, and ModSecurity needs nothing else.


if __name__ == "__main__":
    main()
