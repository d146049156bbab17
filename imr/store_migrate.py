"""A copy of the state file before its schema is upgraded.

An upgrade of imr may bring a newer schema (store.MIGRATIONS); the daemon upgrades the file
when it starts. Before the first migration touches a file that already holds data, the file
is copied whole, through SQLite's online backup (consistent, WAL included), to
`<state>.schema-<old version>.bak` next to it, mode 0600. To go back to the old imr, stop the
daemon and put that copy in place of the state file (blocks and reports made since are lost).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path


def backup_path(state: Path, version: int) -> Path:
    return state.with_name(f"{state.name}.schema-{version}.bak")


def backup_before_migration(db: sqlite3.Connection, state: Path, version: int) -> Path | None:
    """Copy the file about to be migrated from `version`; nothing for a new, empty file.

    An existing backup of the same version is kept (the first copy is the one made by the
    old imr's last state); a new one is written to a temporary name and renamed, so a crash
    never leaves half a backup under the final name.
    """
    if version == 0:
        return None
    target = backup_path(state, version)
    if target.exists():
        return target
    partial = target.with_name(target.name + ".partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    copy = sqlite3.connect(partial)
    try:
        db.backup(copy)
    finally:
        copy.close()
    os.replace(partial, target)
    return target
