"""The gated scanner finds exactly what the full-parse path finds (issue #18 item 4).

Scanner.scan_block finds candidate lines with windowed bytes.find passes and drops
those no signature could match before the full parse (signatures.AccessGate,
decided from needle positions in gate.py). The reference here is the path it
replaced, written out line by line: every line holding a needle or a prefilter
match, through the full parse and every test. A generated corpus (ordinary lines,
look-alikes in referers, user agents, user names and query strings, real attacks,
and the awkward cases: escapes, non-ASCII, odd methods, broken quotes, needles
twice on a line) in every format the engine reads must give the same hits, in the
same order, and the same candidates, for every log format setting and several
signature sets; also when the block is plain ASCII (the gates then skip the
per-line check), when lines are overlong, and with needles across the find windows.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from imr.logscan.engine import _WINDOW, BlockStats, Hit, Scanner, user_signature
from imr.logscan.formats import LogFormat
from imr.logscan.settings import UserRule
from imr.logscan.signatures import BUILTIN, AccessGate, Signature

ATTACK_PATHS = [
    "/mail/bin/msgimport",
    "/w00tw00t.at.ISC.SANS.DFind:)",
    "/user/soapCaller.bs",
    "/scripts/root.exe?/c+dir",
    "/c/winnt/system32/cmd.exe?/c+dir",
    "/scripts/..%255c../winnt/system32/CMD.EXE",
    "/default.ida?" + "N" * 30 + "%u9090%u6858=a",
    "/default.ida?" + "X" * 30 + "%u9090%u6858=a",
    "/DEFAULT.IDA?" + "n" * 30 + "%U9090=a",
]
LOOKALIKES = [
    "cmd.exe",
    "root.exe",
    "w00tw00t.at.ISC.SANS.DFind:)",
    "bin/msgimport",
    "soapCaller.bs",
    "default.ida?NNNNNNNNNNNNNNNNNNNNNNNN%u9090",
    "Access denied with code 403",
    "pull-request",
    "Morfeus Scanner",
    "morfeus",
]
BENIGN_PATHS = ["/", "/index.html", "/blog/2024/{n}", "/img/{n}.png", "/search?q=x{n}"]
# Request lines beyond "GET path HTTP/1.1": what the request-shape gate must get right.
ODD_REQUESTS = [
    "-",
    "G /x HTTP/1.1",
    "CONNECT /x HTTP/1.1",
    "connect mx.example.net:25 HTTP/1.0",
    "OPTIONS * HTTP/1.0",
    "options * HTTP/1.0",
    "OPTIONS * a b",
    "GET index.php HTTP/1.1",
    "GET http://www.example.org/ HTTP/1.1",
    "ABCDEFGHIJKLMNOPQ /x HTTP/1.1",
    "GET /x y z",
    "GET  /cmd.exe HTTP/1.1",
    "GET\t/cmd.exe HTTP/1.1",
    "A\tB /cmd.exe?x C",
    "GET /a?b/cmd.exe HTTP/1.1",
    "GET?/cmd.exe /x HTTP/1.1",
    "/cmd.exe",
    "\\x16\\x03\\x01\\x02\\x00",
    "GET /c\\x6dd.exe HTTP/1.1",
    "GET /bin/\\x6dsgimport HTTP/1.1",
    'GET /a\\"b HTTP/1.1',
    "GET /w\u00f6\u00f6t/cmd.exe HTTP/1.1",
    "GET /\u017foapcaller.bs HTTP/1.1",
    "GET /soapcaller.b\u017f HTTP/1.1",
    "GET /cmd.exe?q=cmd.exe HTTP/1.1",
    "GET /search?q=root.exe&r=cmd.exe HTTP/1.1",
    "GET /a?b /cmd.exe HTTP/1.1",
    "",
]
AGENTS = ["Mozilla/5.0 (X11; Linux x86_64)", "curl/8.4.0", "-", "Morpheus/1.0"]
USERS = ["-", "alice", "a b", '""', "[x]", "cmd.exe", "w00tw00t", "morfeus"]
IPS = ["192.0.2.7", "198.51.100.20", "203.0.113.9", "2001:db8::bad", "10.0.0.1", "host.example"]


def _text(rng: random.Random) -> str:
    return rng.choice(LOOKALIKES)


def _request(rng: random.Random, n: int) -> str:
    roll = rng.random()
    if roll < 0.1:
        return f"GET {rng.choice(ATTACK_PATHS)} HTTP/1.1"
    if roll < 0.25:
        return rng.choice(ODD_REQUESTS)
    if roll < 0.45:
        return f"GET /search?q={_text(rng)} HTTP/1.1"
    return f"{rng.choice(['GET', 'POST', 'HEAD'])} {rng.choice(BENIGN_PATHS).format(n=n)} HTTP/1.1"


def _fields(rng: random.Random) -> tuple[str, str]:
    referer = rng.choice(["-", "https://example.org/", f"https://blog.example/{_text(rng)}"])
    agent = rng.choice([*AGENTS, f"Bot/1.0 ({_text(rng)})", _text(rng)])
    return referer, agent


def access_line(rng: random.Random, n: int) -> str:
    ip = rng.choice(IPS)
    referer, agent = _fields(rng)
    request = _request(rng, n)
    user = rng.choice(USERS)
    head = f"{ip} - {user} [08/Jan/2009:04:52:45 -0500]"
    kind = rng.randrange(5)
    if kind == 0:  # common
        return f'{head} "{request}" 404 330'
    if kind == 1:  # vhost_combined
        return f'www.example.org:80 {head} "{request}" 200 330 "{referer}" "{agent}"'
    if kind == 2:  # nginx with X-Forwarded-For
        xff = rng.choice(["-", "203.0.113.77", "198.51.100.1, 192.0.2.200"])
        return f'{head} "{request}" 200 330 "{referer}" "{agent}" "{xff}"'
    return f'{head} "{request}" 200 330 "{referer}" "{agent}"'


def json_line(rng: random.Random, n: int) -> str:
    referer, agent = _fields(rng)
    request = _request(rng, n)
    method, _, rest = request.partition(" ")
    obj: dict[str, object]
    kind = rng.randrange(4)
    if kind == 0:
        obj = {"remote_addr": rng.choice(IPS), "request": request, "status": 404}
    elif kind == 1:  # no "request" key: only another needle makes it a candidate
        obj = {"remote_addr": rng.choice(IPS), "method": method, "uri": rest.split(" ")[0]}
    elif kind == 2:
        obj = {"client": {"ip": rng.choice(IPS)}, "http": {"method": method, "path": rest}}
    else:
        obj = {"ip": rng.choice(IPS), "request_uri": rest, "request_method": method}
    obj.update(http_referer=referer, http_user_agent=agent, time_iso8601="2009-01-08T04:52:45Z")
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)


def modsec_line(rng: random.Random, n: int) -> str:
    request = _request(rng, n)
    referer, agent = _fields(rng)
    message = rng.choice(["Access denied with code 403 (phase 2).", "Warning.", _text(rng)])
    if rng.random() < 0.5:  # v3
        tx = {
            "client_ip": rng.choice(IPS),
            "time_stamp": "Thu Jan  8 04:52:45 2009",
            "request": {"method": "GET", "uri": request.split(" ")[-1], "headers": {}},
            "response": {"http_code": 403},
            "messages": [{"message": message}],
        }
        tx["request"]["headers"] = {"User-Agent": agent, "Referer": referer}  # type: ignore[index]
        return json.dumps({"transaction": tx})
    return json.dumps(
        {
            "transaction": {
                "remote_address": rng.choice(IPS),
                "time": "08/Jan/2009:04:52:45 --0500",
            },
            "request": {"request_line": request, "headers": {"User-Agent": agent}},
            "response": {"status": 403},
            "audit_data": {"messages": [message]},
        }
    )


def error_line(rng: random.Random, n: int) -> str:
    request = _request(rng, n)
    ip = rng.choice(IPS)
    message = rng.choice(
        ["ModSecurity: Access denied with code 403 (phase 2).", "ModSecurity: Warning.", _text(rng)]
    )
    if rng.random() < 0.5:
        return (
            f"[Thu Jan 08 04:52:45.123456 2009] [:error] [pid 1234] [client {ip}:5123] "
            f'{message} [uri "{request.split(" ")[-1]}"] [unique_id "x{n}"]'
        )
    return (
        f"2009/01/08 04:52:45 [error] 123#0: *1 {message}, client: {ip}, server: example.org, "
        f'request: "{request}", host: "example.org", referrer: "{_fields(rng)[0]}"'
    )


def junk_line(rng: random.Random, n: int) -> str:
    return rng.choice(
        [
            "no quotes at all cmd.exe",
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET /cmd.exe',
            f'{rng.choice(IPS)} - "" [08/Jan/2009:04:52:45 -0500] "GET /cmd.exe HTTP/1.1" 404 1',
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET /root.exe HTTP/1.1" 404 1\r',
            f'{rng.choice(IPS)} - - [x] "GET /root.exe HTTP/1.1" 404 1 "-" "morfeus"\x00',
            "1234/not an error line cmd.exe",
            '{"broken json": "cmd.exe"',
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET / HTTP/1.1" 200 1 '
            f'"-" "{"x" * 300} morfeus"',
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET / HTTP/1.1" 200 1 "-" "ok" '
            '"morfeus" "cmd.exe"',
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET /{"cmd.exe" * 50} HTTP/1.1" '
            f'404 1 "{"root.exe" * 50}" "{"morfeus " * 50}"',
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET / HTTP/1.1" 200 1 '
            '"https://example.org/morfeus" "Mozilla morfeus"',
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET / HTTP/1.1" 200 1 '
            '"https://example.org/morfeus" "Mozilla"',
            f'{rng.choice(IPS)} - - [08/Jan/2009:04:52:45 -0500] "GET / HTTP/1.1" 200 1 "morfeus"',
        ]
    )


MAKERS = [access_line] * 6 + [json_line, modsec_line, error_line, junk_line]


def corpus(seed: int, lines: int) -> bytes:
    rng = random.Random(seed)  # noqa: S311 (a reproducible corpus, not a secret)
    out = [rng.choice(MAKERS)(rng, n) for n in range(lines)]
    out += [s for sig in BUILTIN for s in (*sig.samples, *sig.benign)]
    rng.shuffle(out)
    return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


def reference_scan(scanner: Scanner, block: bytes) -> tuple[list[Hit], BlockStats]:
    """The path before the gates, line by line: every line holding a needle or a
    prefilter match through the full parse. (The built-in prefilter looks at no
    text across a line end, so searching each line alone finds the same lines.)"""
    hits: list[Hit] = []
    lines = block.split(b"\n")
    if block.endswith(b"\n") or not block:
        lines.pop()
    stats = BlockStats(lines=len(lines))
    needles = {n for s in scanner.signatures for n in s.needles}
    prefilters = {s.prefilter for s in scanner.signatures if s.prefilter is not None}
    every = any(s.every_line for s in scanner.signatures)
    for raw in block.splitlines() if every else lines:
        lowered = raw.lower()
        if every or any(n in lowered for n in needles) or any(p.search(raw) for p in prefilters):
            stats.candidates += 1
            scanner._scan_line(raw, hits, stats)
    return hits, stats


def _key(hits: Sequence[Hit]) -> list[tuple[str, str, float | None, str, str]]:
    return [(h.signature.name, h.ip, h.time, h.evidence, h.line) for h in hits]


def _subset(*names: str) -> list[Signature]:
    return [s for s in BUILTIN if s.name in names]


SIGNATURE_SETS = {
    "builtin": list(BUILTIN),
    "paths-only": _subset("nimda", "dfind", "roundcube-msgimport"),
    "request-shape": _subset("nonsense-path", "proxy-probe"),
    "morfeus": _subset("morfeus"),
    "code-red": _subset("code-red", "code-red-ii", "modsecurity"),
    "with-user-rule": [
        *BUILTIN,
        user_signature(
            UserRule(name="ua-rule", field="user_agent", pattern="bot", needles=["bot"])
        ),
    ],
}


def _assert_same(scanner: Scanner, block: bytes) -> None:
    hits, stats = scanner.scan_block(block)
    want, want_stats = reference_scan(scanner, block)
    assert _key(hits) == _key(want)
    assert (stats.lines, stats.hits, stats.unresolved, stats.candidates) == (
        want_stats.lines,
        want_stats.hits,
        want_stats.unresolved,
        want_stats.candidates,
    )


def _plain_lines(block: bytes) -> bytes:
    """The corpus lines the gates judge without a per-line check."""
    lines = [x for x in block.split(b"\n") if x.isascii() and not any(c in x for c in b"\\\0\r")]
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("fmt", list(LogFormat))
@pytest.mark.parametrize("sigs", list(SIGNATURE_SETS))
def test_gated_scan_equals_full_parse(fmt: LogFormat, sigs: str) -> None:
    block = corpus(seed=zlib.crc32(f"{fmt.value}:{sigs}".encode()), lines=1500)
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    scanner = Scanner(SIGNATURE_SETS[sigs], fmt=fmt, trusted=trusted)
    _assert_same(scanner, block)
    # Plain blocks take the gates' cheaper pattern; overlong lines are always parsed.
    _assert_same(scanner, _plain_lines(block))
    _assert_same(Scanner(SIGNATURE_SETS[sigs], fmt=fmt, trusted=trusted, max_line=150), block)
    _assert_same(scanner, block.rstrip(b"\n"))  # the last line without its newline


def test_the_corpus_has_plain_lines_of_every_kind() -> None:
    # Not vacuous: the plain corpus holds attacks and look-alikes the gates must judge.
    block = _plain_lines(corpus(seed=2, lines=3000))
    hits, stats = Scanner(BUILTIN).scan_block(block)
    assert {h.signature.name for h in hits} >= {s.name for s in BUILTIN} - {"modsecurity"}
    assert stats.candidates > 1000


@pytest.mark.parametrize("needle", sorted({n for s in BUILTIN for n in s.needles}))
def test_needles_across_the_find_windows(needle: bytes) -> None:
    """engine._needle_lines searches windows of _WINDOW bytes: a needle may start on
    either side of a window's end, or run across it, on a line of its own or not."""
    path = "/x/" + needle.decode()
    for cut in range(len(needle) + 2):
        line = f'192.0.2.7 - - [08/Jan/2009:04:52:45 -0500] "GET {path} HTTP/1.1" 404 1 "-" "-"'
        at = line.index(needle.decode())
        pad = _WINDOW - cut - at - 1
        filler = "x" * (pad % _WINDOW)
        block = f"{filler}\n{line}\n{filler}\n{line}\n".encode()
        for scanner in (Scanner(BUILTIN), Scanner(BUILTIN, fmt=LogFormat.JSON)):
            _assert_same(scanner, block)
            assert scanner.scan_block(block)[1].candidates == 2


