"""fail2ban's ConfigParser semantics for filter.d files: interpolation across sections,
`%(known/...)s`, and [Init] over [Definition]."""

from __future__ import annotations

from pathlib import Path

from imr.logscan.fail2ban import parse_filter

WHEN = "Jan  2 03:04:05 "


def test_known_falls_back_to_default_section(tmp_path: Path) -> None:
    """As sendmail-auth does: common.conf sets __prefix_line in [DEFAULT], the filter
    extends it in [Definition] with %(known/__prefix_line)s."""
    (tmp_path / "common.conf").write_text("[DEFAULT]\n__prefix_line = \\s*mail <_daemon>:\\s+\n")
    (tmp_path / "f.conf").write_text(
        "[INCLUDES]\nbefore = common.conf\n[Definition]\n_daemon = sm-mta\n"
        "__prefix_line = %(known/__prefix_line)s(?:\\w{14}: )?\n"
        "failregex = ^%(__prefix_line)sAUTH failure from <HOST>$\n"
    )
    flt = parse_filter(tmp_path / "f.conf")
    assert flt.match(WHEN + "mail sm-mta: AUTH failure from 192.0.2.4") is not None
    assert flt.match(WHEN + "mail sm-mta: x9ABCDEFGHIJKL: AUTH failure from 192.0.2.4") == (
        "192.0.2.4",
        "fail2ban f failregex #1",
    )
    assert flt.match(WHEN + "AUTH failure from 192.0.2.4") is None  # the prefix is required
    # A value the section itself replaced wins over [DEFAULT]'s.
    (tmp_path / "base.conf").write_text("[DEFAULT]\np = D\n[Definition]\np = first\n")
    (tmp_path / "g.conf").write_text(
        "[INCLUDES]\nbefore = base.conf\n[Definition]\np = %(known/p)s-second\n"
        "failregex = ^\\s*%(p)s <HOST>$\n"
    )
    flt = parse_filter(tmp_path / "g.conf")
    assert flt.match(WHEN + "first-second 192.0.2.5") is not None
    assert flt.match(WHEN + "D-second 192.0.2.5") is None
