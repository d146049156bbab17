"""fail2ban filter compatibility, against the filters and annotated sample logs that
Debian's fail2ban package installs (skipped without the package; CI installs it).

The sample logs are read by fail2ban's own rules (tests/samplestestcase.py): a
`# failJSON:` line annotates the line after it; a `# filterOptions:` line starts a block
whose lines are tested with those options only (a block with an option set that is
empty apart from `test.*` keys is tested with default options too); `test.condition`
and `constraint` are evaluated with `name` and `opts`; `fileOptions` merge into every
block; `addFILE` appends another sample file. Every annotated line that applies at
default options must agree: same match, and the same host where one is given.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imr.logscan.engine import Scanner
from imr.logscan.fail2ban import FilterError, load_filter, parse_filter

from logscan_helpers import F2B_FILTERS, F2B_SAMPLES

needs_fail2ban = pytest.mark.skipif(
    not (F2B_FILTERS.is_dir() and F2B_SAMPLES.is_dir()),
    reason="Debian package fail2ban not installed (apt-get install fail2ban, service not started)",
)

# Web-server filters: the ones that matter next to imr's own signatures.
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

# Annotations imr disagrees with, by filter: (how many, why). docs/logscan.md lists the same.
KNOWN_DIFFERENCES: dict[str, tuple[int, str]] = {}

_ANNOTATION = re.compile(r"^#+ ?(failJSON|(?:file|filter)Options|addFILE):(.+)$")
Case = tuple[dict[str, Any], str]


def _holds(expression: str, name: str, opts: dict[str, Any]) -> bool:
    """A sample file's `test.condition` / `constraint` (trusted: the installed package's)."""
    return bool(eval(expression, {"__builtins__": {}}, {"name": name, "opts": opts}))  # noqa: S307


def _is_default(opts: dict[str, Any]) -> bool:
    return all(key.startswith("test.") for key in opts)


def default_cases(name: str, root: Path = F2B_SAMPLES) -> list[Case]:
    """(annotation, line) for every annotated line of sample NAME tested at default options."""
    files, common, cases = [name], {}, []
    blocks: list[dict[str, Any]] = [{}]
    ignore = False
    for file in files:  # addFILE appends while we iterate, as fail2ban's loop does
        lines = iter((root / file).read_text(encoding="utf-8").splitlines())
        for line in lines:
            m = _ANNOTATION.match(line)
            if m is None:
                continue  # comments, blank and unannotated lines
            kind, data = m.group(1), json.loads(m.group(2))
            if kind == "fileOptions":
                common = data
            elif kind == "addFILE":
                files.append(data)
            elif kind == "filterOptions":
                blocks, ignore = [], False
                for opts in data if isinstance(data, list) else [data]:
                    opts = {**common, **opts}
                    if opts.get("test.condition"):
                        ignore = not _holds(opts["test.condition"], name, opts)
                    if not ignore:
                        blocks.append(opts)
            else:
                annotated = next(lines, None)
                if annotated is None or ignore:
                    continue
                for opts in blocks:
                    constraint = data.get("constraint")
                    if _is_default(opts) and not (
                        constraint and not _holds(constraint, name, opts)
                    ):
                        cases.append((data, annotated))
    return cases


def agreement(name: str) -> tuple[int, int, list[str]]:
    """(agreeing, annotations, differences) for one filter, its lines fed in file order."""
    flt = parse_filter(F2B_FILTERS / f"{name}.conf")
    good, diffs = 0, []
    cases = default_cases(name)
    for expected, line in cases:
        found = flt.match(line)
        host = expected.get("host")
        if expected.get("match"):
            agrees = found is not None and host in (None, found[0])
        else:
            agrees = found is None
        if agrees:
            good += 1
        else:
            diffs.append(f"{name}: expected {expected} got {found} for {line[:100]}")
    return good, len(cases), diffs


def _samples_with_filters() -> list[str]:
    if not F2B_SAMPLES.is_dir():
        return []
    return sorted(
        s.name
        for s in F2B_SAMPLES.iterdir()
        if s.is_file() and (F2B_FILTERS / f"{s.name}.conf").exists()
    )


@needs_fail2ban
@pytest.mark.parametrize("name", WEB_FILTERS)
def test_web_filters_agree_with_their_annotated_samples(name: str) -> None:
    _, total, diffs = agreement(name)
    assert total > 0
    assert diffs == []


@needs_fail2ban
def test_every_filter_loads() -> None:
    refused = {}
    for conf in sorted(F2B_FILTERS.glob("*.conf")):
        if conf.stem.endswith("common"):
            continue  # include-only helpers, completed by the filters that include them
        try:
            parse_filter(conf)
        except FilterError as exc:
            refused[conf.stem] = str(exc)
    assert refused == {}


@needs_fail2ban
def test_every_sample_log_agrees(capsys: pytest.CaptureFixture[str]) -> None:
    """Every sample log that has a filter.d file, at default options."""
    good = total = 0
    differing: dict[str, int] = {}
    details: list[str] = []
    for name in _samples_with_filters():
        g, t, diffs = agreement(name)
        good, total = good + g, total + t
        if diffs:
            differing[name] = len(diffs)
            details.extend(diffs)
    summary = (
        f"fail2ban samples: imr agrees on {good}/{total} annotations "
        f"({100 * good / total:.1f} %) over {len(_samples_with_filters())} filters"
    )
    with capsys.disabled():
        print(f"\n{summary}; differing: {differing or 'none'}")
    assert total > 750, summary
    known = {name: n for name, (n, _) in KNOWN_DIFFERENCES.items()}
    assert differing == known, summary + "\n" + "\n".join(details)


def test_sample_annotations_are_read_by_fail2ban_rules(tmp_path: Path) -> None:
    """filterOptions blocks apply only to the lines under them."""
    log = tmp_path / "x"
    log.write_text(
        '# failJSON: {"match": true, "host": "192.0.2.1"}\none\n'
        '# filterOptions: [{"mode": "aggressive"}]\n'
        '# failJSON: {"match": true}\ntwo\n'
        '# filterOptions: [{}, {"mode": "ddos"}]\n'
        '# failJSON: {"match": false}\nthree\n'
        '# failJSON: {"match": true, "constraint": "opts.get(\'mode\') == \'ddos\'"}\nfour\n'
        '# filterOptions: {"test.condition": "name == \'other\'"}\n'
        '# failJSON: {"match": true}\nfive\n'
    )
    assert [line for _, line in default_cases("x", tmp_path)] == ["one", "three"]


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
