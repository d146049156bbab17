"""Building abuse mail (pure: no I/O, the time passed in): one message per abuse desk.

Vocabulary:
  - *desk*: one recipient address (abuse@isp.example.net). Each desk gets one
    message per run for all the addresses it answers for, with itself alone in
    `To:` (never a list of other desks).
  - *kind* of a block: "evidence" when imr saw the attack itself (a log line the
    log scanner matched, a ModSecurity rule: sources `logscan:*`, `modsecurity:*`),
    "httpbl" when Project Honey Pot's http:BL listed the address, "manual" for the
    rest (an admin's `imr block`). The mail says which, in those words.

The message is multipart/mixed in X-ARF form (version 0.2, `X-XARF: PLAIN`): a
plain-text part for people, then per address a machine-readable `report.txt`
(YAML; every value a double-quoted JSON string, which is valid YAML, so no
client-supplied text can break out of it) and the evidence lines as
`logfile.log`. X-ARF rather than ARF (RFC 5965): ARF reports on an email message
and its third part must be that message (or its headers); these reports are about
network attacks, which X-ARF describes (source, port, type, evidence).

Every text a client chose (reasons, sources, log lines) is escaped before it goes
into the message: control and format characters (CR, LF, ESC, bidi overrides ...)
become `\\xNN` / `\\uNNNN`, and a backslash becomes `\\\\`.
"""

from __future__ import annotations

import ipaddress
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from zoneinfo import ZoneInfo

from imr.core.durations import format_duration
from imr.reputation.contacts import Contacts
from imr.reputation.exports import Incident, iso, local_time
from imr.reputation.settings import MailKind, NotifySettings

Kind = MailKind
EVIDENCE_SOURCES = ("logscan:", "modsecurity:")
SUBJECT_SOURCES = 80  # characters of rule names in a subject


def kind_of(incident: Incident) -> Kind:
    if incident.source.startswith(EVIDENCE_SOURCES):
        return "evidence"
    if incident.source == "httpbl" or incident.source.startswith("httpbl:"):
        return "httpbl"
    return "manual"


def not_mailed(incident: Incident, notify: NotifySettings) -> str | None:
    """Why this block is not for abuse mail (a count's name), or None if it is."""
    if incident.pardoned:
        return "pardoned"
    if notify.sources and not incident.source.startswith(tuple(notify.sources)):
        return "filtered"
    if notify.uids and incident.uid not in notify.uids:
        return "filtered"
    if kind_of(incident) not in notify.kinds:
        return f"not mailed ({kind_of(incident)})"
    return None


