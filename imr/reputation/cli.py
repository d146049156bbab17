"""`imr check`, `imr reports collect|list|show|send`, `imr report`: reputation commands.

All of them run in the caller's process, never in the daemon: DNS, SMTP and
HTTP wait here, with timeouts, and the blocking path knows nothing of them.
The block history is read from the state file (read-only) or, for a user who
may not read it, through the daemon's `export` op.

Exit status: 0 done, 1 refused or failed (a lookup, the relay, an API),
2 usage or configuration error, 3 the daemon is not running.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from imr.cli_context import (
    EXIT_FAILED,
    CliContext,
    CliError,
    UsageFailure,
    client_errors,
)
from imr.core.durations import format_duration, parse_duration
from imr.reputation import exports
from imr.reputation.abuse_mail import not_mailed
from imr.reputation.contacts import ContactFinder
from imr.reputation.dns_client import DnsUnavailable, make_resolver
from imr.reputation.exports import HistoryError, HistorySource, Incident
from imr.reputation.httpbl import HttpBL, local_refusal
from imr.reputation.mailer import SmtpRelay, send_due
from imr.reputation.outbox import Outbox, OutboxError, Report
from imr.reputation.settings import ReputationSettings, SecretError
from imr.reputation.submit import Pacer, SubmitResult, http_client, submit_abuseipdb, submit_dshield


def register(main: click.Group) -> None:
    """Add the reputation commands to the main `imr` group."""
    main.add_command(check)
    main.add_command(reports)
    main.add_command(report)


def _context(ctx: click.Context) -> CliContext:
    obj = ctx.find_object(CliContext)
    if obj is None:
        raise UsageFailure("no configuration: run through the imr command")
    return obj


def _settings(ctx: click.Context) -> ReputationSettings:
    section = getattr(_context(ctx).config, "reputation", None)
    return section if isinstance(section, ReputationSettings) else ReputationSettings()


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _open_outbox(settings: ReputationSettings) -> Outbox:
    try:
        return Outbox(settings.state_dir)
    except OutboxError as exc:
        raise CliError(f"{exc} (reputation.state_dir; run as the user that owns it)") from None


def _incidents(ctx: click.Context, since: float, source: HistorySource) -> list[Incident]:
    cli = _context(ctx)
    until = time.time() + 1
    path = cli.config.state.path
    if source == "auto":
        source = "state" if os.access(path, os.R_OK) else "daemon"
    try:
        if source == "state":
            return exports.read_state_file(path, since, until)
        with client_errors(refused="the daemon refused the export: "):
            return exports.read_daemon(cli.client(), since, until)
    except HistoryError as exc:
        raise CliError(str(exc)) from None


_from_option = click.option(
    "--from",
    "history",
    type=click.Choice(["auto", "state", "daemon"]),
    default="auto",
    show_default=True,
    help="Block history from the state file (read-only), the daemon's export op,"
    " or the file when readable.",
)


# check ------------------------------------------------------------------------------


@click.command("check")
@click.argument("ip")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--block", "do_block", is_flag=True, help="Ask the daemon to block IP if listed.")
@click.pass_context
def check(ctx: click.Context, ip: str, as_json: bool, do_block: bool) -> None:
    """Look IP up in http:BL and say whether it would be blocked, and why.

    Exit status 0 when the lookup gave an answer (listed or not), 1 when it failed."""
    settings = _settings(ctx)
    refusal = local_refusal(ip)
    if do_block and refusal is not None:
        raise CliError(f"{refusal}: never blocked")
    try:
        key = settings.httpbl.access_key()
        resolver = make_resolver(settings.dns)
    except SecretError as exc:
        raise UsageFailure(f"{exc}; http:BL needs an access key") from None
    except DnsUnavailable as exc:
        raise UsageFailure(str(exc)) from None
    verdict = HttpBL(settings.httpbl, resolver, key).check(ip)
    if as_json:
        click.echo(json.dumps(verdict.as_json(), indent=2))
    else:
        decision = {
            "listed": "block" if verdict.block else "allow",
            "not_listed": "allow",
            "skipped": "skipped",
            "error": "unknown",
        }[verdict.status]
        click.echo(f"{verdict.ip}: {decision} (score {verdict.score})\n  {verdict.why}")
    if verdict.status == "error":
        ctx.exit(EXIT_FAILED)
    if do_block and verdict.block:
        with client_errors():
            result = (
                _context(ctx)
                .client()
                .block(
                    verdict.ip, reason=verdict.reason(), source="httpbl", severity=verdict.severity
                )
            )
        if not as_json:
            click.echo(f"  {result.get('action', 'block')}: until {result.get('expires_at')}")


# reports ----------------------------------------------------------------------------


@click.group("reports")
def reports() -> None:
    """Abuse mail to whoever runs an attacking address (the outbox)."""


def _notify_enabled(settings: ReputationSettings) -> None:
    if not settings.notify.enabled:
        raise UsageFailure("abuse mail is off: set [reputation.notify] enabled = true and sender")


@reports.command("collect")
@click.option("--since", default=None, help="How far back to look (default: collect_window).")
@_from_option
@click.pass_context
def reports_collect(ctx: click.Context, since: str | None, history: HistorySource) -> None:
    """Queue one report per recently blocked address (for cron, before `send`)."""
    settings = _settings(ctx)
    _notify_enabled(settings)
    window = _duration(since) if since else settings.notify.collect_window
    incidents = _incidents(ctx, time.time() - window, history)
    counts: dict[str, int] = {}
    with _open_outbox(settings) as outbox:
        for incident in incidents:
            skip = not_mailed(incident, settings.notify)
            outcome = skip or outbox.queue(incident, settings.notify.period)
            counts[outcome] = counts.get(outcome, 0) + 1
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing new"
    click.echo(f"{len(incidents)} blocks since {format_duration(window)} ago: {summary}")


def _pardon_check(
    ctx: click.Context, outbox: Outbox, history: HistorySource
) -> Callable[[Incident], bool]:
    """Which queued blocks were lifted as false positives since: read from the history now.
    An unreadable history ends the run (nothing is mailed that might have been pardoned)."""
    waiting = [i for r in outbox.reports(pending_only=True) for i in r.incidents]
    if not waiting:
        return lambda incident: False
    since = min(i.blocked_at for i in waiting) - 1
    return exports.pardon_check(_incidents(ctx, since, history))


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def _report_json(r: Report, settings: ReputationSettings) -> dict[str, Any]:
    zone = settings.zone()
    return {
        "id": r.id,
        "ip": r.ip,
        "status": r.status,
        "created_at": exports.iso(r.created_at, zone),
        "attempts": r.attempts,
        "next_attempt_at": exports.iso(r.next_attempt_at, zone),
        "sent_at": exports.iso(r.sent_at, zone) if r.sent_at else None,
        "last_error": r.last_error,
        "recipients": r.recipients,
        "trail": r.trail,
        "message_id": r.message_id,
        "incidents": [i.as_json(zone) for i in r.incidents],
    }


@reports.command("list")
@click.option("--all", "show_all", is_flag=True, help="Sent and given-up reports too.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def reports_list(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """Reports in the outbox (pending ones unless --all)."""
    settings = _settings(ctx)
    with _open_outbox(settings) as outbox:
        rows = outbox.reports(pending_only=not show_all)
    if as_json:
        click.echo(json.dumps([_report_json(r, settings) for r in rows], indent=2))
        return
    if not rows:
        click.echo("no reports" if show_all else "no pending reports")
        return
    table = [["ID", "STATUS", "IP", "CREATED", "TRIES", "NEXT/SENT", "TO / LAST ERROR"]]
    for r in rows:
        table.append(
            [
                str(r.id),
                r.status,
                r.ip,
                _when(r.created_at),
                str(r.attempts),
                _when(r.sent_at if r.status == "sent" else r.next_attempt_at),
                ", ".join(r.recipients) if r.status == "sent" else (r.last_error or "-"),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@reports.command("show")
@click.argument("which")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def reports_show(ctx: click.Context, which: str, as_json: bool) -> None:
    """One report by id, or the latest for an address."""
    settings = _settings(ctx)
    with _open_outbox(settings) as outbox:
        found = outbox.get(int(which)) if which.isdigit() else outbox.latest_for(which)
    if found is None:
        raise CliError(f"no report for {which}")
    data = _report_json(found, settings)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"report {found.id} for {found.ip}: {found.status}")
    for key in ("created_at", "attempts", "next_attempt_at", "sent_at", "last_error"):
        if data[key] is not None:
            click.echo(f"  {key.replace('_', ' ')}: {data[key]}")
    if found.recipients:
        click.echo(f"  sent to: {', '.join(found.recipients)}")
    for step in found.trail:
        click.echo(f"  dns: {step}")
    for incident in data["incidents"]:
        click.echo(
            f"  block {incident['blocked_at']} until {incident['expires_at']}"
            f" rule {incident['source'] or 'manual'}: {incident['reason']}"
        )
        for hit in incident["hits"]:
            click.echo(f"    {hit['at']} {hit['outcome']} {hit['source']}: {hit['reason']}")


@reports.command("send")
@click.option("--dry-run", is_flag=True, help="Print the mails that are due; send nothing.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many.")
@_from_option
@click.pass_context
def reports_send(
    ctx: click.Context, dry_run: bool, limit: int | None, history: HistorySource
) -> None:
    """Mail the reports that are due (for cron, after `collect`)."""
    settings = _settings(ctx)
    _notify_enabled(settings)
    notify = settings.notify
    try:
        password = None if dry_run else notify.password()
        resolver = make_resolver(settings.dns)
    except SecretError as exc:
        raise UsageFailure(str(exc)) from None
    except DnsUnavailable as exc:
        raise UsageFailure(str(exc)) from None
    reporter = notify.reporter or socket.gethostname()
    with _open_outbox(settings) as outbox:
        try:
            with outbox.sending():
                summary = send_due(
                    outbox,
                    notify,
                    ContactFinder(notify, resolver),
                    SmtpRelay(notify, password),
                    settings.zone(),
                    reporter,
                    time.time,
                    pardoned=_pardon_check(ctx, outbox, history),
                    dry_run=dry_run,
                    limit=limit,
                )
        except OutboxError as exc:
            raise CliError(str(exc)) from None
    for message in summary.previews:
        click.echo(message.as_string())
        click.echo("-" * 72)
    for ip in summary.sent:
        click.echo(f"sent {ip}")
    for ip in summary.retry:
        click.echo(f"retry later {ip}", err=True)
    for ip in summary.failed:
        click.echo(f"failed {ip}", err=True)
    for ip in summary.no_contact:
        click.echo(f"no contact {ip}")
    for ip in summary.cancelled:
        click.echo(f"cancelled {ip}: every block lifted as a false positive")
    if summary.waiting_for_time:
        click.echo(
            f"run time limit of {format_duration(notify.run_timeout)} reached:"
            f" {summary.waiting_for_time} wait for the next run",
            err=True,
        )
    if summary.waiting_for_cap:
        click.echo(
            f"daily cap of {notify.daily_cap} reached: {summary.waiting_for_cap} wait", err=True
        )
    if summary.stopped:
        raise CliError(f"stopped: {summary.stopped}; the report waits and is retried")
    if summary.failed:
        ctx.exit(EXIT_FAILED)


@reports.command("cancel")
@click.argument("which")
@click.pass_context
def reports_cancel(ctx: click.Context, which: str) -> None:
    """Cancel a waiting report, by id, or every waiting report for an address."""
    settings = _settings(ctx)
    who = _who()
    with _open_outbox(settings) as outbox:
        if which.isdigit():
            chosen = [r for r in [outbox.get(int(which))] if r is not None]
        else:
            chosen = [r for r in outbox.reports(pending_only=True) if r.ip == which]
        done = [r for r in chosen if outbox.cancel(r.id, f"cancelled by {who}")]
    if not done:
        raise CliError(f"no waiting report for {which}")
    for r in done:
        click.echo(f"cancelled report {r.id} for {r.ip}")


def _who() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


# report (exports) ---------------------------------------------------------------------

FORMATS = ("dshield", "abuseipdb", "csv", "json")


@click.command("report")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--since", default="1d", show_default=True, help="Blocks made in this time.")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write here instead of standard output.",
)
@click.option(
    "--submit", is_flag=True, help="Also submit to the service's API (dshield, abuseipdb)."
)
@click.option(
    "--include-pardoned",
    is_flag=True,
    help="Also blocks an admin lifted as false positives (unblocked, protected).",
)
@_from_option
@click.pass_context
def report(
    ctx: click.Context,
    fmt: str,
    since: str,
    output: Path | None,
    submit: bool,
    include_pardoned: bool,
    history: HistorySource,
) -> None:
    """Build a report of the blocks made since --since, in a service's format.

    Blocks lifted as false positives are left out unless --include-pardoned."""
    settings = _settings(ctx)
    if submit and fmt not in ("dshield", "abuseipdb"):
        raise UsageFailure("--submit works with --format dshield or abuseipdb")
    if submit and fmt == "dshield" and settings.dshield.userid is None:
        raise UsageFailure("DShield needs reputation.dshield.userid")
    window = _duration(since)
    incidents = _incidents(ctx, time.time() - window, history)
    if not include_pardoned:
        incidents, pardoned = exports.without_pardoned(incidents)
        if pardoned:
            click.echo(f"{pardoned} pardoned block(s) left out (--include-pardoned)", err=True)
    if fmt == "dshield" and (ipv6 := exports.dshield_ipv6_left_out(incidents)):
        click.echo(f"{ipv6} IPv6 block(s) left out: DShield takes IPv4 only", err=True)
    _write(exports.render(fmt, incidents, settings), output)
    if submit:
        result = _submit(settings, fmt, incidents)
        click.echo(result.line(), err=True)
        for error in result.errors:
            click.echo(f"  refused {error}", err=True)
        if result.stopped:
            ctx.exit(EXIT_FAILED)


def _write(parts: list[str], output: Path | None) -> None:
    if output is None:
        if len(parts) > 1:
            raise CliError(
                f"the report passes AbuseIPDB's bulk limits ({exports.BULK_MAX_LINES:,} lines or"
                f" {exports.BULK_MAX_BYTES:,} bytes per file): use --output FILE to write"
                f" {len(parts)} files (FILE-1, FILE-2, ...), or a shorter --since"
            )
        click.echo(parts[0], nl=False)
        return
    paths = [output]
    if len(parts) > 1:
        paths = [
            output.with_name(f"{output.stem}-{n}{output.suffix}") for n in range(1, len(parts) + 1)
        ]
        click.echo(
            f"AbuseIPDB takes at most {exports.BULK_MAX_LINES:,} lines or"
            f" {exports.BULK_MAX_BYTES:,} bytes per file: wrote {len(parts)} files",
            err=True,
        )
    for path, text in zip(paths, parts, strict=True):
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{path}: cannot write: {exc.strerror or exc}") from None
        if len(parts) > 1:
            click.echo(f"  {path}", err=True)


def _submit(settings: ReputationSettings, fmt: str, incidents: list[Incident]) -> SubmitResult:
    try:
        key = settings.abuseipdb.api_key() if fmt == "abuseipdb" else settings.dshield.api_key()
    except SecretError as exc:
        raise UsageFailure(str(exc)) from None
    pacer = Pacer(settings.http_interval)
    with _open_outbox(settings) as outbox, http_client(settings.http_timeout) as client:
        if fmt == "abuseipdb":
            return submit_abuseipdb(
                incidents, settings.abuseipdb, key, outbox, client, pacer, settings.zone()
            )
        return submit_dshield(incidents, settings.dshield, key, outbox, client, pacer)
