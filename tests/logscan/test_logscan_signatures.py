"""Built-in signatures: each matches its real samples and none of its benign look-alikes."""

from __future__ import annotations

import random

import pytest

from imr.logscan.engine import Scanner, Thresholds, decide
from imr.logscan.signatures import BUILTIN, Signature

SCANNER = Scanner(BUILTIN)
CASES = [(s, line) for s in BUILTIN for line in s.samples]
BENIGN = [(s, line) for s in BUILTIN for line in s.benign]


def _names(line: str) -> set[str]:
    hits, stats = SCANNER.scan_line(line.encode())
    assert stats.bad == 0, f"line did not parse: {line[:100]}"
    return {h.signature.name for h in hits}


def test_every_signature_has_samples_and_lookalikes() -> None:
    for sig in BUILTIN:
        assert sig.samples, sig.name
        assert sig.benign, sig.name
        assert 1 <= sig.severity <= 10
        assert sig.hits >= 1 and sig.window > 0


@pytest.mark.parametrize(
    ("sig", "line"), CASES, ids=[f"{s.name}-{i}" for i, (s, _) in enumerate(CASES)]
)
def test_sample_matches(sig: Signature, line: str) -> None:
    assert sig.name in _names(line)


@pytest.mark.parametrize(
    ("sig", "line"), BENIGN, ids=[f"{s.name}-{i}" for i, (s, _) in enumerate(BENIGN)]
)
def test_benign_lookalike_does_not_match(sig: Signature, line: str) -> None:
    assert sig.name not in _names(line)


@pytest.mark.parametrize(
    ("sig", "line"), CASES, ids=[f"{s.name}-{i}" for i, (s, _) in enumerate(CASES)]
)
def test_prefilter_lets_every_sample_through(sig: Signature, line: str) -> None:
    # The block path (needles/prefilter) must agree with the slow path, embedded in noise.
    noise = "".join(
        f'192.0.2.{i} - - [08/Jan/2009:04:52:45 -0500] "GET /p{i} HTTP/1.1" 200 1 "-" "x"\n'
        for i in range(1, 20)
    )
    hits, _ = SCANNER.scan_block((noise + line + "\n" + noise).encode())
    assert sig.name in {h.signature.name for h in hits}


def test_the_three_lines_from_the_original_material() -> None:
    assert _names(
        '203.0.113.50 - - [08/Jan/2009:04:52:45 -0500] "GET /mail/bin/msgimport HTTP/1.1" 404 330 '
        '"-" "Mozilla/5.0 (Windows; U; Windows NT 5.1; en-US; rv:1.9.0.5) Gecko/2008120122 Firefox/3.0.5"'  # noqa: E501
    ) == {"roundcube-msgimport"}
    assert _names(
        '198.51.100.23 - - [30/Jan/2009:13:36:51 -0500] "GET /w00tw00t.at.ISC.SANS.DFind:) HTTP/1.1" '  # noqa: E501
        '400 311 "-" "-"'
    ) == {"dfind"}
    hits, _ = SCANNER.scan_line(
        b'2001:db8::bad - - [06/Jan/2009:17:19:00 -0500] "GET /user/soapCaller.bs HTTP/1.1" 404 330 '  # noqa: E501
        b'"-" "Morfeus Fucking Scanner"'
    )
    assert [(h.signature.name, h.ip) for h in hits] == [("morfeus", "2001:db8::bad")]


def test_dfind_is_case_insensitive_unlike_the_original_modsecurity_rule() -> None:
    # The old rule lower-cased the input (t:lowercase) and then looked for mixed case.
    for variant in (
        "w00tw00t.at.ISC.SANS.DFind:)",
        "W00TW00T.AT.ISC.SANS.DFIND:)",
        "w00tw00t.at.isc.sans.dfind:)",
    ):
        line = f'198.51.100.23 - - [30/Jan/2009:13:36:51 -0500] "GET /{variant} HTTP/1.1" 400 311 "-" "-"'  # noqa: E501
        assert _names(line) == {"dfind"}


def test_benign_traffic_never_matches() -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible test data
    paths = [
        "/",
        "/index.html",
        "/blog/2009/01/08/post",
        "/img/a.png",
        "/search?q=exe",
        "/cmd.html",
    ]
    agents = [
        "Mozilla/5.0 (X11; Linux x86_64)",
        "curl/8.0",
        "Googlebot/2.1 (+http://www.google.com/bot.html)",
    ]
    lines = "".join(
        f'192.0.2.{rng.randint(1, 254)} - - [08/Jan/2009:04:52:45 -0500] "GET {rng.choice(paths)} HTTP/1.1" '  # noqa: E501
        f'200 {rng.randint(1, 9999)} "http://example.org/ref" "{rng.choice(agents)}"\n'
        for _ in range(2000)
    )
    hits, stats = SCANNER.scan_block(lines.encode())
    assert hits == []
    assert stats.lines == 2000
    assert stats.candidates == 0  # the prefilter rejected everything without parsing


def test_threshold_counts_hits_within_the_window_per_address() -> None:
    sig = next(s for s in BUILTIN if s.name == "nonsense-path")
    assert (sig.hits, sig.window) == (3, 600)
    line = (
        '192.0.2.60 - - [08/Jan/2009:04:{:02d}:00 -0500] "GET index.php HTTP/1.1" 400 1 "-" "-"\n'
    )
    thresholds = Thresholds()

    def run(minutes: list[int]) -> list[str]:
        data = "".join(line.format(m) for m in minutes).encode()
        hits, _ = SCANNER.scan_block(data)
        return [d.ip for d in decide(hits, thresholds, now=0.0)]

    assert run([0, 5]) == []  # two hits: below the threshold
    assert run([20]) == []  # the first two fell out of the 10-minute window
    assert run([21, 22]) == ["192.0.2.60"]  # three within ten minutes
    assert run([23]) == []  # counting starts over after a block


def test_thresholds_survive_a_round_trip_through_json() -> None:
    sig = next(s for s in BUILTIN if s.name == "nonsense-path")
    line = b'192.0.2.60 - - [08/Jan/2009:04:00:00 -0500] "GET x HTTP/1.1" 400 1 "-" "-"\n'
    first = Thresholds()
    hits, _ = SCANNER.scan_block(line * 2)
    assert decide(hits, first, now=0.0) == []
    second = Thresholds.from_json(first.to_json())
    hits, _ = SCANNER.scan_block(line)
    decisions = decide(hits, second, now=0.0)
    assert [(d.ip, d.signature.name, d.count) for d in decisions] == [("192.0.2.60", sig.name, 3)]
