"""Start-up reads the state file's addresses cheaply; these tests pin that it reads them right.

`stored_target` takes canonical text on a check in C (inet_pton/inet_ntop) instead of a full
parse; it must give exactly what the full parse gives, and refuse what the full parse refuses.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from imr.backends.base import BackendError, KernelBlock
from imr.config import Config
from imr.core.addresses import (
    IPNetwork,
    Refusal,
    intrinsic_refusal,
    network_refusal,
    protection_refusal,
)
from imr.server.broker import Broker, stored_address, stored_target
from imr.store import Store

from fakes import FakeClock, FixedAddresses, RecordingBackend


def _v6_with_zero_runs() -> list[str]:
    """Every pattern of zero and non-zero groups: where `::` goes is the tricky part."""
    texts = []
    for pattern in itertools.product((0, 1), repeat=8):
        groups = [0x2001 if i == 0 and bit else (0xDB8 + i) * bit for i, bit in enumerate(pattern)]
        value = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
        texts.append(str(ipaddress.IPv6Address(value)))
    return texts


def _random_texts(count: int) -> list[str]:
    rng = random.Random(7)  # noqa: S311 - test data, repeatable
    texts = []
    for _ in range(count):
        texts.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        # Sparse groups, so that zero runs of every length turn up.
        groups = [rng.choice((0, 0, rng.getrandbits(16), rng.getrandbits(4))) for _ in range(8)]
        texts.append(str(ipaddress.IPv6Address(sum(g << (16 * i) for i, g in enumerate(groups)))))
    return texts


NOT_CANONICAL = [
    "2001:db8:0:0::1",  # what bench/_common.v6_address writes
    "2001:DB8::1",
    "2001:0db8::1",
    "2001:db8:0:0:0:0:0:1",
    "::ffff:192.0.2.7",  # IPv4-mapped: becomes the IPv4 address
    "::ffff:c000:207",
    "::192.0.2.7",  # IPv4-compatible (deprecated): C and Python print it differently
    "::c000:207",
    "203.0.113.0/24",
    "2001:db8::/48",
    "2001:db8::7/128",
    "192.0.2.7/32",
]


def test_fast_read_gives_what_the_full_parse_gives() -> None:
    for text in _v6_with_zero_runs() + _random_texts(2000) + NOT_CANONICAL:
        target = stored_address(text)
        assert stored_target(text) == (target, str(target)), text
        assert type(stored_target(text)[0]) is type(target), text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "203.0.113.7 } ; flush ruleset ; add element inet imr blocked_v4 { 192.0.2.9",
        "2001:db8::1 timeout 1s",
        "2001:db8::1\n",
        " 203.0.113.7",
        "203.0.113.7\x00",
        "01.2.3.4",
        "1.2.3",
        "fe80::1%eth0",
        "2001:db8::1::2",
        "example.org",
        "203.0.113.0/33",
    ],
)
def test_fast_read_refuses_what_the_full_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        stored_address(text)
    with pytest.raises(ValueError):
        stored_target(text)


def test_a_kernel_block_without_text_gets_the_canonical_text() -> None:
    assert KernelBlock(ipaddress.ip_address("2001:0db8::0:7"), 1.0).text == "2001:db8::7"


class _TextRecording(RecordingBackend):
    """Also keeps the text each restored block reaches the backend with."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        self.texts = sorted(b.text for b in blocks)
        super().replace_all(blocks)


def _seed(path: Path, rows: list[tuple[str, int]], expires_at: float) -> None:
    store = Store(path)
    with store.transaction():
        for ip, uid in rows:
            store.insert_block(ip, expires_at - 86400, expires_at, 1, "scan", "test", uid, 99)
    store.close()


def _reconciled(tmp_path: Path, backend: RecordingBackend) -> Broker:
    store = Store(tmp_path / "state.db")
    broker = Broker(
        Config.model_validate({"protect": {"allowlist": ["198.51.100.0/24"]}}),
        store,
        backend,
        FakeClock(),
        FixedAddresses("192.0.2.1", "2001:db8::1"),
    )
    broker.reconcile()
    return broker


