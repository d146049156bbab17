"""Helpers for the log-scanner tests: log lines, a fake daemon, a fake client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from imr.client import DaemonUnavailable, RequestFailed
from imr.protocol import BlockResult


def combined(
    ip: str, target: str, *, status: int = 404, ua: str = "Mozilla/5.0", ts: str = ""
) -> str:
    when = ts or "08/Jan/2009:04:52:45 -0500"
    return f'{ip} - - [{when}] "GET {target} HTTP/1.1" {status} 330 "-" "{ua}"\n'


def benign(i: int) -> str:
    return combined(f"192.0.2.{i % 250 + 1}", f"/page/{i}.html", status=200)


@dataclass
class FakeClient:
    """Stands in for imr.client.Client; records blocks, can refuse or be 'down'."""

    blocked: list[dict[str, Any]] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # ip -> error code
    down: bool = False

    def block(
        self, ip: str, reason: str = "", source: str = "", severity: int | None = None
    ) -> BlockResult:
        if self.down:
            raise DaemonUnavailable("the imr daemon is not running (test)")
        if ip in self.refuse:
            raise RequestFailed(self.refuse[ip], f"{ip} refused")
        self.blocked.append({"ip": ip, "reason": reason, "source": source, "severity": severity})
        return cast(BlockResult, {"ip": ip, "expires_at": "2099-01-01T00:00:00Z"})  # what is read

    @property
    def ips(self) -> list[str]:
        return [b["ip"] for b in self.blocked]


class FakeDaemon:
    """An asyncio Unix-socket server speaking the daemon's JSON line protocol.

    Records each request with the monotonic time it arrived; answers ok."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[tuple[float, dict[str, Any]]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_unix_server(self._handle, path=str(self.path))
        )
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await asyncio.wait_for(reader.readline(), timeout=5):
                request = json.loads(line)
                self.requests.append((time.monotonic(), request))
                reply = {
                    "v": 1,
                    "id": request.get("id"),
                    "ok": True,
                    "result": {"ip": request.get("ip")},
                }
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def start(self) -> FakeDaemon:
        self._thread.start()
        assert self._ready.wait(5), "fake daemon did not start"
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.requests) >= count:
                return True
            time.sleep(0.002)
        return False


F2B_FILTERS = Path("/etc/fail2ban/filter.d")
F2B_SAMPLES = Path("/usr/lib/python3/dist-packages/fail2ban/tests/files/logs")


def failjson_cases(sample: Path) -> list[tuple[dict[str, Any], str]]:
    """(annotation, line) pairs from a fail2ban sample log: '# failJSON: {...}', then the line."""
    lines = sample.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    cases: list[tuple[dict[str, Any], str]] = []
    pending: dict[str, Any] | None = None
    for line in lines:
        if line.startswith("# failJSON:"):
            try:
                pending = json.loads(line[len("# failJSON:") :])
            except ValueError:
                pending = None
        elif line.startswith("#"):
            continue
        elif pending is not None:
            cases.append((pending, line))
            pending = None
    return cases


def has_filter_options(sample: Path) -> bool:
    return "# filterOptions:" in sample.read_text(encoding="utf-8", errors="replace")
