"""Who is asking, and what they may do.

Clients are identified by the kernel or by cryptography, never by anything
they merely say: on the Unix socket by SO_PEERCRED (users and groups map to
roles; root is always admin); on TCP by a verified client certificate
(access.certificates) or a bearer token whose hash is in the config
(access.tokens). A client with no role may only ping.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import hmac
import os
import pwd
import secrets
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from time import monotonic
from typing import Any

from imr.config import AccessConfig, Role
from imr.terminal import escape

# Which roles may run each operation. ping is open to any client that can
# reach the socket, so hooks can health-check without privileges.
PERMITTED: dict[str, frozenset[Role]] = {
    "block": frozenset({Role.BLOCK, Role.ADMIN}),
    "block_many": frozenset({Role.BLOCK, Role.ADMIN}),
    "unblock": frozenset({Role.ADMIN}),
    "list": frozenset({Role.READ, Role.ADMIN}),
    "show": frozenset({Role.READ, Role.ADMIN}),
    "status": frozenset({Role.READ, Role.ADMIN}),
    "export": frozenset({Role.READ, Role.ADMIN}),
}

# uid, gid and pid of a TCP client: it is no local process. The state file
# keeps them in its uid/pid columns; the daemon's log names the client.
REMOTE_ID = -1

IDENTITY_TTL = 60.0  # seconds a uid's name and roles are kept (Identities)

# OpenSSL's long attribute names (ssl.getpeercert) -> the short names the config uses.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "domainComponent": "DC",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
}


@dataclass(frozen=True)
class Peer:
    """One connected client.

    Local (Unix socket): uid/gid/pid from the kernel, `user` its name.
    Remote (TCP): uid = gid = pid = REMOTE_ID, `user` the identity
    ("cert:CN=web1.example" or "token:web1"), `remote` its address and port.
    """

    uid: int
    gid: int
    pid: int
    user: str
    roles: frozenset[Role]
    remote: str | None = None

    def may(self, op: str) -> bool:
        allowed = PERMITTED.get(op)
        return allowed is None or bool(self.roles & allowed)

    # Cached: asked for every address of every request (a flood makes that a hot path).
    @cached_property
    def principal(self) -> str:
        """The stable identity that quotas and metrics count by (one per client, not per pid)."""
        return self.user if self.remote is not None else f"uid:{self.uid}"

    @cached_property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    def describe(self) -> str:
        return self._description

    @cached_property
    def _description(self) -> str:
        # A certificate subject is the client's own text: escaped for the log line.
        if self.remote is not None:
            return f"{escape(self.user)} from {self.remote}"
        return f"uid={self.uid}({escape(self.user)}) pid={self.pid}"


# Unix socket peers ------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _lookup(uid: int, gid: int, access: AccessConfig) -> tuple[str, frozenset[Role]]:
    """The uid's name and roles, from the user and group databases (may block: NSS, LDAP)."""
    user = _user_name(uid)
    groups = _group_names(user, gid)
    return user or str(uid), roles_for(uid, user, groups, access)


class Identities:
    """Socket peers' names and roles, looked up off the event loop and kept `ttl` seconds.

    A look-up goes through NSS, which may ask LDAP or sssd over the network; done
    on the event loop for every connection, one slow answer stalled every client.
    A group change reaches a running daemon within `ttl` seconds.
    """

    MAX_ENTRIES = 4096

    def __init__(
        self,
        access: AccessConfig,
        ttl: float = IDENTITY_TTL,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._access = access
        self._ttl = ttl
        self._clock = clock
        self._known: dict[
            tuple[int, int], tuple[float, asyncio.Future[tuple[str, frozenset[Role]]]]
        ] = {}

    async def identify(self, pid: int, uid: int, gid: int) -> Peer:
        key = (uid, gid)
        now = self._clock()
        entry = self._known.get(key)
        if entry is None or now - entry[0] >= self._ttl:
            if len(self._known) >= self.MAX_ENTRIES:
                self._known.clear()
            # One look-up per key at a time: concurrent connections of one uid share it.
            looked_up = asyncio.ensure_future(asyncio.to_thread(_lookup, uid, gid, self._access))
            entry = (now, looked_up)
            self._known[key] = entry
        try:
            user, roles = await asyncio.shield(entry[1])
        except Exception:
            if self._known.get(key) is entry:
                del self._known[key]  # try again next time
            raise
        return Peer(uid, gid, pid, user, roles)

    def replace_access(self, access: AccessConfig) -> None:
        """A reloaded [access] section: roles are looked up again from the next client on."""
        self._access = access
        self._known.clear()


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


# TCP peers: certificates ----------------------------------------------------------------

Subject = tuple[tuple[str, str], ...]


def certificate_subject(peercert: Mapping[str, Any]) -> Subject:
    """The subject of a verified certificate (ssl.getpeercert()) as (short name, value) pairs."""
    pairs = []
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            pairs.append((_SHORT_NAMES.get(name, name), str(value)))
    return tuple(pairs)


def subject_text(subject: Subject) -> str:
    """'CN=web1.example,O=Example', in the certificate's order."""
    return ",".join(f"{name}={value}" for name, value in subject)


def certificate_roles(subject: Subject, access: AccessConfig) -> frozenset[Role] | None:
    """Roles of every key whose attributes the subject all has; None if no key matches.

    Keys are canonical already (config_access.canonical_subject): "CN=a,O=b".
    """
    have = set(subject)
    roles: set[Role] | None = None
    for key, mapped in access.certificates.items():
        wanted = {tuple(part.split("=", 1)) for part in key.split(",")}
        if wanted <= have:
            roles = (roles or set()) | _as_set(mapped)
    return None if roles is None else frozenset(roles)


def identify_certificate(subject: Subject, remote: str, access: AccessConfig) -> Peer | None:
    roles = certificate_roles(subject, access)
    if roles is None:
        return None
    return _remote_peer(f"cert:{subject_text(subject)}", roles, remote)


# TCP peers: tokens ----------------------------------------------------------------------

TOKEN_PREFIX = "imr_"  # noqa: S105 - marks tokens in files, not a secret


def new_token() -> str:
    """256 random bits: a single SHA-256 of it is as good as a slow password hash."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def identify_token(token: str, remote: str, access: AccessConfig) -> Peer | None:
    """The peer whose configured hash matches `token`, or None."""
    digest = hash_token(token)
    found: str | None = None
    # Compare with every entry in constant time; no early exit.
    for name, entry in access.tokens.items():
        if hmac.compare_digest(digest, entry.sha256) and found is None:
            found = name
    if found is None:
        return None
    return _remote_peer(f"token:{found}", frozenset(_as_set(access.tokens[found].role)), remote)


def _remote_peer(identity: str, roles: frozenset[Role], remote: str) -> Peer:
    return Peer(REMOTE_ID, REMOTE_ID, REMOTE_ID, identity, roles, remote)


# Helpers ----------------------------------------------------------------------------


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