def clean(text: str) -> str:
    """Client-supplied text made safe for one line of mail: no CR/LF, escapes or bidi tricks."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


@dataclass(frozen=True)
class Item:
    """One address's report in a desk's message."""

    ip: str
    incidents: tuple[Incident, ...]
    contacts: Contacts


def _stamp(epoch: float, zone: ZoneInfo | None) -> str:
    """'2024-05-01 12:00:03 +0200 (CEST)': the offset is always there."""
    return local_time(epoch, zone).strftime("%Y-%m-%d %H:%M:%S %z (%Z)")


_WHAT = {
    "evidence": "attacked {reporter}: the log lines below are what {reporter} saw, and it"
    " blocked the address in its firewall.",
    "httpbl": "was blocked by {reporter} because Project Honey Pot's http:BL lists it as a"
    " threat; {reporter} has no log line of its own showing an attack.",
    "manual": "was blocked by hand by an administrator of {reporter}; the reason they gave"
    " is below.",
}


def _evidence(incidents: Sequence[Incident], limit: int) -> list[tuple[float, str]]:
    """Distinct hit lines (time, "outcome source: reason"), the earliest first, at most limit."""
    lines: list[tuple[float, str]] = []
    seen: set[str] = set()
    for incident in incidents:
        for hit in incident.hits:
            text = f"{hit.outcome} {hit.source or '-'}: {hit.reason or '-'}"
            if text not in seen:
                seen.add(text)
                lines.append((hit.at, clean(text)))
    lines.sort()
    return lines[:limit]


def _destination(settings: NotifySettings, incident: Incident) -> str:
    where = clean(settings.destination) if settings.destination else "this host (not disclosed)"
    port = settings.port_for(incident.source)
    return f"{where}, port {port if port is not None else 'not recorded'}"


def _section(
    item: Item, settings: NotifySettings, zone: ZoneInfo | None, reporter: str
) -> list[str]:
    host = f"{item.ip} ({item.contacts.ptr})" if item.contacts.ptr else item.ip
    kinds = sorted({kind_of(i) for i in item.incidents})
    lines = [f"Address {host}"]
    lines += [f"  It {_WHAT[k].format(reporter=reporter)}" for k in kinds]
    lines += [
        f"  Source: {item.ip}, port not recorded",
        f"  Destination: {_destination(settings, item.incidents[0])}",
        "  Blocks:",
    ]
    for i in item.incidents:
        length = format_duration(i.expires_at - i.blocked_at)
        lines.append(
            f"    {_stamp(i.blocked_at, zone)}  for {length}  rule {clean(i.source or 'manual')}"
            f"  (offence {i.offence}, {kind_of(i)})"
        )
        if i.reason:
            lines.append(f"      reason: {clean(i.reason)}")
    evidence = _evidence(item.incidents, settings.max_evidence_lines)
    total = sum(len(i.hits) for i in item.incidents)
    lines.append(f"  Evidence ({len(evidence)} of {total} entries; control characters escaped):")
    lines += [f"    {_stamp(at, zone)}  {line}" for at, line in evidence]
    lines.append("  Why you: DNS names you as the contact for this address:")
    lines += [f"    {clean(step)}" for step in item.contacts.trail]
    return lines


def xarf_report(item: Item, settings: NotifySettings, zone: ZoneInfo | None, reporter: str) -> str:
    """The X-ARF 0.2 `report.txt` (YAML) for one address."""
    first = item.incidents[0]
    port = settings.port_for(first.source)
    sources = {i.source for i in item.incidents}
    login = any(k in s for s in sources for k in ("ssh", "login", "auth", "pass"))
    fields: list[tuple[str, object]] = [
        ("Reported-From", settings.sender or ""),
        ("Category", "abuse"),
        ("Report-Type", "login-attack" if login else "attack"),
        ("Service", ", ".join(sorted(sources))),
        ("Version", "0.2"),
        ("User-Agent", f"imr on {reporter}"),
        ("Date", iso(first.blocked_at, zone)),
        ("Source-Type", f"ipv{ipaddress.ip_address(item.ip).version}"),
        ("Source", item.ip),
        ("Destination", settings.destination or ""),
        ("Port", port if port is not None else ""),
        ("Occurrences", sum(max(1, len(i.hits)) for i in item.incidents)),
        ("Evidence-Kind", ", ".join(sorted({kind_of(i) for i in item.incidents}))),
        ("Attachment", "text/plain"),
    ]
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in fields)


def _logfile(item: Item, zone: ZoneInfo | None) -> str:
    lines = [
        f"{iso(at, zone)} {line}"
        for at, line in _evidence(item.incidents, 1000)  # the whole record, escaped
    ]
    return "\n".join(lines) + "\n"


def build_message(
    desk: str,
    items: Sequence[Item],
    settings: NotifySettings,
    zone: ZoneInfo | None,
    reporter: str,
    now: float,
) -> EmailMessage:
    """One message to one desk about every address it answers for in this run."""
    if settings.sender is None:
        raise ValueError("reputation.notify.sender is not set")
    rules = sorted({clean(i.source or "manual") for item in items for i in item.incidents})
    body = [f"This is an automated abuse report from {reporter}.", ""]
    if len(items) > 1:
        body += [f"{len(items)} addresses you are the contact for:", ""]
    for item in items:
        body += [*_section(item, settings, zone, reporter), ""]
    body += [
        "The machine(s) may be compromised or misused; please look into it.",
        f"Times are shown with their UTC offset and zone. {reporter} sends at most one report"
        f" per address every {format_duration(settings.period)}.",
        "A machine-readable X-ARF report (report.txt) and the evidence (logfile.log) are"
        " attached for each address.",
        f"Questions: {settings.reply_to or settings.sender}.",
    ]
    message = EmailMessage()
    message["From"] = settings.sender
    message["To"] = desk
    if settings.reply_to:
        message["Reply-To"] = settings.reply_to
    what = items[0].ip if len(items) == 1 else f"{len(items)} addresses"
    subject_rules = ", ".join(rules)[:SUBJECT_SOURCES]
    message["Subject"] = f"Abuse report: {what} attacked {reporter} ({subject_rules})"
    message["Date"] = format_datetime(local_time(now, zone))
    message["Message-ID"] = make_msgid("imr-report", domain=settings.sender.split("@", 1)[1])
    # RFC 3834: machines must not answer this with vacation replies.
    message["Auto-Submitted"] = "auto-generated"
    message["X-XARF"] = "PLAIN"
    message["X-Imr-Address"] = ", ".join(item.ip for item in items)
    message.set_content("\n".join(body) + "\n")
    for n, item in enumerate(items, 1):
        suffix = "" if len(items) == 1 else f"-{n}"
        message.add_attachment(
            xarf_report(item, settings, zone, reporter),
            subtype="plain",
            filename=f"report{suffix}.txt",
        )
        message.add_attachment(
            _logfile(item, zone), subtype="plain", filename=f"logfile{suffix}.log"
        )
    return message
