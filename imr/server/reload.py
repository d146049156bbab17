"""SIGHUP (`imr server reload`, `systemctl reload imr`): reopen the log, read the config again.

*Live* settings take effect at once: roles (access), the allowlist and the rest of
[protect], quotas, the repeat ladder ([policy]), and server.log_file and
log_changes_per_second ([logscan] and [reputation] are not the daemon's: `imr watch`
reads them). *Fixed* settings are the
ones a running daemon is built on: the rest of [server] (socket, its group and
mode, pid file, limits, the TCP listener), [state], [firewall] and [metrics]. A
changed fixed setting is named in a warning and keeps its old value until a
restart. A new configuration that does not load is refused with the usual
message, and the one in force stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from imr.config import Config, ConfigError

log = logging.getLogger("imr.daemon")

LIVE_SERVER_KEYS = ("log_file", "log_changes_per_second")
FIXED_SECTIONS = ("state", "firewall", "metrics", "fleet")


class TakesConfig(Protocol):
    def apply_config(self, config: Config) -> None: ...


def merge(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration to run with after a reload, and the fixed keys that changed
    (they keep their old value; listed as `section.key`)."""
    fixed = [
        f"server.{key}"
        for key in _changed(old.server.model_dump(), new.server.model_dump())
        if key not in LIVE_SERVER_KEYS
    ]
    for section in FIXED_SECTIONS:
        before = getattr(old, section).model_dump()
        fixed += [
            f"{section}.{key}" for key in _changed(before, getattr(new, section).model_dump())
        ]
    server = old.server.model_copy(update={k: getattr(new.server, k) for k in LIVE_SERVER_KEYS})
    update: dict[str, Any] = {"server": server}
    update.update({section: getattr(old, section) for section in FIXED_SECTIONS})
    return new.model_copy(update=update), fixed


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


class Reloader:
    """Runs one reload on the event loop (from the SIGHUP handler)."""

    def __init__(
        self,
        config: Config,
        read_config: Callable[[], Config] | None,
        reopen_log: Callable[[Config], None],
        targets: Sequence[TakesConfig],
    ) -> None:
        self.config = config
        self._read_config = read_config
        self._reopen_log = reopen_log
        self._targets = targets

    def reload(self) -> bool:
        """Reopen the log, then take the new configuration; False if it was refused."""
        try:
            self._reopen_log(self.config)
        except Exception as exc:  # the old file stays in use: keep serving
            log.error("reload: cannot reopen the log file: %s", exc)
        if self._read_config is None:
            log.info("reload: log reopened (no configuration file to read again)")
            return True
        try:
            new = self._read_config()
        except ConfigError as exc:
            log.error("reload refused, the configuration in force stays: %s", exc)
            return False
        effective, fixed = merge(self.config, new)
        if effective.server.log_file != self.config.server.log_file:
            try:
                self._reopen_log(effective)
            except Exception as exc:
                log.error("reload: cannot open the new log file: %s", exc)
        for target in self._targets:
            target.apply_config(effective)
        self.config = effective
        if fixed:
            log.warning(
                "reload: %s changed but take effect only at a restart (imr server stop/start"
                " or systemctl restart imr)",
                ", ".join(fixed),
            )
        log.info("reload: configuration read again; roles, allowlist, quotas and policy in force")
        return True
