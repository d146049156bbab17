"""The ladder: 1 day, 7 days for repeat offenders, custom ladders, escalation in place."""

from __future__ import annotations

import pytest

from imr.core.policy import Action, Ladder, PreviousBlock, decide

DAY = 86400
DEFAULT = Ladder(steps=(DAY, 7 * DAY), repeat_window=30 * DAY, escalate_after=3600)
T0 = 1_700_000_000.0


def test_first_offence_is_one_day() -> None:
    decision = decide(DEFAULT, None, T0)
    assert decision.action is Action.BLOCK
    assert decision.rung == 1
    assert decision.expires_at == T0 + DAY


def test_repeat_within_window_is_seven_days() -> None:
    first = decide(DEFAULT, None, T0)
    previous = PreviousBlock(T0, first.rung, first.expires_at, lifted_at=T0 + DAY)
    again = T0 + DAY + 10 * DAY  # ten days after the first block ended
    decision = decide(DEFAULT, previous, again)
    assert (decision.action, decision.rung) == (Action.BLOCK, 2)
    assert decision.expires_at == again + 7 * DAY


def test_repeat_outside_window_starts_over() -> None:
    previous = PreviousBlock(T0, 2, T0 + 7 * DAY, lifted_at=T0 + 7 * DAY)
    later = T0 + 7 * DAY + 31 * DAY
    decision = decide(DEFAULT, previous, later)
    assert (decision.rung, decision.expires_at) == (1, later + DAY)


def test_top_rung_is_kept_for_further_repeats() -> None:
    previous = PreviousBlock(T0, 2, T0 + 7 * DAY, lifted_at=T0 + 7 * DAY)
    decision = decide(DEFAULT, previous, T0 + 8 * DAY)
    assert decision.rung == 2
    assert decision.expires_at == T0 + 8 * DAY + 7 * DAY


def test_custom_ladder_climbs_every_rung() -> None:
    ladder = Ladder(
        steps=(3600, DAY, 7 * DAY, 30 * DAY), repeat_window=90 * DAY, escalate_after=3600
    )
    now, previous, rungs = T0, None, []
    for _ in range(5):
        decision = decide(ladder, previous, now)
        rungs.append((decision.rung, decision.expires_at - now))
        previous = PreviousBlock(now, decision.rung, decision.expires_at, None)
        now = decision.expires_at + 60  # comes back a minute after release
    assert rungs == [(1, 3600), (2, DAY), (3, 7 * DAY), (4, 30 * DAY), (4, 30 * DAY)]


def test_severity_starts_higher_and_is_clamped() -> None:
    assert decide(DEFAULT, None, T0, severity=2).rung == 2
    decision = decide(DEFAULT, None, T0, severity=9)
    assert (decision.rung, decision.expires_at) == (2, T0 + 7 * DAY)


def test_hit_on_active_block_is_recorded_without_change() -> None:
    active = PreviousBlock(T0, 1, T0 + DAY, None)
    decision = decide(DEFAULT, active, T0 + 60)
    assert decision.action is Action.RECORD
    assert (decision.rung, decision.expires_at) == (1, T0 + DAY)


def test_attacker_still_coming_after_escalate_after_goes_up_a_rung() -> None:
    active = PreviousBlock(T0, 1, T0 + DAY, None)
    now = T0 + 2 * 3600
    decision = decide(DEFAULT, active, now)
    assert decision.action is Action.ESCALATE
    assert (decision.rung, decision.expires_at) == (2, now + 7 * DAY)


def test_higher_severity_on_active_block_escalates_at_once() -> None:
    active = PreviousBlock(T0, 1, T0 + DAY, None)
    decision = decide(DEFAULT, active, T0 + 5, severity=2)
    assert (decision.action, decision.rung) == (Action.ESCALATE, 2)


def test_expired_but_not_yet_lifted_block_is_a_repeat() -> None:
    due = PreviousBlock(T0, 1, T0 + DAY, None)
    decision = decide(DEFAULT, due, T0 + DAY + 1)
    assert (decision.action, decision.rung) == (Action.BLOCK, 2)


def test_ladder_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        Ladder(steps=(), repeat_window=1, escalate_after=1)
