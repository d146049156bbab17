"""Who gets blocked for how long: the escalation ladder.

Pure: every function takes "now" from the caller (an injectable clock in the
shell), so 1-day and 7-day expiries are tested without waiting.

Vocabulary:
- a *rung* (1-based) is a step of the ladder, e.g. [1d, 7d]: rung 1 is 1 day;
- a *repeat* is a new block for an address whose previous block ended within
  the repeat window: it goes one rung up;
- a *hit* on an address that is already blocked is recorded; if it comes at
  least `escalate_after` after the block began (the attacker keeps coming),
  the block escalates in place;
- an *incident* is one block and the hits on it within `escalate_after` of its
  start: the ModSecurity hook, then the log scanner 30 s later reading the same
  requests, are one incident and count once (the second report is recorded);
- a *severity* (1-10) is how bad the reporter thinks the request was. By
  default it is only noted: the ladder alone sets the rung, so a first offence
  is rung 1 whoever reports it. With `severity_skips_rungs` (the config's
  `policy.severity_skips_rungs`, off by default) it is the lowest rung the
  block starts at, and a higher severity escalates an active block at once.

A block that ended (expired) is never part of a later incident, however soon
the address comes back: that is the repeat the ladder is for. A block an
admin lifted is a pardon and is not passed here at all (Store.offences).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from imr.core.durations import format_duration


@dataclass(frozen=True)
class Ladder:
    steps: tuple[int, ...]  # seconds per rung, ascending
    repeat_window: int  # seconds after a block ended within which a new one is a repeat
    escalate_after: int  # seconds into a block after which a new hit escalates it
    severity_skips_rungs: bool = False  # severity = the lowest rung to start at (opt-in)

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("the ladder needs at least one step")
        if any(s <= 0 for s in self.steps):
            raise ValueError("ladder steps must be positive")

    @property
    def top(self) -> int:
        return len(self.steps)

    def duration(self, rung: int) -> int:
        return self.steps[self.clamp(rung) - 1]

    def clamp(self, rung: int) -> int:
        return max(1, min(rung, self.top))

    def starting_rung(self, severity: int) -> int:
        """The lowest rung a report of this severity starts a block at."""
        return self.clamp(severity) if self.severity_skips_rungs else 1


# Slots, not frozen: one of each a block request; a frozen class's __init__ goes through
# object.__setattr__ for each field (docs/performance.md "Per request, round three").
# Nothing assigns a field (dataclasses.replace); unsafe_hash keeps the frozen hash.
@dataclass(slots=True, unsafe_hash=True)
class PreviousBlock:
    """The most recent block of an address that counts as an offence."""

    blocked_at: float
    rung: int
    expires_at: float
    lifted_at: float | None  # None while it is still in force (or due to be lifted)

    def active_at(self, now: float) -> bool:
        return self.lifted_at is None and self.expires_at > now

    @property
    def ended_at(self) -> float:
        return self.expires_at if self.lifted_at is None else min(self.lifted_at, self.expires_at)


class Action(StrEnum):
    BLOCK = "block"  # a new block
    ESCALATE = "escalate"  # the active block goes up a rung or lasts longer
    RECORD = "record"  # already blocked: only the hit is recorded

    @property
    def told(self) -> str:
        """The word a client's person reads: `imr block`, the text reply ("already blocked")."""
        return _WORDS[self][0]

    @property
    def counted(self) -> str:
        """block_many's `counts` key ("recorded"): a wire name, so it never changes."""
        return _WORDS[self][1]

    @property
    def logged(self) -> str:
        """The daemon's log line ("hit on blocked": the operator reads it as a hit)."""
        return _WORDS[self][2]


# Each action's words, in one place: (told, counted, logged).
_WORDS = {
    Action.BLOCK: ("blocked", "blocked", "blocked"),
    Action.ESCALATE: ("escalated", "escalated", "escalated"),
    Action.RECORD: ("already blocked", "recorded", "hit on blocked"),
}


@dataclass(slots=True, unsafe_hash=True)  # as PreviousBlock
class Decision:
    action: Action
    rung: int
    expires_at: float
    why: str


def decide(
    ladder: Ladder, previous: PreviousBlock | None, now: float, severity: int = 1
) -> Decision:
    """Decide what a block request for one address does at time `now`.

    `severity` is the reporter's 1-10; it sets the lowest rung only when the ladder's
    `severity_skips_rungs` is on (see the module docstring).
    """
    # ladder.starting_rung and previous.active_at, inlined: every block request decides.
    wanted = ladder.clamp(severity) if ladder.severity_skips_rungs else 1

    if previous is not None and previous.lifted_at is None and previous.expires_at > now:
        return _hit_on_active_block(ladder, previous, now, wanted)

    steps = ladder.steps
    if previous is not None and now - previous.ended_at <= ladder.repeat_window:
        rung = max(1, min(previous.rung + 1, len(steps)))  # ladder.clamp, inlined
        why = "repeat offence within the repeat window"
    else:
        rung = 1
        why = "first offence"
    if severity > 1 and not ladder.severity_skips_rungs:
        why += f"; severity {severity} does not skip rungs"
    if wanted > rung:
        rung = wanted
        why = f"severity {severity} asked for"
    return Decision(Action.BLOCK, rung, now + steps[rung - 1], why)  # rung is clamped


def _hit_on_active_block(
    ladder: Ladder, previous: PreviousBlock, now: float, wanted: int
) -> Decision:
    rung = previous.rung
    why = ""
    if wanted > rung:
        rung, why = wanted, f"severity {wanted} asked for"
    elif now - previous.blocked_at >= ladder.escalate_after:
        rung, why = ladder.clamp(rung + 1), "still attacking while blocked"
    if why:
        expires_at = max(previous.expires_at, now + ladder.duration(rung))
        if rung > previous.rung or expires_at > previous.expires_at:
            return Decision(Action.ESCALATE, rung, expires_at, why)
    within = now - previous.blocked_at < ladder.escalate_after
    why = "same incident, counted once" if within else "already blocked"
    return Decision(Action.RECORD, previous.rung, previous.expires_at, why)


def describe_severities(ladder: Ladder, severities: range = range(1, 11)) -> list[str]:
    """What each severity starts a first offence at, grouped: ["1-10: rung 1 (1d)"]."""
    groups: list[tuple[int, int, int]] = []  # (first severity, last severity, rung)
    for severity in severities:
        rung = ladder.starting_rung(severity)
        if groups and groups[-1][2] == rung:
            groups[-1] = (groups[-1][0], severity, rung)
        else:
            groups.append((severity, severity, rung))
    return [
        f"{low if low == high else f'{low}-{high}'}: rung {rung}"
        f" ({format_duration(ladder.duration(rung))})"
        for low, high, rung in groups
    ]
