"""`imr server`, `imr token`, `imr config` and `imr contrib-path`: setting imr up and
running the daemon (the commands that change blocks are in imr/cli.py and imr/cli_admin.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import click

from imr.cli_context import (
    EXIT_USAGE,
    CliContext,
    CliError,
    NotRunning,
    client_errors,
    fail,
)
from imr.config import DEFAULT_CONFIG_PATH, Config, load_config
from imr.core.policy import describe_severities
from imr.protocol import StatusResult

_FILE = click.Path(path_type=Path, dir_okay=False)


# --- Daemon ---


@click.group()
def server() -> None:
    """Start, stop and inspect the root daemon."""


@server.command("start")
@click.option("--foreground", is_flag=True, help="Stay in the foreground (systemd, containers).")
@click.option(
    "--log-json", is_flag=True, help='Log JSON lines (same as server.log_format = "json").'
)
@click.option(
    "--adopt-kernel",
    is_flag=True,
    help="If the state file is new but the kernel holds imr blocks, keep them as new blocks.",
)
@click.pass_obj
def server_start(ctx: CliContext, foreground: bool, log_json: bool, adopt_kernel: bool) -> None:
    """Start the daemon (as root)."""
    from imr.server.daemon import DaemonError, configure_logging, run_foreground, start_background

    path = ctx.config_path.absolute()  # the daemon runs in /
    missing_ok = ctx.config_path == DEFAULT_CONFIG_PATH

    def read_config() -> Config:  # again on SIGHUP; raises ConfigError
        config = load_config(path, missing_ok=missing_ok)
        if log_json:
            server_config = config.server.model_copy(update={"log_format": "json"})
            config = config.model_copy(update={"server": server_config})
        return config

    config = read_config() if log_json else ctx.config
    options: dict[str, Any] = {"adopt_kernel": adopt_kernel, "reload_config": read_config}
    try:
        if foreground:
            configure_logging(None)
            run_foreground(config, **options)
        else:
            pid = start_background(config, configure_logging, **options)
            tcp = config.server.tcp
            also = f" and tcp {tcp.listen} port {tcp.port}" if tcp.enabled else ""
            click.echo(f"imr started (pid {pid}), listening on {config.server.socket}{also}")
    except DaemonError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@server.command("stop")
@click.pass_obj
def server_stop(ctx: CliContext) -> None:
    """Stop the daemon; blocks stay in the kernel and the state file."""
    from imr.server.daemon import stop_daemon

    with _signalling("stop"):
        pid = stop_daemon(ctx.config)
    click.echo(f"imr stopped (pid {pid}); blocks stay in force")


@server.command("reload")
@click.pass_obj
def server_reload(ctx: CliContext) -> None:
    """Reopen the log and read the configuration again (SIGHUP); a bad one is refused."""
    from imr.server.daemon import reload_daemon

    # The configuration was read (and checked) before this runs: a bad one already
    # failed with its message, and the daemon keeps the one in force.
    with _signalling("reload"):
        pid = reload_daemon(ctx.config)
    click.echo(f"imr (pid {pid}) asked to reload {ctx.config_path}; its log says what changed")


@contextlib.contextmanager
def _signalling(verb: str) -> Iterator[None]:
    """Errors of signalling the daemon as CliErrors; no daemon exits 3."""
    from imr.server.daemon import DaemonError, DaemonNotRunning

    try:
        yield
    except DaemonNotRunning as exc:
        raise NotRunning(str(exc)) from None
    except DaemonError as exc:
        raise CliError(str(exc)) from None
    except PermissionError:
        raise CliError(f"only root can {verb} the daemon") from None


@server.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def server_status(ctx: CliContext, as_json: bool) -> None:
    """Is the daemon running? Exit 0 only if it is."""
    with client_errors():
        status = cast(StatusResult, ctx.client().request("status"))
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


# --- Tokens for TCP clients ---


@click.group("token")
def token_group() -> None:
    """Bearer tokens for TCP clients without a certificate (docs/security.md)."""


@token_group.command("new")
@click.argument("name")
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(["block", "read", "admin"]),
    help="Role of the token's holder (repeat for several).",
)
@click.option(
    "--output",
    type=_FILE,
    default=None,
    help="Write the token to this new file (mode 0600) instead of printing it.",
)
def token_new(name: str, roles: tuple[str, ...], output: Path | None) -> None:
    """Mint a token for NAME; print the line to add to [access.tokens] (only its hash)."""
    import os
    import re

    from imr.config import TOKEN_NAME
    from imr.server.access import hash_token, new_token

    if not re.match(TOKEN_NAME, name):
        fail(f"token name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ . -", EXIT_USAGE)
    token = new_token()
    if output is not None:
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            fail(f"--output {output}: {exc.strerror} (it must not exist yet)", EXIT_USAGE)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(token + "\n")
    role = json.dumps(roles[0]) if len(set(roles)) == 1 else json.dumps(sorted(set(roles)))
    entry = f'{name} = {{ sha256 = "{hash_token(token)}", role = {role} }}'
    if output is None:
        click.echo(f"# the token for {name}: give it to the client (--token-file); shown once")
        click.echo(token)
    else:
        click.echo(f"# the token for {name} is in {output} (mode 0600)")
    click.echo("# add to the daemon's configuration, then restart the daemon:")
    click.echo("[access.tokens]")
    click.echo(entry)


# --- Configuration ---


@click.group("config")
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
    # What policy.severity_skips_rungs means for this ladder, as a comment below it.
    mapping = "; ".join(describe_severities(ctx.config.policy.to_ladder()))
    lines = ctx.config.to_toml().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("severity_skips_rungs ="))
    lines.insert(at + 1, f"# first offence by reporter severity: {mapping}")
    click.echo("\n".join(lines))


@click.command("contrib-path")
@click.argument("name", required=False, default="")
def contrib_path(name: str) -> None:
    """Print where the contrib files are (units, ModSecurity files, the sample config).

    With NAME (e.g. `modsecurity/imr-rules.conf`), print that file's path; exit 1 if absent.
    """
    from imr.contrib_files import contrib_dir

    base = contrib_dir()
    if base is None:
        fail("the contrib files are not installed with this copy of imr")
    target = base / name if name else base
    if ".." in Path(name).parts or not target.exists():
        fail(f"no contrib file {name!r} in {base}")
    click.echo(str(target))


def _uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{s:02d}"
