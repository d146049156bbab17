"""Real local servers for the reputation tests (and the bench): DNS, SMTP, HTTP.

All listen on 127.0.0.1 on ephemeral ports; nothing reaches the internet.
- ZoneServer: dnslib serving the records it is given (NXDOMAIN with an SOA for
  the rest), counting queries.
- BlackHole: a UDP (DNS) or TCP (SMTP, HTTP) socket that never answers.
- SmtpSink: aiosmtpd keeping every message it receives.
- HttpRecorder: stdlib http.server recording each request and answering what
  the test says.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from aiosmtpd.controller import Controller
from click.testing import CliRunner, Result
from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from imr.cli_context import CliContext
from imr.config import load_config
from imr.reputation.cli import register

SOA_TEXT = "{zone} 60 IN SOA ns.{zone} hostmaster.{zone} 1 3600 600 86400 {minimum}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, server: ZoneServer) -> None:
        self.server = server

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        with self.server.lock:
            self.server.queries.append((qname, qtype))
            records = list(self.server.records)
        matches = [rr for rr in records if str(rr.rname).lower() == qname]
        if not matches:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(RR.fromZone(self.server.soa)[0])
            return reply
        for rr in matches:
            if QTYPE[rr.rtype] == qtype:
                reply.add_answer(rr)
        return reply


class ZoneServer:
    """Authoritative answers from zone-file lines, over UDP on 127.0.0.1."""

    def __init__(self, lines: list[str] | None = None, negative_ttl: int = 300) -> None:
        self.lock = threading.Lock()
        self.records: list[Any] = []
        self.queries: list[tuple[str, str]] = []
        self.soa = SOA_TEXT.format(zone="test.", minimum=negative_ttl)
        for line in lines or []:
            self.add(line)
        self._server = DNSServer(
            _Resolver(self),
            port=0,
            address="127.0.0.1",
            logger=DNSLogger(prefix=False, logf=lambda _: None),
        )

    @property
    def port(self) -> int:
        return int(self._server.server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, line: str) -> None:
        with self.lock:
            self.records.extend(RR.fromZone(line))

    def clear(self) -> None:
        with self.lock:
            self.records.clear()

    def count(self, name: str) -> int:
        with self.lock:
            return sum(1 for qname, _ in self.queries if qname == name.lower())

    def start(self) -> ZoneServer:
        self._server.start_thread()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()


class BlackHole:
    """Accepts (TCP) or receives (UDP) and never says a word: a hanging service."""

    def __init__(self, kind: str = "udp") -> None:
        self.kind = kind
        family_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, family_type)
        self.sock.bind(("127.0.0.1", 0))
        if kind == "tcp":
            self.sock.listen(128)  # the kernel completes handshakes; nobody ever reads
        self.port = int(self.sock.getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


class _Collector:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 OK"


class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 keeping every message."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._collector = _Collector()
        self._controller = Controller(self._collector, hostname="127.0.0.1", port=self.port)

    @property
    def messages(self) -> list[tuple[str, list[str], email.message.EmailMessage]]:
        with self._collector.lock:
            return list(self._collector.messages)

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpRecorder:
    """Records requests; answers `status` and `body` (settable between requests)."""

    status: int = 200
    body: bytes = b'{"data": {}}'
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                recorder.requests.append(
                    Recorded(
                        "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body
                    )
                )
                self.send_response(recorder.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(recorder.body)))
                self.end_headers()
                self.wfile.write(recorder.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HttpRecorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def running(server: Any) -> Iterator[Any]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run_reputation_cli(config_path: Path, *args: str) -> Result:
    """The reputation commands (imr report, check, reports) under CliRunner, with the
    configuration at config_path, as `imr --config config_path ARGS` would run them."""

    @click.group()
    def main() -> None:
        pass

    register(main)
    obj = CliContext(load_config(config_path, missing_ok=False), config_path)
    return CliRunner().invoke(main, list(args), obj=obj)
