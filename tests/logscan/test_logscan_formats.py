"""Every format parses its tricky cases; bad lines are counted, never fatal."""

from __future__ import annotations

import json

from imr.logscan.engine import Scanner, resolve_client
from imr.logscan.formats import LogFormat, parse_line, unescape
from imr.logscan.settings import LogscanConfig
from imr.logscan.signatures import BUILTIN

_T = "[08/Jan/2009:04:52:45 -0500]"
EPOCH = 1231408365.0  # 2009-01-08 09:52:45 UTC


def test_common_and_combined_and_vhost_combined() -> None:
    common = parse_line(f'203.0.113.5 - frank {_T} "GET /a HTTP/1.0" 200 2326')
    assert common is not None and common.fmt is LogFormat.COMMON
    assert (common.peer, common.method, common.target, common.status, common.time) == (
        "203.0.113.5",
        "GET",
        "/a",
        200,
        EPOCH,
    )
    comb = parse_line(f'203.0.113.5 - - {_T} "GET /a HTTP/1.0" 200 - "http://r/" "UA 1.0"')
    assert comb is not None and comb.fmt is LogFormat.COMBINED
    assert (comb.referer, comb.user_agent) == ("http://r/", "UA 1.0")
    vhost = parse_line(f'www.example.org:443 203.0.113.5 - - {_T} "GET /a HTTP/1.1" 200 5 "-" "UA"')
    assert vhost is not None and vhost.fmt is LogFormat.VHOST_COMBINED
    assert vhost.peer == "203.0.113.5"


def test_ipv6_clients() -> None:
    rec = parse_line(f'2001:db8::bad - - {_T} "GET / HTTP/1.1" 200 1 "-" "-"')
    assert rec is not None and rec.peer == "2001:db8::bad"
    vhost = parse_line(f'example.org:80 2001:db8:0:1::2 - - {_T} "GET / HTTP/1.1" 200 1 "-" "-"')
    assert vhost is not None and vhost.peer == "2001:db8:0:1::2"


def test_escaped_quotes_apache_and_nginx() -> None:
    apache = parse_line(f'203.0.113.5 - - {_T} "GET /a\\"b HTTP/1.1" 400 1 "-" "say \\"hi\\""')
    assert apache is not None
    assert (apache.target, apache.user_agent) == ('/a"b', 'say "hi"')
    nginx = parse_line(f'203.0.113.5 - - {_T} "GET /a\\x22b HTTP/1.1" 400 1 "-" "x\\x22y" "-"')
    assert nginx is not None
    assert (nginx.target, nginx.user_agent) == ('/a"b', 'x"y')
    assert unescape("\\x16\\x03\\\\") == "\x16\x03\\"


def test_nginx_forwarded_for_field() -> None:
    rec = parse_line(f'10.0.0.2 - - {_T} "GET / HTTP/1.1" 200 1 "-" "UA" "203.0.113.9, 10.0.0.3"')
    assert rec is not None and rec.forwarded_for == "203.0.113.9, 10.0.0.3"


def test_json_access_log() -> None:
    line = json.dumps(
        {
            "time_iso8601": "2009-01-08T04:52:45-05:00",
            "remote_addr": "203.0.113.7",
            "request": "GET /mail/bin/msgimport HTTP/1.1",
            "status": "404",
            "http_user_agent": "UA",
            "http_x_forwarded_for": "-",
        }
    )
    rec = parse_line(line)
    assert rec is not None and rec.fmt is LogFormat.JSON
    assert (rec.peer, rec.target, rec.status, rec.time, rec.forwarded_for) == (
        "203.0.113.7",
        "/mail/bin/msgimport",
        404,
        EPOCH,
        "",
    )
    nested = parse_line(json.dumps({"client": {"ip": "203.0.113.8"}, "method": "GET", "uri": "/x"}))
    assert nested is not None and (nested.peer, nested.target) == ("203.0.113.8", "/x")


