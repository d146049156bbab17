"""Abuse mail: one concise report per address (pure building), and the send run.

The run takes the due reports from the outbox, finds whom to tell (DNS), and
hands each report to the configured SMTP relay. A relay that cannot be reached
ends the run (the report waits and is retried with backoff; the others were not
tried and are not penalised). A relay that refuses every recipient for good
(5xx) fails that report only. The daily cap leaves the rest for later.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Protocol
from zoneinfo import ZoneInfo

from imr.core.durations import format_duration
from imr.reputation.contacts import Contacts
from imr.reputation.exports import Incident, local_time
from imr.reputation.outbox import Outbox, Report
from imr.reputation.settings import NotifySettings


class Finder(Protocol):
    def find(self, ip: str) -> Contacts: ...


class RelayUnavailable(Exception):
    """The relay cannot be reached or dropped us: retry later, stop this run."""


class Refused(Exception):
    """The relay refused this message for good (5xx)."""


# Building ----------------------------------------------------------------------------


def _stamp(epoch: float, zone: ZoneInfo | None) -> str:
    """'2024-05-01 12:00:03 +0200 (CEST)': the offset is always there."""
    return local_time(epoch, zone).strftime("%Y-%m-%d %H:%M:%S %z (%Z)")


def _why_these(contacts: Contacts) -> list[str]:
    return [f"  {step}" for step in contacts.trail]


def build_message(
    report: Report,
    contacts: Contacts,
    settings: NotifySettings,
    zone: ZoneInfo | None,
    reporter: str,
    now: float,
) -> EmailMessage:
    """One concise plain-text report for every block of this address in the report."""
    if settings.sender is None:
        raise ValueError("reputation.notify.sender is not set")
    incidents = report.incidents
    rules = sorted({i.source or "manual" for i in incidents})
    host = f"{report.ip} ({contacts.ptr})" if contacts.ptr else report.ip

    body = [
        f"This is an automated abuse report from {reporter}.",
        "",
        f"The address {host} attacked {reporter}, which blocked it in its firewall.",
        "The machine may be compromised or misused; please look into it.",
        "",
        "Blocks:",
    ]
    for i in incidents:
        length = format_duration(i.expires_at - i.blocked_at)
        body.append(
            f"  {_stamp(i.blocked_at, zone)}  for {length}  rule {i.source or 'manual'}"
            f"  (offence {i.offence})"
        )
        if i.reason:
            body.append(f"    {i.reason}")
    evidence = _evidence(incidents, settings.max_evidence_lines)
    total = sum(len(i.hits) for i in incidents)
    body += ["", f"Evidence ({len(evidence)} of {total} entries):"]
    for at, line in evidence:
        body.append(f"  {_stamp(at, zone)}  {line}")
    body += [
        "",
        "You receive this because DNS names you as the contact for this address:",
        *_why_these(contacts),
        "",
        f"{reporter} sends at most one report per address every"
        f" {format_duration(settings.period)}.",
        f"Questions: {settings.reply_to or settings.sender}.",
    ]

    message = EmailMessage()
    message["From"] = settings.sender
    message["To"] = ", ".join(contacts.recipients)
    if settings.reply_to:
        message["Reply-To"] = settings.reply_to
    message["Subject"] = f"Abuse report: {report.ip} attacked {reporter} ({', '.join(rules)})"
    message["Date"] = format_datetime(local_time(now, zone))
    message["Message-ID"] = make_msgid("imr-report", domain=settings.sender.split("@", 1)[1])
    # RFC 3834: machines must not answer this with vacation replies.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Imr-Address"] = report.ip
    message.set_content("\n".join(body) + "\n")
    return message


def _evidence(incidents: list[Incident], limit: int) -> list[tuple[float, str]]:
    """Distinct hit lines (time, "outcome source: reason"), the earliest first, at most limit."""
    lines: list[tuple[float, str]] = []
    seen: set[str] = set()
    for incident in incidents:
        for hit in incident.hits:
            text = f"{hit.outcome} {hit.source or '-'}: {hit.reason or '-'}"
            if text in seen:
                continue
            seen.add(text)
            lines.append((hit.at, text))
    lines.sort()
    return lines[:limit]


# Sending -----------------------------------------------------------------------------


class SmtpRelay:
    """One connection for the whole run, opened on first use."""

    def __init__(self, settings: NotifySettings, password: str | None) -> None:
        self.settings = settings
        self._password = password
        self._smtp: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        try:
            smtp: smtplib.SMTP
            if s.smtp_security == "tls":
                smtp = smtplib.SMTP_SSL(
                    s.smtp_host,
                    s.smtp_port,
                    timeout=s.smtp_timeout,
                    context=ssl.create_default_context(),
                )
            else:
                smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout)
            if s.smtp_security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_user and self._password is not None:
                smtp.login(s.smtp_user, self._password)
        except smtplib.SMTPAuthenticationError as exc:
            raise RelayUnavailable(f"the relay refused the login: {exc.smtp_code}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise RelayUnavailable(
                f"cannot reach the relay {s.smtp_host}:{s.smtp_port}: {_text(exc)}"
            ) from None
        return smtp

    def send(self, message: EmailMessage, recipients: list[str]) -> None:
        if self._smtp is None:
            self._smtp = self._connect()
        try:
            # Recipients refused one by one while others accepted: sent (to those).
            self._smtp.send_message(message, to_addrs=recipients)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            if all(code >= 500 for code in codes):
                raise Refused(f"every recipient refused: {_refusals(exc.recipients)}") from None
            raise RelayUnavailable(f"recipients deferred: {_refusals(exc.recipients)}") from None
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code >= 500 and not isinstance(exc, smtplib.SMTPSenderRefused):
                raise Refused(f"refused: {exc.smtp_code} {_text(exc)}") from None
            self.close()
            raise RelayUnavailable(f"relay error: {exc.smtp_code} {_text(exc)}") from None
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise RelayUnavailable(f"the relay dropped the connection: {_text(exc)}") from None

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                self._smtp.close()
            self._smtp = None


def _text(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        detail = exc.smtp_error
        return detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return str(exc) or exc.__class__.__name__


def _refusals(recipients: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{r} {code}" for r, (code, _) in recipients.items())


class Relay(Protocol):
    def send(self, message: EmailMessage, recipients: list[str]) -> None: ...
    def close(self) -> None: ...


@dataclass
class SendSummary:
    sent: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    no_contact: list[str] = field(default_factory=list)
    waiting_for_cap: int = 0
    stopped: str | None = None  # why the run ended early (relay down)
    previews: list[EmailMessage] = field(default_factory=list)


def send_due(
    outbox: Outbox,
    settings: NotifySettings,
    finder: Finder,
    relay: Relay,
    zone: ZoneInfo | None,
    reporter: str,
    now: Callable[[], float],
    *,
    dry_run: bool = False,
    limit: int | None = None,
) -> SendSummary:
    """Send what is due, within the daily cap. dry_run changes nothing and sends nothing."""
    summary = SendSummary()
    due = outbox.due()
    budget = settings.daily_cap - outbox.sent_in_last_day()
    if limit is not None:
        due = due[:limit]
    try:
        for index, report in enumerate(due):
            if budget <= 0:
                summary.waiting_for_cap = len(due) - index
                break
            contacts = finder.find(report.ip)
            if not contacts.recipients:
                if dry_run:
                    summary.no_contact.append(report.ip)
                elif contacts.temporary:
                    outbox.mark_retry(
                        report,
                        "; ".join(contacts.trail),
                        settings.retry_after,
                        settings.max_attempts,
                    )
                    summary.retry.append(report.ip)
                else:
                    outbox.mark_no_contact(report.id, contacts.trail)
                    summary.no_contact.append(report.ip)
                continue
            message = build_message(report, contacts, settings, zone, reporter, now())
            if dry_run:
                summary.previews.append(message)
                budget -= 1
                continue
            try:
                relay.send(message, contacts.recipients)
            except Refused as exc:
                outbox.mark_failed(report.id, str(exc), contacts.trail)
                summary.failed.append(report.ip)
                continue
            except RelayUnavailable as exc:
                status = outbox.mark_retry(
                    report, str(exc), settings.retry_after, settings.max_attempts
                )
                (summary.failed if status == "failed" else summary.retry).append(report.ip)
                summary.stopped = str(exc)
                break
            outbox.mark_sent(
                report.id, contacts.recipients, contacts.trail, str(message["Message-ID"])
            )
            summary.sent.append(report.ip)
            budget -= 1
    finally:
        relay.close()
    return summary
