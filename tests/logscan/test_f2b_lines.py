"""Multi-line filters (maxlines, <SKIPLINES>): fail2ban's line buffer, checked against
fail2ban-regex on the same log."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from imr.logscan.fail2ban import FilterError, parse_filter

from logscan_helpers import F2B_FILTERS

# Tomcat/guacamole style: the date line, then the message line (maxlines = 2).
TWO_LINES = """\
Jan 02, 2024 3:04:05 AM org.apache.guacamole.net.basic.BasicGuacamoleTunnelServlet doConnect
WARNING: Authentication attempt from 192.0.2.21 for user "admin" failed.
Jan 02, 2024 3:04:06 AM org.apache.guacamole.net.basic.BasicGuacamoleTunnelServlet doConnect
INFO: User "bob" successfully authenticated from 192.0.2.22.
Jan 02, 2024 3:04:07 AM org.apache.guacamole.net.basic.BasicGuacamoleTunnelServlet doConnect
WARNING: Authentication attempt from 192.0.2.23 for user "root" failed.
"""

# A connection id on the first line, its failure some lines later (<SKIPLINES>).
SKIP_FILTER = """\
[Definition]
failregex = ^\\s*conn=(?P<conn>\\d+) from <HOST>$<SKIPLINES>^\\s*conn=(?P=conn) auth failed$
maxlines = 5
"""
SKIP_LOG = """\
2024-01-02 03:04:01 conn=1 from 192.0.2.31
2024-01-02 03:04:02 conn=2 from 192.0.2.32
2024-01-02 03:04:03 conn=2 auth ok
2024-01-02 03:04:04 conn=9 noise
2024-01-02 03:04:05 conn=1 auth failed
"""


def _hosts(conf: Path, log: str) -> list[str]:
    flt = parse_filter(conf)
    return [found[0] for line in log.splitlines() if (found := flt.match(line))]


def _fail2ban_regex(conf: Path, log: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "x.log"
    path.write_text(log)
    out = subprocess.run(
        ["fail2ban-regex", "-o", "ip", str(path), str(conf)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return out.split()


needs_f2b = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None or not F2B_FILTERS.is_dir(),
    reason="fail2ban-regex not installed",
)


@pytest.mark.skipif(not F2B_FILTERS.is_dir(), reason="Debian fail2ban not installed")
def test_two_line_messages_are_matched() -> None:
    assert _hosts(F2B_FILTERS / "guacamole.conf", TWO_LINES) == ["192.0.2.21", "192.0.2.23"]


def test_skiplines_keep_the_lines_they_skip(tmp_path: Path) -> None:
    conf = tmp_path / "skip.conf"
    conf.write_text(SKIP_FILTER)
    assert _hosts(conf, SKIP_LOG) == ["192.0.2.31"]


@needs_f2b
def test_multi_line_equals_fail2ban_regex(tmp_path: Path) -> None:
    guacamole = F2B_FILTERS / "guacamole.conf"
    assert _hosts(guacamole, TWO_LINES) == _fail2ban_regex(guacamole, TWO_LINES, tmp_path)
    conf = tmp_path / "skip.conf"
    conf.write_text(SKIP_FILTER)
    assert _hosts(conf, SKIP_LOG) == _fail2ban_regex(conf, SKIP_LOG, tmp_path)


def test_bad_maxlines_is_a_clear_error(tmp_path: Path) -> None:
    conf = tmp_path / "m.conf"
    conf.write_text("[Definition]\nfailregex = <HOST>\nmaxlines = lots\n")
    with pytest.raises(FilterError, match="maxlines = 'lots': expected 1 to 100"):
        parse_filter(conf)
