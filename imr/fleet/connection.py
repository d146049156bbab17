"""A Redis connection for one member, as `[fleet]` says: its ACL user, password file, TLS,
and either one server (`redis_url`) or the primary that Sentinel names (`sentinels`).

With Sentinel, every new connection asks the sentinels which server is the primary now
(redis-py's `Sentinel.master_for`), so the publisher's and the follower's reconnect loops
find the new primary after a failover by themselves. Both read and write on the primary:
a replica may lag, and the follower's stored positions must never run ahead of it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from imr.core.addresses import endpoint_text
from imr.fleet.settings import FleetSettings

log = logging.getLogger("imr.fleet")

# Reconnect back-off: from FIRST doubling to at most LAST seconds, so a Redis restart is
# noticed within seconds and a long outage costs one attempt (and one log line) a while.
BACKOFF_FIRST = 0.2
BACKOFF_LAST = 5.0
# A blocking XREAD waits this long (ms) for news before it asks again.
BLOCK_MS = 5000
# A sentinel that does not answer within this many seconds is skipped for the next one.
SENTINEL_TIMEOUT = 2.0


class FleetConfigError(Exception):
    """The [fleet] settings name a file that cannot be read."""


def _secret(key: str, path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise FleetConfigError(f"fleet.{key} {path}: {exc.strerror}") from None


def _tls_options(settings: FleetSettings) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if settings.tls_ca is not None:
        found["ssl_ca_certs"] = str(settings.tls_ca)
    if settings.tls_cert is not None:
        found["ssl_certfile"] = str(settings.tls_cert)
        found["ssl_keyfile"] = str(settings.tls_key or settings.tls_cert)
    return found


def redis_options(settings: FleetSettings, timeout: float) -> dict[str, Any]:
    """redis-py's keyword arguments (sync or asyncio) for a data connection: the ACL user,
    its password, TLS, and a socket timeout longer than a blocking XREAD (so only a dead
    connection times out). Raises FleetConfigError when the password file is unreadable."""
    found: dict[str, Any] = {
        "username": settings.user,
        "socket_connect_timeout": timeout,
        "socket_timeout": BLOCK_MS / 1000 + timeout,
        "retry_on_timeout": False,
    }
    if settings.password_file is not None:
        found["password"] = _secret("password_file", settings.password_file)
    if settings.data_tls:
        found |= _tls_options(settings)
        if settings.sentinels:  # a URL says rediss:// itself
            found["ssl"] = True
    return found


def sentinel_options(settings: FleetSettings) -> dict[str, Any]:
    """redis-py's keyword arguments for the connections to the sentinels themselves."""
    found: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "socket_timeout": SENTINEL_TIMEOUT,
    }
    if settings.sentinel_password_file is not None:
        found["password"] = _secret("sentinel_password_file", settings.sentinel_password_file)
    if settings.sentinel_tls:
        found |= {"ssl": True, **_tls_options(settings)}
    return found


def check_files(settings: FleetSettings) -> None:
    """Read the password files now: a start-up error rather than a task that retries."""
    redis_options(settings, 1.0)
    if settings.sentinels:
        sentinel_options(settings)


@contextlib.asynccontextmanager
async def connected(settings: FleetSettings, *, timeout: float = 10.0) -> AsyncIterator[Any]:
    """A client of the primary (nothing is sent until the first command); closed on exit,
    together with the connections to the sentinels."""
    options = redis_options(settings, timeout)
    sentinel: Sentinel | None = None
    if settings.sentinels:
        sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs=sentinel_options(settings))
        client = sentinel.master_for(settings.sentinel_service, **options)
    else:
        client = aioredis.Redis.from_url(settings.redis_url, **options)
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
        if sentinel is not None:
            with contextlib.suppress(Exception):
                await sentinel.aclose()


def host_port(host: object, port: object) -> str:
    return endpoint_text(host.decode() if isinstance(host, bytes) else str(host), str(port))


def primary_address(client: Any) -> str | None:
    """HOST:PORT of the primary Sentinel named for this client's last connection (None
    without Sentinel)."""
    address = getattr(client.connection_pool, "master_address", None)
    return host_port(*address) if address else None


class Backoff:
    """Seconds to wait before the next attempt; reset by a success."""

    def __init__(self) -> None:
        self.delay = 0.0

    def failed(self) -> float:
        self.delay = min(BACKOFF_LAST, self.delay * 2 if self.delay else BACKOFF_FIRST)
        return self.delay

    def succeeded(self) -> bool:
        """Whether this ends an outage (for a log line)."""
        was, self.delay = self.delay, 0.0
        return was > 0
