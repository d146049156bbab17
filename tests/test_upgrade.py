"""Upgrading the state file: schema migration at start, with a backup of the file first.

The previous release's file is made the way 0.1.0 made it (its one migration, rows written
with the store's own statements); a newer schema is simulated by appending a migration, as
the next release will. tests/test_package.py covers the rest of an upgrade (blocks kept in the
kernel, hooks failing open) with the Debian package in a container.
"""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

import pytest

from imr import store
from imr.store import Store, StoreError
from imr.store_migrate import backup_path

_NEXT = "CREATE INDEX hits_by_block ON hits(block_id)"


def _previous_release_file(path: Path) -> None:
    """A state file at schema 1 (imr 0.1.0: its one migration, as it wrote them) holding one
    active and one lifted block."""
    db = sqlite3.connect(path)
    for statement in store.MIGRATIONS[0].split(";"):
        if statement.strip():
            db.execute(statement)
    now = time.time()
    row = (
        "INSERT INTO blocks (ip, blocked_at, expires_at, rung, offence, reason, source, lifted_at)"
    )
    db.execute(
        row + " VALUES ('203.0.113.7', ?, ?, 1, 1, 'scanner', 'test', NULL)", (now, now + 86400)
    )
    db.execute(
        row + " VALUES ('198.51.100.9', ?, ?, 1, 1, 'old', 'test', ?)",
        (now - 500, now - 100, now - 100),
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    assert _version(path) == 1


def _version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


@pytest.fixture
def next_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, _NEXT))
    monkeypatch.setattr(store, "SCHEMA_VERSION", len(store.MIGRATIONS))


def test_previous_release_file_opens_with_its_blocks(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _previous_release_file(path)
    db = Store(path)
    assert [b.ip for b in db.active_blocks()] == ["203.0.113.7"]
    db.close()
    # Migrated to this release's schema, with a copy of the file as it was.
    assert _version(path) == store.SCHEMA_VERSION
    assert [p.name for p in tmp_path.glob("*.bak")] == [backup_path(path, 1).name]


@pytest.mark.usefixtures("next_schema")
def test_migration_backs_up_the_file_first(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    # Made at schema 1 with the real first migration only (Store would make the newest).
    db = sqlite3.connect(path)
    for statement in store.MIGRATIONS[0].split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute(
        "INSERT INTO blocks (ip, blocked_at, expires_at, rung, offence, reason, source)"
        " VALUES ('203.0.113.7', ?, ?, 1, 1, 'scanner', 'test')",
        (time.time(), time.time() + 86400),
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()

    upgraded = Store(path)
    assert [b.ip for b in upgraded.active_blocks()] == ["203.0.113.7"]
    upgraded.close()
    assert _version(path) == store.SCHEMA_VERSION

    backup = backup_path(path, 1)
    assert backup.exists(), list(tmp_path.iterdir())
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert _version(backup) == 1
    copy = sqlite3.connect(backup)
    rows = copy.execute("SELECT ip FROM blocks WHERE lifted_at IS NULL").fetchall()
    indexes = copy.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    copy.close()
    assert rows == [("203.0.113.7",)]
    assert ("hits_by_block",) not in indexes  # the copy is from before the migration
    assert not list(tmp_path.glob("*.partial"))

    # A second start finds the file current: no new backup, the first one is kept.
    before = backup.stat().st_mtime_ns
    Store(path).close()
    assert backup.stat().st_mtime_ns == before


@pytest.mark.usefixtures("next_schema")
def test_new_file_needs_no_backup(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    assert _version(tmp_path / "state.db") == store.SCHEMA_VERSION
    assert not list(tmp_path.glob("*.bak"))


def test_file_from_a_newer_imr_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _previous_release_file(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={store.SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this imr knows"):
        Store(path)
    assert not list(tmp_path.glob("*.bak"))