def test_modsecurity_json_audit_log_v2_and_v3() -> None:
    v3 = {
        "transaction": {
            "client_ip": "203.0.113.20",
            "time_stamp": "Thu Jan  8 04:52:45 2009",
            "request": {"method": "GET", "uri": "/x", "headers": {"User-Agent": "Morfeus"}},
            "response": {"http_code": 403},
            "messages": [{"message": "SQL Injection Attack Detected"}],
        }
    }
    rec = parse_line(json.dumps(v3))
    assert rec is not None and rec.fmt is LogFormat.MODSEC_JSON
    assert (rec.peer, rec.target, rec.status, rec.user_agent) == (
        "203.0.113.20",
        "/x",
        403,
        "Morfeus",
    )
    v2 = {
        "transaction": {"time": "08/Jan/2009:04:52:45 --0500", "remote_address": "203.0.113.21"},
        "request": {"request_line": "GET /w00tw00t.at.ISC.SANS.DFind:) HTTP/1.1", "headers": {}},
        "response": {"status": 400},
        "audit_data": {"messages": ["Access denied with code 400"]},
    }
    rec2 = parse_line(json.dumps(v2))
    assert rec2 is not None and (rec2.peer, rec2.time, rec2.status) == ("203.0.113.21", EPOCH, 400)
    hits, _ = Scanner(BUILTIN).scan_line(json.dumps(v2).encode())
    assert [h.signature.name for h in hits] == ["dfind"]


def test_error_log_client_addresses() -> None:
    a22 = parse_line(
        "[Thu Jan 08 04:52:45 2009] [error] [client 203.0.113.30] File does not exist: /x"
    )
    assert a22 is not None and a22.peer == "203.0.113.30"
    a24 = parse_line(
        "[Thu Jan 08 04:52:45.123 2009] [:error] [pid 1:tid 2] [client 2001:db8::1:4711] msg"
    )
    assert a24 is not None and a24.peer == "2001:db8::1"  # 2.4 style: the last group is the port
    ngx = parse_line(
        '2009/01/08 04:52:45 [error] 1#0: *5 open() "/x" failed, client: 203.0.113.31, server: a, '
        'request: "GET /x HTTP/1.1", host: "a"'
    )
    assert ngx is not None and (ngx.peer, ngx.method, ngx.target) == ("203.0.113.31", "GET", "/x")


def test_format_override_rejects_other_formats() -> None:
    line = f'203.0.113.5 - - {_T} "GET / HTTP/1.0" 200 1'
    assert parse_line(line, LogFormat.COMMON) is not None
    assert parse_line(line, LogFormat.JSON) is None
    assert parse_line(line, LogFormat.VHOST_COMBINED) is None


def test_bad_lines_are_counted_and_skipped() -> None:
    scanner = Scanner(BUILTIN, max_line=4096)
    good = b'203.0.113.50 - - [08/Jan/2009:04:52:45 -0500] "GET /bin/msgimport HTTP/1.1" 404 1 "-" "-"\n'  # noqa: E501
    bad = [
        b'203.0.113.51 - - [08/Jan/2009:04:52:45 -0500] "GET /bin/msgimport HTT\n',  # truncated
        b"\x00\x00\x00msgimport\x00\x00\n",  # binary
        b'203.0.113.52 - - [08/Jan/2009:04:52:45 -0500] "GET /bin/msgimport\xff\xfe HTTP/1.1" 4 1\n',  # noqa: E501
        b'203.0.113.53 - - [08/Jan/2009:04:52:45 -0500] "GET /bin/msgimport?'
        + b"A" * 9000
        + b'"\n',
    ]
    hits, stats = scanner.scan_block(good + b"".join(bad) + good)
    assert [h.ip for h in hits] == ["203.0.113.50", "203.0.113.50"]
    assert stats.bad == len(bad)
    assert stats.lines == 6


