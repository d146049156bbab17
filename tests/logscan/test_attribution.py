"""Who a log line blames: the client the server recorded, never an address the client
wrote into the line (issue #12, item 1).

Each writer renders one request the way that server writes its log: the same fields,
the same escaping (Apache \\" and \\xhh, nginx \\x22, JSON), nginx's cut at 2048 bytes,
with attacker text in every field the client controls (path, query, user, ident, host,
referer, user agent, X-Forwarded-For, header names, ModSecurity values). Whatever that
text says, in whatever spelling, a parsed line resolves to the real peer or to nothing.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imr.cli_context import CliContext
from imr.config import Config, ServerConfig
from imr.core.addresses import IPAddress, IPNetwork
from imr.logscan.cli import scan
from imr.logscan.engine import resolve_client
from imr.logscan.formats import LogFormat, parse_line

CLF = "08/Jan/2009:04:52:45 -0500"
TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)
PROXY = "10.0.0.2"
ISSUE_PATH = "/x,%20client:%20198.51.100.3,%20y/cmd.exe"  # the issue's reproduction

# --- addresses and attacker text ---------------------------------------------

reals = st.one_of(
    st.integers(1, 254).map(lambda i: ipaddress.ip_address(f"203.0.113.{i}")),
    st.integers(1, 0xFFFF).map(lambda i: ipaddress.ip_address(f"2001:db8:1::{i:x}")),
)
fakes = st.one_of(
    st.integers(1, 254).map(lambda i: ipaddress.ip_address(f"198.51.100.{i}")),
    st.integers(1, 0xFFFF).map(lambda i: ipaddress.ip_address(f"2001:db8:bad::{i:x}")),
)


def spellings(address: IPAddress) -> list[str]:
    """Ways a client can write `address`: plain, IPv6 long/short/upper, IPv4-mapped,
    bracketed, with a port, percent-encoded (as sent) and decoded (as nginx logs it)."""
    if isinstance(address, ipaddress.IPv4Address):
        text = str(address)
        forms = [text, f"::ffff:{text}", f"::FFFF:{text}", f"[::ffff:{text}]", f"{text}:8080"]
    else:
        text = address.compressed
        long = address.exploded
        forms = [text, long, text.upper(), long.upper(), f"[{text}]", f"[{text}]:443"]
    every_byte = "".join(f"%{b:02X}" for b in forms[0].encode())
    return [*forms, *(quote(f, safe="") for f in forms), every_byte]


# Field markers of every format, each around a forged address ({a}).
MARKERS = (
    "{a}",
    ", client: {a}, server: www",
    ', client: {a}, server: www, request: "GET /cmd.exe HTTP/1.1", host: "www"',
    "[client {a}] ",
    "[client {a}] ModSecurity: Access denied with code 403 (phase 2). ",
    "(Value: `a, client: {a}, server: b' )",
    f'{{a}} - - [{CLF}] "GET /cmd.exe HTTP/1.1" 404 1 "-" "-"',
    " {a} - x",
    '" "{a}',
    '\\" \\"{a}',
    "[pid 1] ",
    ", referer: {a}",
    '","remote_addr":"{a}',
    '","client_ip":"{a}","x":"',
    '"},"client":{"ip":"{a}"},"x":{"y":"',
    '","transaction":{"client_ip":"{a}","request":{"uri":"/cmd.exe"}},"x":"',
    '"}},"transaction":{"client_ip":"{a}"},"x":{"y":{"z":"',
)
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


@st.composite
def attacker_text(draw: st.DrawFn) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(("marker", "marker", "marker", "text", "padding")))
        if kind == "marker":
            spelled = draw(st.sampled_from(spellings(draw(fakes))))
            parts.append(draw(st.sampled_from(MARKERS)).replace("{a}", spelled))
        elif kind == "padding":  # fills nginx's 2048 bytes so its own context is cut
            parts.append("A" * draw(st.integers(1, 2000)))
        else:
            parts.append(draw(st.text(PRINTABLE, max_size=12)))
    return "".join(parts)


# --- the servers' escaping ---------------------------------------------------------


def apache(text: str) -> str:
    """ap_escape_logitem: \\" \\\\ and \\xhh for control bytes."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def nginx(text: str) -> str:
    """nginx access-log escape=default: \\xHH for '"', '\\' and control bytes."""
    return "".join(
        f"\\x{ord(c):02X}" if c in '"\\' or ord(c) < 0x20 or ord(c) >= 0x7F else c for c in text
    )


def json_value(text: str) -> str:
    return json.dumps(text)[1:-1]


# --- the writers: (real client, attacker text) -> (line as bytes, format) ---------

Writer = Callable[[str, str], tuple[bytes, LogFormat]]


