"""Abuse mail: the send run (the messages are built in abuse_mail.py).

The run takes the due reports from the outbox, drops the blocks pardoned since
they were queued, finds whom to tell (DNS, each report within its own deadline
and all within the run's), and sends one message per abuse desk through the
configured SMTP relay. A relay that cannot be reached ends the run (the reports
in that message wait and are retried with backoff; the others were not tried
and are not penalised). A relay that refuses a desk for good (5xx) fails the
reports that only that desk was to get. The daily cap and the run's deadline
leave the rest for later.
"""

from __future__ import annotations

import dataclasses
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Protocol
from zoneinfo import ZoneInfo

from imr.reputation.abuse_mail import Item, build_message
from imr.reputation.contacts import Contacts
from imr.reputation.exports import Incident
from imr.reputation.outbox import Outbox, Report
from imr.reputation.settings import NotifySettings


class Finder(Protocol):
    def find(self, ip: str, deadline: float | None = None) -> Contacts: ...


class RelayUnavailable(Exception):
    """The relay cannot be reached or dropped us: retry later, stop this run."""


class Refused(Exception):
    """The relay refused this message for good (5xx)."""


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
    cancelled: list[str] = field(default_factory=list)  # every block pardoned
    waiting_for_cap: int = 0
    waiting_for_time: int = 0  # left for the next run: the run's deadline came first
    stopped: str | None = None  # why the run ended early (relay down)
    previews: list[EmailMessage] = field(default_factory=list)


@dataclass
class _Planned:
    report: Report
    contacts: Contacts
    delivered: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    unavailable: str | None = None


def send_due(
    outbox: Outbox,
    settings: NotifySettings,
    finder: Finder,
    relay: Relay,
    zone: ZoneInfo | None,
    reporter: str,
    now: Callable[[], float],
    *,
    pardoned: Callable[[Incident], bool],
    dry_run: bool = False,
    limit: int | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> SendSummary:
    """Send what is due, within the daily cap and the run's deadline, one message per desk.

    `pardoned` says whether a block was lifted as a false positive since it was queued
    (read from the state file just before): such blocks are dropped from their report,
    and a report left with none is cancelled. dry_run changes nothing and sends nothing."""
    summary = SendSummary()
    deadline = monotonic() + settings.run_timeout
    try:
        planned = _plan(
            outbox, settings, finder, summary, pardoned, dry_run, limit, deadline, monotonic
        )
        desks: dict[str, list[_Planned]] = {}
        for plan in planned:
            for recipient in plan.contacts.recipients:
                desks.setdefault(recipient, []).append(plan)
        for desk, plans in desks.items():
            items = [Item(p.report.ip, tuple(p.report.incidents), p.contacts) for p in plans]
            message = build_message(desk, items, settings, zone, reporter, now())
            if dry_run:
                summary.previews.append(message)
                continue
            try:
                relay.send(message, [desk])
            except Refused as exc:
                for plan in plans:
                    plan.refused.append(f"{desk}: {exc}")
                continue
            except RelayUnavailable as exc:
                for plan in plans:
                    plan.unavailable = str(exc)
                summary.stopped = str(exc)
                break
            for plan in plans:
                plan.delivered.append(desk)
                plan.message_ids.append(str(message["Message-ID"]))
        if not dry_run:
            for plan in planned:
                _settle(outbox, settings, plan, summary)
    finally:
        relay.close()
    return summary


def _plan(
    outbox: Outbox,
    settings: NotifySettings,
    finder: Finder,
    summary: SendSummary,
    pardoned: Callable[[Incident], bool],
    dry_run: bool,
    limit: int | None,
    deadline: float,
    monotonic: Callable[[], float],
) -> list[_Planned]:
    """The due reports that are still wanted and have someone to tell, within the cap."""
    due = outbox.due()
    budget = settings.daily_cap - outbox.sent_in_last_day()
    if limit is not None:
        due = due[:limit]
    planned: list[_Planned] = []
    for index, report in enumerate(due):
        if budget <= 0:
            summary.waiting_for_cap = len(due) - index
            break
        kept = [i for i in report.incidents if not pardoned(i)]
        if not kept:
            if not dry_run:
                outbox.cancel(report.id, "every block in it was lifted as a false positive")
            summary.cancelled.append(report.ip)
            continue
        if len(kept) < len(report.incidents):
            if not dry_run:
                outbox.replace_incidents(report.id, kept)
            report = dataclasses.replace(report, incidents=kept)
        start = monotonic()
        if start >= deadline:
            summary.waiting_for_time = len(due) - index
            break
        contacts = finder.find(report.ip, min(deadline, start + settings.report_lookup_timeout))
        if contacts.recipients:
            planned.append(_Planned(report, contacts))
            budget -= 1
        elif dry_run:
            summary.no_contact.append(report.ip)
        elif contacts.temporary:
            outbox.mark_retry(
                report, "; ".join(contacts.trail), settings.retry_after, settings.max_attempts
            )
            summary.retry.append(report.ip)
        else:
            outbox.mark_no_contact(report.id, contacts.trail)
            summary.no_contact.append(report.ip)
    return planned


def _settle(outbox: Outbox, settings: NotifySettings, plan: _Planned, summary: SendSummary) -> None:
    report, trail = plan.report, plan.contacts.trail
    if plan.delivered:
        outbox.mark_sent(report.id, plan.delivered, trail, " ".join(plan.message_ids))
        summary.sent.append(report.ip)
    elif plan.unavailable is not None:
        status = outbox.mark_retry(
            report, plan.unavailable, settings.retry_after, settings.max_attempts
        )
        (summary.failed if status == "failed" else summary.retry).append(report.ip)
    elif plan.refused:
        outbox.mark_failed(report.id, "; ".join(plan.refused), trail)
        summary.failed.append(report.ip)
    # else: its desk was not tried (the relay went down first): untouched, not charged.
