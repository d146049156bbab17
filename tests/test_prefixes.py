"""The escalation decision of imr.core.prefixes, without a clock or a network (issue #16)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import pytest

from imr.core.addresses import IPAddress, IPNetwork
from imr.core.policy import Action, Ladder, PreviousBlock, decide
from imr.core.prefixes import (
    Coverage,
    Escalation,
    Guard,
    Level,
    PrefixIndex,
    UnitMemory,
    make_guard,
    offence_unit,
    unit_previous,
)

V6_64 = Level(6, 64, 128, 3, 3600)
V4_24 = Level(4, 24, 32, 8, 3600)
V6_48 = Level(6, 48, 64, 4, 3600)
CAP = {4: 16, 6: 32}


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def guard_with(
    allow: Sequence[str] = (),
    never: Sequence[str] = (),
    own: Sequence[str] = (),
    cap: dict[int, int] = CAP,
) -> Guard:
    return make_guard(
        cap,
        frozenset(ip(a) for a in own),
        frozenset(),
        [net(a) for a in allow],
        [net(a) for a in never],
    )


def nothing_blocked(network: IPNetwork) -> bool:
    return False


def feed(
    index: PrefixIndex,
    addresses: list[str],
    start: float = 0.0,
    step: float = 1.0,
    **kw: Any,
) -> list[Escalation]:
    guard = guard_with(**kw)
    found: list[Escalation] = []
    for n, a in enumerate(addresses):
        made = index.observe(ip(a), start + n * step, guard, nothing_blocked)
        for escalation in made:  # committed at once
            index.forget(escalation)
        found += made
    return found


def test_three_addresses_of_one_64_escalate_on_the_third() -> None:
    index = PrefixIndex([V6_64, V4_24])
    assert feed(index, ["2001:db8::1", "2001:db8::2"]) == []
    found = feed(index, ["2001:db8::3"], start=10)
    assert [e.network for e in found] == [net("2001:db8::/64")]
    assert found[0].members == ("2001:db8::1", "2001:db8::2", "2001:db8::3")
    assert "3 blocked addresses of 2001:db8::/64 within 60 min" in found[0].describe()


def test_the_same_address_twice_counts_once() -> None:
    index = PrefixIndex([V6_64])
    assert feed(index, ["2001:db8::1", "2001:db8::1", "2001:db8::2", "2001:db8::2"]) == []


def test_ipv4_needs_eight_of_one_24_and_neighbours_do_not_add_up() -> None:
    index = PrefixIndex([V6_64, V4_24])
    assert feed(index, [f"192.0.2.{n}" for n in range(1, 8)]) == []
    assert feed(index, [f"198.51.100.{n}" for n in range(1, 8)]) == []
    found = feed(index, ["192.0.2.200"], start=20)
    assert [e.network for e in found] == [net("192.0.2.0/24")]
    assert len(found[0].members) == 8


def test_blocks_outside_the_window_do_not_count() -> None:
    index = PrefixIndex([V6_64])
    # One every 40 minutes: never three within the hour.
    assert feed(index, [f"2001:db8::{n}" for n in range(1, 10)], step=2400) == []
    # Then three within the hour do.
    found = feed(index, ["2001:db8::a", "2001:db8::b"], start=9 * 2400, step=60)
    assert [e.network for e in found] == [net("2001:db8::/64")]


def test_an_allowlisted_address_inside_prevents_the_escalation() -> None:
    index = PrefixIndex([V6_64, V4_24])
    allow = ["2001:db8::99/128", "192.0.2.250/32"]
    assert feed(index, [f"2001:db8::{n}" for n in range(1, 6)], allow=allow) == []
    assert feed(index, [f"192.0.2.{n}" for n in range(1, 20)], allow=allow) == []
    # An own address inside a /24 prevents it too.
    other = [f"198.51.100.{n}" for n in range(1, 20)]
    assert feed(index, other, own=["198.51.100.77"]) == []


def test_the_never_aggregate_list_prevents_the_escalation() -> None:
    index = PrefixIndex([V4_24, V6_64])
    # A CGNAT-like range wider than the /24, and one narrower inside a /64.
    never = ["192.0.0.0/16", "2001:db8:0:1:8000::/65"]
    assert feed(index, [f"192.0.2.{n}" for n in range(1, 30)], never=never) == []
    assert feed(index, [f"2001:db8:0:1::{n}" for n in range(1, 9)], never=never) == []
    # A /64 next to it still escalates.
    found = feed(index, [f"2001:db8:0:2::{n}" for n in range(1, 4)], never=never)
    assert [e.network for e in found] == [net("2001:db8:0:2::/64")]


def test_the_cap_refuses_a_level_wider_than_network_min_prefix() -> None:
    wide = Level(4, 12, 24, 2, 3600)  # opt-in, but wider than the default cap /16
    index = PrefixIndex([wide])
    assert feed(index, ["192.0.2.1", "192.0.3.1", "192.0.4.1"]) == []
    found = feed(index, ["192.0.5.1", "192.0.6.1"], cap={4: 8, 6: 32}, start=10)
    assert [e.network for e in found] == [net("192.0.0.0/12")]


def test_rotation_across_64s_of_one_48_is_counted_per_64() -> None:
    index = PrefixIndex([V6_64, V6_48])
    # Many addresses in one /64: that /64 escalates, it counts once for the /48.
    found = feed(index, ["2001:db8:1:1::1", "2001:db8:1:1::2", "2001:db8:1:1::3"])
    assert [e.network for e in found] == [net("2001:db8:1:1::/64")]
    # One address in each of three more /64s of the /48: the fourth /64 makes the /48.
    found = feed(index, ["2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:1:4::1"], start=5)
    assert [e.network for e in found] == [net("2001:db8:1::/48")]
    assert found[0].members[0] == "2001:db8:1:1::/64"
    assert found[0].addresses == (
        "2001:db8:1:1::3",
        "2001:db8:1:2::1",
        "2001:db8:1:3::1",
        "2001:db8:1:4::1",
    )
    assert "4 blocked networks of 2001:db8:1::/48" in found[0].describe()


def test_an_already_blocked_prefix_does_not_escalate_again() -> None:
    index = PrefixIndex([V6_64])
    guard = guard_with()
    blocked = {net("2001:db8::/64")}
    for n in range(1, 6):
        assert index.observe(ip(f"2001:db8::{n}"), n, guard, blocked.__contains__) == []


def test_an_escalation_not_committed_keeps_its_count() -> None:
    index = PrefixIndex([V6_64])
    guard = guard_with()
    for n in (1, 2):
        index.observe(ip(f"2001:db8::{n}"), n, guard, nothing_blocked)
    (first,) = index.observe(ip("2001:db8::3"), 3, guard, nothing_blocked)
    # The batch failed (not forgotten): tried again, the same block escalates again.
    (again,) = index.observe(ip("2001:db8::3"), 3, guard, nothing_blocked)
    assert again == first
    index.forget(again)
    assert index.observe(ip("2001:db8::4"), 4, guard, nothing_blocked) == []


def test_an_escalation_starts_a_new_count() -> None:
    index = PrefixIndex([V6_64])
    assert len(feed(index, ["2001:db8::1", "2001:db8::2", "2001:db8::3"])) == 1
    assert feed(index, ["2001:db8::4", "2001:db8::5"], start=10) == []
    assert len(feed(index, ["2001:db8::6"], start=20)) == 1


def test_a_pardon_forgets_the_members() -> None:
    index = PrefixIndex([V6_64, V6_48])
    feed(index, ["2001:db8:1:1::1", "2001:db8:1:1::2", "2001:db8:1:2::1"])
    index.pardon(net("2001:db8:1::/48"))  # forgets the /48 and the /64s inside it
    assert len(index) == 0
    # Two more are not enough after the pardon: the count starts again.
    assert feed(index, ["2001:db8:1:1::3", "2001:db8:1:1::4"], start=10) == []
    index.pardon(net("2001:db8:1:1::/64"))
    assert feed(index, ["2001:db8:1:1::5", "2001:db8:1:1::6"], start=20) == []


def test_a_guarded_prefix_escalates_once_the_guard_is_gone() -> None:
    index = PrefixIndex([V6_64])
    allow = ["2001:db8::99/128"]
    assert feed(index, ["2001:db8::1", "2001:db8::2", "2001:db8::3"], allow=allow) == []
    assert [e.network for e in feed(index, ["2001:db8::4"], start=5)] == [net("2001:db8::/64")]


def test_refusal_names_the_guarded_prefixes() -> None:
    index = PrefixIndex([V6_64, V4_24])
    found = index.refusal(ip("2001:db8::5"), guard_with(allow=["2001:db8::99/128"]))
    assert found[0][0] == net("2001:db8::/64") and "allowlist" in found[0][1]


def test_the_index_stays_bounded() -> None:
    index = PrefixIndex([V4_24])
    for n in range(1, 200):  # 199 addresses of one /24 that the guard refuses
        index.observe(ip(f"192.0.2.{n}"), n, guard_with(never=["192.0.2.0/24"]), nothing_blocked)
    members = next(iter(index._prefixes.values())).seen
    assert len(members) == V4_24.count
    index.sweep(10_000)
    assert len(index) == 0


def test_levels_are_checked() -> None:
    with pytest.raises(ValueError):
        Level(6, 64, 64, 3, 60)
    with pytest.raises(ValueError):
        Level(4, 24, 32, 1, 60)
    with pytest.raises(ValueError):
        Level(5, 24, 32, 3, 60)


# --- The offence unit ---

LADDER = Ladder((86400, 7 * 86400), 30 * 86400, 3600)


def test_offence_unit_is_the_64_of_an_ipv6_address_only() -> None:
    assert offence_unit(ip("2001:db8::1"), 64) == offence_unit(ip("2001:db8::ffff:1"), 64)
    assert offence_unit(ip("2001:db8::1"), 64) != offence_unit(ip("2001:db8:0:1::1"), 64)
    assert offence_unit(ip("2001:db8::1"), 128) is None
    assert offence_unit(ip("192.0.2.1"), 64) is None


def test_a_new_address_of_an_offending_unit_is_a_repeat() -> None:
    memory = UnitMemory()
    unit = offence_unit(ip("2001:db8::1"), 64)
    assert unit is not None
    first = decide(LADDER, unit_previous(None, memory.get(unit), 0), 0)
    assert first.rung == 1
    memory.remember(unit, PreviousBlock(0, first.rung, first.expires_at, None), 0, 86400)
    # The first block is still in force: for the new address it is a repeat, not a hit.
    second = decide(LADDER, unit_previous(None, memory.get(unit), 100), 100)
    assert (second.action, second.rung) == (Action.BLOCK, 2)
    assert "repeat" in second.why


def test_unit_previous_keeps_the_more_recent_block() -> None:
    own = PreviousBlock(0, 2, 10, 5)
    older = PreviousBlock(0, 1, 3, 3)
    assert unit_previous(own, older, 100) is own
    assert unit_previous(own, None, 100) is own
    newer = PreviousBlock(50, 1, 200, None)
    chosen = unit_previous(own, newer, 100)
    assert chosen is not None and chosen.ended_at == 100


def test_unit_memory_forgets_after_the_repeat_window() -> None:
    memory = UnitMemory()
    memory.remember(1, PreviousBlock(0, 1, 10, None), 0, 50)
    memory.remember(1, PreviousBlock(-5, 1, 4, None), 0, 50)  # older: ignored
    assert memory.get(1) == PreviousBlock(0, 1, 10, None)
    memory.sweep(100, 50)
    assert memory.get(1) is None


# --- Coverage ---


def test_coverage_finds_the_covering_network() -> None:
    coverage = Coverage()
    assert not coverage
    coverage.add(net("2001:db8::/64"))
    coverage.add(net("192.0.2.0/24"))
    coverage.add(net("2001:db8:5::/48"))
    assert coverage.covering(ip("2001:db8::7")) == net("2001:db8::/64")
    assert coverage.covering(ip("2001:db8:5:9::1")) == net("2001:db8:5::/48")
    assert coverage.covering(ip("192.0.2.9")) == net("192.0.2.0/24")
    assert coverage.covering(ip("192.0.3.9")) is None
    assert coverage.covering(ip("::c000:209")) is None  # 192.0.2.9's value, but IPv6
    assert coverage.inside(net("2001:db8::/48")) == [net("2001:db8::/64")]
    assert len(coverage.inside(net("2001:db8::/32"))) == 2
    assert coverage.inside(net("2001:db8:6::/48")) == []
    assert coverage.inside(net("2001:db8::/64")) == []  # the same network is not inside
    coverage.remove(net("192.0.2.0/24"))
    assert coverage.covering(ip("192.0.2.9")) is None
