"""The ladder: 1 day, 7 days for repeat offenders, custom ladders, escalation in place.

The clock is injected: every decision takes `now` from the test, so days pass at once.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from imr.cli import main
from imr.core.policy import Action, Ladder, PreviousBlock, decide

DAY = 86400
DEFAULT = Ladder(steps=(DAY, 7 * DAY), repeat_window=30 * DAY, escalate_after=3600)
# The ladder docs/operations.md shows as an example of a longer one.
FOUR = Ladder(steps=(3600, DAY, 7 * DAY, 30 * DAY), repeat_window=90 * DAY, escalate_after=3600)
T0 = 1_700_000_000.0
# What reporters send beyond imr-hook's 1 (test above): a fail2ban filter 5, the built-in
# signatures 3 to 8 (code-red 8), `imr block --severity` up to 10.
REPORTER_SEVERITIES = range(2, 11)


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


@pytest.mark.parametrize("ladder", [DEFAULT, FOUR], ids=["1d-7d", "1h-1d-7d-30d"])
@pytest.mark.parametrize("severity", REPORTER_SEVERITIES)
def test_first_offence_is_rung_one_whatever_the_severity(ladder: Ladder, severity: int) -> None:
    decision = decide(ladder, None, T0, severity=severity)
    assert (decision.action, decision.rung) == (Action.BLOCK, 1)
    assert decision.expires_at == T0 + ladder.steps[0]
    if severity > 1:
        assert decision.why == f"first offence; severity {severity} does not skip rungs"


@pytest.mark.parametrize("first, second", [(1, 8), (8, 1), (8, 8), (5, 10)])
def test_two_reporters_30s_apart_are_one_incident(first: int, second: int) -> None:
    """The ModSecurity hook (severity 1), then the scanner reading the same requests (8)."""
    block = decide(FOUR, None, T0, severity=first)
    active = PreviousBlock(T0, block.rung, block.expires_at, None)
    again = decide(FOUR, active, T0 + 30, severity=second)
    assert (again.action, again.rung, again.expires_at) == (Action.RECORD, 1, T0 + 3600)
    assert again.why == "same incident, counted once"


def test_severity_does_not_speed_up_escalation_in_place() -> None:
    active = PreviousBlock(T0, 1, T0 + 3600, None)
    decision = decide(FOUR, active, T0 + 3000, severity=10)
    assert decision.action is Action.RECORD
    later = decide(FOUR, active, T0 + 3599, severity=10)  # not yet escalate_after
    assert later.action is Action.RECORD
    still = decide(FOUR, PreviousBlock(T0, 1, T0 + DAY, None), T0 + 3600, severity=10)
    assert (still.action, still.rung) == (Action.ESCALATE, 2)  # one rung, not to the top


def test_real_repeat_after_the_block_ended_is_rung_two_whatever_the_severity() -> None:
    first = decide(FOUR, None, T0, severity=8)
    ended = PreviousBlock(T0, first.rung, first.expires_at, lifted_at=first.expires_at)
    back = first.expires_at + 60  # the attacker returns a minute after release
    decision = decide(FOUR, ended, back, severity=8)
    assert (decision.action, decision.rung, decision.expires_at) == (Action.BLOCK, 2, back + DAY)
    assert decision.why.startswith("repeat offence")


def test_opt_in_severity_skips_rungs_as_before() -> None:
    skips = replace(FOUR, severity_skips_rungs=True)
    assert decide(skips, None, T0, severity=2).rung == 2
    decision = decide(skips, None, T0, severity=8)
    assert (decision.rung, decision.expires_at) == (4, T0 + 30 * DAY)
    assert decision.why == "severity 8 asked for"
    active = PreviousBlock(T0, 1, T0 + 3600, None)
    hit = decide(skips, active, T0 + 30, severity=8)
    assert (hit.action, hit.rung, hit.expires_at) == (Action.ESCALATE, 4, T0 + 30 + 30 * DAY)


def test_opt_in_severity_is_clamped_to_the_top_rung() -> None:
    skips = replace(DEFAULT, severity_skips_rungs=True)
    decision = decide(skips, None, T0, severity=9)
    assert (decision.rung, decision.expires_at) == (2, T0 + 7 * DAY)


def test_severity_mapping_is_described_for_config_show_and_rules_list() -> None:
    from imr.core.policy import describe_severities

    assert describe_severities(FOUR) == ["1-10: rung 1 (1h)"]
    assert describe_severities(replace(FOUR, severity_skips_rungs=True)) == [
        "1: rung 1 (1h)",
        "2: rung 2 (1d)",
        "3: rung 3 (7d)",
        "4-10: rung 4 (30d)",
    ]


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


def test_higher_severity_on_active_block_escalates_at_once_when_opted_in() -> None:
    active = PreviousBlock(T0, 1, T0 + DAY, None)
    decision = decide(replace(DEFAULT, severity_skips_rungs=True), active, T0 + 5, severity=2)
    assert (decision.action, decision.rung) == (Action.ESCALATE, 2)


def test_expired_but_not_yet_lifted_block_is_a_repeat() -> None:
    due = PreviousBlock(T0, 1, T0 + DAY, None)
    decision = decide(DEFAULT, due, T0 + DAY + 1)
    assert (decision.action, decision.rung) == (Action.BLOCK, 2)


def test_ladder_must_not_be_empty() -> None:
    with pytest.raises(ValueError):
        Ladder(steps=(), repeat_window=1, escalate_after=1)


@pytest.mark.parametrize(
    "policy, code_red, mapping",
    [
        ("", "rung 1 (1d)", "1-10: rung 1 (1d)"),
        (
            'ladder = ["1h", "1d", "7d", "30d"]\nseverity_skips_rungs = true\n',
            "rung 4 (30d)",
            "1: rung 1 (1h); 2: rung 2 (1d); 3: rung 3 (7d); 4-10: rung 4 (30d)",
        ),
    ],
    ids=["default", "opted-in"],
)
def test_rules_list_and_config_show_say_what_a_severity_leads_to(
    tmp_path: Path, policy: str, code_red: str, mapping: str
) -> None:
    config = tmp_path / "imr.toml"
    config.write_text(f"[policy]\n{policy}")
    runner = CliRunner()
    listed = runner.invoke(main, ["--config", str(config), "rules", "list"])
    assert listed.exit_code == 0, listed.output
    (line,) = [x for x in listed.output.splitlines() if x.startswith("code-red ")]
    assert f"sev  8 -> {code_red}" in line and " 1 in 1h " in line
    as_json = runner.invoke(main, ["--config", str(config), "rules", "list", "--json"])
    sig = next(s for s in json.loads(as_json.stdout) if s["name"] == "code-red")
    rung, duration = code_red.removeprefix("rung ").rstrip(")").split(" (")
    assert sig["first_offence"] == {"rung": int(rung), "duration": duration}
    shown = runner.invoke(main, ["--config", str(config), "config", "show"])
    policy_part = shown.output.split("[policy]\n")[1].split("\n\n")[0].splitlines()
    assert policy_part[-1] == f"# first offence by reporter severity: {mapping}"
