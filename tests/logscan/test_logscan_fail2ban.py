"""fail2ban filter compatibility, against the filters and annotated sample logs that
Debian's fail2ban package installs (skipped without the package; CI installs it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imr.logscan.engine import Scanner
from imr.logscan.fail2ban import FilterError, load_filter, parse_filter

from logscan_helpers import F2B_FILTERS, F2B_SAMPLES, failjson_cases, has_filter_options

needs_fail2ban = pytest.mark.skipif(
    not (F2B_FILTERS.is_dir() and F2B_SAMPLES.is_dir()),
    reason="Debian package fail2ban not installed (apt-get install fail2ban, service not started)",
)

# Web-server filters: the ones that matter next to imr's own signatures. Each must
# agree with every failJSON annotation of its sample log.
WEB_FILTERS = [
    "apache-badbots",
    "apache-botsearch",
    "apache-fakegooglebot",
    "apache-modsecurity",
    "apache-nohome",
    "apache-noscript",
    "apache-overflows",
    "apache-pass",
    "apache-shellshock",
    "nginx-bad-request",
    "nginx-botsearch",
    "nginx-limit-req",
    "php-url-fopen",
    "lighttpd-auth",
]


def agreement(name: str) -> tuple[int, int, list[str]]:
    flt = parse_filter(F2B_FILTERS / f"{name}.conf")
    good, total, diffs = 0, 0, []
    for expected, line in failjson_cases(F2B_SAMPLES / name):
        total += 1
        found = flt.match(line)
        want = bool(expected.get("match"))
        host_ok = (
            not want
            or expected.get("host") is None
            or (found is not None and found[0] == expected["host"])
        )
        if (found is not None) == want and host_ok:
            good += 1
        else:
            diffs.append(f"{name}: expected {expected} got {found} for {line[:100]}")
    return good, total, diffs


@needs_fail2ban
@pytest.mark.parametrize("name", WEB_FILTERS)
def test_web_filters_agree_with_their_annotated_samples(name: str) -> None:
    _, total, diffs = agreement(name)
    assert total > 0
    assert diffs == []


@needs_fail2ban
def test_every_filter_loads_or_is_refused_with_a_reason() -> None:
    refused = {}
    for conf in sorted(F2B_FILTERS.glob("*.conf")):
        if conf.stem.endswith("common"):
            continue  # include-only helpers, completed by the filters that include them
        try:
            parse_filter(conf)
        except FilterError as exc:
            refused[conf.stem] = str(exc)
    # Only multi-line filters are refused (documented limit).
    assert all("SKIPLINES" in r for r in refused.values()), refused
    assert {"mongodb-auth", "slapd"} <= set(refused)


@needs_fail2ban
def test_overall_agreement_floor() -> None:
    """All filters with samples and default options: a floor against regressions
    (docs/logscan.md lists the differences and why)."""
    good = total = 0
    for sample in sorted(F2B_SAMPLES.iterdir()):
        conf = F2B_FILTERS / f"{sample.name}.conf"
        if not conf.exists() or has_filter_options(sample):
            continue
        try:
            g, t, _ = agreement(sample.name)
        except FilterError:
            continue
        good, total = good + g, total + t
    assert total > 300
    assert good / total >= 0.9, f"{good}/{total}"


@needs_fail2ban
def test_badbots_hosts_equal_fail2ban_regex(tmp_path: Path) -> None:
    """The same hosts as fail2ban-regex itself, on a log we write."""
    log = tmp_path / "access.log"
    log.write_text(
        '192.0.2.1 - - [05/Mar/2007:14:39:21 +0100] "GET / HTTP/1.0" 200 4 "-" "EmailSiphon"\n'
        '192.0.2.2 - - [05/Mar/2007:14:39:22 +0100] "GET / HTTP/1.0" 200 4 "-" "Mozilla/5.0"\n'
        '2001:db8::3 - - [05/Mar/2007:14:39:23 +0100] "POST /x HTTP/1.1" 200 4 "-" "Jorgee"\n'
    )
    conf = F2B_FILTERS / "apache-badbots.conf"
    out = subprocess.run(
        ["fail2ban-regex", "--print-all-matched", "--raw", str(log), str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    assert "Lines: 3 lines, 0 ignored, 2 matched" in out
    sig = load_filter(conf, maxretry=1)
    hits, _ = Scanner([sig]).scan_block(log.read_bytes())
    assert [h.ip for h in hits] == ["192.0.2.1", "2001:db8::3"]
    assert all(h.signature.source_prefix == "fail2ban" for h in hits)


def test_interpolation_includes_and_tags(tmp_path: Path) -> None:
    (tmp_path / "base.conf").write_text(
        "[DEFAULT]\nprefix = ^\\s*\\[client <HOST>\\]\n[Init]\nword = probe\n"
    )
    (tmp_path / "f.conf").write_text(
        "[INCLUDES]\nbefore = base.conf\n[Definition]\n"
        "failregex = %(prefix)s <word> one$\n"
        "            %(prefix)s <F-USER>\\S+</F-USER> two$\n"
        "ignoreregex = friend\n"
        "datepattern = {^LN-BEG}\n"
    )
    (tmp_path / "f.local").write_text("[Init]\nword = attack\n")
    flt = parse_filter(tmp_path / "f.conf")
    when = "2024-01-02 03:04:05 "
    assert flt.match(when + "[client 192.0.2.9] attack one") == (
        "192.0.2.9",
        "fail2ban f failregex #1",
    )
    assert flt.match(when + "[client 192.0.2.9] probe one") is None  # .local overrode [Init]
    assert flt.match(when + "[client 2001:db8::9] bob two") is not None
    assert flt.match(when + "[client 192.0.2.9] friend two") is None
    assert flt.match("[client 192.0.2.9] attack one") is None  # no date: skipped, as fail2ban does


def test_bad_filters_are_clear_errors(tmp_path: Path) -> None:
    cases = {
        "missing.conf": None,
        "nodef.conf": "[Init]\na = 1\n",
        "undefined.conf": "[Definition]\nfailregex = %(nothere)s <HOST>\n",
        "badre.conf": "[Definition]\nfailregex = ^(<HOST>\n",
        "include.conf": "[INCLUDES]\nbefore = gone.conf\n[Definition]\nfailregex = <HOST>\n",
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(FilterError, match=name):
            parse_filter(tmp_path / name)