def test_trusted_proxy_forwarded_for() -> None:
    config = LogscanConfig(trusted_proxies=["10.0.0.0/8"])
    trusted = tuple(config.trusted_proxies)
    via = parse_line(
        f'10.0.0.2 - - {_T} "GET / HTTP/1.1" 200 1 "-" "UA" "198.51.100.1, 203.0.113.9, 10.0.0.3"'
    )
    assert via is not None
    assert str(resolve_client(via, trusted)) == "203.0.113.9"  # rightmost untrusted hop
    only_proxies = parse_line(f'10.0.0.2 - - {_T} "GET / HTTP/1.1" 200 1 "-" "UA" "10.1.1.1"')
    assert only_proxies is not None and resolve_client(only_proxies, trusted) is None
    direct = parse_line(f'203.0.113.4 - - {_T} "GET / HTTP/1.1" 200 1 "-" "UA" "198.51.100.1"')
    assert direct is not None
    assert str(resolve_client(direct, trusted)) == "203.0.113.4"  # untrusted peer: XFF is a lie
    named = parse_line(f'evil.example - - {_T} "GET / HTTP/1.1" 200 1 "-" "UA"')
    assert named is not None and resolve_client(named, trusted) is None


def test_a_trusted_proxy_is_never_blocked() -> None:
    scanner = Scanner(BUILTIN, trusted=(__import__("ipaddress").ip_network("10.0.0.0/8"),))
    line = f'10.0.0.2 - - {_T} "GET /mail/bin/msgimport HTTP/1.1" 404 1 "-" "UA" "-"\n'
    hits, stats = scanner.scan_block(line.encode())
    assert hits == [] and stats.unresolved == 1
    line = f'10.0.0.2 - - {_T} "GET /mail/bin/msgimport HTTP/1.1" 404 1 "-" "UA" "203.0.113.77"\n'
    hits, _ = scanner.scan_block(line.encode())
    assert [h.ip for h in hits] == ["203.0.113.77"]


# --- attribution: the client field is the server's, never client text (issue #12) ---

_NGX = "2009/01/08 04:52:45 [error] 12#0: *5 "
_FAKE = "198.51.100.3"


def _peer(line: str, fmt: LogFormat = LogFormat.AUTO) -> str | None:
    rec = parse_line(line, fmt)
    return rec.peer if rec is not None else None


def test_nginx_error_client_is_nginx_own_context() -> None:
    tail = ', client: 203.0.113.9, server: www, request: "GET /x,%20client:%20{a},%20y/cmd.exe"'
    issue = _NGX + 'open() "/var/www/x, client: {a}, y/cmd.exe" failed (2: No such file)' + tail
    assert _peer(issue.format(a=_FAKE)) == "203.0.113.9"
    # The marker in full, before (decoded path) or after (raw referrer) the real one: nobody.
    forged = issue.replace(", y/cmd", ", server: y/cmd").format(a=_FAKE)
    assert _peer(forged) is None
    assert _peer(issue.format(a="x") + f', referrer: "a, client: {_FAKE}, server: b"') is None
    # The same address in another spelling is no conflict.
    same = issue.replace(", y/cmd", ", server: y/cmd").format(a="::ffff:203.0.113.9")
    assert _peer(same) == "203.0.113.9"
    # A line at nginx's 2048-byte limit may have lost its context: only a forged one is left.
    path = f'/x, client: {_FAKE}, server: w, request: "GET /cmd.exe HTTP/1.1"' + "A" * 3000
    cut = (_NGX + f'open() "{path}" failed (36: File name too long)' + tail.format(a="x"))[:2047]
    assert _peer(cut) is None


def test_modsecurity_nginx_client_is_the_leading_one() -> None:
    line = (
        _NGX + "[client 203.0.113.61] ModSecurity: Access denied with code 403 (phase 2). "
        f"Matched \"Operator `Rx'\" against variable `ARGS:a' (Value: `a, client: {_FAKE}, "
        'server: b\' ) [uri "/x"], client: 203.0.113.61, server: a, request: "GET /x HTTP/1.1"'
    )
    assert _peer(line) == "203.0.113.61"
    assert _peer((line + "A" * 3000)[:2047]) == "203.0.113.61"  # cut: the leading one stays


