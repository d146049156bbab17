"""Parse one log line into a Record: access logs, JSON logs, ModSecurity logs.

Pure functions on text. The scanner only parses lines its prefilter flagged,
so parsing can afford regexes and strptime. A line that fits no format gives
None; the caller counts it as bad and moves on.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class LogFormat(StrEnum):
    AUTO = "auto"
    COMMON = "common"
    COMBINED = "combined"
    VHOST_COMBINED = "vhost_combined"
    NGINX = "nginx"  # nginx "combined" (optionally followed by "$http_x_forwarded_for")
    JSON = "json"  # one JSON access-log object per line
    MODSEC_JSON = "modsec_json"  # ModSecurity audit log, SecAuditLogFormat JSON
    ERROR = "error"  # Apache / nginx error log (ModSecurity messages)


@dataclass(frozen=True, slots=True)
class Record:
    peer: str  # the address that connected, as logged (maybe a proxy)
    forwarded_for: str = ""  # X-Forwarded-For as logged, if the format has it
    time: float | None = None  # seconds since the epoch, from the line
    method: str = ""
    target: str = ""  # request target, unescaped
    status: int | None = None
    user_agent: str = ""
    referer: str = ""
    message: str = ""  # error-log / audit-log message text
    fmt: LogFormat = LogFormat.COMBINED


# A quoted field as Apache (\" and \xhh) and nginx (\x22) escape it. Possessive: a field
# has only one parse, so a long hostile one costs one pass.
_Q = r'"((?:[^"\\]++|\\.)*+)"'
# Everything before the request's opening quote: "[vhost] peer ident user [time] ". The
# user (a Basic-auth name) is client text and may hold spaces, brackets and escaped quotes
# but no raw '"' (Apache logs an empty user as ""), so the first raw quote opens the request.
_ACCESS_HEAD = re.compile(r'(?:[^"\\]++|\\.|""(?= \[))*+')
_ACCESS = re.compile(
    _Q.replace("((", "(?P<request>(", 1) + r" (?P<status>\d{3}|-) (?P<size>\d+|-)"
    r"(?: " + _Q.replace("((", "(?P<referer>(", 1) + " " + _Q.replace("((", "(?P<ua>(", 1) + ")?"
    r"(?: " + _Q.replace("((", "(?P<xff>(", 1) + r")?(?P<rest>.*)$",
    re.DOTALL,
)
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")
_REQUEST = re.compile(r"^(?P<method>\S+) (?P<target>\S+)(?: (?P<proto>\S+))?$", re.DOTALL)


def unescape(text: str) -> str:
    """Undo Apache/nginx log escaping (\\" \\\\ \\xhh); other text is kept as is."""
    if "\\" not in text:
        return text

    def repl(m: re.Match[str]) -> str:
        code = m.group(1)
        if code[0] == "x" and len(code) == 3:
            return chr(int(code[1:], 16))
        return {"n": "\n", "t": "\t", "r": "\r"}.get(code, code)

    return _ESCAPE.sub(repl, text)


@functools.lru_cache(maxsize=4096)  # busy logs repeat the same second many times
def parse_clf_time(text: str) -> float | None:
    """08/Jan/2009:04:52:45 -0500 -> epoch seconds."""
    try:
        return datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z").timestamp()
    except ValueError:
        return None


def split_request(request: str) -> tuple[str, str]:
    """'GET /x HTTP/1.1' -> ('GET', '/x'); junk (TLS bytes, '-') -> ('', junk)."""
    m = _REQUEST.match(request)
    if m is None:
        return "", request
    return m.group("method"), m.group("target")


# Apache's vhost_combined starts with "%v:%p"; a client address is never logged with a port.
_VHOST = re.compile(r"(?:[^\s:\[\]]+|\[[^\s\]]+\]):\d{1,5}")


def _access_peer(head: str, fmt: LogFormat) -> tuple[str, LogFormat] | None:
    """(peer, format) from the head of an access-log line, or None when unsure.

    The head is "[vhost] peer ident user". The user (a Basic-auth name) and a
    host-derived first field (nginx $host) are client text that may hold spaces,
    so the peer's position is only certain when the peer comes first (named
    combined/common formats) or no field has a space (four tokens for
    vhost_combined). Auto-detection takes four tokens as vhost_combined only when
    the first is "host:port", and refuses every other ambiguous head."""
    tokens = head.split(" ")
    if len(tokens) < 3 or not tokens[0] or not tokens[1]:
        return None
    if fmt is LogFormat.VHOST_COMBINED:
        return (tokens[1], fmt) if len(tokens) == 4 else None
    if fmt is not LogFormat.AUTO:
        return tokens[0], fmt
    if len(tokens) == 3:
        return tokens[0], LogFormat.COMBINED
    if len(tokens) == 4 and _VHOST.fullmatch(tokens[0]):
        return tokens[1], LogFormat.VHOST_COMBINED
    return None


def parse_access(line: str, fmt: LogFormat = LogFormat.COMBINED) -> Record | None:
    head = _ACCESS_HEAD.match(line)  # always matches, maybe ""
    before = head.group() if head else ""
    opening = before.rfind(" [")
    when = before[opening + 2 : -2]
    if opening < 0 or not before.endswith("] ") or not 0 < len(when) <= 64 or "]" in when:
        return None
    m = _ACCESS.match(line, len(before))
    if m is None:
        return None
    found = _access_peer(before[:opening], fmt)
    if found is None:
        return None
    peer, detected = found
    if fmt is LogFormat.COMMON and m.group("ua") is not None:
        return None
    if fmt is LogFormat.AUTO and detected is LogFormat.COMBINED and m.group("ua") is None:
        detected = LogFormat.COMMON
    method, target = split_request(unescape(m.group("request")))
    status = m.group("status")
    xff = m.group("xff")
    return Record(
        peer=peer,
        forwarded_for=unescape(xff) if xff and xff != "-" else "",
        time=parse_clf_time(when),
        method=method,
        target=target,
        status=int(status) if status != "-" else None,
        user_agent=unescape(m.group("ua") or ""),
        referer=unescape(m.group("referer") or ""),
        fmt=detected,
    )


# --- JSON access logs -------------------------------------------------------

_PEER_KEYS = ("remote_addr", "client_ip", "clientip", "remote_ip", "client", "ip", "remoteIP")
_XFF_KEYS = ("http_x_forwarded_for", "x_forwarded_for", "xff", "forwarded_for")
_UA_KEYS = ("http_user_agent", "user_agent", "agent", "useragent", "userAgent")
_REF_KEYS = ("http_referer", "referer", "referrer")
_STATUS_KEYS = ("status", "status_code", "response", "code")
_TIME_KEYS = ("time_iso8601", "time", "timestamp", "@timestamp", "time_local", "ts")
# Objects that may hold the client one level down ({"client": {"ip": ...}}). Others, such
# as "headers" or "args", have keys the client chose and never name it.
_CLIENT_PARENTS = ("client", "source", "request", "http", "remote", "connection")


class _RepeatedKeys(dict[str, Any]):
    """A JSON object that names a key twice (json keeps the last value). nginx without
    escape=json lets a '"' in a header close its string and add keys, so which value
    is the real one cannot be known."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    return obj if len(obj) == len(pairs) else _RepeatedKeys(pairs)


def _claims(obj: dict[str, Any], keys: tuple[str, ...]) -> list[str] | None:
    """Every value the line gives under `keys`, at the top and in the client objects;
    None if one of those objects repeats a key."""
    containers = [obj, *(v for k in _CLIENT_PARENTS if isinstance(v := obj.get(k), dict))]
    if any(isinstance(c, _RepeatedKeys) for c in containers):
        return None
    return [
        value
        for container in containers
        for key in keys
        if isinstance(value := container.get(key), str) and value not in ("", "-")
    ]


def _first(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = obj.get(key)
        if value not in (None, "", "-"):
            return value
    return None


def parse_any_time(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Milliseconds are common in JSON logs; no log line is from 2286.
        return float(value) / 1000 if value > 1e11 else float(value)
    if not isinstance(value, str):
        return None
    clf = parse_clf_time(value)
    if clf is not None:
        return clf
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo else None


def _flatten(obj: dict[str, Any]) -> dict[str, Any]:
    # {"request": {"method": ...}} and {"client": {"ip": ...}} style logs: one level is enough.
    flat = dict(obj)
    for key, value in obj.items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat.setdefault(f"{key}_{sub}", inner)
                flat.setdefault(sub, inner)
    return flat


def parse_json_access(line: str) -> Record | None:
    """One JSON access-log object. The client is the value of the known client keys;
    when they name different addresses, or repeat, the line is refused (an injected
    key, see _RepeatedKeys) rather than one of them guessed."""
    obj = _load_object(line)
    if obj is None or "transaction" in obj:
        return None
    peers = _claims(obj, _PEER_KEYS)
    peer = agreed(peers) if peers else None
    if peer is None:
        return None
    forwarded = _claims(obj, _XFF_KEYS) or []
    # Behind a trusted proxy, two different X-Forwarded-For values block nothing.
    xff = (agreed(forwarded) or "") if forwarded else ""
    flat = _flatten(obj)
    method = flat.get("request_method") or flat.get("method") or ""
    target = flat.get("request_uri") or flat.get("uri") or flat.get("path") or ""
    request = flat.get("request")
    if isinstance(request, str) and not target:
        method, target = split_request(request)
    status = _first(flat, _STATUS_KEYS)
    try:
        status_code = int(status) if status is not None else None
    except (TypeError, ValueError):
        status_code = None
    return Record(
        peer=peer,
        forwarded_for=xff,
        time=parse_any_time(_first(flat, _TIME_KEYS)),
        method=str(method),
        target=str(target),
        status=status_code,
        user_agent=str(_first(flat, _UA_KEYS) or ""),
        referer=str(_first(flat, _REF_KEYS) or ""),
        fmt=LogFormat.JSON,
    )


def _load_object(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line, object_pairs_hook=_object)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


# --- ModSecurity ------------------------------------------------------------


def _modsec_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    # v2: "08/Jan/2009:04:52:45 --0500" (sic, double minus); v3: "Thu Jan  8 04:52:45 2009".
    fixed = value.replace(" --", " -").replace(" -+", " +")
    clf = parse_clf_time(fixed)
    if clf is not None:
        return clf
    try:
        return datetime.strptime(" ".join(value.split()), "%a %b %d %H:%M:%S %Y").timestamp()
    except ValueError:
        return None


def parse_modsec_json(line: str) -> Record | None:
    """One audit-log entry (ModSecurity v2 or v3 JSON format)."""
    obj = _load_object(line)
    if obj is None or not isinstance(obj.get("transaction"), dict):
        return None
    tx: dict[str, Any] = obj["transaction"]
    # An audit entry holds only objects at the top. A flat JSON access log whose
    # unescaped header added a "transaction" key has strings there: not an entry.
    if isinstance(obj, _RepeatedKeys) or isinstance(tx, _RepeatedKeys):
        return None
    if not all(isinstance(v, dict | list) for v in obj.values()):
        return None
    if isinstance(tx.get("client_ip"), str):  # v3: everything under "transaction"
        request = tx.get("request") or {}
        response = tx.get("response") or {}
        messages = tx.get("messages") or []
        peer, when = tx["client_ip"], _modsec_time(tx.get("time_stamp"))
        status = response.get("http_code") if isinstance(response, dict) else None
    elif isinstance(tx.get("remote_address"), str):  # v2
        request = obj.get("request") or {}
        response = obj.get("response") or {}
        audit = obj.get("audit_data") or {}
        messages = audit.get("messages") or [] if isinstance(audit, dict) else []
        peer, when = tx["remote_address"], _modsec_time(tx.get("time"))
        status = response.get("status") if isinstance(response, dict) else None
    else:
        return None
    if not isinstance(request, dict):
        request = {}
    beside = _claims(obj, _PEER_KEYS)  # an access-log client key here was injected
    if not isinstance(peer, str) or beside is None or agreed([peer, *beside]) is None:
        return None
    raw_headers = request.get("headers")
    headers: dict[str, Any] = raw_headers if isinstance(raw_headers, dict) else {}
    pairs = headers.pairs if isinstance(headers, _RepeatedKeys) else list(headers.items())
    lower = {str(k).lower(): v for k, v in pairs}
    # The client can send X-Forwarded-For twice (or in two cases): then it says nothing.
    xffs = [v for k, v in pairs if str(k).lower() == "x-forwarded-for"]
    line_field = request.get("request_line")
    if isinstance(line_field, str):
        method, target = split_request(line_field)
    else:
        method, target = str(request.get("method", "")), str(request.get("uri", ""))
    texts = []
    for item in messages if isinstance(messages, list) else []:
        if isinstance(item, dict):
            texts.append(str(item.get("message", "")))
        else:
            texts.append(str(item))
    return Record(
        peer=peer,
        forwarded_for=str(xffs[0]) if len(xffs) == 1 else "",
        time=when,
        method=method,
        target=target,
        status=status if isinstance(status, int) else None,
        user_agent=str(lower.get("user-agent", "")),
        message="; ".join(t for t in texts if t),
        fmt=LogFormat.MODSEC_JSON,
    )


# Apache: the client is a fixed field before the message ("[client ADDR]"), after the
# 2.4 default prefix "[pid P:tid T] %7F: %E: " (source file at debug levels, APR status).
# Only that position counts: the message itself quotes paths and values the client chose.
# The level is one word ("error", "proxy:error", "core:trace5"): a line whose second field
# holds spaces is not Apache's (an nginx access line that starts with a client-chosen $host).
_APACHE_ERR = re.compile(
    r"^\[(?P<time>[^\]]{1,64})\] \[(?P<level>[\w:.-]{0,40})\](?P<pid> \[pid [^\]]*\])?"
    r"(?: [\w.-]+\(\d+\):)?(?: \(-?\d+\)[^\[\]]*?:(?= \[client ))?"
    r"(?: \[client (?P<peer>\[[^\]\s]+\]:\d+|[^\]\s]+)\])?(?: \[client [^\]]*\])? (?P<msg>.*)$",
    re.DOTALL,
)
_NGINX_ERR = re.compile(
    r"^(?P<time>\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[\w+\] \d+#\d+: (?:\*\d+ )?(?P<msg>.*)$",
    re.DOTALL,
)
# nginx appends ", client: ADDR, server: NAME[, request: "..."]..." to the message. The
# message (a decoded path, a ModSecurity value) and the request, host and referrer that
# follow are raw client text and may repeat that marker; see _nginx_client.
_NGINX_CONTEXT = re.compile(r", client: ([^,\s]+), server: ")
# libmodsecurity starts its messages with the client (ModSecurity-nginx logs them as is).
_LIBMODSEC_CLIENT = re.compile(r"\[client ([^\]\s]+)\] ModSecurity: ")
# NGX_MAX_ERROR_STR (2048) bytes with the newline: a message that fills it loses the
# context nginx appends last, so a line this long may hold only a forged one.
_NGINX_LINE_MAX = 2047
_NGINX_REQUEST = re.compile(r', request: "((?:[^"\\]|\\.)*)"')
_MODSEC_URI = re.compile(r'\[uri "((?:[^"\\]|\\.)*)"\]')
_PORT_SUFFIX = re.compile(r"^(.+):\d{1,5}$")


def strip_port(token: str, has_port: bool) -> str:
    """'[2001:db8::1]:80', '192.0.2.1:80' -> address. Apache 2.4 logs IPv6 as
    '2001:db8::1:49152' (no brackets), so a trailing :NNNN is taken as a port
    only when the log style is known to carry one (has_port)."""
    token = token.strip()
    if token.startswith("["):
        return token[1:].split("]", 1)[0]
    if token.count(":") == 1 or has_port:
        m = _PORT_SUFFIX.match(token)
        if m:
            return m.group(1)
    return token


def _apache_error_time(text: str) -> float | None:
    # "Thu Jan 08 04:52:45.123456 2009"; the zone is the server's, taken as local time.
    for pattern in ("%a %b %d %H:%M:%S.%f %Y", "%a %b %d %H:%M:%S %Y"):
        try:
            return datetime.strptime(text, pattern).timestamp()
        except ValueError:
            continue
    return None


def canonical_address(token: str) -> str:
    """One spelling per address ('2001:DB8::1', '::ffff:192.0.2.1' -> canonical), so
    two claims about the client can be compared; other text is returned as is."""
    text = strip_port(token, False)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def agreed(claims: list[str]) -> str | None:
    """The one address every claim names, or None when they differ."""
    if len(claims) < 2:
        return claims[0] if claims else None  # the common case, and no spelling to compare
    first = canonical_address(claims[0])
    return first if all(canonical_address(c) == first for c in claims[1:]) else None


def _nginx_client(line: str, msg: str) -> str | None:
    """The client of an nginx error line, or None when the line cannot say for sure.

    libmodsecurity starts its messages with "[client ADDR] ModSecurity: ", before any
    client text: that is the client. Otherwise nginx's own context names it, but a
    forged ", client: X, server: " can sit before it (in the message) or after it (in
    the raw request line, host or referrer), so every such marker must name the same
    address; and a line cut at nginx's length limit may have lost the real one."""
    leading = _LIBMODSEC_CLIENT.match(msg)
    if leading:
        return strip_port(leading.group(1), False)
    if len(line) * 4 >= _NGINX_LINE_MAX and len(line.encode("utf-8", "replace")) >= _NGINX_LINE_MAX:
        return None
    found = agreed(_NGINX_CONTEXT.findall(msg))
    return strip_port(found, False) if found else None


def parse_error(line: str) -> Record | None:
    m = _APACHE_ERR.match(line)
    if m is not None:
        msg = m.group("msg")
        # Apache 2.4 ("[module:level]", "[pid ...]") logs the client port; 2.2 does not.
        has_port = m.group("pid") is not None or ":" in m.group("level")
        token = m.group("peer")
        peer = strip_port(token, has_port) if token else None
        when = _apache_error_time(m.group("time"))
    else:
        m = _NGINX_ERR.match(line)
        if m is None:
            return None
        msg = m.group("msg")
        peer = _nginx_client(line, msg)
        try:
            when = datetime.strptime(m.group("time"), "%Y/%m/%d %H:%M:%S").timestamp()
        except ValueError:
            when = None
    if not peer:
        return None
    uri = _MODSEC_URI.search(msg)
    request = _NGINX_REQUEST.search(msg)
    method, target = ("", "")
    if request:
        method, target = split_request(unescape(request.group(1)))
    if uri:
        target = unescape(uri.group(1))
    return Record(
        peer=peer,
        time=when,
        method=method,
        target=target,
        message=msg,
        fmt=LogFormat.ERROR,
    )


_PARSERS_AUTO = (parse_access, parse_json_access, parse_modsec_json, parse_error)


def parse_line(line: str, fmt: LogFormat = LogFormat.AUTO) -> Record | None:
    """Parse with the given format, or try each in turn (auto)."""
    if fmt in (LogFormat.COMMON, LogFormat.COMBINED, LogFormat.VHOST_COMBINED, LogFormat.NGINX):
        return parse_access(line, LogFormat.COMBINED if fmt is LogFormat.NGINX else fmt)
    if fmt is LogFormat.JSON:
        return parse_json_access(line)
    if fmt is LogFormat.MODSEC_JSON:
        return parse_modsec_json(line)
    if fmt is LogFormat.ERROR:
        return parse_error(line)
    if line.startswith("{"):
        return parse_json_access(line) or parse_modsec_json(line)
    if line.startswith("[") or (line[:4].isdigit() and line[4:5] == "/"):
        return parse_error(line)
    return parse_access(line, LogFormat.AUTO)
