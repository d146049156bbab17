"""Who is asking, and what they may do.

Clients are identified by the kernel (SO_PEERCRED on the Unix socket), never
by anything they say. Roles come from the config: users and groups map to
roles; root is always admin. A user with no role may only ping.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from imr.config import AccessConfig, Role

# Which roles may run each operation. ping is open to any client that can
# reach the socket, so hooks can health-check without privileges.
PERMITTED: dict[str, frozenset[Role]] = {
    "block": frozenset({Role.BLOCK, Role.ADMIN}),
    "unblock": frozenset({Role.ADMIN}),
    "list": frozenset({Role.READ, Role.ADMIN}),
    "show": frozenset({Role.READ, Role.ADMIN}),
    "status": frozenset({Role.READ, Role.ADMIN}),
    "export": frozenset({Role.READ, Role.ADMIN}),
}


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int
    user: str
    roles: frozenset[Role]

    def may(self, op: str) -> bool:
        allowed = PERMITTED.get(op)
        return allowed is None or bool(self.roles & allowed)

    @property
    def principal(self) -> str:
        """The stable identity that quotas and metrics count by (one per client, not per pid)."""
        return f"uid:{self.uid}"

    def describe(self) -> str:
        return f"uid={self.uid}({self.user}) pid={self.pid}"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def identify(pid: int, uid: int, gid: int, access: AccessConfig) -> Peer:
    user = _user_name(uid)
    groups = _group_names(user, gid)
    return Peer(uid, gid, pid, user or str(uid), roles_for(uid, user, groups, access))


def roles_for(
    uid: int, user: str | None, groups: set[str], access: AccessConfig
) -> frozenset[Role]:
    if uid == 0:
        return frozenset({Role.ADMIN})
    roles: set[Role] = set()
    if user is not None and user in access.users:
        roles |= _as_set(access.users[user])
    for group in groups:
        if group in access.groups:
            roles |= _as_set(access.groups[group])
    return frozenset(roles)


def _as_set(value: Role | list[Role]) -> set[Role]:
    return set(value) if isinstance(value, list) else {value}


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_names(user: str | None, gid: int) -> set[str]:
    """The user's groups from the group database (primary and supplementary)."""
    gids = {gid}
    if user is not None:
        with contextlib.suppress(OSError):
            gids.update(os.getgrouplist(user, gid))
    names = set()
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return names
