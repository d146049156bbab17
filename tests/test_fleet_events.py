"""The fleet's signed events and the pure trust checks (no Redis, no kernel)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imr.core.fleet import (
    OriginQuota,
    Protection,
    entry_time,
    may_lift,
    merged,
    target_refusal,
)
from imr.fleet import events
from imr.fleet.keys import load_private, load_public, public_text, verify
from imr.store import MIGRATIONS, SCHEMA_VERSION, Store, StoreError

KEY_A = Ed25519PrivateKey.generate()
KEY_B = Ed25519PrivateKey.generate()
VERIFIERS = {
    "a": lambda sig, msg: verify(load_public(public_text(KEY_A.public_key())), sig, msg),
    "b": lambda sig, msg: verify(KEY_B.public_key(), sig, msg),
}


def body(**changes: object) -> bytes:
    data = json.loads(
        events.outbox_body("a", "block", "203.0.113.5", 1000.0, 87400.0, 1, 1, "scan", "hook")
    )
    data["seq"] = 1
    data.update(changes)
    return json.dumps(data, sort_keys=True).encode()


def entry(raw: bytes, key: Ed25519PrivateKey = KEY_A) -> dict[bytes, bytes]:
    fields = events.sign(raw, key.sign)
    return {b"e": fields["e"], b"s": fields["s"]}


def test_a_signed_event_round_trips() -> None:
    event = events.decode(entry(body()), "a", VERIFIERS)
    assert isinstance(event, events.Event)
    assert (event.origin, event.seq, event.ip, event.rung) == ("a", 1, "203.0.113.5", 1)
    assert events.decode(entry(event.to_json()), "a", VERIFIERS) == event


def test_forged_and_hostile_events_are_refused() -> None:
    refused = events.EventRefusal
    assert events.decode(entry(body(), KEY_B), "a", VERIFIERS) is refused.SIGNATURE
    tampered = entry(body())
    tampered[b"e"] = tampered[b"e"].replace(b"203.0.113.5", b"203.0.113.6")
    assert events.decode(tampered, "a", VERIFIERS) is refused.SIGNATURE
    # Signed by a, put in b's stream: the origin inside must be the stream's.
    assert events.decode(entry(body(), KEY_B), "b", VERIFIERS) is refused.ORIGIN_MISMATCH
    assert events.decode(entry(b"{not json"), "a", VERIFIERS) is refused.MALFORMED
    assert events.decode(entry(body(v=2)), "a", VERIFIERS) is refused.VERSION
    assert events.decode(entry(body(rung="1")), "a", VERIFIERS) is refused.MALFORMED
    assert events.decode(entry(body(kind="drop")), "a", VERIFIERS) is refused.MALFORMED
    assert events.decode(entry(body(extra=1)), "a", VERIFIERS) is refused.MALFORMED
    assert events.decode({b"e": body()}, "a", VERIFIERS) is refused.MALFORMED
    assert events.decode(entry(body()), "c", VERIFIERS) is refused.UNKNOWN_ORIGIN


PROTECTION = Protection(
    own=frozenset({ipaddress.ip_address("192.0.2.1")}),
    broadcast=frozenset(),
    allowlist=(ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("192.0.2.18/32")),
    min_prefix={4: 24, 6: 48},
)


def test_remote_targets_pass_the_local_checks() -> None:
    assert target_refusal("203.0.113.5", PROTECTION) is None
    assert target_refusal("203.0.113.0/24", PROTECTION) is None
    for ip in ("127.0.0.1", "192.0.2.1", "198.51.100.7", "192.0.2.18", "::ffff:192.0.2.1"):
        found = target_refusal(ip, PROTECTION)
        assert found is not None and found[0] in ("protected_target", "malformed"), ip
    assert target_refusal("203.0.0.0/16", PROTECTION) is not None
    assert target_refusal("203.0.0.0/16", PROTECTION)[0] == "too_wide"  # type: ignore[index]
    assert target_refusal("198.51.100.0/24", PROTECTION)[0] == "protected_target"  # type: ignore[index]
    assert target_refusal("example.org", PROTECTION)[0] == "malformed"  # type: ignore[index]


def test_quota_merge_and_lift_rules() -> None:
    quota = OriginQuota(3)
    assert [quota.admit("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert quota.admit("b", 0.0)
    assert quota.admit("a", 60.5)
    # Two escalations in either order end the same.
    start = (1, 100.0)
    assert merged(merged(start, 2, 500.0), 2, 400.0) == merged(merged(start, 2, 400.0), 2, 500.0)
    assert merged((3, 100.0), 2, 50.0) == (3, 100.0)
    assert may_lift("a", "a", False) and not may_lift("a", "b", False)
    assert not may_lift("a", None, False) and may_lift("a", None, True)


def test_a_version_1_state_file_is_migrated_and_keeps_its_blocks(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(MIGRATIONS[0])
        db.execute(
            "INSERT INTO blocks (id, ip, blocked_at, expires_at, rung, offence, reason, source)"
            " VALUES (1, '203.0.113.9', 1.0, 9e9, 1, 1, 'old', 'cli')"
        )
        db.execute("PRAGMA user_version=1")
        db.commit()
    store = Store(path)
    try:
        [record] = store.active_blocks()
        assert (record.ip, record.origin) == ("203.0.113.9", None)
        with store.transaction():
            store.add_outbox([b"{}"])
            store.set_position("imr:fleet:a", "1-0", 3)
        assert store.positions() == {"imr:fleet:a": ("1-0", 3)}
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_a_foreign_file_is_refused_before_any_migration_touches_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE blocks (id INTEGER PRIMARY KEY, address TEXT)")
        db.execute("PRAGMA user_version=1")
        db.commit()
    with pytest.raises(StoreError, match="not an imr state file"):
        Store(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(blocks)")]
        assert columns == ["id", "address"]
        assert db.execute("PRAGMA user_version").fetchone() == (1,)


def test_one_signature_covers_an_entry_of_many_events() -> None:
    many = [json.loads(body(seq=n, ip=f"203.0.113.{n}")) for n in range(1, 4)]
    many[1]["v"] = 9
    raw = json.dumps(many).encode()
    found = events.decode_entry(entry(raw), "a", VERIFIERS)
    assert [getattr(e, "seq", e) for e in found] == [1, events.EventRefusal.VERSION, 3]
    too_many = json.dumps([many[0]] * (events.MAX_ENTRY_EVENTS + 1)).encode()
    assert events.decode_entry(entry(too_many), "a", VERIFIERS) == [events.EventRefusal.MALFORMED]
    assert events.decode_entry(entry(raw, KEY_B), "a", VERIFIERS) == [events.EventRefusal.SIGNATURE]


def test_keygen_writes_a_private_key_and_prints_its_public_key(tmp_path: Path) -> None:
    imr = str(Path(sys.executable).parent / "imr")
    path = tmp_path / "fleet.key"
    made = subprocess.run([imr, "fleet", "keygen", str(path)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_text(load_private(path).public_key()) == made.stdout.strip()
    again = subprocess.run([imr, "fleet", "keygen", str(path)], capture_output=True, text=True)
    assert again.returncode != 0 and "exists already" in again.stderr
    assert "Traceback" not in again.stderr


def test_the_quota_runs_on_the_entries_own_time() -> None:
    assert entry_time("1796619254231-7") == 1796619254.231
    assert entry_time("bogus") is None
    quota = OriginQuota(150)
    # A catch-up: ten minutes of 100 events a minute, read in one go: all admitted.
    spread = [1000.0 + minute * 60 + n * 0.5 for minute in range(10) for n in range(100)]
    assert all(quota.admit("a", at) for at in spread)
    # A flood: 200 events stamped within one second: the excess is refused.
    flood = [5000.0 + n / 1000 for n in range(200)]
    assert sum(quota.admit("b", at) for at in flood) == 150