def test_apache_error_client_only_from_its_field() -> None:
    in_message = (
        f"[Thu Jan 08 04:52:45 2009] [error] File does not exist: /var/www/[client {_FAKE}]"
    )
    assert _peer(in_message) is None
    status = (
        "[Thu Jan 08 04:52:45.1 2009] [proxy:error] [pid 1:tid 2] (111)Connection refused: "
        f"[client 203.0.113.9:4711] AH01114: /[client {_FAKE}]"
    )
    assert _peer(status) == "203.0.113.9"
    # 2.2 logs no port: a "[pid " in the client's path must not make the last group one.
    a22 = (
        "[Thu Jan 08 04:52:45 2009] [error] [client 2001:db8::1:4711] File does not exist: /[pid x"
    )
    assert _peer(a22) == "2001:db8::1:4711"
    bracketed = "[Thu Jan 08 04:52:45.1 2009] [core:error] [pid 1] [client [2001:db8::1]:4711] x"
    assert _peer(bracketed) == "2001:db8::1"


def test_access_log_peer_position() -> None:
    req = f'{_T} "GET /cmd.exe HTTP/1.1" 404 1 "-" "-"'
    # IdentityCheck On: the client's identd answers "198.51.100.3 x" as its user name.
    identd = f"203.0.113.9 {_FAKE} x - {req}"
    assert _peer(identd, LogFormat.COMBINED) == "203.0.113.9"
    assert _peer(identd) is None  # auto: "vhost peer ident user" without a vhost:port
    # A Basic-auth user with spaces: a named format still reads the line.
    spaced = parse_line(f"203.0.113.9 - {_FAKE} - x {req}", LogFormat.COMBINED)
    assert spaced is not None and (spaced.peer, spaced.target) == ("203.0.113.9", "/cmd.exe")
    # nginx '$host $remote_addr ...': the Host header comes first, and may hold a space.
    assert _peer(f"www 203.0.113.9 - - {req}", LogFormat.VHOST_COMBINED) == "203.0.113.9"
    assert _peer(f"a {_FAKE} 203.0.113.9 - - {req}", LogFormat.VHOST_COMBINED) is None


def test_json_log_client_keys_must_agree() -> None:
    def line(body: str) -> str:
        return '{"request":"GET /cmd.exe HTTP/1.1",' + body + "}"

    assert _peer(line('"remote_addr":"203.0.113.7"')) == "203.0.113.7"
    # nginx without escape=json: a '"' in the user agent adds keys.
    assert _peer(line(f'"remote_addr":"203.0.113.7","ua":"x","remote_addr":"{_FAKE}"')) is None
    assert _peer(line(f'"ua":"x","remote_addr":"{_FAKE}","y":"","client":"203.0.113.7"')) is None
    assert _peer(line(f'"client":{{"ip":"203.0.113.7"}},"ua":"x","ip":"{_FAKE}"')) is None
    # Header names are the client's: they never name the client.
    headers = json.dumps({"client": {"ip": "203.0.113.7"}, "headers": {"remote_addr": _FAKE}})
    assert _peer(headers) == "203.0.113.7"
    # A "transaction" key injected into an access log is no ModSecurity audit entry.
    injected = f'{{"remote_addr":"203.0.113.7","ua":"x","transaction":{{"client_ip":"{_FAKE}"}}}}'
    assert _peer(injected) is None


def test_modsecurity_audit_log_forwarded_for_repeated() -> None:
    headers = f'{{"X-Forwarded-For":"203.0.113.9","X-Forwarded-For":"{_FAKE}"}}'
    entry = f'{{"transaction":{{"client_ip":"10.0.0.2","request":{{"headers":{headers}}}}}}}'
    rec = parse_line(entry)
    assert rec is not None and rec.forwarded_for == ""
    trusted = LogscanConfig(trusted_proxies=["10.0.0.0/8"]).trusted_proxies
    assert resolve_client(rec, trusted) is None
