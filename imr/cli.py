"""The command line: click options become one CliContext; each command makes one call.

Exit status: 0 success, 1 refused or failed, 2 usage or configuration error,
3 the daemon is not running.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from imr import __version__
from imr.cli_context import CliContext
from imr.client import ClientError, DaemonUnavailable, RequestFailed
from imr.config import DEFAULT_CONFIG_PATH, ConfigError, config_path, load_config
from imr.logscan.cli import rules, scan, watch

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"imr: {message}", err=True)
    sys.exit(code)


def call(ctx: CliContext, op: str, **fields: Any) -> dict[str, Any]:
    """One request to the daemon; every client error becomes a message and an exit code."""
    try:
        return ctx.client().request(op, **fields)
    except DaemonUnavailable as exc:
        fail(str(exc), EXIT_NOT_RUNNING)
    except RequestFailed as exc:
        fail(f"{exc.message} [{exc.code}]")
    except ClientError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Configuration file (default: $IMR_CONFIG or /etc/imr/imr.toml).",
)
@click.version_option(__version__, prog_name="imr")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """imr: block attackers in the kernel firewall on request of unprivileged clients."""
    path = config_path(config_file)
    try:
        # Only a file named by --config or $IMR_CONFIG must exist; no default file means defaults.
        config = load_config(path, missing_ok=path == DEFAULT_CONFIG_PATH)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    ctx.obj = CliContext(config, path)


# Daemon --------------------------------------------------------------------------


@main.group()
def server() -> None:
    """Start, stop and inspect the root daemon."""


@server.command("start")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (systemd, containers).")
@click.pass_obj
def server_start(ctx: CliContext, foreground: bool) -> None:
    """Start the daemon (as root)."""
    from imr.server.daemon import DaemonError, configure_logging, run_foreground, start_background

    try:
        if foreground:
            configure_logging(None)
            run_foreground(ctx.config)
        else:
            pid = start_background(ctx.config, configure_logging)
            click.echo(f"imr started (pid {pid}), listening on {ctx.config.server.socket}")
    except DaemonError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@server.command("stop")
@click.pass_obj
def server_stop(ctx: CliContext) -> None:
    """Stop the daemon; blocks stay in the kernel and the state file."""
    from imr.server.daemon import DaemonError, stop_daemon

    try:
        pid = stop_daemon(ctx.config)
    except DaemonError as exc:
        fail(str(exc), EXIT_NOT_RUNNING if "not running" in str(exc) else EXIT_FAILED)
    except PermissionError:
        fail("only root can stop the daemon")
    click.echo(f"imr stopped (pid {pid}); blocks stay in force")


@server.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def server_status(ctx: CliContext, as_json: bool) -> None:
    """Is the daemon running? Exit 0 only if it is."""
    status = call(ctx, "status")
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(
        f"imr is running\n"
        f"  pid:           {status['pid']}\n"
        f"  version:       {status['version']}\n"
        f"  uptime:        {_uptime(status['uptime_seconds'])} (since {status['started_at']})\n"
        f"  backend:       {status['backend_detail']}\n"
        f"  chosen:        {status['backend_choice']}\n"
        f"  socket:        {status['socket']}\n"
        f"  state file:    {status['state_file']}\n"
        f"  active blocks: {status['active_blocks']}"
    )


# Blocks --------------------------------------------------------------------------


@main.command()
@click.argument("ip")
@click.option("--reason", default="", help="Why (kept in the state file and logs).")
@click.option("--source", default="cli", show_default=True, help="Tag naming the reporter.")
@click.option(
    "--severity",
    type=click.IntRange(1, 10),
    default=None,
    help="Start at this rung of the ladder (1 = first).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def block(
    ctx: CliContext, ip: str, reason: str, source: str, severity: int | None, as_json: bool
) -> None:
    """Block IP (roles: block, admin)."""
    result = call(ctx, "block", ip=ip, reason=reason, source=source, severity=severity)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    verb = {"block": "blocked", "escalate": "escalated", "record": "already blocked"}
    click.echo(
        f"{verb[result['action']]} {result['ip']} until {result['expires_at']}"
        f" (rung {result['rung']}, offence {result['offence']}: {result['why']})"
    )


@main.command()
@click.argument("ip")
@click.option("--reason", default="", help="Why (kept in the logs).")
@click.pass_obj
def unblock(ctx: CliContext, ip: str, reason: str) -> None:
    """Lift the block on IP now (role: admin)."""
    result = call(ctx, "unblock", ip=ip, reason=reason)
    click.echo(f"unblocked {result['ip']}")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many rows.")
@click.pass_obj
def list_blocks(ctx: CliContext, as_json: bool, limit: int | None) -> None:
    """Active blocks (roles: read, admin)."""
    blocks = call(ctx, "list", limit=limit)["blocks"]
    if as_json:
        click.echo(json.dumps(blocks, indent=2))
        return
    if not blocks:
        click.echo("no active blocks")
        return
    rows = [["IP", "BLOCKED AT", "EXPIRES AT", "OFFENCE", "BY", "SOURCE", "REASON"]]
    for b in blocks:
        rows.append(
            [
                b["ip"],
                b["blocked_at"],
                b["expires_at"],
                str(b["offence"]),
                _who(b),
                b["source"] or "-",
                b["reason"] or "-",
            ]
        )
    click.echo(_table(rows))


@main.command()
@click.argument("ip")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show(ctx: CliContext, ip: str, as_json: bool) -> None:
    """The current block of IP, if any, and its whole history (roles: read, admin)."""
    result = call(ctx, "show", ip=ip)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    active = result["active"]
    if active:
        click.echo(
            f"{result['ip']} is blocked until {active['expires_at']}"
            f" (rung {active['rung']}, offence {active['offence']}, {active['duration']})"
        )
    else:
        click.echo(f"{result['ip']} is not blocked")
    if result["blocks"]:
        click.echo("\nblocks:")
        rows = [["BLOCKED AT", "EXPIRES AT", "RUNG", "LIFTED", "BY", "SOURCE", "REASON"]]
        for b in result["blocks"]:
            lifted = f"{b['lifted_at']} ({b['lift_reason']})" if b["lifted_at"] else "-"
            rows.append(
                [
                    b["blocked_at"],
                    b["expires_at"],
                    str(b["rung"]),
                    lifted,
                    _who(b),
                    b["source"] or "-",
                    b["reason"] or "-",
                ]
            )
        click.echo(_table(rows))
    if result["hits"]:
        click.echo("\nreports:")
        rows = [["AT", "OUTCOME", "BY", "SOURCE", "REASON"]]
        for h in result["hits"]:
            rows.append([h["at"], h["outcome"], _who(h), h["source"] or "-", h["reason"] or "-"])
        click.echo(_table(rows))


@main.command()
@click.option("--json", "as_json", is_flag=True, default=True, help="Print JSON (the only form).")
@click.pass_obj
def export(ctx: CliContext, as_json: bool) -> None:
    """Dump the whole state (every block and report) as JSON (roles: read, admin)."""
    click.echo(json.dumps(call(ctx, "export"), indent=2))


# Configuration --------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def config_show(ctx: CliContext, as_json: bool) -> None:
    """The effective configuration: the file's values with every default filled in."""
    exists = ctx.config_path.exists()
    if as_json:
        click.echo(json.dumps(ctx.config.model_dump(mode="json"), indent=2))
        return
    origin = str(ctx.config_path) if exists else f"{ctx.config_path} (absent: defaults)"
    click.echo(f"# effective configuration from {origin}\n")
    click.echo(ctx.config.to_toml())


# Log scanning (imr/logscan) ------------------------------------------------------

main.add_command(scan)
main.add_command(watch)
main.add_command(rules)


# Helpers --------------------------------------------------------------------------


def _who(entry: dict[str, Any]) -> str:
    uid, pid = entry.get("uid"), entry.get("pid")
    if uid is None:
        return "-"
    return f"uid {uid}" + (f" pid {pid}" if pid else "")


def _uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{s:02d}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