def test_restore_puts_canonical_text_in_the_kernel_and_lifts_protected_rows(
    tmp_path: Path,
) -> None:
    far = FakeClock().now() + 86400
    rows = [("2001:db8::7", 100000), ("2001:DB8:0:0::8", 100000), ("203.0.113.7", 100001)]
    rows += [("2001:db8::1", 100000), ("198.51.100.9", 100000)]  # own address, allowlist
    _seed(tmp_path / "state.db", rows, far)
    backend = _TextRecording()
    broker = _reconciled(tmp_path, backend)
    assert backend.texts == ["2001:db8::7", "2001:db8::8", "203.0.113.7"]
    assert set(backend.kernel) == {ipaddress.ip_address(text) for text in backend.texts}
    assert broker.status()["active_blocks"] == 3
    assert not backend.applies  # one replace_all, no per-block applies
    store = Store(tmp_path / "state.db")
    try:
        lifted = {ip for ip, _ in rows} - {r.ip for r in store.active_blocks()}
        assert lifted == {"2001:db8::1", "198.51.100.9"}
        records = store.active_blocks()
        # One int object per uid, not one per row (the daemon keeps 100,000 of these).
        by_uid = [r.uid for r in records if r.uid == 100000]
        assert len(by_uid) == 2 and by_uid[0] is by_uid[1]
    finally:
        store.close()


def test_a_hostile_row_stops_the_restore_before_the_kernel_is_touched(tmp_path: Path) -> None:
    far = FakeClock().now() + 86400
    _seed(tmp_path / "state.db", [("203.0.113.7", 0), ("203.0.113.8 } flush ruleset", 0)], far)
    backend = RecordingBackend()
    backend.kernel = {ipaddress.ip_address("203.0.113.250"): far}
    with pytest.raises(ValueError, match="invalid address"):
        _reconciled(tmp_path, backend)
    assert backend.kernel == {ipaddress.ip_address("203.0.113.250"): far}


# Start-up decides nearly every row on its packed bytes (ProtectionIndex) and the rest with
# the full checks; the outcome must be what the full checks alone decide, row by row.
PROTECT = {"allowlist": ["198.51.100.0/24", "203.0.113.64/26", "2001:db8:1::/48"]}
OWN = ("192.0.2.1", "2001:db8::1")
BROADCAST = ("192.0.2.255",)

CHOSEN_ROWS = [
    "127.0.0.1",
    "::1",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "169.254.3.4",
    "fe80::1",
    "255.255.255.255",
    "192.0.2.1",  # own
    "2001:db8::1",
    "192.0.2.255",  # broadcast
    "198.51.100.0",  # allowlist edges, in and out
    "198.51.100.255",
    "198.51.99.255",
    "198.51.101.0",
    "203.0.113.63",
    "203.0.113.64",
    "203.0.113.127",
    "203.0.113.128",
    "2001:db8:1::",
    "2001:db8:1:ffff:ffff:ffff:ffff:ffff",
    "2001:db8:2::",
    "::ffff:192.0.2.1",  # IPv4-mapped own address: not canonical, the full path folds it
    "::ffff:203.0.113.9",
    "2001:DB8::7",  # not canonical
    "203.0.113.0/28",  # networks: the full path
    "198.51.100.0/25",  # inside the allowlist
    "192.0.2.0/30",  # holds an own address
    "2001:db8:5::/48",
    "10.0.0.0/8",  # too wide
]


def _rows_to_restore() -> list[str]:
    rng = random.Random(5)  # noqa: S311 - test data, repeatable
    rows = dict.fromkeys(CHOSEN_ROWS)
    for _ in range(1500):
        rows[str(ipaddress.IPv4Address(rng.getrandbits(32)))] = None
        rows[str(ipaddress.IPv6Address(rng.getrandbits(128)))] = None
        rows[str(ipaddress.IPv6Address((0x2001_0DB8 << 96) + rng.getrandbits(96)))] = None
        # Inside the allowlisted /48 or next to it.
        rows[str(ipaddress.IPv6Address((0x2001_0DB8_0001 << 80) + rng.getrandbits(81)))] = None
        rows[str(ipaddress.IPv4Address((198 << 24) + (51 << 16) + rng.getrandbits(10)))] = None
    return list(rows)


