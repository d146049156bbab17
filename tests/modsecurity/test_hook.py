"""imr-hook on its own: what it sends, and that it fails open fast (no root needed)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imr.hook import HookError, build_request, decode_reply, parse_timeout, run

HOOK = str(Path(sys.executable).parent / "imr-hook")


@contextlib.contextmanager
def fake_daemon(path: Path, reply: bytes | None) -> Iterator[list[bytes]]:
    """Accepts on `path`, records each request line, answers `reply` (None: never answers)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.05)
    seen: list[bytes] = []
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                seen.append(conn.recv(65536))
                if reply is not None:
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_request_names_the_address_and_rule_and_nothing_else() -> None:
    env = {"IMR_IP": "203.0.113.66", "REMOTE_ADDR": "192.0.2.1", "IMR_RULE": "99901"}
    request = json.loads(build_request(env))
    assert request == {
        "v": 1,
        "op": "block",
        "ip": "203.0.113.66",
        "reason": "ModSecurity rule 99901",
        "source": "modsecurity:99901",
    }


def test_falls_back_to_remote_addr_and_normalises_ipv6() -> None:
    request = json.loads(build_request({"REMOTE_ADDR": "2001:DB8:0::66"}))
    assert request["ip"] == "2001:db8::66"
    assert request["source"] == "modsecurity"


@pytest.mark.parametrize("rule", ["99901; rm -rf /", "$(id)", "1" * 11, "99 901", "-1"])
def test_a_rule_that_is_not_a_plain_id_is_dropped(rule: str) -> None:
    request = json.loads(build_request({"IMR_IP": "203.0.113.66", "IMR_RULE": rule}))
    assert request["source"] == "modsecurity"
    assert request["reason"] == "ModSecurity rule"


@pytest.mark.parametrize("address", ["", "example.com", "203.0.113.66; reboot", "1.2.3.4.5"])
def test_an_invalid_address_is_refused(address: str) -> None:
    with pytest.raises(HookError, match="no valid client address"):
        build_request({"IMR_IP": address})


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 0.3), ("0.1", 0.1), ("5", 0.3), ("-1", 0.3), ("nan", 0.3)]
)
def test_timeout_is_bounded(raw: str | None, expected: float) -> None:
    assert parse_timeout(raw) == expected


def test_reports_a_block(tmp_path: Path) -> None:
    path = tmp_path / "imr.sock"
    reply = b'{"v":1,"id":null,"ok":true,"result":{"kind":"block","action":"block"}}\n'
    with fake_daemon(path, reply) as seen:
        out, err = run({"IMR_IP": "203.0.113.66", "IMR_RULE": "99901", "IMR_SOCKET": str(path)})
    assert (out, err) == ("imr-hook: block 203.0.113.66", None)
    assert json.loads(seen[0])["source"] == "modsecurity:99901"


def test_a_refusal_is_logged_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "imr.sock"
    reply = b'{"v":1,"id":null,"ok":false,"error":{"code":"forbidden","message":"no\\nrole"}}\n'
    with fake_daemon(path, reply):
        out, err = run({"IMR_IP": "203.0.113.66", "IMR_SOCKET": str(path)})
    assert out == "imr-hook: refused"
    assert err == "imr-hook: the imr daemon refused the block: forbidden: no role"


def test_a_text_busy_from_an_older_daemon_is_reported_as_such(tmp_path: Path) -> None:
    path = tmp_path / "imr.sock"
    with fake_daemon(path, b"error busy: too many connections; try again\n"):
        out, err = run({"IMR_IP": "203.0.113.66", "IMR_SOCKET": str(path)})
    assert out == "imr-hook: not blocked"
    assert (
        err
        == "imr-hook: not blocked: the imr daemon refused: busy: too many connections; try again"
    )


