"""The nftables backend's element path as raw nfnetlink elements: apply()'s address
changes as batch steps for nfnetlink.ElementWriter, and replace_all()'s full sets for
nfnetlink.replace_elements. This is the daemon's hot path (docs/performance.md, the "Speed
round two" sections): keys are packed addresses, and the common case is spelled out
inline. The element text of the nft script path is in imr/backends/nftables_script.py.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Mapping, Sequence

from imr.backends import nfnetlink
from imr.backends.base import KernelBlock, Slot, slot_of, slot_of_text
from imr.backends.nftables_script import MARKERS, MAX_TIMEOUT, NETWORK_SLOTS, SETS


def _timeout_ms(expires_at: float, now: float) -> int | None:
    """A netlink element's timeout: the remaining time in whole seconds rounded up, as
    `element_text` writes it; None (no timeout) beyond what the kernel can hold."""
    remaining = math.ceil(expires_at - now)
    return remaining * 1000 if remaining <= MAX_TIMEOUT else None


def packed_steps(
    adding: Mapping[bytes, KernelBlock], removing: Sequence[bytes], now: float
) -> list[nfnetlink.Step]:
    """apply()'s change to the address sets as netlink batch steps, the same as its script:
    per set, every touched address added (a no-op if present) and deleted (so the delete
    is always valid: deleting an absent element aborts the whole transaction), then each
    new one added with its remaining time as the timeout (an escalation's new timeout).
    A fresh block (never blocked here) is only added: a third of the kernel's work. Keys
    are packed addresses: 4 bytes for IPv4, 16 for IPv6."""
    touched: dict[int, list[bytes]] = {4: [], 16: []}
    timed: dict[int, list[bytes]] = {4: [], 16: []}
    for key in removing:
        touched[len(key)].append(nfnetlink.address_element(key, None))
    for key, block in adding.items():
        if not block.fresh:
            touched[len(key)].append(nfnetlink.address_element(key, None))
        timed[len(key)].append(nfnetlink.address_element(key, _timeout_ms(block.expires_at, now)))
    steps: list[nfnetlink.Step] = []
    for size, set_name in ((4, SETS["v4"]), (16, SETS["v6"])):
        if touched[size]:
            steps.append((nfnetlink.ADD, set_name, touched[size]))
            steps.append((nfnetlink.DELETE, set_name, touched[size]))
        if timed[size]:
            steps.append((nfnetlink.ADD, set_name, timed[size]))
    return steps


def encoded_sets(latest: Mapping[str, float], now: float) -> dict[str, list[bytes]]:
    """Every set's elements for `nfnetlink.replace_elements`, markers included: each
    target (canonical text) with its remaining time as the timeout, as `element_text` writes it.
    OSError or ValueError for a text that is not an address or network."""
    found: dict[Slot, list[bytes]] = {slot: [] for slot in SETS}
    intervals: dict[Slot, list[tuple[bytes, bytes | None, int | None]]] = {
        slot: [] for slot in NETWORK_SLOTS
    }
    v4, v6 = found["v4"], found["v6"]
    # The common case spelled out (100,000 addresses: a call per element doubles the time).
    head4, head6 = nfnetlink.element_head(4), nfnetlink.element_head(16)
    timeout_head = nfnetlink.TIMEOUT_HEAD
    pton, ceil = socket.inet_pton, math.ceil
    for text, expires_at in latest.items():
        remaining = ceil(expires_at - now)
        if remaining <= MAX_TIMEOUT and "/" not in text:
            ms = (remaining * 1000).to_bytes(8, "big")
            if ":" in text:
                v6.append(head6 + pton(socket.AF_INET6, text) + timeout_head + ms)
            else:
                v4.append(head4 + pton(socket.AF_INET, text) + timeout_head + ms)
            continue
        timeout = _timeout_ms(expires_at, now)
        if "/" not in text:
            family = socket.AF_INET6 if ":" in text else socket.AF_INET
            found[slot_of_text(text)].append(nfnetlink.address_element(pton(family, text), timeout))
            continue
        network = ipaddress.ip_network(text)  # admin blocks: a few
        after = int(network.broadcast_address) + 1
        end = (
            after.to_bytes(len(network.network_address.packed), "big")
            if after < (1 << network.max_prefixlen)
            else None
        )
        intervals[slot_of(network)].append((network.network_address.packed, end, timeout))
    for slot, marker in MARKERS.items():
        found[slot].append(nfnetlink.address_element(marker.packed, None))
    for slot, spans in intervals.items():
        found[slot] = nfnetlink.interval_elements(sorted(spans))
    return {SETS[slot]: found[slot] for slot in SETS}
