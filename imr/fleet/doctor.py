"""`imr doctor`'s fleet checks: keys, the password file, and Redis as this member sees it
(with Sentinel: the sentinels, the primary they name, and this member's user on it)."""

from __future__ import annotations

import stat
from typing import Any

import redis
from redis.exceptions import RedisError
from redis.sentinel import Sentinel

from imr.config import Config
from imr.doctor.findings import Finding, ok, problem, warning
from imr.fleet import keys
from imr.fleet.connection import FleetConfigError, host_port, redis_options, sentinel_options
from imr.fleet.settings import FleetSettings

CHECK = "fleet"
TIMEOUT = 3.0


def check_fleet(config: Config) -> list[Finding]:
    settings = config.fleet
    if not settings.enabled:
        return []
    findings = _keys(settings)
    findings += _password(settings)
    if settings.sentinels and not settings.tls:
        findings.append(
            warning(
                CHECK,
                "fleet.tls is off: passwords and events cross the network in clear",
                "set fleet.tls = true with fleet.tls_ca (docs/fleet.md, TLS)",
            )
        )
    elif not settings.sentinels and not settings.redis_url.startswith(("rediss://", "unix://")):
        findings.append(
            warning(
                CHECK,
                f"fleet.redis_url {settings.redis_url} is not TLS: passwords and events cross"
                " the network in clear",
                "use rediss:// with fleet.tls_ca (docs/fleet.md, TLS)",
            )
        )
    findings += _redis(settings)
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
    found: list[Finding] = []
    for key in ("password_file", "sentinel_password_file"):
        path = getattr(settings, key)
        if path is None:
            continue
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            found.append(problem(CHECK, f"fleet.{key} {path}: {exc.strerror}", "create it (0600)"))
            continue
        if mode & stat.S_IRWXO:
            found.append(problem(CHECK, f"{path} is readable by everyone", f"chmod 600 {path}"))
    return found


def _redis(settings: FleetSettings) -> list[Finding]:
    try:
        options = redis_options(settings, TIMEOUT)
        if settings.sentinels:
            return _sentinels(settings, sentinel_options(settings), options)
    except FleetConfigError as exc:
        return [problem(CHECK, str(exc), "see above")]
    client = redis.Redis.from_url(settings.redis_url, **options)
    return [_answers(settings, client, settings.redis_url)]


def _answers(settings: FleetSettings, client: Any, where: str) -> Finding:
    """This member's ACL user on the server: its own stream, and WAIT if it is to wait."""
    try:
        client.ping()
        length = client.xlen(settings.stream(settings.name))
        if settings.wait_replicas:
            client.wait(0, 0)  # answers at once; only the ACL is in question
    except RedisError as exc:
        return problem(
            CHECK,
            f"Redis at {where} as {settings.user}: {exc}",
            "check the address, the ACL user (+wait with fleet.wait_replicas) and its"
            " password (docs/fleet.md, ACLs)",
        )
    finally:
        client.close()
    return ok(CHECK, f"Redis {where} answers {settings.user}; own stream: {length}")


def _sentinels(
    settings: FleetSettings, sentinel_kwargs: dict[str, Any], options: dict[str, Any]
) -> list[Finding]:
    """Every sentinel answers; they name a primary for the service; it answers this user."""
    sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs=sentinel_kwargs, **options)
    found: list[Finding] = []
    try:
        for text, node in zip(settings.sentinels, list(sentinel.sentinels), strict=True):
            try:
                node.ping()
            except RedisError as exc:
                found.append(
                    warning(
                        CHECK,
                        f"sentinel {text}: {exc}",
                        "check fleet.sentinels, sentinel_password_file and sentinel_tls",
                    )
                )
        if len(found) == len(settings.sentinels):
            fix = "check that the sentinels run and that this host reaches them"
            return [*found, problem(CHECK, "no sentinel answers", fix)]
        service = settings.sentinel_service
        try:
            primary = host_port(*sentinel.discover_master(service))
        except RedisError as exc:
            fix = f"sentinel monitor {service} HOST PORT QUORUM in the sentinels' config"
            return [*found, problem(CHECK, f"no primary for {service!r}: {exc}", fix)]
        client = sentinel.master_for(service, **options)
        where = f"{primary} (Sentinel's primary of {service!r})"
        return [*found, _answers(settings, client, where)]
    finally:
        for node in sentinel.sentinels:
            node.close()
