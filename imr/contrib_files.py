"""Where the contrib files are: the units, the ModSecurity files and the sample config.

A wheel (and the Debian package's virtual environment) carries them as the package data
`imr/contrib` (setup.py maps the checkout's `contrib/` there); a source checkout, or an
editable install of one, has them beside the package. `imr contrib-path` prints the result.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def contrib_dir() -> Path | None:
    for candidate in (_PACKAGE / "contrib", _PACKAGE.parent / "contrib"):
        if (candidate / "systemd" / "imr.service").is_file():
            return candidate
    return None
