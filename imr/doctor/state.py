"""The state file: opened read-only, its schema, integrity and the times it holds."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
from pathlib import Path

from imr.config import Config
from imr.doctor.findings import (
    Finding,
    iso,
    ok,
    problem,
    user_name,
)
from imr.store import SCHEMA_VERSION

# No clock running before this can be right: imr did not exist yet.
EARLIEST_PLAUSIBLE = 1_735_689_600  # 2025-01-01T00:00:00Z
LATEST_PLAUSIBLE = 4_102_444_800  # 2100-01-01T00:00:00Z
FUTURE_SLACK = 300.0  # seconds a state file time may lie ahead of the clock


def check_state(config: Config, now: float) -> list[Finding]:
    path = config.state.path
    if not path.exists():
        return [ok("state file", f"{path} does not exist yet; the daemon creates it")]
    findings = []
    info = path.stat()
    if info.st_uid != 0 or stat.S_IMODE(info.st_mode) & 0o022:
        findings.append(
            problem(
                "state file",
                f"{path} is owned by {user_name(info.st_uid)} with mode"
                f" {stat.S_IMODE(info.st_mode):04o}: someone other than root can rewrite it",
                f"chown root {path}; chmod 0640 {path}",
            )
        )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        return [*findings, problem("state file", f"cannot open {path}: {exc}", "run as root")]
    with contextlib.closing(db):
        try:
            integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            newest = _newest_time(db) if version >= 1 else None
        except sqlite3.DatabaseError as exc:
            return [*findings, _corrupt(path, str(exc))]
    if integrity != ["ok"]:
        return [*findings, _corrupt(path, "; ".join(integrity[:3]))]
    if version > SCHEMA_VERSION:
        findings.append(
            problem(
                "state file",
                f"{path} has schema version {version}, newer than this imr ({SCHEMA_VERSION})",
                "upgrade imr to the version that wrote it",
            )
        )
    elif version < SCHEMA_VERSION:
        findings.append(
            ok("state file", f"schema version {version}; the daemon upgrades it when it starts")
        )
    if newest is not None and newest > now + FUTURE_SLACK:
        findings.append(
            problem(
                "clock",
                f"{path} holds times up to {iso(newest)}, after the clock's {iso(now)}:"
                " the clock went back, so blocks will last longer than they should",
                "set the clock right (timedatectl set-ntp true); the blocks expire on their own",
            )
        )
    if not findings:
        findings.append(ok("state file", f"{path}: integrity ok, schema version {version}"))
    return findings


def _newest_time(db: sqlite3.Connection) -> float | None:
    row = db.execute(
        "SELECT MAX(t) FROM (SELECT MAX(blocked_at) AS t FROM blocks"
        " UNION ALL SELECT MAX(at) FROM hits)"
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def _corrupt(path: Path, detail: str) -> Finding:
    return problem(
        "state file",
        f"{path} is damaged: {detail}",
        f"stop the daemon, keep a copy (cp {path} {path}.bad), then try"
        f" `sqlite3 {path}.bad .recover | sqlite3 {path}.new` and move {path}.new into place;"
        " or move the file aside and start empty (the kernel's blocks are then removed)",
    )