def test_fails_open_fast_when_the_daemon_hangs(tmp_path: Path) -> None:
    path = tmp_path / "imr.sock"
    with fake_daemon(path, None):
        started = time.monotonic()
        out, err = run({"IMR_IP": "203.0.113.66", "IMR_SOCKET": str(path), "IMR_TIMEOUT": "0.2"})
        elapsed = time.monotonic() - started
    assert out == "imr-hook: not blocked"
    assert err is not None and "did not answer within 0.2s" in err
    assert elapsed < 0.5


def test_fails_open_when_the_daemon_is_down(tmp_path: Path) -> None:
    out, err = run({"IMR_IP": "203.0.113.66", "IMR_SOCKET": str(tmp_path / "missing.sock")})
    assert out == "imr-hook: not blocked"
    assert err is not None and "not running" in err


def test_console_script_ignores_hostile_request_headers(tmp_path: Path) -> None:
    """As ModSecurity runs it: CGI environment with attacker-chosen HTTP_* values."""
    path = tmp_path / "imr.sock"
    reply = b'{"v":1,"id":null,"ok":true,"result":{"kind":"block","action":"block"}}\n'
    env = {
        "PATH": "/usr/bin:/bin",
        "REMOTE_ADDR": "203.0.113.66",
        "IMR_RULE": "99901",
        "IMR_SOCKET": str(path),
        "HTTP_USER_AGENT": "() { :; }; /bin/touch /tmp/imr-pwned",
        "HTTP_X_FORWARDED_FOR": "198.51.100.1",
        "HTTP_IMR_IP": "198.51.100.2",
        "REQUEST_URI": "/bin/msgimport?$(reboot)",
    }
    with fake_daemon(path, reply) as seen:
        result = subprocess.run(
            [HOOK], env=env, capture_output=True, text=True, timeout=10, check=False
        )
    assert result.returncode == 0
    assert result.stdout == "imr-hook: block 203.0.113.66\n"
    assert result.stderr == ""
    assert json.loads(seen[0])["ip"] == "203.0.113.66"


LAUNCHER = Path(__file__).resolve().parents[2] / "contrib" / "modsecurity" / "imr-hook"
# Modules whose import costs as much as the rest of the hook (they pull in enum,
# functools and collections); the hook uses their C halves instead.
HEAVY = {"json", "re", "ipaddress", "socket", "enum", "collections", "functools", "typing"}


def test_the_launcher_reports_a_block_without_loading_heavy_modules(tmp_path: Path) -> None:
    """The shipped exec program, through its #! line, loads only the hook and what
    Python itself needs (a console script would load the virtualenv's site too)."""
    path = tmp_path / "imr.sock"
    reply = b'{"v":1,"id":null,"ok":true,"result":{"kind":"block","action":"block"}}\n'
    env = {"PATH": "/usr/bin:/bin", "REMOTE_ADDR": "2001:DB8:0::66", "IMR_SOCKET": str(path)}
    with fake_daemon(path, reply) as seen:
        result = subprocess.run(
            [str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=10, check=False
        )
        traced = subprocess.run(
            ["/usr/bin/python3", "-X", "importtime", "-I", "-S", str(LAUNCHER)],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    assert result.stdout == traced.stdout == "imr-hook: block 2001:db8::66\n"
    assert json.loads(seen[0])["ip"] == "2001:db8::66"
    loaded = {
        line.rsplit("|", 1)[-1].strip()
        for line in traced.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "imr.hook" in loaded
    assert not loaded & HEAVY


@pytest.mark.parametrize(
    "data",
    [
        b'{"v":1,"ok":true,"result":{"action":"block","n":[1,2.5,null,false]}}\n',
        b'  {"a":"\\u00e9\\n"}  \r\n',
        b'{"x": NaN}',
        b"[1, 2]",
        b'"text"',
    ],
)
def test_decode_reply_reads_what_json_reads(data: bytes) -> None:
    assert repr(decode_reply(data)) == repr(json.loads(data))


@pytest.mark.parametrize(
    "data", [b"", b"\n", b"error busy: x\n", b'{"a":1} x', b'{"a":', b"\xff", b'{"a":1}{}']
)
def test_decode_reply_refuses_what_json_refuses(data: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        decode_reply(data)
