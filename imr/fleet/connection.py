"""A Redis connection for one member, as `[fleet]` says: its ACL user, password file, TLS."""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis

from imr.fleet.settings import FleetSettings

log = logging.getLogger("imr.fleet")

# Reconnect back-off: from FIRST doubling to at most LAST seconds, so a Redis restart is
# noticed within seconds and a long outage costs one attempt (and one log line) a while.
BACKOFF_FIRST = 0.2
BACKOFF_LAST = 5.0
# A blocking XREAD waits this long (ms) for news before it asks again.
BLOCK_MS = 5000


class FleetConfigError(Exception):
    """The [fleet] settings name a file that cannot be read."""


def connect(settings: FleetSettings, *, timeout: float = 10.0) -> aioredis.Redis:
    kwargs: dict[str, Any] = {
        "username": settings.user,
        "socket_connect_timeout": timeout,
        # Longer than a blocking XREAD, so only a dead connection times out.
        "socket_timeout": BLOCK_MS / 1000 + timeout,
        "retry_on_timeout": False,
    }
    if settings.password_file is not None:
        try:
            kwargs["password"] = settings.password_file.read_text().strip()
        except OSError as exc:
            raise FleetConfigError(
                f"fleet.password_file {settings.password_file}: {exc.strerror}"
            ) from None
    if settings.redis_url.startswith("rediss://"):
        if settings.tls_ca is not None:
            kwargs["ssl_ca_certs"] = str(settings.tls_ca)
        if settings.tls_cert is not None:
            kwargs["ssl_certfile"] = str(settings.tls_cert)
            kwargs["ssl_keyfile"] = str(settings.tls_key or settings.tls_cert)
    return aioredis.Redis.from_url(settings.redis_url, **kwargs)


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