def _full_check(text: str, config: Config, local: FixedAddresses) -> Refusal | None:
    target = stored_address(text)
    allow = config.protect.allowlist
    if isinstance(target, ipaddress.IPv4Network | ipaddress.IPv6Network):
        limits = config.protect.network_min_prefix
        return network_refusal(target, limits, local.own, local.broadcast, allow)
    return intrinsic_refusal(target) or protection_refusal(
        target, local.own, local.broadcast, allow
    )


def test_restore_decides_every_row_as_the_full_checks_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    rows = _rows_to_restore()
    # Every fifth row expired while the daemon was down (protected ones among them).
    due = {ip: clock.now() + (-60 if i % 5 == 0 else 3600 + i) for i, ip in enumerate(rows)}
    store = Store(tmp_path / "state.db")
    with store.transaction():
        for ip in rows:
            store.insert_block(ip, clock.now() - 7200, due[ip], 1, "scan", "test", 100000, 99)
    config = Config.model_validate({"protect": PROTECT})
    local = FixedAddresses(*OWN, broadcast=BROADCAST)
    backend = _TextRecording()
    broker = Broker(config, store, backend, clock, local)
    with caplog.at_level(logging.INFO, logger="imr.broker"):
        broker.reconcile()

    expected: dict[str, str | None] = {}
    messages = set()
    for ip in rows:
        refusal = _full_check(ip, config, local)
        if due[ip] <= clock.now():
            expected[ip] = "expired"
        elif refusal is not None:
            expected[ip] = "protected"
            messages.add(f"lifted {ip} at start: {refusal.message}")
        else:
            expected[ip] = None
    lifted = {ip: store.history(ip)[0][-1].lift_reason for ip in rows}
    store.close()
    assert lifted == expected
    kept = [ip for ip in rows if expected[ip] is None]
    protected = [ip for ip in rows if expected[ip] == "protected"]
    assert len(kept) > 4000 and len(protected) > 500  # both paths are exercised
    assert messages <= {r.getMessage() for r in caplog.records}
    # An address under a kept network block has no kernel entry of its own (issue #16).
    kept_targets = {stored_address(ip): due[ip] for ip in kept}
    networks = [t for t in kept_targets if isinstance(t, IPNetwork)]
    targets = {
        t: at
        for t, at in kept_targets.items()
        if isinstance(t, IPNetwork) or not any(t.version == n.version and t in n for n in networks)
    }
    assert backend.kernel == targets
    assert backend.texts == sorted(str(t) for t in targets)
    for block_address in backend.kernel:  # the fast path builds the same objects
        assert type(block_address) is type(stored_address(str(block_address)))
    assert broker.status()["active_blocks"] == len(kept)


class _FailingBackend(RecordingBackend):
    """A kernel load that fails in prepare or in replace_all."""

    def __init__(self, error: Exception, where: str) -> None:
        super().__init__()
        self.error, self.where = error, where

    def prepare(self) -> None:
        if self.where == "prepare":
            raise self.error
        super().prepare()

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        if self.where == "replace_all":
            raise self.error
        super().replace_all(blocks)


@pytest.mark.parametrize("where", ["prepare", "replace_all"])
def test_a_failed_kernel_load_raises_from_reconcile_and_nothing_is_published(
    tmp_path: Path, where: str
) -> None:
    far = FakeClock().now() + 86400
    _seed(tmp_path / "state.db", [("2001:db8::7", 100000), ("203.0.113.7", 100000)], far)
    error = BackendError("the kernel said no")
    backend = _FailingBackend(error, where)
    store = Store(tmp_path / "state.db")
    broker = Broker(Config.model_validate({}), store, backend, FakeClock(), FixedAddresses(*OWN))
    with pytest.raises(BackendError) as raised:
        broker.reconcile()
    assert raised.value is error
    assert broker.status()["active_blocks"] == 0
    assert not backend.kernel
    assert len(store.active_blocks()) == 2  # nothing lifted: the next start tries again
    store.close()
