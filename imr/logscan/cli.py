"""`imr scan`, `imr watch`, `imr rules list|test`: the log scanner's commands.

Each takes the CliContext from ctx.obj (the main CLI registers them). User
errors (unreadable file, bad filter, state directory in use) print one `imr: ...` line
and exit 1; an unreachable daemon exits 3, so cron mails say what happened.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from imr.cli_context import EXIT_NOT_RUNNING, CliContext, CliError, NotRunning, UsageFailure
from imr.client import ClientError, DaemonUnavailable
from imr.config import PolicyConfig
from imr.core.durations import format_duration
from imr.core.policy import Ladder
from imr.logscan.engine import Scanner, signatures_from_config
from imr.logscan.fail2ban import FilterError, load_filter
from imr.logscan.follow import Follower
from imr.logscan.formats import LogFormat
from imr.logscan.httpbl import ClientAddresses, HttpBLScan, HttpBLUnavailable, from_settings
from imr.logscan.reader import BUILTIN, StateError, StateStore
from imr.logscan.runner import Outcome, Report, ScanError, scan_files
from imr.logscan.settings import LogscanConfig
from imr.logscan.signatures import Signature
from imr.reputation.settings import ReputationSettings

_PROGRESS_MIN_BYTES = 32 << 20  # smaller logs finish before a bar is worth drawing


class _DaemonFailed(CliError):
    """The daemon answered but the scan's requests failed: exit 3 as well, so a cron
    job tells a daemon-side failure from a bad log or filter (exit 1)."""

    exit_code = EXIT_NOT_RUNNING


def logscan_config(ctx: click.Context) -> LogscanConfig:
    obj = ctx.obj
    if isinstance(obj, CliContext):
        section = getattr(obj.config, "logscan", None)
        if isinstance(section, LogscanConfig):
            return section
    return LogscanConfig()


def filter_path(name: Path, directory: Path) -> Path:
    """A --fail2ban-filter argument as a file: a path that exists as given, else
    NAME or NAME.conf in fail2ban's filter.d (`sshd` -> /etc/fail2ban/filter.d/sshd.conf)."""
    if name.exists() or len(name.parts) > 1:
        return name
    stem = name.name.removesuffix(".conf")
    found = directory / f"{stem}.conf"
    if not found.exists():
        raise CliError(f"{name}: no such filter file, and no {found}")
    return found


def _signatures(config: LogscanConfig, filters: tuple[Path, ...]) -> list[Signature]:
    if filters:
        try:
            return [
                load_filter(
                    filter_path(p, config.fail2ban_filter_dir),
                    maxretry=config.fail2ban_maxretry,
                    findtime=config.fail2ban_findtime,
                )
                for p in filters
            ]
        except FilterError as exc:
            raise CliError(str(exc)) from None
    try:
        return signatures_from_config(config)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _scanner(config: LogscanConfig, fmt: str | None, filters: tuple[Path, ...]) -> Scanner:
    return Scanner(
        _signatures(config, filters),
        LogFormat(fmt) if fmt else config.format,
        tuple(config.trusted_proxies),
        config.max_line_bytes,
    )


def _rule_sets(
    config: LogscanConfig, fmt: str | None, filters: tuple[Path, ...], builtin: bool
) -> list[tuple[str, Scanner]]:
    """(rule set, scanner) pairs: each fail2ban filter is a rule set of its own, and the
    built-in signatures one more (alone when no filter is given, or with --builtin)."""
    sets = [
        (f"fail2ban:{p.name.removesuffix('.conf')}", _scanner(config, fmt, (p,))) for p in filters
    ]
    if builtin or not filters:
        sets.insert(0, (BUILTIN, _scanner(config, fmt, ())))
    return sets


def _httpbl(
    ctx: click.Context, config: LogscanConfig, flag: bool | None, fmt: str | None, *, follow: bool
) -> HttpBLScan | None:
    """The http:BL check when asked for (--httpbl, else logscan.httpbl); exit 2 if unusable."""
    if not (config.httpbl if flag is None else flag):
        return None
    obj = ctx.obj
    section = getattr(obj.config, "reputation", None) if isinstance(obj, CliContext) else None
    settings = section if isinstance(section, ReputationSettings) else ReputationSettings()
    addresses = ClientAddresses(
        LogFormat(fmt) if fmt else config.format,
        tuple(config.trusted_proxies),
        config.max_line_bytes,
    )
    try:
        return from_settings(settings, addresses, config.httpbl_max_lookups, follow=follow)
    except HttpBLUnavailable as exc:
        raise UsageFailure(f"--httpbl: {exc}") from None


def _client(ctx: click.Context, dry_run: bool) -> Any:
    if dry_run:
        return None
    obj = ctx.obj
    if not isinstance(obj, CliContext):
        raise CliError("no configuration: run through the imr command")
    return obj.client()


