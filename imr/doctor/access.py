"""The configuration's people and places: `[access]` names that exist and can reach the
socket, and a logscan state directory the scanner can write.

A role given to a user or group that does not exist, or whose members are not allowed
to connect to the socket (its group and mode), is a role nobody can use: the daemon
does not mind, so only a warning here says why `imr list` answers "permission denied".
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from imr.config import Config
from imr.doctor.findings import Finding, ok, warning

CHECK = "access"
SCANNER_USER = "imr-logscan"  # the Debian package's units run imr scan/watch as this user


@dataclass(frozen=True)
class SocketReach:
    """Who may connect to the socket: root, everyone, or members of one group."""

    everyone: bool
    gid: int | None  # the socket's group, if group members may connect
    label: str  # "group imr, mode 0660", for the messages

    def admits(self, uid: int, gids: set[int]) -> bool:
        return uid == 0 or self.everyone or (self.gid is not None and self.gid in gids)


def socket_reach(config: Config) -> SocketReach:
    server = config.server
    mode = server.socket_mode_bits
    name = server.socket_group or "root"
    try:
        gid: int | None = grp.getgrnam(name).gr_gid
    except KeyError:
        gid = None  # server.socket_group names no group: the daemon refuses to start
    label = f"group {name}, mode {mode:04o}"
    return SocketReach(bool(mode & 0o002), gid if mode & 0o020 else None, label)


def _groups_of(user: pwd.struct_passwd) -> set[int]:
    try:
        return set(os.getgrouplist(user.pw_name, user.pw_gid))
    except OSError:
        return {user.pw_gid}


def _members(group: grp.struct_group) -> list[pwd.struct_passwd]:
    """The group's members: named in it, or with it as their primary group."""
    found = {}
    for name in group.gr_mem:
        try:
            found[name] = pwd.getpwnam(name)
        except KeyError:
            continue
    for user in pwd.getpwall():
        if user.pw_gid == group.gr_gid:
            found[user.pw_name] = user
    return list(found.values())


def check_access(config: Config) -> list[Finding]:
    reach = socket_reach(config)
    group_fix = f"adduser NAME {config.server.socket_group or 'root'}"
    findings = []
    for name, roles in config.access.users.items():
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            findings.append(
                warning(
                    CHECK,
                    f"access.users: no user named {name!r} on this host: role {roles} is unused",
                    f"create the user, or remove {name!r} from [access.users]",
                )
            )
            continue
        if not reach.admits(user.pw_uid, _groups_of(user)):
            findings.append(
                warning(
                    CHECK,
                    f"access.users: {name} has role {roles} but cannot connect to the socket"
                    f" ({reach.label}): nobody can use that role",
                    group_fix.replace("NAME", name),
                )
            )
    for name, roles in config.access.groups.items():
        findings += _check_group(name, roles, reach, group_fix)
    remote = [*config.access.certificates, *config.access.tokens]
    if remote and not config.server.tcp.enabled:
        findings.append(
            warning(
                CHECK,
                f"[access.certificates] and [access.tokens] name {len(remote)} TCP client(s)"
                " but server.tcp is off: nobody can use their roles",
                "set server.tcp.enabled = true (docs/operations.md, Clients on other hosts),"
                " or remove the entries",
            )
        )
    findings += check_logscan_dir(config.logscan.state_dir)
    return findings or [ok(CHECK, "every user and group in [access] exists and can connect")]


def _check_group(name: str, roles: object, reach: SocketReach, fix: str) -> list[Finding]:
    try:
        group = grp.getgrnam(name)
    except KeyError:
        return [
            warning(
                CHECK,
                f"access.groups: no group named {name!r} on this host: role {roles} is unused",
                f"create the group, or remove {name!r} from [access.groups]",
            )
        ]
    members = _members(group)
    able = [m.pw_name for m in members if reach.admits(m.pw_uid, _groups_of(m))]
    if able or reach.everyone:
        return []
    who = f"none of its members ({', '.join(sorted(m.pw_name for m in members))})"
    return [
        warning(
            CHECK,
            f"access.groups: group {name} has role {roles} but"
            f" {who if members else 'it has no members, and nobody'} can connect to the"
            f" socket ({reach.label}): nobody can use that role",
            fix.replace("NAME", "<member>") + f" for each member of {name} who needs it",
        )
    ]


def check_logscan_dir(path: Path) -> list[Finding]:
    """`imr scan`/`imr watch` keep their offsets here: the scanner's user must write it."""
    user = _scanner()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the scanner makes the missing directories
    writable = existing.is_dir() and _may_write(existing, user)
    if writable:
        return []
    what = "" if existing == path else f" (it does not exist; {existing} is where it would go)"
    return [
        warning(
            "logscan",
            f"logscan.state_dir {path} is not writable by {user.pw_name}{what}:"
            " imr scan and imr watch cannot remember where they stopped",
            f"mkdir -p {path}; chown {user.pw_name} {path}; chmod 0750 {path}"
            " (or set logscan.state_dir)",
        )
    ]


def _scanner() -> pwd.struct_passwd:
    """The user the scanner runs as: the package's, else whoever runs the doctor."""
    try:
        return pwd.getpwnam(SCANNER_USER)
    except KeyError:
        return pwd.getpwuid(os.geteuid())


def _may_write(directory: Path, user: pwd.struct_passwd) -> bool:
    if user.pw_uid == os.geteuid():
        return os.access(directory, os.W_OK | os.X_OK)
    info = directory.stat()
    mode = stat.S_IMODE(info.st_mode)
    if user.pw_uid == 0:
        return True
    if info.st_uid == user.pw_uid:
        return mode & 0o300 == 0o300
    if info.st_gid in _groups_of(user):
        return mode & 0o030 == 0o030
    return mode & 0o003 == 0o003