def _bench_module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "logscan_bench.py"
    spec = importlib.util.spec_from_file_location("logscan_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gates_skip_look_alikes_and_keep_every_attack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a vacuous comparison: on the benchmark's hostile log most candidates never
    # reach the parser, and every attack line still does.
    log = tmp_path / "hostile.log"
    attacks = _bench_module().generate_hostile(log, 20_000)
    block = log.read_bytes()
    scanner = Scanner(BUILTIN)
    parsed: list[bytes] = []
    real = scanner._scan_line

    def counting(raw: bytes, hits: list[Hit], stats: BlockStats) -> None:
        parsed.append(raw)
        real(raw, hits, stats)

    monkeypatch.setattr(scanner, "_scan_line", counting)
    hits, stats = scanner.scan_block(block)
    assert stats.candidates > 8_000  # half the lines carry a look-alike
    assert len(parsed) < stats.candidates // 5
    assert stats.hits == attacks
    assert _key(hits) == _key(reference_scan(Scanner(BUILTIN), block)[0])


def test_the_corpus_has_hits_of_every_kind() -> None:
    hits, _ = reference_scan(Scanner(BUILTIN), corpus(seed=1, lines=3000))
    assert {h.signature.name for h in hits} == {s.name for s in BUILTIN}


@pytest.mark.parametrize(
    "gate",
    [
        AccessGate(path=(b"cmd exe",)),  # a space: could run across the path's end
        AccessGate(path=(b"cmd.exe?",)),
        AccessGate(path=(b"not-a-needle",)),  # its positions are not recorded
        AccessGate(path=(b"cmd.exe",), user_agent=(b"cmd.exe",)),
    ],
)
def test_gates_that_positions_cannot_judge_parse_every_candidate(gate: AccessGate) -> None:
    sig = replace(
        _subset("nimda")[0], access_gate=gate, needles=(b"cmd exe", b"cmd.exe?", b"cmd.exe")
    )
    scanner = Scanner([sig])
    assert scanner._gates is None
    _assert_same(scanner, corpus(seed=3, lines=500))
