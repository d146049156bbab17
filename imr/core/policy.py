"""Who gets blocked for how long: the escalation ladder.

Pure: every function takes "now" from the caller (an injectable clock in the
shell), so 1-day and 7-day expiries are tested without waiting.

Vocabulary:
- a *rung* (1-based) is a step of the ladder, e.g. [1d, 7d]: rung 1 is 1 day;
- a *repeat* is a new block for an address whose previous block ended within
  the repeat window: it goes one rung up;
- a *hit* on an address that is already blocked is recorded; if it comes at
  least `escalate_after` after the block began (the attacker keeps coming) or
  asks for a higher severity, the block escalates in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Ladder:
    steps: tuple[int, ...]  # seconds per rung, ascending
    repeat_window: int  # seconds after a block ended within which a new one is a repeat
    escalate_after: int  # seconds into a block after which a new hit escalates it

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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Decision:
    action: Action
    rung: int
    expires_at: float
    why: str


def decide(
    ladder: Ladder, previous: PreviousBlock | None, now: float, severity: int = 1
) -> Decision:
    """Decide what a block request for one address does at time `now`.

    `severity` is the lowest rung the request asks for (1 = the first step).
    """
    wanted = ladder.clamp(severity)

    if previous is not None and previous.active_at(now):
        return _hit_on_active_block(ladder, previous, now, wanted)

    if previous is not None and now - previous.ended_at <= ladder.repeat_window:
        rung = ladder.clamp(previous.rung + 1)
        why = "repeat offence within the repeat window"
    else:
        rung = 1
        why = "first offence"
    if wanted > rung:
        rung = wanted
        why = f"severity {severity} asked for"
    return Decision(Action.BLOCK, rung, now + ladder.duration(rung), why)


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
    return Decision(Action.RECORD, previous.rung, previous.expires_at, "already blocked")
