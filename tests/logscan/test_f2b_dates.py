"""Date cutting as fail2ban's DateDetector does it: the time-zone part of a date takes
only what fail2ban takes (never the next capital word), and [Init] datepattern counts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from imr.logscan.fail2ban import parse_filter

WORDS_FILTER = "[Definition]\nfailregex = ^\\W*(?:SMTP|INFO|MAIL) login failed from <HOST>$\n"

# Each line has its own address; the comment says what fail2ban cuts as the date.
WORDS_LOG = """\
2013-06-02 09:22:06 SMTP login failed from 192.0.2.1
2013-06-02 09:22:06 INFO login failed from 192.0.2.2
Jun  2 09:22:06 MAIL login failed from 192.0.2.3
2013-06-02 09:22:06 +0200 SMTP login failed from 192.0.2.4
2013-06-02T09:22:06Z INFO login failed from 192.0.2.5
[PDT Jun  2 09:22:06] SMTP login failed from 192.0.2.6
130324  0:04:00 MAIL login failed from 192.0.2.7
11-06-2013 02:09:40 +0300 SMTP login failed from 192.0.2.8
2013-06-02 09:22:06 UTC MAIL login failed from 192.0.2.9
"""
# ISO and syslog dates end before a capital word (SMTP/INFO/MAIL); an offset, Z and UTC
# are part of an ISO date; monit's leading zone and MySQL's yymmdd are dates. fail2ban's
# dd-mm-yyyy template has no zone, so " +0300" stays in line 8 and the regex misses it.
EXPECTED = [f"192.0.2.{i}" for i in (1, 2, 3, 4, 5, 6, 7, 9)]


def _matches(conf: Path, log: str) -> list[str]:
    flt = parse_filter(conf)
    return [found[0] for line in log.splitlines() if (found := flt.match(line))]


def test_time_zone_takes_no_word(tmp_path: Path) -> None:
    conf = tmp_path / "words.conf"
    conf.write_text(WORDS_FILTER)
    assert _matches(conf, WORDS_LOG) == EXPECTED


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban-regex not installed")
def test_time_zone_cut_equals_fail2ban_regex(tmp_path: Path) -> None:
    conf = tmp_path / "words.conf"
    conf.write_text(WORDS_FILTER)
    log = tmp_path / "words.log"
    log.write_text(WORDS_LOG)
    out = subprocess.run(
        ["fail2ban-regex", "-o", "ip", str(log), str(conf)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert _matches(conf, WORDS_LOG) == out.split() == EXPECTED


def test_init_datepattern_overrides_definition(tmp_path: Path) -> None:
    """As grafana.conf: the date pattern is set in [Init]."""
    conf = tmp_path / "g.conf"
    conf.write_text(
        "[Init]\ndatepattern = ^t=%%Y-%%m-%%dT%%H:%%M:%%S%%z\n"
        "[Definition]\ndatepattern = ^NEVER %%Y\n"
        'failregex = ^(?: lvl=err?or)? msg="Invalid username or password"'
        ".* remote_addr=<ADDR>\n"
    )
    line = (
        't=2024-01-02T03:04:05+0100 lvl=eror msg="Invalid username or password" '
        "logger=context userId=0 remote_addr=192.0.2.44"
    )
    assert _matches(conf, line) == ["192.0.2.44"]


def test_date_placeholders(tmp_path: Path) -> None:
    """{DATE} stands for each default template; EPOCH inside audit(...); {NONE} cuts nothing."""
    conf = tmp_path / "d.conf"
    conf.write_text("[Definition]\ndatepattern = ^\\[{DATE}\\]\nfailregex = ^\\s*denied <HOST>$\n")
    assert _matches(conf, "[2024-01-02 03:04:05] denied 192.0.2.1") == ["192.0.2.1"]
    assert _matches(conf, "[Jan  2 03:04:05] denied 192.0.2.2") == ["192.0.2.2"]
    audit = tmp_path / "a.conf"
    audit.write_text("[Definition]\nfailregex = ^type=X msg=audit\\(:\\d+\\): addr=<HOST>$\n")
    assert _matches(audit, "type=X msg=audit(1373330717.000:4070): addr=192.0.2.3") == ["192.0.2.3"]
    none = tmp_path / "n.conf"
    none.write_text("[Definition]\ndatepattern = {NONE}\nfailregex = ^denied <HOST>$\n")
    assert _matches(none, "denied 192.0.2.4") == ["192.0.2.4"]
