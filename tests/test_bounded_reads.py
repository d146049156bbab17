"""Reads that cost what they return: `show` in pages, newest first; `export` streamed in pages;
hits pruned after `state.hit_retention`; and one address in many spellings counted once.

The broker parts run with a real state file, a fake clock and the recording backend (as in
test_broker.py). The memory test runs the real daemon on a state file of 200,000 hits and
reads its resident set from /proc while an unprivileged reader exports it all.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from test_broker import block, running

from imr.config import Config
from imr.protocol import BlockManyRequest, ExportPage, ExportRequest, ShowRequest, ShowResult
from imr.server import upkeep
from imr.server.broker import Broker, BrokerError
from imr.store import SCHEMA_VERSION, Store

from daemon_harness import READER, Daemon, daemon_world
from fakes import READER as READER_PEER
from fakes import ROOT, WEB

pytestmark = pytest.mark.anyio

DAY = 86400
ATTACKER = "203.0.113.7"
PAGE = 10  # state.page_rows in these tests (its smallest value)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(**state: Any) -> Config:
    return Config.model_validate(
        {
            "protect": {"allowlist": ["198.51.100.0/24"]},
            "state": {"page_rows": PAGE, **state},
            "quota": {"hits_per_minute": 3},
            "escalation": {"enabled": False},  # pages of one /24's addresses, not its network
        }
    )


def quota_config() -> Config:
    """hits_per_minute = 3, and nothing new besides: so the spelling tests run on any imr."""
    return Config.model_validate(
        {"protect": {"allowlist": ["198.51.100.0/24"]}, "quota": {"hits_per_minute": 3}}
    )


async def show(broker: Broker, ip: str, **fields: Any) -> ShowResult:
    return await broker.handle(ShowRequest(op="show", ip=ip, **fields), READER_PEER)


async def export_page(broker: Broker, **fields: Any) -> ExportPage:
    return await broker.handle(ExportRequest(op="export", **fields), READER_PEER)


# --- show: pages, newest first ---


async def test_show_pages_an_address_history_newest_first(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, _backend, clock, _store):
        for n in range(25):  # the admin is exempt from hits_per_minute
            await block(broker, ATTACKER, peer=ROOT, reason=f"r{n}")
            clock.advance(1)
        first = await show(broker, ATTACKER, limit=8)
        assert [h["reason"] for h in first["hits"]] == [f"r{n}" for n in range(24, 16, -1)]
        assert first["active"] is not None and first["active"]["ip"] == ATTACKER
        assert len(first["blocks"]) == 1
        second = await show(broker, ATTACKER, limit=8, before=first["next_before"])
        assert [h["reason"] for h in second["hits"]] == [f"r{n}" for n in range(16, 8, -1)]
        last = await show(broker, ATTACKER, limit=20, before=second["next_before"])
        # The daemon's page size caps any limit asked for: 10 of the 9 left, and no more.
        assert [h["reason"] for h in last["hits"]] == [f"r{n}" for n in range(8, -1, -1)]
        assert last["next_before"] is None
        capped = await show(broker, ATTACKER)  # no limit: one page of state.page_rows
        assert len(capped["hits"]) == PAGE and capped["next_before"] is not None


async def test_show_lists_blocks_newest_first(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, _backend, clock, _store):
        for n in range(3):
            await block(broker, ATTACKER, peer=ROOT, reason=f"block {n}")
            clock.advance(8 * DAY)  # past the longest rung: the next one is a new block
            await broker.expire_due()
        shown = await show(broker, ATTACKER, limit=2)
        assert [b["reason"] for b in shown["blocks"]] == ["block 2", "block 1"]
        assert shown["more_blocks"] is True


# --- export: pages that follow `next` ---


async def test_export_comes_in_pages_of_at_most_page_rows(tmp_path: Path) -> None:
    async with running(tmp_path, config()) as (broker, _backend, clock, store):
        for n in range(13):
            await block(broker, f"203.0.113.{n + 1}", peer=ROOT)
        for n in range(12):
            await block(broker, "203.0.113.1", peer=ROOT, reason=f"again {n}")
            clock.advance(1)
        pages = [await export_page(broker)]
        while pages[-1]["next"] is not None:
            pages.append(await export_page(broker, after=pages[-1]["next"]))
        assert all(len(p["blocks"]) + len(p["hits"]) <= PAGE for p in pages)
        blocks = [b["ip"] for p in pages for b in p["blocks"]]
        hits = [h["reason"] for p in pages for h in p["hits"]]
        assert blocks == [f"203.0.113.{n + 1}" for n in range(13)]
        assert len(hits) == 25 and hits[-12:] == [f"again {n}" for n in range(12)]
        assert {p["schema_version"] for p in pages} == {SCHEMA_VERSION}
        limited = await export_page(broker, limit=3)
        assert len(limited["blocks"]) == 3 and limited["next"] is not None
    del store


# --- hit retention ---


async def test_hits_older_than_the_retention_are_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upkeep, "PRUNE_ROWS", 2)  # several steps of the writer
    async with running(tmp_path, config(hit_retention="30d")) as (broker, _b, clock, store):
        for n in range(5):
            await block(broker, ATTACKER, peer=ROOT, reason=f"old {n}")
        clock.advance(31 * DAY)
        await block(broker, "203.0.113.8", peer=ROOT, reason="young")
        assert await broker.prune_hits() == 5
        assert [h.reason for h in store.history(ATTACKER)[1]] == []
        assert [h.reason for h in store.history("203.0.113.8")[1]] == ["young"]
        assert len(store.history(ATTACKER)[0]) == 1  # blocks are kept for ever
        assert await broker.prune_hits() == 0


async def test_hits_dated_by_a_clock_that_was_ahead_do_not_hold_up_pruning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upkeep, "PRUNE_ROWS", 2)
    async with running(tmp_path, config(hit_retention="30d")) as (broker, _b, clock, store):
        clock.advance(400 * DAY)  # the clock is a year ahead, then set right
        await block(broker, "203.0.113.9", peer=ROOT, reason="from the future")
        clock.advance(-400 * DAY)
        for n in range(3):
            await block(broker, ATTACKER, peer=ROOT, reason=f"old {n}")
        clock.advance(31 * DAY)
        await block(broker, "203.0.113.8", peer=ROOT, reason="young")
        assert await broker.prune_hits() == 3
        left = [
            h.reason
            for ip in ("203.0.113.9", ATTACKER, "203.0.113.8")
            for h in store.history(ip)[1]
        ]
        assert left == ["from the future", "young"]


# --- hits_per_minute: one address in many spellings ---

SPELLINGS = [
    ATTACKER,
    "::ffff:203.0.113.7",
    "::FFFF:203.0.113.7",
    "::ffff:cb00:7107",
    "::FFFF:CB00:7107",
    "0:0:0:0:0:ffff:203.0.113.7",
    "0::ffff:203.0.113.7",
    "0:0::ffff:cb00:7107",
    "203.0.113.7/32",
]


async def test_many_spellings_of_a_blocked_address_count_once(tmp_path: Path) -> None:
    async with running(tmp_path, quota_config()) as (broker, _backend, _clock, store):
        await block(broker, ATTACKER)
        request = BlockManyRequest(op="block_many", ips=SPELLINGS)
        result = await broker.handle(request, WEB)
        assert [item["ok"] for item in result["results"]] == [True] * len(SPELLINGS)
        assert {item.get("action") for item in result["results"]} == {"record"}
        assert [h.outcome for h in store.history(ATTACKER)[1]] == ["block", "record"]
        # hits_per_minute = 3: that was one, so two more reports are taken, then no more.
        for _ in range(2):
            assert (await block(broker, ATTACKER))["action"] == "record"
        with pytest.raises(BrokerError) as refused:
            await block(broker, ATTACKER)
        assert refused.value.code == "rate_limited"


async def test_many_spellings_of_a_new_address_make_one_block_and_one_row(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, quota_config()) as (broker, _backend, _clock, store):
        request = BlockManyRequest(op="block_many", ips=SPELLINGS)
        result = await broker.handle(request, WEB)
        assert {item.get("action") for item in result["results"]} == {"block"}
        blocks, hits = store.history(ATTACKER)
        assert (len(blocks), [h.outcome for h in hits]) == (1, ["block"])


async def test_concurrent_reports_of_a_new_address_count_as_hits(tmp_path: Path) -> None:
    """Several requests for one new address in one batch: one block, and the others are
    hits that count against hits_per_minute (they wrote hit rows), though each was
    admitted as a new block."""
    async with running(tmp_path, quota_config()) as (broker, _backend, _clock, store):
        results = await asyncio.gather(*(block(broker, ATTACKER) for _ in range(4)))
        assert sorted(r["action"] for r in results) == ["block", "record", "record", "record"]
        with pytest.raises(BrokerError) as refused:  # 3 hits this minute: the limit
            await block(broker, ATTACKER)
        assert refused.value.code == "rate_limited"
        assert len(store.history(ATTACKER)[1]) == 4


# --- the real daemon: export of 200,000 hits with bounded memory ---

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
HITS = 200_000
GROWTH_LIMIT_KB = 40_000  # growth of the daemon's resident set: ~8 MB measured, ~300 MB unpaged


def fill_state(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(path)
    rows = [
        (
            f"2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::1",
            1_700_000_000.0 + n,
            "record",
            "x" * 100,
            "modsecurity:942100",
            33,
            4242,
            None,
        )
        for n in range(HITS)
    ]
    with store.transaction():
        store.record_hits(rows)
    store.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def start_dryrun(world: Daemon) -> int:
    world.write_config()
    text = world.config_file.read_text().replace('backend = "iptables"', 'backend = "dryrun"')
    world.config_file.write_text(text)
    fill_state(world.state_file)
    result = world.start()
    assert result.returncode == 0, result.stderr
    pid = world.pid()
    assert pid is not None
    return pid


@needs_root
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_an_export_of_200k_hits_is_streamed_with_bounded_daemon_memory(
    test_users: None, anyio_backend: str
) -> None:
    with daemon_world() as world:
        pid = start_dryrun(world)
        before = rss_kb(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], rss_kb(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            argv = ["runuser", "-u", READER, "--", *world.imr_argv("export")]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        finally:
            done.set()
            sampler.join()
        assert out.returncode == 0, out.stderr[-2000:]
        data = json.loads(out.stdout)
        assert (data["kind"], len(data["blocks"]), len(data["hits"])) == ("export", 0, HITS)
        assert data["hits"][-1]["ip"] == f"2001:db8:{(HITS - 1) >> 16:x}:{(HITS - 1) & 0xFFFF:x}::1"
        assert peak[0] - before < GROWTH_LIMIT_KB, (before, peak[0])
        shown = world.as_user(READER, "show", "2001:db8:0:5::1", "--limit", "1", "--json")
        assert shown.returncode == 0, shown.stderr
        page = json.loads(shown.stdout)
        assert [h["reason"] for h in page["hits"]] == ["x" * 100] and page["next_before"] is None