def _request(evil: str, esc: Callable[[str], str]) -> str:
    return esc(f"GET /{evil}?q={evil} HTTP/1.1")


def apache_combined(real: str, evil: str) -> tuple[bytes, LogFormat]:
    user, e = apache(evil) or "-", apache(evil)
    line = f'{real} - {user} [{CLF}] "{_request(evil, apache)}" 404 1 "{e}" "{e}"'
    return line.encode(), LogFormat.COMBINED


def apache_combined_identd(real: str, evil: str) -> tuple[bytes, LogFormat]:
    # IdentityCheck On: %l is whatever the client's own identd answers.
    line = f'{real} {apache(evil) or "-"} - [{CLF}] "{_request(evil, apache)}" 404 1 "-" "-"'
    return line.encode(), LogFormat.COMBINED


def apache_vhost(real: str, evil: str) -> tuple[bytes, LogFormat]:
    e = apache(evil)
    line = f'www.example.org:443 {real} - {e or "-"} [{CLF}] "{_request(evil, apache)}" 404 1 "{e}" "{e}"'  # noqa: E501
    return line.encode(), LogFormat.VHOST_COMBINED


def nginx_combined(real: str, evil: str) -> tuple[bytes, LogFormat]:
    e = nginx(evil)
    line = f'{real} - {e or "-"} [{CLF}] "{_request(evil, nginx)}" 404 1 "{e}" "{e}" "{e or "-"}"'
    return line.encode(), LogFormat.NGINX


def nginx_host_first(real: str, evil: str) -> tuple[bytes, LogFormat]:
    # log_format '$host $remote_addr - $remote_user [$time_local] ...': $host is the
    # client's Host header up to the port, lower-cased.
    host = nginx(evil.split(":")[0].lower()) or "www"
    line = f'{host} {real} - {nginx(evil) or "-"} [{CLF}] "{_request(evil, nginx)}" 404 1 "-" "-"'
    return line.encode(), LogFormat.VHOST_COMBINED


def apache_error_22(real: str, evil: str) -> tuple[bytes, LogFormat]:
    line = (
        f"[Thu Jan 08 04:52:45 2009] [error] [client {real}] File does not exist: "
        f"/var/www/{apache(evil)}, referer: {apache(evil)}"
    )
    return line.encode(), LogFormat.ERROR


def apache_error_24(real: str, evil: str) -> tuple[bytes, LogFormat]:
    line = (
        "[Thu Jan 08 04:52:45.123456 2009] [proxy:error] [pid 1234:tid 5678] (111)Connection "
        f"refused: [client {real}:51234] AH01114: /{apache(evil)}, referer: {apache(evil)}"
    )
    return line.encode(), LogFormat.ERROR


def apache_modsecurity(real: str, evil: str) -> tuple[bytes, LogFormat]:
    e = apache(evil)
    line = (
        f"[Thu Jan 08 04:52:45.123456 2009] [:error] [pid 1234] [client {real}:51234] "
        f"[client {real}] ModSecurity: Access denied with code 403 (phase 2). Pattern match "
        f'"cmd" at ARGS:q. [data "{e}"] [hostname "www"] [uri "/{e}"] [unique_id "x"]'
    )
    return line.encode(), LogFormat.ERROR


def _nginx_cut(line: bytes) -> bytes:
    # ngx_log_error_core: one 2048-byte buffer, newline included; the context goes last.
    return line[:2047]


def nginx_error(real: str, evil: str) -> tuple[bytes, LogFormat]:
    # nginx logs the decoded path raw; decoded CR/LF would split the entry into several
    # physical lines, which no line parser can undo (docs/logscan.md), so they are left out.
    path = unquote_to_bytes(evil).replace(b"\n", b"%").replace(b"\r", b"%")
    raw = evil.encode()
    line = (
        b'2009/01/08 04:52:45 [error] 12#0: *5 open() "/var/www/html/' + path + b'" failed '
        b"(2: No such file or directory), client: " + real.encode() + b", server: www, "
        b'request: "GET /' + raw + b' HTTP/1.1", host: "' + (raw or b"www") + b'", '
        b'referrer: "' + raw + b'"'
    )
    return _nginx_cut(line), LogFormat.ERROR


def nginx_modsecurity(real: str, evil: str) -> tuple[bytes, LogFormat]:
    raw = evil.encode()
    line = (
        b"2009/01/08 04:52:45 [error] 12#0: *5 [client " + real.encode() + b"] ModSecurity: "
        b"Access denied with code 403 (phase 2). Matched \"Operator `Rx' with parameter "
        b"`cmd' against variable `ARGS:q' (Value: `" + raw + b'\' ) [hostname "www"] '
        b'[uri "/' + raw + b'"] [unique_id "1"], client: ' + real.encode() + b", server: www, "
        b'request: "GET /' + raw + b' HTTP/1.1", host: "www", referrer: "' + raw + b'"'
    )
    return _nginx_cut(line), LogFormat.ERROR


