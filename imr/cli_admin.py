"""The commands an administrator reaches for beyond block/list/show: unblock (one, many,
by source, all), stats, shell completion and the man page.

Errors go through CliError (imr/cli_context.py): `imr: <message>`, exit 1, 2 or 3.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

import click

from imr.cli_context import CliContext, CliError, UsageFailure, client_errors
from imr.client import RequestFailed
from imr.protocol import MAX_LIST_LIMIT
from imr.terminal import escape

SHELLS = ("bash", "zsh", "fish")


def _request(ctx: CliContext, op: str, **fields: Any) -> dict[str, Any]:
    with client_errors():
        return ctx.client().request(op, **fields)


def _active(ctx: CliContext, source: str | None = None) -> list[dict[str, Any]]:
    """Every active block (matching `source`), oldest first; more than a listing holds fails."""
    result = _request(ctx, "list", source=source, limit=MAX_LIST_LIMIT)
    if result.get("matched", 0) > len(result["blocks"]):
        raise CliError(f"more than {MAX_LIST_LIMIT} blocks match; narrow it with --source")
    blocks: list[dict[str, Any]] = result["blocks"]
    return blocks


def read_addresses(file: TextIO) -> list[str]:
    """The first word of each line ("203.0.113.7 seen 3 times"); blank and # lines skipped."""
    return [line.split()[0] for line in file if line.strip()[:1] not in ("", "#")]


def confirm_bulk(count: int, what: str, yes: bool, is_tty: Callable[[], bool]) -> None:
    """Ask before lifting blocks by pattern; without a terminal to ask, --yes is required."""
    if yes or count == 0:
        return
    if not is_tty():
        raise UsageFailure(
            f"refusing to unblock {count} {what} without --yes (no terminal to ask on)"
        )
    if not click.confirm(f"unblock {count} {what}?", default=False, err=True):
        raise CliError("nothing unblocked")


@click.command()
@click.argument("ips", nargs=-1, metavar="[IP]...")
@click.option(
    "--from-file",
    type=click.File("r"),
    help="Also unblock the first word of each line of this file ('-': standard input).",
)
@click.option(
    "--source",
    "pattern",
    metavar="PATTERN",
    default=None,
    help="Every active block whose source is this tag (or tag:...) or matches this glob.",
)
@click.option("--all", "everything", is_flag=True, help="Every active block.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before --source or --all.")
@click.option("--reason", default="", help="Why (kept in the logs).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one result per address).")
@click.pass_obj
def unblock(
    ctx: CliContext,
    ips: tuple[str, ...],
    from_file: TextIO | None,
    pattern: str | None,
    everything: bool,
    yes: bool,
    reason: str,
    as_json: bool,
) -> None:
    """Lift blocks now (role: admin): each IP, those in --from-file, or by --source or --all.

    --source and --all ask first on a terminal; elsewhere they need --yes. Each address
    is lifted on its own; the exit status is 1 if any was refused.
    """
    if pattern is not None and everything:
        raise UsageFailure("give --source or --all, not both")
    wanted = list(ips) + (read_addresses(from_file) if from_file is not None else [])
    if pattern is not None or everything:
        found = [b["ip"] for b in _active(ctx, pattern)]
        what = "active block(s)" + (f" of source {pattern!r}" if pattern else "")
        confirm_bulk(len(found), escape(what), yes, sys.stdin.isatty)
        wanted += found  # an address given twice is lifted once (below)
    elif not wanted:
        raise UsageFailure("give at least one address, --from-file, --source or --all")
    if not wanted:
        click.echo("no matching active blocks")
        return
    results = [_unblock_one(ctx, ip, reason) for ip in dict.fromkeys(wanted)]
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for item in results:
            _print_unblocked(item)
    if not all(item["ok"] for item in results):
        raise SystemExit(1)


def _print_unblocked(item: dict[str, Any]) -> None:
    if item["ok"]:
        click.echo(f"unblocked {item['ip']}")
        return
    error = item["error"]
    message = escape(f"unblock {item['ip']}: {error['message']} [{error['code']}]")
    click.echo(f"imr: {message}", err=True)


def _unblock_one(ctx: CliContext, ip: str, reason: str) -> dict[str, Any]:
    """One unblock; a refusal is a result, a daemon that went away ends the command."""
    with client_errors():
        try:
            result = ctx.client().request("unblock", ip=ip, reason=reason)
        except RequestFailed as exc:
            return {"ip": ip, "ok": False, "error": {"code": exc.code, "message": exc.message}}
    return {"ip": result["ip"], "ok": True}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--hours",
    type=click.IntRange(1, 24 * 14),
    default=24,
    show_default=True,
    help="How many hours of blocks per hour to show.",
)
@click.pass_obj
def stats(ctx: CliContext, as_json: bool, hours: int) -> None:
    """Active blocks by source, rung and backend, and blocks made per hour (roles: read, admin).

    Counted from the active blocks (`imr list`): a block already lifted or expired is not
    in the hourly counts.
    """
    status = _request(ctx, "status")
    blocks = _active(ctx)
    summary = summarise(blocks, status, time.time(), hours)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"active blocks: {summary['active']} (backend {summary['backend']})")
    for title, key in (("by source", "by_source"), ("by rung", "by_rung")):
        click.echo(f"\n{title}:")
        for name, count in summary[key].items():
            click.echo(f"  {count:>7}  {escape(name)}")
    click.echo(f"\nblocks made per hour (UTC), last {hours} hour(s), still active:")
    for hour, count in summary["per_hour"].items():
        click.echo(f"  {hour}  {count:>7}")


def summarise(
    blocks: list[dict[str, Any]], status: dict[str, Any], now: float, hours: int
) -> dict[str, Any]:
    """The stats document: counts by source, rung, backend and the hour blocks were made in."""
    sources = Counter(b["source"] or "-" for b in blocks)
    rungs = Counter(f"rung {b['rung']}" for b in blocks)
    start = int(now // 3600 - hours + 1) * 3600
    per_hour = {_hour(start + 3600 * i): 0 for i in range(hours)}
    for b in blocks:
        hour = b["blocked_at"][:13] + ":00Z"
        if hour in per_hour:
            per_hour[hour] += 1
    return {
        "active": len(blocks),
        "backend": status.get("backend", "?"),
        "by_backend": {status.get("backend", "?"): len(blocks)},
        "by_source": dict(sources.most_common()),
        "by_rung": dict(sorted(rungs.items())),
        "per_hour": per_hour,
    }


def _hour(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(epoch))


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish).

    bash: `imr completion bash > /etc/bash_completion.d/imr`; zsh: into a directory on
    $fpath as `_imr`; fish: `~/.config/fish/completions/imr.fish`.
    """
    from click.shell_completion import get_completion_class

    from imr.cli import main

    cls = get_completion_class(shell)
    if cls is None:  # click knows all three; an older click might not
        raise CliError(f"no completion for {shell} in this click")
    click.echo(cls(main, {}, "imr", "_IMR_COMPLETE").source())


@click.command("man")
def man_page() -> None:
    """Print the imr(1) man page (roff), made from these commands' help."""
    from imr.manpage import render

    click.echo(render(), nl=False)
