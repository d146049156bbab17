"""Start-up reads the state file's addresses cheaply; these tests pin that it reads them right.

`stored_target` takes canonical text on a check in C (inet_pton/inet_ntop) instead of a full
parse; it must give exactly what the full parse gives, and refuse what the full parse refuses.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from imr.backends.base import KernelBlock
from imr.config import Config
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
