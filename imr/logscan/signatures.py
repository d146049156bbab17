"""Attack signatures: what a hit looks like, how bad it is, how many make a block.

A signature has two parts. `needles` (lower-case literals) and `prefilter`
(a bytes regex) let the scanner find candidate lines in a whole block without
looking at each line; `test` then decides on the parsed Record and returns the
evidence. The needles must be a superset: a line the test would accept must
contain one of them (or match the prefilter), or it is never tested.

On hostile logs most candidates carry a needle in a field that does not count
(a referer, a user agent, a query string). `access_gate` lets the scanner drop
those before the full parse: on an access-log line cut at its quotes (see
AccessGate), it says what the line needs before the test could accept it. It must be
a necessary condition of the test on that line, never a guess; a signature
without one makes the scanner parse every candidate, as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from imr.logscan.formats import Record

Test = Callable[[Record], str | None]
# For rules that find the host themselves (fail2ban filters): line -> (host, evidence).
LineTest = Callable[[str], tuple[str, str] | None]


@dataclass(frozen=True)
class AccessGate:
    """What an access-log line needs before a test could accept it; any one item will do.

    The scanner checks it only on lines that parse_access would read (not JSON or
    error-log lines), that are ASCII (bytes.lower() then agrees with re.IGNORECASE)
    and hold no backslash (no escape can change a field). For such a line, whenever
    parse_access accepts it, the request is exactly the text between the first two
    quotes and the user agent the fourth quoted field after it, so the checks below
    are exact. An empty gate: the test never accepts an access-log line.
    """

    # Lower-case needles of which the request's path must hold one. The scanner looks
    # in the request up to the first "?" after its first space, which holds the path.
    path: tuple[bytes, ...] = ()
    user_agent: tuple[bytes, ...] = ()  # lower-case needles, one of which the agent holds
    odd_request: bool = False  # or: the request is not plain (see PLAIN_REQUEST)


# Requests on which neither nonsense-path nor proxy-probe can fire: "-"; a method of
# 2-16 letters (not CONNECT) and a target starting with "/"; "OPTIONS * ". A request
# that splits otherwise has no method, and then only TLS bytes count (not these).
PLAIN_REQUEST = re.compile(rb"(?i:(?!connect )[a-z]{2,16} /|options \* )|-\Z")


def user_agent_of(tail: bytes) -> bytes:
    """The user agent in the line after its request: ' 200 1 "referer" "agent"...'."""
    parts = tail.split(b'"', 4)
    return parts[3] if len(parts) == 5 else b""


@dataclass(frozen=True)
class Signature:
    name: str
    # 1..10, passed to the daemon: noted in its log; it sets the first rung only with
    # policy.severity_skips_rungs (then severity N starts at rung N; `imr rules list` says).
    severity: int
    description: str
    hits: int  # this many hits from one address ...
    window: int  # ... within this many seconds make a block
    test: Test = field(repr=False)
    needles: tuple[bytes, ...] = ()
    prefilter: re.Pattern[bytes] | None = None
    # Real attack lines (tests prove each matches) and benign look-alikes (must not).
    samples: tuple[str, ...] = ()
    benign: tuple[str, ...] = ()
    line_test: LineTest | None = field(default=None, repr=False)
    source_prefix: str = "logscan"
    access_gate: AccessGate | None = field(default=None, repr=False)

    @property
    def every_line(self) -> bool:
        """No needle and no prefilter: the scanner must parse every line for this one."""
        return not self.needles and self.prefilter is None


def _path(target: str) -> str:
    return target.split("?", 1)[0]


def field_test(field_name: str, pattern: re.Pattern[str], *, path_only: bool = False) -> Test:
    def test(record: Record) -> str | None:
        value: str = getattr(record, field_name)
        if path_only:
            value = _path(value)
        m = pattern.search(value)
        return f"{field_name} matches {m.group(0)[:60]!r}" if m else None

    return test


def any_of(*tests: Test) -> Test:
    def test(record: Record) -> str | None:
        for t in tests:
            why = t(record)
            if why:
                return why
        return None

    return test


def _line(ip: str, request: str, ua: str = "-", status: int = 404) -> str:
    return f'{ip} - - [08/Jan/2009:04:52:45 -0500] "{request}" {status} 330 "-" "{ua}"'


_FIREFOX = (
    "Mozilla/5.0 (Windows; U; Windows NT 5.1; en-US; rv:1.9.0.5) Gecko/2008120122 Firefox/3.0.5"
)
_CODE_RED_TAIL = (
    "%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3%u7801%u9090%u6858%ucbd3%u7801"
    "%u9090%u9090%u8190%u00c3%u0003%u8b00%u531b%u53ff%u0078%u0000%u00=a"
)

# --- the tests ---------------------------------------------------------------

_CODE_RED = re.compile(r"^/default\.ida\?N{20,}", re.IGNORECASE)
_CODE_RED_II = re.compile(r"^/default\.ida\?X{20,}", re.IGNORECASE)
_SHELLCODE = re.compile(r"%u9090", re.IGNORECASE)


def _code_red(pattern: re.Pattern[str], name: str) -> Test:
    def test(record: Record) -> str | None:
        # N-padding (Code Red) vs X-padding (Code Red II), then the NOP sled.
        pad = pattern.match(record.target)
        pad_char = pad.group(0)[-1].upper() if pad else ""
        if pad and pad_char == name and _SHELLCODE.search(record.target):
            return f"target is /default.ida?{pad_char * 4}... with %u9090 shellcode"
        return None

    return test


_NIMDA = re.compile(r"(?:/|\\|%5c|%255c|%2f)(?:cmd|root)\.exe$", re.IGNORECASE)
_DFIND = re.compile(r"^/w00tw00t\.at\.", re.IGNORECASE)
_MSGIMPORT = re.compile(r"(?:^|/)bin/msgimport$", re.IGNORECASE)
_SOAPCALLER = re.compile(r"/soapcaller\.bs$", re.IGNORECASE)
_MORFEUS_UA = re.compile(r"\bmorfeus\b", re.IGNORECASE)
_ABSOLUTE = re.compile(r"^[a-z][a-z0-9+.-]{1,15}://", re.IGNORECASE)
_METHOD = re.compile(r"^[A-Za-z]{2,16}$")
_MODSEC_DENIED = re.compile(r"ModSecurity: Access denied with code (\d{3})", re.IGNORECASE)


def _nonsense(record: Record) -> str | None:
    target = record.target
    if not record.method:
        # No "METHOD target" at all: a TLS handshake or raw bytes sent to an HTTP port.
        if target.startswith("\x16\x03") or target.startswith("\\x16\\x03"):
            return "TLS handshake or binary data sent as an HTTP request"
        return None
    if not _METHOD.match(record.method):
        return f"method {record.method[:20]!r} is not an HTTP method"
    if target.startswith("/") or target == "*" or _ABSOLUTE.match(target):
        return None
    if record.method.upper() == "CONNECT":
        return None  # proxy-probe's business
    return f"request target {target[:40]!r} is not a path"


def _proxy_probe(record: Record) -> str | None:
    if record.method.upper() == "CONNECT":
        return f"CONNECT {record.target[:60]!r}: proxy test"
    if record.method and _ABSOLUTE.match(record.target):
        return f"absolute URI {record.target[:60]!r}: proxy test"
    return None


def _modsec(record: Record) -> str | None:
    m = _MODSEC_DENIED.search(record.message)
    return f"ModSecurity denied the request (code {m.group(1)})" if m else None


# Access logs: a request line right after the time stamp whose target does not
# start with "/" (absolute URIs, junk, TLS bytes). The regex starts with a literal,
# so re's fast literal search skips most of the block; JSON and error logs are
# caught by the needle b"request" instead (their request field is named so).
_NON_PATH_REQUEST = re.compile(rb'\] "(?!-")(?![A-Za-z]{1,16} /)(?!OPTIONS \* )')
_REQUEST_FIELD = (b"request",)
# Code Red's pattern is anchored at the target's start, before any "?".
_CODE_RED_GATE = AccessGate(path=(b"default.ida",))


BUILTIN: tuple[Signature, ...] = (
    Signature(
        name="code-red",
        access_gate=_CODE_RED_GATE,
        severity=8,
        description="Code Red worm (IIS .ida buffer overflow)",
        hits=1,
        window=3600,
        test=_code_red(_CODE_RED, "N"),
        needles=(b"default.ida",),
        samples=(
            _line("192.0.2.10", "GET /default.ida?" + "N" * 224 + _CODE_RED_TAIL + " HTTP/1.0"),
        ),
        benign=(
            _line("192.0.2.11", "GET /default.ida HTTP/1.1"),
            _line("192.0.2.11", "GET /default.idaho/index.html HTTP/1.1", status=200),
            _line("192.0.2.11", "GET /search?q=default.ida%3FNNNN%u9090 HTTP/1.1", status=200),
            _line("192.0.2.11", "GET /default.ida?" + "X" * 224 + _CODE_RED_TAIL + " HTTP/1.0"),
        ),
    ),
    Signature(
        name="code-red-ii",
        access_gate=_CODE_RED_GATE,
        severity=8,
        description="Code Red II worm (IIS .ida buffer overflow, X padding)",
        hits=1,
        window=3600,
        test=_code_red(_CODE_RED_II, "X"),
        needles=(b"default.ida",),
        samples=(
            _line("192.0.2.12", "GET /default.ida?" + "X" * 224 + _CODE_RED_TAIL + " HTTP/1.0"),
        ),
        benign=(
            _line("192.0.2.13", "GET /default.ida?XXXX HTTP/1.1"),
            _line("192.0.2.13", "GET /default.ida?" + "N" * 224 + _CODE_RED_TAIL + " HTTP/1.0"),
        ),
    ),
    Signature(
        name="nimda",
        access_gate=AccessGate(path=(b"cmd.exe", b"root.exe")),
        severity=7,
        description="Nimda worm (IIS cmd.exe / root.exe probes)",
        hits=1,
        window=3600,
        test=field_test("target", _NIMDA, path_only=True),
        needles=(b"cmd.exe", b"root.exe"),
        samples=(
            _line("192.0.2.20", "GET /scripts/root.exe?/c+dir HTTP/1.0"),
            _line("192.0.2.20", "GET /MSADC/root.exe?/c+dir HTTP/1.0"),
            _line("192.0.2.20", "GET /c/winnt/system32/cmd.exe?/c+dir HTTP/1.0"),
            _line("192.0.2.20", "GET /scripts/..%255c../winnt/system32/cmd.exe?/c+dir HTTP/1.0"),
            _line(
                "192.0.2.20",
                "GET /_vti_bin/..%255c../..%255c../..%255c../winnt/system32/cmd.exe?/c+dir"
                " HTTP/1.0",
            ),
            _line(
                "192.0.2.20", "GET /scripts/..\\xc1\\x1c../winnt/system32/cmd.exe?/c+dir HTTP/1.0"
            ),
        ),
        benign=(
            _line("192.0.2.21", "GET /search?q=cmd.exe HTTP/1.1", status=200),
            _line("192.0.2.21", "GET /blog/why-root.exe-is-bad HTTP/1.1", status=200),
            _line("192.0.2.21", "GET /downloads/cmd.exe.zip HTTP/1.1", status=200),
            _line("192.0.2.21", "GET /rootexe HTTP/1.1"),
        ),
    ),
    Signature(
        name="dfind",
        access_gate=AccessGate(path=(b"w00tw00t",)),  # anchored at the start, like Code Red
        severity=6,
        description="DFind scanner (w00tw00t.at.ISC.SANS.DFind), often without Host header",
        hits=1,
        window=3600,
        test=field_test("target", _DFIND),
        needles=(b"w00tw00t",),
        samples=(
            '198.51.100.23 - - [30/Jan/2009:13:36:51 -0500] "GET /w00tw00t.at.ISC.SANS.DFind:) '
            'HTTP/1.1" 400 311 "-" "-"',
            _line("198.51.100.23", "GET /W00TW00T.AT.ISC.SANS.DFIND:) HTTP/1.1", "-", 400),
            _line(
                "198.51.100.23", "GET /w00tw00t.at.blackhats.romanian.anti-sec:) HTTP/1.1", "-", 400
            ),
        ),
        benign=(
            _line("192.0.2.31", "GET /blog/w00tw00t.html HTTP/1.1", status=200),
            '192.0.2.31 - - [30/Jan/2009:13:36:51 -0500] "GET / HTTP/1.1" 200 311 '
            '"http://example.com/w00tw00t.at.ISC.SANS.DFind:)" "Mozilla/5.0"',
        ),
    ),
    Signature(
        name="roundcube-msgimport",
        access_gate=AccessGate(path=(b"msgimport",)),
        severity=6,
        description="Roundcube bin/msgimport probe",
        hits=1,
        window=3600,
        test=field_test("target", _MSGIMPORT, path_only=True),
        needles=(b"msgimport",),
        samples=(
            '203.0.113.50 - - [08/Jan/2009:04:52:45 -0500] "GET /mail/bin/msgimport HTTP/1.1" '
            f'404 330 "-" "{_FIREFOX}"',
            _line("203.0.113.51", "GET /roundcube/bin/msgimport HTTP/1.1", _FIREFOX),
            _line("203.0.113.51", "GET /bin/msgimport HTTP/1.1", _FIREFOX),
        ),
        benign=(
            _line("192.0.2.41", "GET /docs/msgimport-howto.html HTTP/1.1", status=200),
            _line("192.0.2.41", "GET /search?q=bin/msgimport HTTP/1.1", status=200),
            _line("192.0.2.41", "GET /mail/bin/msgimport.txt HTTP/1.1", status=200),
        ),
    ),
    Signature(
        name="morfeus",
        access_gate=AccessGate(path=(b"soapcaller",), user_agent=(b"morfeus",)),
        severity=6,
        description="Morfeus scanner (soapCaller.bs probe or Morfeus user agent)",
        hits=1,
        window=3600,
        test=any_of(
            field_test("target", _SOAPCALLER, path_only=True),
            field_test("user_agent", _MORFEUS_UA),
        ),
        needles=(b"soapcaller", b"morfeus"),
        samples=(
            '2001:db8::bad - - [06/Jan/2009:17:19:00 -0500] "GET /user/soapCaller.bs HTTP/1.1" '
            '404 330 "-" "Morfeus Fucking Scanner"',
            _line("192.0.2.50", "GET /soapCaller.bs HTTP/1.1", _FIREFOX),
            _line("192.0.2.50", "GET / HTTP/1.1", "Morfeus Fucking Scanner", 200),
        ),
        benign=(
            _line("192.0.2.51", "GET /docs/soapcaller.bs.txt HTTP/1.1", status=200),
            _line("192.0.2.51", "GET / HTTP/1.1", "Morpheus/1.0", 200),
            _line("192.0.2.51", "GET /?q=soapCaller.bs HTTP/1.1", status=200),
        ),
    ),
    Signature(
        name="nonsense-path",
        access_gate=AccessGate(odd_request=True),
        severity=3,
        description="request target that is not a path, or binary data on the HTTP port",
        hits=3,
        window=600,
        test=_nonsense,
        prefilter=_NON_PATH_REQUEST,
        needles=_REQUEST_FIELD,
        samples=(
            _line("192.0.2.60", "GET index.php HTTP/1.1", "-", 400),
            _line("192.0.2.60", "GET ../../../../etc/passwd HTTP/1.1", "-", 400),
            _line(
                "192.0.2.60", "\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc\\x03\\x03", "-", 400
            ),
        ),
        benign=(
            _line("192.0.2.61", "GET / HTTP/1.1", status=200),
            _line("192.0.2.61", "OPTIONS * HTTP/1.0", status=200),
            _line("192.0.2.61", "-", status=408),
            _line("192.0.2.61", "GET /index.php?go=index.php HTTP/1.1", status=200),
        ),
    ),
    Signature(
        name="proxy-probe",
        access_gate=AccessGate(odd_request=True),
        severity=5,
        description="absolute-URI or CONNECT request: testing for an open proxy",
        hits=1,
        window=3600,
        test=_proxy_probe,
        prefilter=_NON_PATH_REQUEST,
        needles=_REQUEST_FIELD,
        samples=(
            _line("192.0.2.70", "GET http://www.example.org/ HTTP/1.1", status=404),
            _line("192.0.2.70", "GET http://202.108.22.5:80/ HTTP/1.0", status=404),
            _line("192.0.2.70", "CONNECT mx.example.net:25 HTTP/1.0", status=405),
            _line("192.0.2.70", "HEAD HTTPS://proxy-check.example/ HTTP/1.1", status=404),
        ),
        benign=(
            '192.0.2.71 - - [08/Jan/2009:04:52:45 -0500] "GET /page HTTP/1.1" 200 330 '
            '"http://www.example.org/" "Mozilla/5.0"',
            _line("192.0.2.71", "GET /redirect?to=http://www.example.org/ HTTP/1.1", status=302),
        ),
    ),
    Signature(
        name="modsecurity",
        access_gate=AccessGate(),  # parse_access leaves Record.message empty
        severity=5,
        description="ModSecurity denied the request (error log or JSON audit log)",
        hits=3,
        window=600,
        test=_modsec,
        needles=(b"access denied with code",),
        samples=(
            "[Thu Jan 08 04:52:45.123456 2009] [:error] [pid 1234] [client 203.0.113.60:51234] "
            "[client 203.0.113.60] ModSecurity: Access denied with code 403 (phase 2). "
            "Matched \"Operator `Rx' with parameter `union.*select' against variable `ARGS:id' "
            '[id "942100"] [uri "/index.php"] [unique_id "AbC"]',
            "2009/01/08 04:52:45 [error] 123#0: *1 [client 203.0.113.61] ModSecurity: Access "
            'denied with code 403 (phase 2). [uri "/x"] [unique_id "1"], client: 203.0.113.61, '
            'server: example.org, request: "GET /x HTTP/1.1", host: "example.org"',
        ),
        benign=(
            "[Thu Jan 08 04:52:45.123456 2009] [:error] [pid 1234] [client 192.0.2.62:5123] "
            'ModSecurity: Warning. Pattern match at ARGS. [uri "/a"]',
            "[Thu Jan 08 04:52:45.123456 2009] [core:error] [pid 1234] [client 192.0.2.62:5123] "
            "AH00126: Invalid URI in request GET /Access denied HTTP/1.1",
        ),
    ),
)


def builtin_names() -> list[str]:
    return [s.name for s in BUILTIN]