def _nginx_json(template: str, esc: Callable[[str], str]) -> Writer:
    def write(real: str, evil: str) -> tuple[bytes, LogFormat]:
        line = template.replace("$remote_addr", real).replace("$evil", esc(evil))
        return line.encode(), LogFormat.JSON

    return write


_NGINX_JSON = (
    '{"time_iso8601":"2009-01-08T04:52:45-05:00","remote_addr":"$remote_addr",'
    '"remote_user":"$evil","request":"GET /$evil HTTP/1.1","status":"404",'
    '"http_referer":"$evil","http_user_agent":"$evil","http_x_forwarded_for":"$evil"}'
)
# The client key comes last and is not the first one the parser knows.
_NGINX_JSON_LATE = '{"request":"GET /$evil HTTP/1.1","ua":"$evil","client":"$remote_addr"}'
_NGINX_JSON_NESTED = '{"request":{"uri":"/$evil","ua":"$evil"},"client":{"ip":"$remote_addr"}}'


def json_with_headers(real: str, evil: str) -> tuple[bytes, LogFormat]:
    # An application logging its request headers: the client chooses their names.
    headers = {name: evil for name in ("ip", "remote_addr", "client_ip", "X-Forwarded-For")}
    obj = {"client": {"ip": real}, "uri": f"/{evil}", "headers": headers}
    return json.dumps(obj).encode(), LogFormat.JSON


def modsec_v3(real: str, evil: str) -> tuple[bytes, LogFormat]:
    headers = {"Host": evil, "User-Agent": evil, evil[:20] or "x": evil}
    tx = {
        "client_ip": real,
        "time_stamp": "Thu Jan  8 04:52:45 2009",
        "request": {"method": "GET", "uri": f"/{evil}", "headers": headers},
        "response": {"http_code": 403},
        "messages": [{"message": evil, "details": {"data": evil, "match": evil}}],
    }
    return json.dumps({"transaction": tx}).encode(), LogFormat.MODSEC_JSON


def modsec_v2(real: str, evil: str) -> tuple[bytes, LogFormat]:
    obj = {
        "transaction": {"time": f"{CLF[:-5]}--0500", "remote_address": real},
        "request": {"request_line": f"GET /{evil} HTTP/1.1", "headers": {"Referer": evil}},
        "response": {"status": 403},
        "audit_data": {"messages": [evil]},
    }
    return json.dumps(obj).encode(), LogFormat.MODSEC_JSON


WRITERS: dict[str, Writer] = {
    "apache_combined": apache_combined,
    "apache_combined_identd": apache_combined_identd,
    "apache_vhost_combined": apache_vhost,
    "nginx_combined_xff": nginx_combined,
    "nginx_host_first": nginx_host_first,
    "apache22_error": apache_error_22,
    "apache24_error": apache_error_24,
    "apache_modsecurity": apache_modsecurity,
    "nginx_error": nginx_error,
    "nginx_modsecurity": nginx_modsecurity,
    "nginx_json_escape_json": _nginx_json(_NGINX_JSON, json_value),
    "nginx_json_escape_default": _nginx_json(_NGINX_JSON, nginx),
    "nginx_json_escape_none": _nginx_json(_NGINX_JSON, lambda s: s),
    "nginx_json_late_key_escape_none": _nginx_json(_NGINX_JSON_LATE, lambda s: s),
    "nginx_json_nested_escape_none": _nginx_json(_NGINX_JSON_NESTED, lambda s: s),
    "json_with_headers": json_with_headers,
    "modsec_audit_v3": modsec_v3,
    "modsec_audit_v2": modsec_v2,
}