_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in LogFormat]),
    default=None,
    help="Log format (default: from the config, normally auto-detected per line).",
)
_filter_option = click.option(
    "--fail2ban-filter",
    "filters",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Use this fail2ban filter (a filter.d file, or NAME for"
    " /etc/fail2ban/filter.d/NAME.conf) instead of the built-in signatures (repeatable).",
)
_httpbl_option = click.option(
    "--httpbl/--no-httpbl",
    "use_httpbl",
    default=None,
    help="Also look every client address up in http:BL and block the listed ones"
    " (default: logscan.httpbl; needs [reputation.httpbl] with a key).",
)


def _outcome_line(o: Outcome) -> str:
    detail = f" ({o.detail})" if o.detail else ""
    return f"{o.status} {o.ip} {o.signature} severity={o.severity} hits={o.count}{detail}"


@click.command("scan")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--dry-run", is_flag=True, help="Decide and print, but neither block nor remember offsets."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@_format_option
@_filter_option
@click.option(
    "--builtin",
    is_flag=True,
    help="With --fail2ban-filter: also run the built-in signatures in the same pass.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where offsets are remembered (default: logscan.state_dir).",
)
@click.option(
    "--from-end",
    is_flag=True,
    help="For a log never seen before, start at its end instead of its beginning.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print errors only (no blocks, no warnings).")
@click.option("-v", "--verbose", is_flag=True, help="Also print a summary line (to stderr).")
@_httpbl_option
@click.pass_context
def scan(
    ctx: click.Context,
    paths: tuple[Path, ...],
    dry_run: bool,
    as_json: bool,
    fmt: str | None,
    filters: tuple[Path, ...],
    builtin: bool,
    state_dir: Path | None,
    from_end: bool,
    quiet: bool,
    verbose: bool,
    use_httpbl: bool | None,
) -> None:
    """Scan the lines added to PATHS since the last run (for cron).

    Prints nothing when there is nothing to report: one line per block on
    stdout, warnings on stderr (a missing log among several is a warning)."""
    config = logscan_config(ctx)
    rule_sets = _rule_sets(config, fmt, filters, builtin)
    httpbl = _httpbl(ctx, config, use_httpbl, fmt, follow=False)
    client = _client(ctx, dry_run)
    if all(not p.exists() and not _has_rotated(p) for p in paths):
        raise CliError(f"{', '.join(map(str, paths))}: no such file")
    try:
        with StateStore(state_dir or config.state_dir) as store:
            report = Report()
            for name, scanner in rule_sets:
                report.merge(
                    _run_with_progress(
                        paths, scanner, store, client, config, from_end, as_json, httpbl, name
                    )
                )
                httpbl = None  # one lookup per address, with the first rule set
            if not dry_run:
                store.save()
    except (StateError, ScanError) as exc:
        raise CliError(str(exc)) from None
    except DaemonUnavailable as exc:
        raise NotRunning(f"{exc}; nothing was remembered, the next run retries") from None
    except ClientError as exc:
        raise _DaemonFailed(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot save state: {exc}") from None
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    elif not quiet:
        _print_report(report, verbose)


def _has_rotated(path: Path) -> bool:
    return any(path.parent.glob(path.name + ".*")) if path.parent.is_dir() else False


def _run_with_progress(
    paths: tuple[Path, ...],
    scanner: Scanner,
    store: StateStore,
    client: Any,
    config: LogscanConfig,
    from_end: bool,
    as_json: bool,
    httpbl: HttpBLScan | None,
    rule_set: str,
) -> Report:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    if as_json or not sys.stderr.isatty() or total < _PROGRESS_MIN_BYTES:
        return scan_files(
            paths,
            scanner,
            store,
            client,
            max_line=config.max_line_bytes,
            start_at_end=from_end,
            httpbl=httpbl,
            rule_set=rule_set,
        )
    with click.progressbar(length=total, label=f"scanning ({rule_set})", file=sys.stderr) as bar:
        return scan_files(
            paths,
            scanner,
            store,
            client,
            max_line=config.max_line_bytes,
            start_at_end=from_end,
            progress=bar.update,
            httpbl=httpbl,
            rule_set=rule_set,
        )


def _print_report(report: Report, verbose: bool) -> None:
    """Blocks on stdout, warnings on stderr; the summary only when asked (-v):
    cron mails whatever a run prints, and a quiet run should send none."""
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    for outcome in report.outcomes:
        click.echo(_outcome_line(outcome))
    if not verbose:
        return
    s = report.stats
    rate = s.lines / report.seconds if report.seconds > 0 else 0.0
    click.echo(
        f"{s.lines} lines ({report.bytes_read} bytes) in {report.seconds:.2f}s, "
        f"{rate:,.0f} lines/s; "
        f"{s.hits} hits, {len(report.outcomes)} blocks, {s.bad} bad lines",
        err=True,
    )
    if report.httpbl is not None:
        h = report.httpbl
        click.echo(
            f"http:BL: {h['lookups']} lookups, {h['listed']} listed, {h['to_block']} to block, "
            f"{h['errors']} failed, {h['over_cap']} over the cap",
            err=True,
        )


@click.command("watch")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print what would be blocked; block nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print each outcome as a JSON line.")
@_format_option
@_filter_option
@click.option("--from-start", is_flag=True, help="Read the files from the beginning first.")
@_httpbl_option
@click.pass_context
def watch(
    ctx: click.Context,
    paths: tuple[Path, ...],
    dry_run: bool,
    as_json: bool,
    fmt: str | None,
    filters: tuple[Path, ...],
    from_start: bool,
    use_httpbl: bool | None,
) -> None:
    """Follow PATHS (rotation-aware) and block attackers as lines arrive."""
    config = logscan_config(ctx)
    scanner = _scanner(config, fmt, filters)
    httpbl = _httpbl(ctx, config, use_httpbl, fmt, follow=True)
    client = _client(ctx, dry_run)
    for path in paths:
        if not path.parent.is_dir():
            raise CliError(f"{path}: directory {path.parent} does not exist")

    def report(outcome: Outcome) -> None:
        line = json.dumps(outcome.as_json()) if as_json else _outcome_line(outcome)
        click.echo(line)
        sys.stdout.flush()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    follower = Follower(
        paths,
        scanner,
        client,
        report,
        max_line=config.max_line_bytes,
        start_at_end=not from_start,
        httpbl=httpbl,
    )
    follower.run(stop.is_set)


@click.group("rules")
def rules() -> None:
    """What the scanner looks for."""


@rules.command("list")
@click.option("--json", "as_json", is_flag=True)
@_filter_option
@click.pass_context
def rules_list(ctx: click.Context, as_json: bool, filters: tuple[Path, ...]) -> None:
    """List the signatures with severity, the block a first offence gets, and threshold."""
    sigs = _signatures(logscan_config(ctx), filters)
    ladder = _ladder(ctx)
    if as_json:
        click.echo(json.dumps([_sig_json(s, ladder) for s in sigs], indent=2))
        return
    for s in sigs:
        rung = ladder.starting_rung(s.severity)
        first = f"rung {rung} ({format_duration(ladder.duration(rung))})"
        click.echo(
            f"{s.name:22} sev {s.severity:2} -> {first:14} {s.hits} in"
            f" {format_duration(s.window)}  {s.description}"
        )
    if not ladder.severity_skips_rungs:
        click.echo("(severity does not skip rungs: policy.severity_skips_rungs is off)", err=True)


def _ladder(ctx: click.Context) -> Ladder:
    """The daemon's ladder from the same config file, to say what a severity leads to."""
    obj = ctx.obj
    policy = getattr(obj.config, "policy", None) if isinstance(obj, CliContext) else None
    return (policy if isinstance(policy, PolicyConfig) else PolicyConfig()).to_ladder()


def _sig_json(s: Signature, ladder: Ladder) -> dict[str, Any]:
    rung = ladder.starting_rung(s.severity)
    return {
        "name": s.name,
        "severity": s.severity,
        "first_offence": {"rung": rung, "duration": format_duration(ladder.duration(rung))},
        "hits": s.hits,
        "window": s.window,
        "description": s.description,
        "needles": [n.decode(errors="replace") for n in s.needles],
    }


@rules.command("test")
@click.argument("lines", nargs=-1, required=True)
@_format_option
@_filter_option
@click.pass_context
def rules_test(
    ctx: click.Context, lines: tuple[str, ...], fmt: str | None, filters: tuple[Path, ...]
) -> None:
    """Show which signatures match LINES, and why ('-' reads lines from stdin).

    Exit status 0 if any line matched, 1 if none did."""
    config = logscan_config(ctx)
    scanner = _scanner(config, fmt, filters)
    texts: list[str] = []
    for line in lines:
        texts.extend(sys.stdin.read().splitlines() if line == "-" else [line])
    matched = False
    for text in texts:
        hits, stats = scanner.scan_line(text.encode("utf-8", "surrogateescape"))
        if stats.bad:
            click.echo(f"unparsed: {text[:120]}")
        elif stats.unresolved and not hits:
            click.echo(f"no blockable client (trusted proxy or host name): {text[:120]}")
        elif not hits:
            click.echo(f"no match: {text[:120]}")
        for hit in hits:
            matched = True
            s = hit.signature
            click.echo(
                f"match {s.name} ip={hit.ip} severity={s.severity} "
                f"threshold={s.hits}/{format_duration(s.window)}: {hit.evidence}"
            )
    ctx.exit(0 if matched else 1)
