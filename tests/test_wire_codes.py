"""The catalogue of wire codes (imr/wire_codes.py) and docs/protocol.md's table agree."""

from __future__ import annotations

import re
from pathlib import Path

from imr.core import quota
from imr.core.addresses import RefusalCode
from imr.wire_codes import WireCode

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def documented_codes() -> list[str]:
    """The codes in the first column of the "Error codes" table, in order."""
    text = PROTOCOL_DOC.read_text()
    section = text.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| code |") and rows[1].startswith("| ---"), rows[:2]
    codes: list[str] = []
    for row in rows[2:]:
        first_cell = row.split("|")[1]
        codes.extend(re.findall(r"`([a-z_]+)`", first_cell))
    return codes


def test_every_code_is_documented_and_every_documented_code_exists() -> None:
    documented = documented_codes()
    assert len(documented) == len(set(documented)), "a code is documented twice"
    assert set(documented) - set(WireCode) == set(), "documented, but not in WireCode"
    assert set(WireCode) - set(documented) == set(), "in WireCode, but not in docs/protocol.md"


def test_the_core_refusals_are_in_the_catalogue() -> None:
    # The core spells its own codes (it imports nothing outside core); each must be a wire code.
    for code in [*RefusalCode, quota.RATE_LIMITED, quota.QUOTA_EXCEEDED]:
        assert WireCode(code) == code
