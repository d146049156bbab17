"""The TCP listener with real TLS (a throwaway CA made by trustme), in-process, on loopback.

Certificates, tokens, refusals and the shared limits; the real daemon with
every role and operation is tests/test_role_matrix.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import ssl
import stat
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
from click.testing import CliRunner
from pydantic import ValidationError

from imr.cli import main
from imr.client import Client, ClientError, RequestFailed, TcpTarget
from imr.config import AccessConfig, Config, Role, describe_errors
from imr.protocol import Result
from imr.server.access import (
    REMOTE_ID,
    certificate_roles,
    hash_token,
    identify_token,
    new_token,
)
from imr.server.broker import Broker, BrokerError
from imr.server.listener import ListenerError
from imr.server.tcp_listener import TcpListener
from imr.store import Store

from fakes import FakeClock, FixedAddresses, RecordingBackend

pytestmark = pytest.mark.anyio  # async tests without wrappers (uvicorn tests/test_server.py)

# Throwaway tokens for these tests only.
WEB_TOKEN = "imr_web1-test-token-000000000000000000000000"  # noqa: S105
READ_TOKEN = "imr_reader-test-token-11111111111111111111111"  # noqa: S105


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signs the daemon's and the clients' certificates
    server: Path  # the daemon's chain and key in one file
    clients: dict[str, Path]  # name -> client certificate and key in one file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(root / "server.pem")
    )
    clients = {}
    for name, issuer in [
        ("block", ca),
        ("read", ca),
        ("stranger", ca),  # signed by our CA, but no subject mapping
        ("forged", other_ca),  # says CN=block.imrtest, signed by another CA
    ]:
        common_name = "block.imrtest" if name == "forged" else f"{name}.imrtest"
        leaf = issuer.issue_cert(common_name, common_name=common_name)
        path = root / f"{name}.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
        clients[name] = path
    return Pki(root / "ca.pem", root / "server.pem", clients)


CERTIFICATES = {"CN=block.imrtest": "block", "CN=read.imrtest": "read"}
TOKENS = {
    "web1": {"sha256": hash_token(WEB_TOKEN), "role": "block"},
    "reader": {"sha256": hash_token(READ_TOKEN), "role": ["read"]},
}


@dataclass
class Served:
    port: int
    backend: RecordingBackend
    state: Path


@asynccontextmanager
async def serving(
    tmp_path: Path,
    pki: Pki | None,
    *,
    certificates: dict[str, Any] | None = None,
    tokens: dict[str, Any] | None = None,
    tcp_options: dict[str, object] | None = None,
    **server: object,
) -> AsyncIterator[Served]:
    tcp: dict[str, object] = {"enabled": True, "listen": "127.0.0.1", "port": 0}
    tcp |= tcp_options or {}
    if pki is not None:
        tcp |= {"tls_cert": str(pki.server), "client_ca": str(pki.ca)}
    config = Config.model_validate(
        {
            "server": {"socket": str(tmp_path / "imr.sock"), "tcp": tcp, **server},
            "access": {
                "certificates": CERTIFICATES if certificates is None else certificates,
                "tokens": tokens or {},
            },
        }
    )
    backend = RecordingBackend()
    store = Store(tmp_path / "state.db")
    broker = Broker(config, store, backend, FakeClock(), FixedAddresses("192.0.2.1"))
    broker.reconcile()
    await broker.start()
    listener = TcpListener(config.server, config.access, broker.handle, BrokerError)
    await listener.start()
    try:
        yield Served(listener.port, backend, tmp_path / "state.db")
    finally:
        await listener.close()
        await broker.stop()
        store.close()


def client_context(pki: Pki, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(pki.clients[cert])
    return context


async def connect(
    port: int, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None
    )


async def exchange(port: int, context: ssl.SSLContext | None, *lines: bytes) -> list[bytes]:
    """Send each line and read its reply; stop early (with b"") when the daemon hangs up."""
    reader, writer = await connect(port, context)
    replies = []
    try:
        for line in lines:
            try:
                writer.write(line)
                await writer.drain()
                reply = await asyncio.wait_for(reader.readline(), 5)
            except ConnectionResetError:
                reply = b""  # the daemon hung up after its last reply
            replies.append(reply)
            if not reply:
                break
    finally:
        writer.close()
    return replies


async def refused(port: int, context: ssl.SSLContext | None) -> bool:
    """True if the daemon ends the session without answering a ping."""
    try:
        replies = await exchange(port, context, b"ping\n")
    except (ssl.SSLError, ConnectionError):
        return True
    return replies == [b""]


def error_code(reply: bytes) -> str:
    data = json.loads(reply)
    assert data["ok"] is False, data
    return str(data["error"]["code"])


def block_rows(state: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(state)) as db:
        return db.execute("SELECT ip, uid, pid FROM blocks").fetchall()


# Certificates ------------------------------------------------------------------------


async def test_mapped_certificates_get_their_roles(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki) as served:
        replies = await exchange(
            served.port,
            client_context(pki, "block"),
            b'{"op":"block","ip":"203.0.113.7","source":"test"}\n',
            b"block 2001:db8::bad probe\n",
            b"list\n",
            b'{"op":"unblock","ip":"203.0.113.7"}\n',
        )
        assert json.loads(replies[0])["result"]["action"] == "block"
        assert replies[1].startswith(b"ok blocked 2001:db8::bad until ")
        assert replies[2].startswith(b"error forbidden: user cert:O=trustme")
        assert replies[2].endswith(b",CN=block.imrtest is not allowed to list\n")
        assert error_code(replies[3]) == "forbidden"
        (listed,) = await exchange(served.port, client_context(pki, "read"), b"list\n")
        assert listed.startswith(b"ok 2 active")
        assert {str(a) for a in served.backend.kernel} == {"203.0.113.7", "2001:db8::bad"}
        # No local uid or pid: the state file says so, the daemon's log names the client.
        assert {(uid, pid) for _, uid, pid in block_rows(served.state)} == {(REMOTE_ID, REMOTE_ID)}


async def test_no_certificate_or_another_ca_fails_the_handshake(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "imr")
    async with serving(tmp_path, pki) as served:
        assert await refused(served.port, client_context(pki, None))
        assert await refused(served.port, client_context(pki, "forged"))
        assert served.backend.kernel == {}
        # Still serving the good ones.
        (pong,) = await exchange(served.port, client_context(pki, "block"), b"ping\n")
        assert pong == b"ok pong\n"
    handshakes = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.message]
    assert len(handshakes) == 2, handshakes
    assert any("certificate" in m for m in handshakes)


async def test_unmapped_subject_is_refused_and_nothing_happens(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki) as served:
        replies = await exchange(
            served.port,
            client_context(pki, "stranger"),
            b'{"op":"block","ip":"203.0.113.9"}\n',
            b"ping\n",
        )
        assert error_code(replies[0]) == "unauthenticated"
        assert "CN=stranger.imrtest" in json.loads(replies[0])["error"]["message"]
        assert replies[1:] == [b""]  # and hung up
        assert served.backend.kernel == {}
        assert block_rows(served.state) == []


async def test_plain_text_to_the_tls_port_is_told_so(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki) as served:
        replies = await exchange(served.port, None, b"block 203.0.113.9\n", b"ping\n")
        assert replies[0].startswith(b"error tls_required: this port speaks TLS")
        assert replies[1:] == [b""]
        assert served.backend.kernel == {}


# Tokens ---------------------------------------------------------------------------------


async def test_tokens_over_tls_without_a_certificate(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki, tokens=TOKENS) as served:
        no_cert = client_context(pki, None)
        # Nothing before `auth`: the first other line is refused and the connection ends.
        replies = await exchange(served.port, no_cert, b"block 203.0.113.9\n", b"ping\n")
        assert replies[0].startswith(b"error unauthenticated: not authenticated: send `auth")
        assert replies[1:] == [b""]
        replies = await exchange(
            served.port, no_cert, b'{"op":"auth","token":"imr_guess"}\n', b"ping\n"
        )
        assert json.loads(replies[0])["error"] == {
            "code": "unauthenticated",
            "message": "unknown token",
        }
        assert replies[1:] == [b""]
        replies = await exchange(
            served.port,
            no_cert,
            f"auth {WEB_TOKEN}\n".encode(),
            b"block 203.0.113.9 probe\n",
            b"list\n",
            f"auth {READ_TOKEN}\n".encode(),
        )
        assert replies[0] == b"ok authenticated token:web1 (roles block)\n"
        assert replies[1].startswith(b"ok blocked 203.0.113.9")
        assert replies[2].startswith(b"error forbidden: user token:web1 is not allowed")
        assert replies[3] == (
            b"error bad_request: this connection is already identified as token:web1\n"
        )
        (auth, block) = await exchange(
            served.port,
            no_cert,
            json.dumps({"op": "auth", "token": READ_TOKEN, "id": "a"}).encode() + b"\n",
            b'{"op":"block","ip":"203.0.113.10"}\n',
        )
        assert json.loads(auth) == {
            "v": 1,
            "id": "a",
            "ok": True,
            "result": {"kind": "auth", "principal": "token:reader", "roles": ["read"]},
        }
        assert error_code(block) == "forbidden"
        # Certificates still work beside tokens.
        (pong,) = await exchange(served.port, client_context(pki, "read"), b"ping\n")
        assert pong == b"ok pong\n"
        assert [str(a) for a in served.backend.kernel] == ["203.0.113.9"]


async def test_plain_tcp_tokens_on_loopback(tmp_path: Path) -> None:
    async with serving(tmp_path, None, certificates={}, tokens=TOKENS) as served:
        replies = await exchange(
            served.port, None, f"auth {WEB_TOKEN}\n".encode(), b"block 203.0.113.11\n"
        )
        assert replies[0] == b"ok authenticated token:web1 (roles block)\n"
        assert replies[1].startswith(b"ok blocked 203.0.113.11")


# Limits (shared with the Unix socket) -----------------------------------------------------


async def test_overlong_line_over_tls_is_refused_and_closed(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki, max_line_bytes=1024) as served:
        reader, writer = await connect(served.port, client_context(pki, "block"))
        writer.write(b"block 203.0.113.9 " + b"x" * 1024 * 1024 + b"\n")
        sending = asyncio.create_task(writer.drain())
        reply = await asyncio.wait_for(reader.readline(), 10)
        sending.cancel()
        assert reply.startswith(b"error line_too_long:")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        (pong,) = await exchange(served.port, client_context(pki, "block"), b"ping\n")
        assert pong == b"ok pong\n"
        assert served.backend.kernel == {}


async def test_replies_before_an_overlong_line_are_not_lost(tmp_path: Path) -> None:
    """Pipelined lines, then one too long, then more: every earlier reply and the refusal
    arrive, then EOF. (The daemon closed with the rest unread, the kernel reset the TCP
    connection, and the client lost the replies it had not read yet: tests/test_fuzz.py
    found it.)"""
    async with serving(
        tmp_path, None, certificates={}, tokens=TOKENS, max_line_bytes=1024
    ) as served:
        loop = asyncio.get_running_loop()
        # A plain socket: what arrives stays in the kernel until we read it, as for a
        # blocking client (an asyncio client would read it in at once).
        with socket.create_connection(("127.0.0.1", served.port)) as sock:
            sock.setblocking(False)
            lines = f"auth {WEB_TOKEN}\n".encode() + b"ping\n" * 20 + b"x" * 20_000 + b"\n"
            # ... and 1 MB more, still arriving when the daemon hangs up.
            sending = asyncio.create_task(loop.sock_sendall(sock, lines + b"ping\n" * 200_000))
            await asyncio.sleep(0.5)  # the daemon has answered and hung up
            with contextlib.suppress(OSError):
                await asyncio.wait_for(sending, 5)
            received = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
                received += chunk
        replies = received.splitlines(keepends=True)
        assert replies[0].startswith(b"ok authenticated")
        assert replies[1:21] == [b"ok pong\n"] * 20
        assert replies[21].startswith(b"error line_too_long:")
        assert len(replies) == 22  # then EOF, not a reset


async def test_idle_clients_are_dropped_authenticated_or_not(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki, tokens=TOKENS, idle_timeout=0.5) as served:
        for cert in ("block", None):
            reader, writer = await connect(served.port, client_context(pki, cert))
            start = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert asyncio.get_running_loop().time() - start < 3
            writer.close()


async def test_connection_limit_on_plain_tcp(tmp_path: Path) -> None:
    async with serving(tmp_path, None, certificates={}, tokens=TOKENS, max_connections=1) as served:
        # Slots are for identified clients; unidentified ones count as startups.
        first_reader, first = await connect(served.port, None)
        first.write(f"auth {WEB_TOKEN}\n".encode())
        assert (await first_reader.readline()).startswith(b"ok authenticated")
        (busy,) = await exchange(served.port, None, f"auth {READ_TOKEN}\n".encode())
        assert busy.startswith(b"error busy:")
        first.close()


# The client library ----------------------------------------------------------------------


async def test_client_over_tls_with_a_certificate_or_a_token(tmp_path: Path, pki: Pki) -> None:
    async with serving(tmp_path, pki, tokens=TOKENS) as served:

        def tls(**options: Any) -> TcpTarget:
            return TcpTarget("127.0.0.1", served.port, True, pki.ca, **options)

        def calls() -> None:
            by_cert = Client(tcp=tls(cert_file=pki.clients["block"]))
            assert by_cert.block("203.0.113.20")["action"] == "block"
            by_token = Client(tcp=tls(token=READ_TOKEN))
            assert [b["ip"] for b in by_token.request("list")["blocks"]] == ["203.0.113.20"]
            with pytest.raises(RequestFailed) as forbidden:
                by_token.block("203.0.113.21")
            assert forbidden.value.code == "forbidden"
            with pytest.raises(RequestFailed) as unknown:
                Client(tcp=tls(token=WEB_TOKEN + "x")).request("ping")
            assert unknown.value.code == "unauthenticated"
            forged = Client(tcp=tls(cert_file=pki.clients["forged"]))
            with pytest.raises(ClientError, match="refused the TLS session"):
                forged.request("ping")
            plain = Client(tcp=TcpTarget("127.0.0.1", served.port, tls=False))
            with pytest.raises(RequestFailed) as tls_required:
                plain.request("ping")
            assert tls_required.value.code == "tls_required"

        await asyncio.to_thread(calls)


def test_target_urls() -> None:
    assert str(TcpTarget.from_url("tls://[2001:db8::1]:7700")) == "tls://[2001:db8::1]:7700"
    target = TcpTarget.from_url("tcp://127.0.0.1:7700")
    assert (target.host, target.port, target.tls) == ("127.0.0.1", 7700, False)
    for bad in ("http://x:1", "tls://host", "tls://host:99999", "tls://h:1/path"):
        with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
            TcpTarget.from_url(bad)


# Configuration and start-up ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tcp", "expected"),
    [
        ({"listen": "0.0.0.0"}, "is not a loopback address: set allow_non_loopback"),
        (
            {"listen": "192.0.2.1", "allow_non_loopback": True},
            "is not a loopback address and needs TLS",
        ),
        ({"listen": "localhost"}, "expected an IP address"),
        ({"client_ca": "/ca.pem"}, "client_ca (client certificates) needs TLS"),
        ({"tls_key": "/k.pem"}, "tls_key needs tls_cert"),
    ],
)
def test_unsafe_tcp_settings_are_refused(tcp: dict[str, object], expected: str) -> None:
    with pytest.raises(ValidationError) as error:
        Config.model_validate({"server": {"tcp": tcp}})
    assert expected in describe_errors(error.value)


def test_access_keys_are_checked() -> None:
    with pytest.raises(ValidationError) as error:
        AccessConfig.model_validate({"certificates": {"web1.example": "block"}})
    assert "expected ATTRIBUTE=value" in describe_errors(error.value)
    with pytest.raises(ValidationError) as error:
        AccessConfig.model_validate({"tokens": {"web1": {"sha256": "abc", "role": "block"}}})
    assert "sha256" in describe_errors(error.value)
    config = AccessConfig.model_validate({"certificates": {"cn = web1 , o=Example": "read"}})
    assert config.certificates == {"CN=web1,O=Example": Role.READ}


def test_start_up_errors_name_the_problem(tmp_path: Path, pki: Pki) -> None:
    def listener(tcp: dict[str, Any], access: dict[str, Any]) -> TcpListener:
        config = Config.model_validate(
            {"server": {"tcp": {"enabled": True, "port": 0, **tcp}}, "access": access}
        )

        async def handler(*_: object) -> Result:
            return cast(Result, {})

        return TcpListener(config.server, config.access, handler, BrokerError)

    certs = {"certificates": CERTIFICATES}
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"tls_cert": str(tmp_path / "missing.pem"), "client_ca": str(pki.ca)}, certs),
        ({"tls_cert": str(pki.server), "client_ca": str(tmp_path / "no-ca.pem")}, certs),
        ({"tls_cert": str(pki.ca), "client_ca": str(pki.ca)}, certs),  # a CA, no key
        ({"tls_cert": str(pki.server)}, certs),  # certificates, but no client_ca
    ]
    messages = []
    for tcp, access in cases:
        with pytest.raises(ListenerError) as error:
            asyncio.run(listener(tcp, access).start())
        messages.append(str(error.value))
    assert "server.tcp.tls_cert: cannot read" in messages[0] and "missing.pem" in messages[0]
    assert "server.tcp.client_ca: cannot read" in messages[1]
    assert "cannot load the certificate and key" in messages[2]
    assert "no client could authenticate" in messages[3]


# Identity ------------------------------------------------------------------------------


def test_certificate_keys_match_subsets_of_the_subject() -> None:
    access = AccessConfig.model_validate(
        {
            "certificates": {
                "CN=web1.example": "block",
                "O=Example,OU=ops": "read",
                "CN=web2.example": [],
            }
        }
    )
    web1 = (("O", "Example"), ("OU", "ops"), ("CN", "web1.example"))
    assert certificate_roles(web1, access) == frozenset({Role.BLOCK, Role.READ})
    assert certificate_roles((("O", "Example"), ("CN", "web1.example")), access) == frozenset(
        {Role.BLOCK}
    )
    assert certificate_roles((("CN", "web2.example"),), access) == frozenset()  # mapped, no role
    assert certificate_roles((("CN", "web1.example.evil"),), access) is None


def test_tokens_are_matched_by_hash() -> None:
    access = AccessConfig.model_validate({"tokens": TOKENS})
    peer = identify_token(WEB_TOKEN, "192.0.2.5:4711", access)
    assert peer is not None
    assert (peer.principal, peer.roles, peer.uid, peer.pid) == (
        "token:web1",
        frozenset({Role.BLOCK}),
        REMOTE_ID,
        REMOTE_ID,
    )
    assert peer.describe() == "token:web1 from 192.0.2.5:4711"
    assert identify_token(WEB_TOKEN + "x", "192.0.2.5:4711", access) is None
    assert identify_token(hash_token(WEB_TOKEN), "192.0.2.5:4711", access) is None
    token = new_token()
    assert token.startswith("imr_") and len(token) >= 40 and token != new_token()


# The CLI ----------------------------------------------------------------------------------


@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "imr.toml"
    path.write_text("")
    monkeypatch.setenv("IMR_CONFIG", str(path))
    for name in ("IMR_CONNECT", "IMR_TLS_CA", "IMR_TLS_CERT", "IMR_TLS_KEY", "IMR_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    yield path


def test_token_new_prints_a_config_entry_that_matches(no_config: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["token", "new", "web1", "--role", "block"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    token = lines[1]
    entry = tomllib.loads("\n".join(lines[3:]))
    access = AccessConfig.model_validate(entry["access"])
    assert access.tokens["web1"].sha256 == hash_token(token)
    assert access.tokens["web1"].role == Role.BLOCK

    out = tmp_path / "web2.token"
    result = CliRunner().invoke(
        main, ["token", "new", "web2", "--role", "read", "--role", "block", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().strip() not in result.output
    entry = tomllib.loads("\n".join(result.output.splitlines()[2:]))
    assert entry["access"]["tokens"]["web2"]["role"] == ["block", "read"]
    again = CliRunner().invoke(
        main, ["token", "new", "web2", "--role", "read", "--output", str(out)]
    )
    assert again.exit_code == 2 and "must not exist" in again.output
    bad = CliRunner().invoke(main, ["token", "new", "web 1", "--role", "read"])
    assert bad.exit_code == 2 and "token name" in bad.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tls-ca", "ca.pem", "ping"], "need --connect"),
        (["--connect", "http://x:1", "ping"], "expected tcp://HOST:PORT"),
        (["--connect", "tcp://127.0.0.1:1", "--tls-cert", "c.pem", "ping"], "need a tls://"),
        (["--connect", "tls://127.0.0.1:1", "--token-file", "/nonexistent", "ping"], "cannot read"),
    ],
)
def test_connect_usage_errors(no_config: Path, args: list[str], expected: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_cli_over_tcp_not_running_is_exit_3(no_config: Path) -> None:
    result = CliRunner().invoke(main, ["--connect", "tcp://127.0.0.1:1", "ping"])
    assert result.exit_code == 3, result.output
    assert "nothing listens on tcp://127.0.0.1:1" in result.output
