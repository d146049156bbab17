"""Every role x every operation x both listeners, against the real daemon.

One daemon (root, iptables, in the `server` namespace) serves the whole
matrix. Unix-socket clients are real unprivileged users (runuser) and root;
TCP clients run the real CLI in the `innocent` namespace and reach the
daemon's TLS listener on 192.0.2.1 over a veth link, identified by a client
certificate or a token (over TLS, without a certificate). An allowed op must
succeed; a forbidden one must answer `forbidden` and change neither the
kernel (iptables -S) nor the state file.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from imr.client import Client
from imr.server.access import REMOTE_ID, hash_token, new_token

from daemon_harness import (
    BLOCKER,
    IMR,
    NOBODY,
    READER,
    SERVER_SIDE_V4,
    Daemon,
    daemon_world,
    ensure_test_users,
    remove_test_users,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

ROLES = ("none", "read", "block", "admin")
OPS = ("ping", "status", "list", "show", "block", "unblock", "export")
LISTENERS = ("unix", "tls-cert", "tls-token")
# Written out here, not taken from access.PERMITTED, so a change there must show up here.
ALLOWED = {
    "none": {"ping"},
    "read": {"ping", "status", "list", "show", "export"},
    "block": {"ping", "block"},
    "admin": set(OPS),
}
UNIX_USERS = {"none": NOBODY, "read": READER, "block": BLOCKER, "admin": "root"}
PORT = 7700
ROLE_CONFIG = {"none": "[]", "read": '"read"', "block": '"block"', "admin": '"admin"'}


@dataclass
class Matrix:
    world: Daemon
    pki: Path
    tokens: dict[str, Path]  # role -> token file

    def client_argv(self, listener: str, role: str) -> list[str]:
        if listener == "tls-cert":
            return [
                "--connect",
                f"tls://{SERVER_SIDE_V4}:{PORT}",
                "--tls-ca",
                str(self.pki / "ca.pem"),
                "--tls-cert",
                str(self.pki / f"{role}.pem"),
            ]
        return [
            "--connect",
            f"tls://{SERVER_SIDE_V4}:{PORT}",
            "--tls-ca",
            str(self.pki / "ca.pem"),
            "--token-file",
            str(self.tokens[role]),
        ]

    def run(self, listener: str, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        if listener == "unix":
            user = UNIX_USERS[role]
            return self.world.as_root(*args) if user == "root" else self.world.as_user(user, *args)
        # A remote client: another namespace, no config file, only what --connect says.
        return self.world.innocent.run(IMR, *self.client_argv(listener, role), *args, check=False)

    def snapshot(self) -> tuple[str, list[tuple[object, ...]]]:
        counts = self.world.state_rows(
            "SELECT COUNT(*), SUM(lifted_at IS NOT NULL), (SELECT COUNT(*) FROM hits) FROM blocks"
        )
        return (self.world.rules(4), counts)


def write_pki(root: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    server = ca.issue_cert(SERVER_SIDE_V4)
    server.private_key_and_cert_chain_pem.write_to_path(str(root / "server.pem"))
    for role in ROLES:
        name = f"{role}.matrix.imrtest"
        leaf = ca.issue_cert(name, common_name=name)
        leaf.private_key_and_cert_chain_pem.write_to_path(str(root / f"{role}.pem"))
    stranger = ca.issue_cert("stranger.imrtest", common_name="stranger.imrtest")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(root / "stranger.pem"))
    trustme.CA().issue_cert(
        "admin.matrix.imrtest", common_name="admin.matrix.imrtest"
    ).private_key_and_cert_chain_pem.write_to_path(str(root / "forged.pem"))


def cell_index(listener: str, role: str) -> int:
    return LISTENERS.index(listener) * len(ROLES) + ROLES.index(role)


def to_block(listener: str, role: str) -> str:
    return f"203.0.113.{100 + cell_index(listener, role)}"


def seeded(listener: str, role: str) -> str:
    return f"203.0.113.{150 + cell_index(listener, role)}"


@pytest.fixture(scope="module")
def matrix() -> Iterator[Matrix]:
    created = ensure_test_users()
    try:
        with daemon_world() as world:
            pki = world.root / "pki"
            pki.mkdir(mode=0o700)
            write_pki(pki)
            tokens = {}
            token_lines = []
            for role in ROLES:
                token = new_token()
                tokens[role] = pki / f"{role}.token"
                tokens[role].write_text(token + "\n")
                token_lines.append(
                    f'{role} = {{ sha256 = "{hash_token(token)}", role = {ROLE_CONFIG[role]} }}'
                )
            certificates = [f'"CN={r}.matrix.imrtest" = {ROLE_CONFIG[r]}' for r in ROLES]
            world.extra_config = "\n".join(
                [
                    "[server.tcp]",
                    "enabled = true",
                    f'listen = "{SERVER_SIDE_V4}"',
                    f"port = {PORT}",
                    "allow_non_loopback = true",
                    f'tls_cert = "{pki / "server.pem"}"',
                    f'client_ca = "{pki / "ca.pem"}"',
                    "[access.certificates]",
                    *certificates,
                    "[access.tokens]",
                    *token_lines,
                ]
            )
            world.write_config()
            started = world.start()
            assert started.returncode == 0, started.stderr
            # Every cell unblocks its own seeded address, so each has one to lift.
            root = Client(world.socket)  # this test runs as root: admin
            for listener in LISTENERS:
                for role in ROLES:
                    assert root.block(seeded(listener, role), reason="seed")["action"] == "block"
            yield Matrix(world, pki, tokens)
    finally:
        remove_test_users(created)


def rule_for(address: str, rules: str) -> list[str]:
    return [line for line in rules.splitlines() if f"-s {address}/" in line]


def by_ip(column: str, address: str) -> str:
    # The harness takes a query string; the address is one of ours, a dotted quad.
    assert address.replace(".", "").isdigit()
    return f"SELECT {column} FROM blocks WHERE ip = '{address}'"  # noqa: S608


def expected_uid(listener: str, role: str) -> int:
    if listener != "unix":
        return REMOTE_ID
    return pwd.getpwnam(UNIX_USERS[role]).pw_uid


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("listener", LISTENERS)
def test_role_may_do_exactly_its_operations(matrix: Matrix, listener: str, role: str) -> None:
    world = matrix.world
    target, seed = to_block(listener, role), seeded(listener, role)
    commands = {
        "ping": ["ping"],
        "status": ["server", "status", "--json"],
        "list": ["list", "--json"],
        "show": ["show", seed, "--json"],
        "block": ["block", target, "--reason", f"matrix {listener} {role}"],
        "unblock": ["unblock", seed],
        "export": ["export"],
    }
    after = matrix.snapshot()
    for op in OPS:
        before = after
        result = matrix.run(listener, role, *commands[op])
        after = matrix.snapshot()
        cell = (listener, role, op, result.stdout[-300:], result.stderr[-300:])
        assert "Traceback" not in result.stderr, cell
        if op not in ALLOWED[role]:
            assert result.returncode == 1, cell
            assert "[forbidden]" in result.stderr and f"allowed to {op}" in result.stderr, cell
            assert after == before, cell  # nothing in the kernel or the state file changed
            continue
        assert result.returncode == 0, cell
        if op == "block":
            assert rule_for(target, after[0]), cell
            assert world.state_rows(by_ip("uid", target)) == [(expected_uid(listener, role),)], cell
        elif op == "unblock":
            assert not rule_for(seed, after[0]), cell
            assert world.state_rows(by_ip("lift_reason", seed)) == [("unblocked",)], cell
        else:
            assert after == before, cell  # reading changes nothing
            if op == "list":
                assert seed in {b["ip"] for b in json.loads(result.stdout)}, cell
            elif op == "show":
                assert json.loads(result.stdout)["active"]["ip"] == seed, cell
            elif op == "status":
                assert json.loads(result.stdout)["kind"] == "status", cell
            elif op == "export":
                assert seed in {b["ip"] for b in json.loads(result.stdout)["blocks"]}, cell
            else:
                assert result.stdout.startswith("pong"), cell


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (["--tls-cert", "stranger.pem"], "[unauthenticated]"),  # our CA, subject not mapped
        (["--tls-cert", "forged.pem"], "refused the TLS session"),  # admin's CN, another CA
        ([], "send `auth TOKEN`"),  # no certificate, no token
    ],
)
def test_unknown_remote_clients_are_refused(matrix: Matrix, how: list[str], expected: str) -> None:
    argv = ["--connect", f"tls://{SERVER_SIDE_V4}:{PORT}", "--tls-ca", str(matrix.pki / "ca.pem")]
    if how:
        argv += [how[0], str(matrix.pki / how[1])]
    before = matrix.snapshot()
    for args in (["ping"], ["block", "203.0.113.99"], ["unblock", seeded("unix", "none")]):
        result = matrix.world.innocent.run(IMR, *argv, *args, check=False)
        assert result.returncode == 1, result
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert matrix.snapshot() == before


def test_the_daemon_log_names_remote_clients(matrix: Matrix) -> None:
    assert matrix.run("tls-token", "block", "unblock", seeded("unix", "none")).returncode == 1
    assert matrix.run("tls-cert", "read", "block", "203.0.113.98").returncode == 1
    log = matrix.world.log_file.read_text()
    assert f"listening on tcp {SERVER_SIDE_V4}:{PORT} (TLS" in log
    assert "refused unblock by token:block from 192.0.2.77:" in log
    assert "refused block by cert:" in log and "CN=read.matrix.imrtest from 192.0.2.77:" in log