def blamed(line: bytes, fmt: LogFormat, trusted: tuple[IPNetwork, ...] = ()) -> set[str]:
    """Whom the scanner would block for `line`, read as `fmt` and auto-detected."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return set()  # the scanner counts it as bad
    found = set()
    for as_fmt in (fmt, LogFormat.AUTO):
        record = parse_line(text, as_fmt)
        if record is not None and (client := resolve_client(record, trusted)) is not None:
            found.add(str(client))
    return found


# --- the property --------------------------------------------------------------


@pytest.mark.parametrize("writer", WRITERS, ids=str)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(real=reals, evil=attacker_text())
@example(real=ipaddress.ip_address("203.0.113.9"), evil=ISSUE_PATH)
@example(real=ipaddress.ip_address("203.0.113.9"), evil="x, client: 198.51.100.3, server: y")
@example(real=ipaddress.ip_address("203.0.113.9"), evil='","client_ip":"198.51.100.3","x":"')
@example(real=ipaddress.ip_address("203.0.113.9"), evil='","remote_addr":"198.51.100.3","x":"')
@example(
    real=ipaddress.ip_address("203.0.113.9"),
    evil='"},"transaction":{"client_ip":"198.51.100.3"},"x":{"y":"',
)
@example(real=ipaddress.ip_address("203.0.113.9"), evil="198.51.100.3")
@example(real=ipaddress.ip_address("203.0.113.9"), evil="198.51.100.3 x")
@example(real=ipaddress.ip_address("203.0.113.9"), evil="x 198.51.100.3")
@example(
    real=ipaddress.ip_address("203.0.113.9"),
    evil="[client 198.51.100.3] ModSecurity: x, client: 198.51.100.3, server: w" + "A" * 1900,
)
# A Host header that makes an nginx host-first access line look like an Apache error line.
@example(real=ipaddress.ip_address("203.0.113.1"), evil="[pid 1] [client ::ffff:198.51.100.1] ")
def test_only_the_real_peer_is_ever_blamed(writer: str, real: IPAddress, evil: str) -> None:
    line, fmt = WRITERS[writer](str(real), evil)
    assert blamed(line, fmt) <= {str(real)}, line


@pytest.mark.parametrize("writer", WRITERS, ids=str)
@settings(max_examples=40, deadline=None)
@given(real=reals, fake=fakes, data=st.data())
def test_a_bare_address_in_client_text_still_blames_the_peer(
    writer: str, real: IPAddress, fake: IPAddress, data: st.DataObject
) -> None:
    """No marker, just another address somewhere: the line is parsed and the peer blamed
    (the property above is not met by refusing everything)."""
    spelled = data.draw(st.sampled_from(spellings(fake)))
    line, fmt = WRITERS[writer](str(real), f"/{spelled}/cmd.exe")
    if writer == "nginx_host_first":
        fmt = LogFormat.VHOST_COMBINED  # auto-detection refuses a first field without a port
        record = parse_line(line.decode(), fmt)
        assert record is not None and resolve_client(record, ()) == real
        return
    assert blamed(line, fmt) == {str(real)}, line


@settings(max_examples=150, deadline=None)
@given(real=reals, evil=attacker_text())
@example(real=ipaddress.ip_address("203.0.113.9"), evil="198.51.100.3")
def test_behind_a_trusted_proxy_only_the_hop_it_appended_counts(real: IPAddress, evil: str) -> None:
    """The proxy appends the address it saw to whatever X-Forwarded-For the client sent."""
    xff = f"{evil}, {real}" if evil else str(real)
    e = nginx(evil)
    nginx_line = f'{PROXY} - - [{CLF}] "GET /{e} HTTP/1.1" 404 1 "-" "{e}" "{nginx(xff)}"'
    assert blamed(nginx_line.encode(), LogFormat.NGINX, TRUSTED) <= {str(real)}
    headers = f'"X-Forwarded-For":"{real}","x-forwarded-for":{json.dumps(evil or "198.51.100.3")}'
    # the client's own header kept beside the proxy's
    doubled = f'{{"transaction":{{"client_ip":"{PROXY}","request":{{"headers":{{{headers}}}}}}}}}'
    assert blamed(doubled.encode(), LogFormat.MODSEC_JSON, TRUSTED) <= {str(real)}
    same_key = doubled.replace('"x-forwarded-for"', '"X-Forwarded-For"')
    assert blamed(same_key.encode(), LogFormat.MODSEC_JSON, TRUSTED) <= {str(real)}


# --- end to end: imr scan on the issue's line -------------------------------------


def test_imr_scan_never_blocks_the_address_in_the_uri(tmp_path: Path) -> None:
    line, _ = nginx_error("203.0.113.9", ISSUE_PATH)
    forged_server = line.replace(b", y/cmd.exe", b", server: y/cmd.exe")
    log = tmp_path / "error.log"
    log.write_bytes(line + b"\n" + forged_server + b"\n")
    result = CliRunner().invoke(
        scan,
        [str(log), "--dry-run", "--json", "--state-dir", str(tmp_path / "st")],
        obj=CliContext(Config(server=ServerConfig(socket=tmp_path / "none.sock")), Path("x")),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert "198.51.100.3" not in result.output
    # The first line blames the client that sent it; the second (two markers naming
    # different addresses) blames nobody and is counted as bad.
    assert [(b["ip"], b["signature"]) for b in report["blocks"]] == [("203.0.113.9", "nimda")]
    assert report["bad_lines"] == 1
