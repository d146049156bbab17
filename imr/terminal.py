"""Client-supplied text, made safe to print on a terminal or in a text log line.

Reasons, source tags, lift reasons, JSON keys and certificate subjects come from
clients. Printed raw, a control character can clear the admin's screen, set the
window title (OSC), move the cursor, start a fake table row or log line (CR, LF,
U+2028), and a bidi override can reverse the text after it. `escape` shows each
such character as a visible `\\xNN` / `\\uNNNN` escape instead; the protocol
refuses them in new requests (imr/protocol.py), and this covers rows written
before that and every log line.
"""

from __future__ import annotations

import re

# C0 and DEL, C1 (0x80-0x9f: 0x9b is a one-byte CSI on some terminals), the bidi
# marks, embeddings, overrides and isolates, and the Unicode line and paragraph separators.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """`text` with every unsafe character shown as an escape; safe text is returned as it is."""
    if UNSAFE.search(text) is None:
        return text
    return UNSAFE.sub(_visible, text)


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
