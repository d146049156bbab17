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

Start-up is most of the hook's cost (docs/modsecurity.md, "Cost per request"), so
it imports no module that pulls in others: not ipaddress, socket, json or re, which
bring enum, functools and collections with them (about half of the interpreter's
start-up again). It uses their C halves (_socket, _json) directly; run it as
`python3 -I -S hook.py` (or through its own #! line) and nothing else is loaded.
"""

from __future__ import annotations

import os
import sys
import time
from _socket import AF_INET, AF_INET6, AF_UNIX, SOCK_STREAM, inet_ntop, inet_pton, socket

TYPE_CHECKING = False
if TYPE_CHECKING:  # collections.abc imports collections: only for the type checker
    from collections.abc import Mapping

DEFAULT_SOCKET = "/run/imr/imr.sock"
DEFAULT_TIMEOUT = 0.3
MAX_TIMEOUT = 1.0
_CONTROL_TO_SPACE = {code: " " for code in (*range(32), 127)}


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
    ip = client_address(env)
    rule = (env.get("IMR_RULE") or "").strip()
    # Only a plain rule id may reach the daemon's records; anything else is dropped.
    rule = rule if rule.isascii() and rule.isdigit() and len(rule) <= 10 else ""
    reason = f"ModSecurity rule {rule}" if rule else "ModSecurity rule"
    source = f"modsecurity:{rule}" if rule else "modsecurity"
    # What json.dumps(separators=(",", ":")) writes: every value is an address in
    # canonical form or digits and fixed words, so none needs escaping.
    return f'{{"v":1,"op":"block","ip":"{ip}","reason":"{reason}","source":"{source}"}}\n'.encode()


def client_address(env: Mapping[str, str]) -> str:
    raw_ip = (env.get("IMR_IP") or env.get("REMOTE_ADDR") or "").strip()
    ip = canonical_ip(raw_ip)
    if ip is None:
        raise HookError(f"no valid client address (got {raw_ip[:64]!r})")
    return ip


def canonical_ip(text: str) -> str | None:
    """'2001:DB8:0::66' -> '2001:db8::66'; None unless a plain IPv4 or IPv6 address
    (as ipaddress.ip_address, without IPv6 zones, which the daemon refuses anyway)."""
    family = AF_INET6 if ":" in text else AF_INET
    try:
        return inet_ntop(family, inet_pton(family, text))
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None


class _ScanContext:
    """What _json's scanner reads from json.JSONDecoder: the standard settings."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity


def decode_reply(data: bytes) -> object:
    """json.loads(data) with _json's C scanner, without importing json (and re)."""
    try:
        from _json import make_scanner
    except ImportError:  # another Python: the slower import is fine
        import json

        return json.loads(data)
    text = data.decode("utf-8")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    try:
        # typeshed types the context as the scanner class itself; any object with these
        # attributes is what the C code reads.
        value, end = make_scanner(_ScanContext())(text, start)  # type: ignore[arg-type]
    except StopIteration:
        raise ValueError("no JSON value") from None
    if text[end:].strip(" \t\n\r"):
        raise ValueError("extra data after the JSON value")
    return value


def send(path: str, line: bytes, timeout: float) -> dict[str, object]:
    """One round trip to the daemon within `timeout` seconds overall; the decoded reply."""
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HookError(f"the imr daemon did not answer within {timeout:g}s")
        return left

    sock = socket(AF_UNIX, SOCK_STREAM)
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
        reply = decode_reply(data)
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
        return f"imr-hook: {action} {client_address(env)}", None
    error = reply.get("error")
    if isinstance(error, dict):
        detail = f"{error.get('code', 'error')}: {error.get('message', '')}"
    else:
        detail = "error reply without details"
    return "imr-hook: refused", f"imr-hook: the imr daemon refused the block: {_one_line(detail)}"


def _one_line(text: str) -> str:
    """The reply may echo parts of the request; keep the log entry on one line."""
    return text.translate(_CONTROL_TO_SPACE)[:300]


def main() -> None:
    out, err = run(os.environ)
    if err is not None:
        print(err, file=sys.stderr, flush=True)
    print(out, flush=True)
    # Exit 0 even on failure: fail open, and ModSecurity needs nothing else.


if __name__ == "__main__":
    main()
