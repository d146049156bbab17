"""The socket (mode, group, the directories above it) and the daemon (pid file, ping)."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from imr.cli_context import CliContext
from imr.config import Config, ServerConfig
from imr.doctor.findings import (
    Finding,
    group_name,
    ok,
    problem,
    user_name,
    warning,
)


def check_socket(config: Config) -> list[Finding]:
    server = config.server
    path = server.socket
    try:
        info = path.lstat()
    except FileNotFoundError:
        return [
            problem(
                "socket",
                f"no socket at {path} (server.socket)",
                "start the daemon: systemctl start imr.socket imr.service, or imr server start",
            )
        ]
    except OSError as exc:
        return [problem("socket", f"cannot look at {path}: {exc.strerror}", "run as root")]
    if not stat.S_ISSOCK(info.st_mode):
        return [
            problem(
                "socket",
                f"{path} is not a socket (the daemon will refuse to replace it)",
                f"find out what made it, then remove it: rm {path}",
            )
        ]
    mode = stat.S_IMODE(info.st_mode)
    findings = _socket_mode_findings(server, path, mode)
    findings += _socket_owner_findings(server, path, info)
    findings += _unreachable_parents(path, mode)
    if not findings:
        findings.append(
            ok("socket", f"{path}: mode {mode:04o}, owner root, group {group_name(info.st_gid)}")
        )
    return findings


def _socket_mode_findings(server: ServerConfig, path: Path, mode: int) -> list[Finding]:
    """The socket's mode against server.socket_mode, and whether every user may connect."""
    findings = []
    if mode != server.socket_mode_bits:
        findings.append(
            problem(
                "socket",
                f"{path} has mode {mode:04o}, the config says server.socket_mode = "
                f"{server.socket_mode!r}",
                f"chmod {server.socket_mode_bits:04o} {path}; under systemd set SocketMode="
                f"{server.socket_mode_bits:04o} in imr.socket (a restart of the daemon"
                " alone also sets it when the daemon makes the socket)",
            )
        )
    if mode & 0o007:
        findings.append(
            warning(
                "socket",
                f"{path} is open to every local user (mode {mode:04o}): any of them may ping,"
                " and any that [access] gives a role may use it",
                "use mode 0660 and server.socket_group for the clients",
            )
        )
    return findings


def _socket_owner_findings(server: ServerConfig, path: Path, info: os.stat_result) -> list[Finding]:
    """The socket's owner (root) and group (server.socket_group, else root)."""
    findings = []
    if info.st_uid != 0:
        findings.append(
            problem(
                "socket",
                f"{path} is owned by {user_name(info.st_uid)}, not root: that user can replace it",
                f"chown root {path} (or restart the daemon as root)",
            )
        )
    wanted_group = server.socket_group or "root"
    try:
        wanted_gid = grp.getgrnam(wanted_group).gr_gid
    except KeyError:
        findings.append(
            problem(
                "socket",
                f"server.socket_group = {wanted_group!r}: no such group",
                f"groupadd --system {wanted_group} (contrib/systemd/imr.sysusers.conf makes 'imr')",
            )
        )
    else:
        if info.st_gid != wanted_gid:
            findings.append(
                problem(
                    "socket",
                    f"{path} has group {group_name(info.st_gid)}, the config says"
                    f" server.socket_group = {wanted_group!r}",
                    f"chgrp {wanted_group} {path}; under systemd set SocketGroup={wanted_group}"
                    " in imr.socket",
                )
            )
    return findings


def _unreachable_parents(path: Path, mode: int) -> list[Finding]:
    """Clients need search (x) permission on every directory above the socket."""
    if not mode & 0o077:
        return []
    for parent in path.parents:
        try:
            parent_mode = stat.S_IMODE(parent.stat().st_mode)
        except OSError:
            continue
        if not parent_mode & 0o011:
            return [
                problem(
                    "socket",
                    f"{parent} (mode {parent_mode:04o}) cannot be searched by the socket's group"
                    " or others, so clients cannot reach the socket",
                    f"chmod o+x {parent} (or g+x with the socket's group)",
                )
            ]
    return []


def check_daemon(ctx: CliContext) -> list[Finding]:
    from imr.client import Client, ClientError
    from imr.server.daemon import is_imr_process, read_pid

    pid_file = ctx.config.server.pid_file
    pid = read_pid(pid_file)
    findings = []
    if pid is not None and not is_imr_process(pid):
        findings.append(
            warning(
                "daemon",
                f"{pid_file} names pid {pid}, which is not an imr daemon (a stale pid file)",
                f"rm {pid_file} (the daemon rewrites it when it starts)",
            )
        )
        pid = None
    try:
        reply = Client(ctx.config.server.socket, timeout=5.0).request("ping")
    except ClientError as exc:
        where = f" (pid {pid} holds {pid_file})" if pid is not None else ""
        return [
            *findings,
            problem(
                "daemon",
                f"the daemon does not answer on {ctx.config.server.socket}{where}: {exc}",
                "systemctl start imr.service (journalctl -u imr.service says why it stopped),"
                " or imr server start",
            ),
        ]
    version = reply.get("version", "?") if isinstance(reply, dict) else "?"
    running = f"pid {pid}" if pid is not None else "pid file unread"
    return [*findings, ok("daemon", f"answers ping ({running}, version {version})")]
