"""block_many and the batch writer's shortcuts: each address decided, admitted and answered on
its own; one batch's deferred writes (new blocks, hits) never reorder against its updates.

The broker runs with a real state file, a fake clock and the recording backend (as in
test_broker.py); the daemon test at the end runs the real thing as an unprivileged user.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_broker import DAY, addr, running

from imr.config import Config
from imr.core.log_budget import LineBudget
from imr.protocol import (
    MAX_BLOCK_MANY,
    BlockManyRequest,
    BlockRequest,
    ProtocolError,
    UnblockRequest,
    parse_request,
)
from imr.server.access import Peer
from imr.server.broker import Broker, BrokerError

from daemon_harness import ATTACKER_V4, ATTACKER_V6, BLOCKER, READER, SERVER_V4, Daemon
from daemon_harness import daemon_world as _daemon_world
from fakes import READER as READER_PEER
from fakes import ROOT, WEB, RecordingBackend

UNLIMITED = {"protect": {"allowlist": ["198.51.100.0/24"]}, "quota": {"blocks_per_minute": 0}}


async def block_many(broker: Broker, ips: list[str], peer: Peer = WEB, **fields: Any) -> Any:
    return await broker.handle(BlockManyRequest(op="block_many", ips=ips, **fields), peer)


def test_each_address_gets_its_own_outcome_in_order(tmp_path: Path) -> None:
    ips = ["203.0.113.7", "127.0.0.1", "2001:db8::7", "198.51.100.9", "not-an-ip", "203.0.113.8"]

    async def scenario() -> None:
        async with running(tmp_path) as (broker, backend, clock, store):
            result = await block_many(broker, ips, reason="scan wave", source="logscan")
            assert [item["ip"] for item in result["results"]] == ips
            assert [item["ok"] for item in result["results"]] == [1, 0, 1, 0, 0, 1]
            codes = [item["error"]["code"] for item in result["results"] if not item["ok"]]
            assert codes == ["loopback_address", "allowlisted", "invalid_address"]
            assert result["counts"] == {"blocked": 3, "escalated": 0, "recorded": 0, "refused": 3}
            blocked = ["203.0.113.7", "2001:db8::7", "203.0.113.8"]
            assert backend.kernel == {addr(ip): clock.now() + DAY for ip in blocked}
            rows = {r.ip: r for r in store.active_blocks()}
            assert set(rows) == set(blocked)
            assert {(r.reason, r.source, r.uid, r.offence) for r in rows.values()} == {
                ("scan wave", "logscan", 33, 1)
            }
            assert len(backend.applies) == 1  # one batch: one kernel transaction

    asyncio.run(scenario())


def test_repeat_offenders_and_pardons_inside_one_batch(tmp_path: Path) -> None:
    """The batch reads every new address's history in one query; the ladder must see the
    same history as one request at a time would."""

    async def scenario() -> None:
        async with running(tmp_path) as (broker, _, clock, store):
            await block_many(broker, ["203.0.113.1", "203.0.113.2"])
            await broker.handle(UnblockRequest(op="unblock", ip="203.0.113.2"), ROOT)  # pardon
            clock.advance(DAY)
            await broker.expire_due()  # 203.0.113.1 served its day
            clock.advance(60)
            result = await block_many(broker, ["203.0.113.1", "203.0.113.2", "203.0.113.3"])
            by_ip = {item["ip"]: item for item in result["results"]}
            assert (by_ip["203.0.113.1"]["rung"], by_ip["203.0.113.1"]["offence"]) == (2, 2)
            assert (by_ip["203.0.113.2"]["rung"], by_ip["203.0.113.2"]["offence"]) == (1, 2)
            assert (by_ip["203.0.113.3"]["rung"], by_ip["203.0.113.3"]["offence"]) == (1, 1)
            rows = {r.ip: (r.rung, r.offence) for r in store.active_blocks()}
            assert rows == {"203.0.113.1": (2, 2), "203.0.113.2": (1, 2), "203.0.113.3": (1, 1)}

    asyncio.run(scenario())


def test_updates_in_a_batch_see_its_earlier_new_blocks(tmp_path: Path) -> None:
    """New blocks are inserted together at the end of a batch; an unblock or escalation of
    one of them in the same batch must still find its row."""
    # Severity escalates at once only with the opt-in (core/policy.py).
    config = Config.model_validate({**UNLIMITED, "policy": {"severity_skips_rungs": True}})

    async def scenario() -> None:
        async with running(tmp_path, config) as (broker, backend, _, store):
            # Queued in this order before the writer runs: one batch.
            outcomes = await asyncio.gather(
                broker.handle(BlockRequest(op="block", ip="203.0.113.20"), WEB),
                broker.handle(UnblockRequest(op="unblock", ip="203.0.113.20"), ROOT),
                broker.handle(BlockRequest(op="block", ip="203.0.113.21"), WEB),
                broker.handle(BlockRequest(op="block", ip="203.0.113.21", severity=2), WEB),
                broker.handle(BlockRequest(op="block", ip="203.0.113.20"), WEB),
            )
            assert len(backend.applies) == 1
            assert [o.get("action") for o in outcomes] == [
                "block",
                None,
                "block",
                "escalate",
                "block",
            ]
            assert outcomes[1]["kind"] == "unblock"
            blocks, hits = store.history("203.0.113.20")
            assert [(b.offence, b.lift_reason) for b in blocks] == [(1, "unblocked"), (2, None)]
            assert [h.block_id for h in hits] == [b.id for b in blocks]
            (escalated,) = store.history("203.0.113.21")[0]
            assert (escalated.rung, escalated.lifted_at) == (2, None)
            assert {r.ip for r in store.active_blocks()} == {"203.0.113.20", "203.0.113.21"}
            assert set(backend.kernel) == {addr("203.0.113.20"), addr("203.0.113.21")}

    asyncio.run(scenario())


def test_a_kernel_refusal_fails_only_its_address(tmp_path: Path) -> None:
    backend = RecordingBackend()
    backend.refuse.add(addr("2001:db8::bad"))
    ips = [f"2001:db8::{i:x}" for i in range(2, 60)] + ["2001:db8::bad"]
    config = Config.model_validate(UNLIMITED)

    async def scenario() -> None:
        async with running(tmp_path, config, backend=backend) as (broker, _, _clock, store):
            result = await block_many(broker, ips)
            failed = [item for item in result["results"] if not item["ok"]]
            assert [(f["ip"], f["error"]["code"]) for f in failed] == [
                ("2001:db8::bad", "internal_error")
            ]
            assert {str(a) for a in backend.kernel} == set(ips[:-1])
            assert {r.ip for r in store.active_blocks()} == set(ips[:-1])
            assert store.history("2001:db8::bad") == ([], [])

    asyncio.run(scenario())


def test_quota_counts_addresses_not_requests(tmp_path: Path) -> None:
    config = Config.model_validate({"quota": {"blocks_per_minute": 5}})
    ips = [f"203.0.113.{i}" for i in range(1, 13)]

    async def scenario() -> None:
        async with running(tmp_path, config) as (broker, backend, _, store):
            result = await block_many(broker, ips)
            codes = [i["error"]["code"] if not i["ok"] else "ok" for i in result["results"]]
            assert codes == ["ok"] * 5 + ["rate_limited"] * 7
            assert len(store.active_blocks()) == 5 and len(backend.kernel) == 5
            # A hit on an address it already blocked is no new block: not limited.
            again = await block_many(broker, ips[:2])
            assert [i["action"] for i in again["results"]] == ["record", "record"]

    asyncio.run(scenario())


def test_roles_and_networks(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (broker, backend, _, _store):
            with pytest.raises(BrokerError) as refused:
                await block_many(broker, ["203.0.113.5"], READER_PEER)
            assert refused.value.code == "forbidden"
            result = await block_many(broker, ["203.0.113.0/24", "203.0.113.5"])
            assert [i["ok"] for i in result["results"]] == [False, True]
            assert result["results"][0]["error"]["code"] == "network_not_allowed"
            assert set(backend.kernel) == {addr("203.0.113.5")}

    asyncio.run(scenario())


def test_protocol_limits_and_text_summary() -> None:
    request, is_json = parse_request(b'{"op":"block_many","ips":["203.0.113.7","2001:db8::7"]}')
    assert isinstance(request, BlockManyRequest) and is_json
    assert request.ips == ["203.0.113.7", "2001:db8::7"]
    for line, message in [
        (b'{"op":"block_many","ips":[]}', "ips: List should have at least 1 item"),
        (b'{"op":"block_many","ips":["203.0.113.7","203.0.113.7"]}', "given twice"),
        (b'{"op":"block_many","ip":"203.0.113.7"}', "ips: Field required"),
        (b'{"op":"block_many","ips":"203.0.113.7"}', "ips: Input should be a valid list"),
        (b'{"op":"block_many","ips":[7]}', "ips.0: Input should be a valid string"),
    ]:
        with pytest.raises(ProtocolError) as refused:
            parse_request(line)
        assert message in refused.value.message, refused.value.message
    too_many = [str(ipaddress.IPv4Address("198.18.0.0") + i) for i in range(MAX_BLOCK_MANY + 1)]
    with pytest.raises(ProtocolError, match="at most 1000 items"):
        parse_request(json.dumps({"op": "block_many", "ips": too_many}).encode())


def test_line_budget_windows() -> None:
    budget = LineBudget(per_second=3)
    assert budget.admit(2, now=100.0) == 2
    assert budget.admit(5, now=100.5) == 1  # 4 held back in this window
    assert budget.held_back(now=100.9) == 0  # the window is still running
    assert budget.held_back(now=101.0) == 4
    assert budget.held_back(now=101.1) == 0  # answered once
    assert budget.admit(1, now=101.2) == 1  # a new window
    assert LineBudget(per_second=0).admit(10_000, now=0.0) == 10_000


def test_a_flood_logs_a_summary_instead_of_every_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config.model_validate({**UNLIMITED, "server": {"log_changes_per_second": 10}})
    ips = [f"2001:db8::{i:x}" for i in range(2, 202)]

    async def scenario() -> None:
        async with running(tmp_path, config) as (broker, _, _clock, store):
            await block_many(broker, ips, source="wave", reason="flood")
            assert len(store.active_blocks()) == 200  # every change is in the state file
            await asyncio.sleep(1.3)  # the expiry loop reports the finished window

    with caplog.at_level("INFO", logger="imr.broker"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "imr.broker"]
    blocked = [line for line in lines if line.startswith("blocked ")]
    assert len(blocked) == 10
    assert blocked[0].startswith("blocked 2001:db8::2 until ")
    assert blocked[0].endswith(
        " rung=1 offence=1 (first offence) by uid=33(www-data) pid=4242 source=wave reason='flood'"
    )
    assert any(line.startswith("190 more changes in the last second") for line in lines), lines


# The real daemon, as an unprivileged user ------------------------------------------------


@pytest.fixture
def world(test_users: None) -> Iterator[Daemon]:
    with _daemon_world() as daemon:
        daemon.write_config()
        result = daemon.start()
        assert result.returncode == 0, result.stderr
        yield daemon


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")
def test_cli_blocks_many_addresses_as_the_web_user(world: Daemon) -> None:
    listed = world.root / "wave.txt"  # the web user can read it there
    wave = [f"203.0.113.{i}" for i in range(100, 200)]
    listed.write_text("".join(f"{ip} seen 3 times\n" for ip in wave))
    listed.chmod(0o644)

    result = world.as_user(
        BLOCKER,
        "block",
        ATTACKER_V4,
        ATTACKER_V6,
        "127.0.0.1",
        SERVER_V4,
        "--from-file",
        str(listed),
    )
    assert result.returncode == 1, result.stderr  # some were refused
    assert "Traceback" not in result.stderr
    assert f"blocked {ATTACKER_V4} until" in result.stdout
    assert "refused 127.0.0.1: 127.0.0.1 is a loopback address [loopback_address]" in result.stdout
    assert f"refused {SERVER_V4}:" in result.stdout and "[own_address]" in result.stdout
    # The default quota (60 new blocks a minute) counts addresses, not requests.
    wanted = [ATTACKER_V4, *wave[:58]]
    assert result.stdout.count("[rate_limited]") == 42
    assert f"refused {wave[58]}:" in result.stdout
    rules = world.rules(4)
    assert all(f"-s {ip}/32" in rules for ip in wanted)
    assert not any(f"-s {ip}/32" in rules for ip in wave[58:])
    assert "127.0.0.1" not in rules and f"-s {SERVER_V4}/" not in rules
    assert f"-s {ATTACKER_V6}/128" in world.rules(6)
    rows = world.state_rows("SELECT ip FROM blocks WHERE lifted_at IS NULL")
    assert {row[0] for row in rows} == {*wanted, ATTACKER_V6}

    reader = world.as_user(READER, "block", "203.0.113.250", "203.0.113.251", "--json")
    assert reader.returncode == 1 and "not allowed to block_many" in reader.stderr
    assert world.state_rows("SELECT COUNT(*) FROM blocks WHERE ip LIKE '203.0.113.25_'") == [(0,)]


def test_refusals_are_logged_once_per_client_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [f"203.0.113.{i}.{i}" for i in range(300)] + ["127.0.0.1", "::1"]

    async def scenario() -> None:
        async with running(tmp_path) as (broker, _, _clock, _store):
            result = await block_many(broker, bad)
            assert result["counts"]["refused"] == 302

    with caplog.at_level("WARNING", logger="imr.broker"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(lines) == 2, lines  # one invalid_address line, one loopback_address line
    assert lines[0].startswith("refused block_many '203.0.113.0.0' by uid=33(www-data)")
