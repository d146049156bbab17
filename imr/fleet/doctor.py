"""`imr doctor`'s fleet checks: keys, the password file, and Redis as this member sees it."""

from __future__ import annotations

import stat
from typing import Any

import redis
from redis.exceptions import RedisError

from imr.config import Config
from imr.doctor.findings import Finding, ok, problem, warning
from imr.fleet import keys
from imr.fleet.settings import FleetSettings

CHECK = "fleet"


def check_fleet(config: Config) -> list[Finding]:
    settings = config.fleet
    if not settings.enabled:
        return []
    findings = _keys(settings)
    findings += _password(settings)
    if not settings.redis_url.startswith(("rediss://", "unix://")):
        findings.append(
            warning(
                CHECK,
                f"fleet.redis_url {settings.redis_url} is not TLS: passwords and events cross"
                " the network in clear",
                "use rediss:// with fleet.tls_ca (docs/fleet.md, TLS)",
            )
        )
    findings.append(_redis(settings))
    return findings


def _keys(settings: FleetSettings) -> list[Finding]:
    found: list[Finding] = []
    for name, member in settings.members.items():
        try:
            keys.load_public(member.public_key)
        except keys.FleetKeyError as exc:
            found.append(problem(CHECK, f"fleet.members.{name}: {exc}", "imr fleet keygen PATH"))
    try:
        private = keys.load_private(settings.private_key)
    except keys.FleetKeyError as exc:
        return [*found, problem(CHECK, str(exc), f"imr fleet keygen {settings.private_key}")]
    mine = keys.public_text(private.public_key())
    if mine != settings.members[settings.name].public_key:
        found.append(
            problem(
                CHECK,
                f"{settings.private_key} is not the key of fleet.members.{settings.name}",
                f'set fleet.members.{settings.name}.public_key = "{mine}" on every member',
            )
        )
    mode = settings.private_key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        found.append(
            problem(
                CHECK,
                f"{settings.private_key} is readable by others (mode {oct(mode & 0o777)})",
                f"chmod 600 {settings.private_key}",
            )
        )
    return found or [ok(CHECK, f"signing key of {settings.name} matches its public key")]


def _password(settings: FleetSettings) -> list[Finding]:
    path = settings.password_file
    if path is None:
        return []
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return [problem(CHECK, f"fleet.password_file {path}: {exc.strerror}", "create it (0600)")]
    if mode & stat.S_IRWXO:
        return [problem(CHECK, f"{path} is readable by everyone", f"chmod 600 {path}")]
    return []


def _redis(settings: FleetSettings) -> Finding:
    kwargs: dict[str, Any] = {"username": settings.user, "socket_timeout": 3.0}
    kwargs["socket_connect_timeout"] = 3.0
    if settings.password_file is not None:
        try:
            kwargs["password"] = settings.password_file.read_text().strip()
        except OSError:
            return problem(CHECK, "cannot read fleet.password_file", "see above")
    if settings.redis_url.startswith("rediss://") and settings.tls_ca is not None:
        kwargs["ssl_ca_certs"] = str(settings.tls_ca)
    client = redis.Redis.from_url(settings.redis_url, **kwargs)
    try:
        client.ping()
        length = client.xlen(settings.stream(settings.name))
    except RedisError as exc:
        return problem(
            CHECK,
            f"Redis at {settings.redis_url} as {settings.user}: {exc}",
            "check fleet.redis_url, the ACL user and its password (docs/fleet.md, ACLs)",
        )
    finally:
        client.close()
    return ok(CHECK, f"Redis {settings.redis_url} answers {settings.user}; own stream: {length}")
