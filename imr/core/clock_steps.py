"""Steps of the wall clock, told apart from time passing.

Wall time minus monotonic time stays constant while time passes (NTP slewing moves it by
at most 0.5 ms a second); a *step* (`date -s`, an NTP step after a suspend, a VM restored
from a snapshot) changes it at once. Pure: the caller passes both readings.
"""

from __future__ import annotations

STEP_THRESHOLD = 2.0  # seconds: a change of (wall - monotonic) this large is a step


class StepDetector:
    def __init__(self, threshold: float = STEP_THRESHOLD) -> None:
        self.threshold = threshold
        self._offset: float | None = None

    def step(self, wall: float, monotonic: float) -> float | None:
        """The step since the last reading, in seconds (negative: back), or None (the first
        reading only takes the offset)."""
        offset = wall - monotonic
        last, self._offset = self._offset, offset
        if last is None or abs(offset - last) < self.threshold:
            return None
        return offset - last
