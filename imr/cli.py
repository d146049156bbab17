"""The command line: click options become one CliContext; each command makes one call.

Exit status: 0 success, 1 refused or failed, 2 usage or configuration error,
3 the daemon is not running.
"""

from __future__ import annotations

import functools
import json
import pwd
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

import click

from imr import __version__, cli_admin, cli_setup
from imr.cli_context import (
    EXIT_FAILED,
    EXIT_USAGE,
    CliContext,
    client_errors,
    fail,
)
from imr.client import Client, TcpTarget
from imr.config import DEFAULT_CONFIG_PATH, ConfigError, config_path, load_config
from imr.core.durations import format_duration, parse_duration
from imr.core.policy import Action
from imr.protocol import (
    MAX_LIST_LIMIT,
    BlockInfo,
    BlockManyItem,
    BlockResult,
    ExportPage,
    HitInfo,
    ListResult,
    PongResult,
    ShowResult,
)
from imr.terminal import escape

_FILE = click.Path(path_type=Path, dir_okay=False)
_T = TypeVar("_T")


def call(ctx: CliContext, op: str, **fields: Any) -> dict[str, Any]:
    """One request to the daemon; every client error becomes a message and an exit code."""
    return _asking(lambda client: client.request(op, **fields), ctx)


def call_many(ctx: CliContext, ips: list[str], **fields: Any) -> list[BlockManyItem]:
    """block_many in as many requests as the line limit needs; errors as in call()."""
    return _asking(lambda client: client.block_many(ips, **fields), ctx)


def _asking(ask: Callable[[Client], _T], ctx: CliContext) -> _T:
    with client_errors():
        return ask(ctx.client())


# click >= 8.2 raises this UsageError for a bare group; its message is the group's help.
_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {})
)


class _MainGroup(click.Group):
    """`imr`, with the log-scanning, reputation and doctor commands imported only when asked
    for: `imr server start` (the daemon forks from that process and keeps what it imported)
    and the client commands then skip httpx and dnspython (~0.1 s and several MB)."""

    _extras_loaded = False

    def _load_extras(self) -> None:
        if self._extras_loaded:
            return
        self._extras_loaded = True
        from imr.doctor import doctor
        from imr.fleet.cli import fleet
        from imr.logscan.cli import rules, scan, watch
        from imr.reputation.cli import register as register_reputation

        for command in (scan, watch, rules, doctor, fleet):
            self.add_command(command)
        register_reputation(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and not self._extras_loaded:
            self._load_extras()
            command = super().get_command(ctx, cmd_name)
        return command

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_extras()
        return super().list_commands(ctx)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """click's main loop, with its usage errors in imr's one style: `imr: <message>`
        and where to read more, exit 2 (click prints the usage and `Error: ...`)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # a group without its command: its help, as click does
            click.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "imr"
            click.echo(f"imr: {exc.format_message()} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("imr: aborted", err=True)
            sys.exit(EXIT_FAILED)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Configuration file (default: $IMR_CONFIG or /etc/imr/imr.toml).",
)
@click.option(
    "--connect",
    metavar="URL",
    envvar="IMR_CONNECT",
    default=None,
    help="Talk to a daemon's TCP listener: tls://HOST:PORT, or tcp://127.0.0.1:PORT (loopback).",
)
@click.option("--tls-ca", type=_FILE, envvar="IMR_TLS_CA", help="CA of the daemon's certificate.")
@click.option("--tls-cert", type=_FILE, envvar="IMR_TLS_CERT", help="Client certificate (PEM).")
@click.option("--tls-key", type=_FILE, envvar="IMR_TLS_KEY", help="Its key, if not in --tls-cert.")
@click.option(
    "--token-file", type=_FILE, envvar="IMR_TOKEN_FILE", help="File holding a bearer token."
)
@click.version_option(__version__, prog_name="imr")
@click.pass_context
def main(
    ctx: click.Context,
    config_file: Path | None,
    connect: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    token_file: Path | None,
) -> None:
    """imr: block attackers in the kernel firewall on request of unprivileged clients."""
    path = config_path(config_file)
    try:
        # Only a file named by --config or $IMR_CONFIG must exist; no default file means defaults.
        config = load_config(path, missing_ok=path == DEFAULT_CONFIG_PATH)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    tcp = _tcp_target(connect, tls_ca, tls_cert, tls_key, token_file)
    ctx.obj = CliContext(config, path, tcp)


def _tcp_target(
    url: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    token_file: Path | None,
) -> TcpTarget | None:
    """--connect and its options -> a TcpTarget; usage errors exit 2."""
    if url is None:
        if any(v is not None for v in (ca, cert, key, token_file)):
            fail("--tls-ca, --tls-cert, --tls-key and --token-file need --connect", EXIT_USAGE)
        return None
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--token-file {token_file}: cannot read: {exc}", EXIT_USAGE)
        if not token or any(c.isspace() for c in token):
            fail(f"--token-file {token_file}: expected one token on one line", EXIT_USAGE)
    if key is not None and cert is None:
        fail("--tls-key needs --tls-cert", EXIT_USAGE)
    try:
        target = TcpTarget.from_url(url, ca_file=ca, cert_file=cert, key_file=key, token=token)
    except ValueError as exc:
        fail(f"--connect {exc}", EXIT_USAGE)
    if not target.tls and (ca or cert):
        fail("--tls-ca and --tls-cert need a tls:// address", EXIT_USAGE)
    return target


# Blocks --------------------------------------------------------------------------


@main.command()
@click.argument("ips", nargs=-1, metavar="IP...")
@click.option(
    "--from-file",
    type=click.File("r"),
    help="Also block the first word of each line of this file ('-': standard input).",
)
@click.option("--reason", default="", help="Why (kept in the state file and logs).")
@click.option("--source", default="cli", show_default=True, help="Tag naming the reporter.")
@click.option(
    "--severity",
    type=click.IntRange(1, 10),
    default=None,
    help="How bad, 1-10: noted; starts at this rung only if policy.severity_skips_rungs.",
)
@click.option(
    "--duration",
    metavar="DURATION",
    default=None,
    help="Admins: the block ends this long from now (30m, 2d), whatever the ladder says.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def block(
    ctx: CliContext,
    ips: tuple[str, ...],
    from_file: TextIO | None,
    reason: str,
    source: str,
    severity: int | None,
    duration: str | None,
    as_json: bool,
) -> None:
    """Block each IP (roles: block, admin).

    Several addresses go as block_many requests: each is checked and answered on its
    own; the exit status is 1 if any was refused.
    """
    wanted = list(ips)
    if from_file is not None:
        # The first word of each line ("203.0.113.7 seen 3 times"); blank and # lines skipped.
        wanted += [line.split()[0] for line in from_file if line.strip()[:1] not in ("", "#")]
    if not wanted:
        fail("give at least one address (or --from-file)", EXIT_USAGE)
    if duration is not None and (len(wanted) > 1 or from_file is not None):
        fail("--duration takes one address", EXIT_USAGE)
    verb = {action.value: action.told for action in Action}
    if len(wanted) == 1 and from_file is None:
        extra = {"duration": duration} if duration is not None else {}
        asked = call(
            ctx, "block", ip=wanted[0], reason=reason, source=source, severity=severity, **extra
        )
        result = cast(BlockResult, asked)
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        click.echo(
            f"{verb[result['action']]} {result['ip']} until {result['expires_at']}"
            f" (rung {result['rung']}, offence {result['offence']}, {result['duration']}:"
            f" {result['why']})"
        )
        return
    results = call_many(ctx, wanted, reason=reason, source=source, severity=severity)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for item in results:
            if item["ok"]:
                click.echo(
                    f"{verb[item['action']]} {item['ip']} until {item['expires_at']}"
                    f" (rung {item['rung']}, offence {item['offence']})"
                )
            else:
                error = item["error"]
                click.echo(
                    f"imr: block {escape(item['ip'])}: {error['message']} [{error['code']}]",
                    err=True,
                )
    if not all(item["ok"] for item in results):
        sys.exit(EXIT_FAILED)


def _duration_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("list")
@click.option(
    "--since",
    metavar="DURATION",
    callback=_duration_option,
    help="Only blocks made within this long (90s, 30m, 1h, 1d, 2w).",
)
@click.option("--reason", metavar="TEXT", default=None, help="Reason contains TEXT (any case).")
@click.option(
    "--source",
    metavar="PATTERN",
    default=None,
    help="Source tag is PATTERN or PATTERN:..., or matches the glob PATTERN ('logscan*').",
)
@click.option(
    "--origin", metavar="HOST", default=None, help="Made by fleet member HOST ('local': here)."
)
@click.option(
    "--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=None, help="At most N rows."
)
@click.option(
    "--networks", is_flag=True, help="Only network blocks (an admin's, and escalated prefixes)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of blocks).")
@click.pass_obj
def list_blocks(
    ctx: CliContext,
    since: int | None,
    reason: str | None,
    source: str | None,
    origin: str | None,
    limit: int | None,
    networks: bool,
    as_json: bool,
) -> None:
    """Active blocks, oldest first, from the daemon's memory (roles: read, admin)."""
    fields: dict[str, Any] = {"since": since, "reason": reason, "source": source, "limit": limit}
    if networks:  # only when asked: an older daemon refuses the unknown field
        fields["networks"] = True
    if origin is not None:  # likewise
        fields["origin"] = origin
    result = cast(ListResult, call(ctx, "list", **fields))
    blocks = result["blocks"]
    if as_json:
        click.echo(json.dumps(blocks, indent=2))
        return
    filtered = networks or any(v is not None for v in (since, reason, source, origin))
    if not blocks:
        click.echo("no matching active blocks" if filtered else "no active blocks")
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
    matched = result.get("matched", len(blocks))
    if matched > len(blocks):
        click.echo(f"({len(blocks)} of {matched} matching; raise --limit for more)", err=True)


@main.command()
@click.argument("ip")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=None,
    help="At most this many blocks and reports, newest first (the daemon's page size caps it).",
)
@click.option("--before", type=click.IntRange(1), default=None, help="Only reports before this id.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--check", is_flag=True, help="Exit 1 if IP is not blocked now (for scripts; prints as usual)."
)
@click.pass_obj
def show(
    ctx: CliContext, ip: str, limit: int | None, before: int | None, as_json: bool, check: bool
) -> None:
    """The current block of IP, if any, and its history, newest first (roles: read, admin).

    With --check the exit status says whether IP is blocked: 0 blocked, 1 not.
    """
    result = cast(ShowResult, call(ctx, "show", ip=ip, limit=limit, before=before))
    _show(result, as_json)
    if check and not result["active"]:
        sys.exit(EXIT_FAILED)


def _show(result: ShowResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    active = result["active"]
    if active:
        click.echo(
            f"{result['ip']} is blocked until {active['expires_at']}"
            f" (rung {active['rung']}, offence {active['offence']}, {active['duration']},"
            f" {format_duration(active['remaining_seconds'])} left)"
        )
        if result.get("covered_by"):  # older daemons do not say
            click.echo(f"  (in the kernel through the network block {result['covered_by']})")
    else:
        click.echo(f"{result['ip']} is not blocked")
    if result["blocks"]:
        click.echo("\nblocks:")
        rows = [["BLOCKED AT", "EXPIRES AT", "LENGTH", "RUNG", "LIFTED", "BY", "SOURCE", "REASON"]]
        for b in result["blocks"]:
            lifted = f"{b['lifted_at']} ({b['lift_reason']})" if b["lifted_at"] else "-"
            rows.append(
                [
                    b["blocked_at"],
                    b["expires_at"],
                    b["duration"],
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
    if result.get("next_before") is not None:
        click.echo(f"(older reports: --before {result['next_before']})", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, default=True, help="Print JSON (the only form).")
@click.pass_obj
def export(ctx: CliContext, as_json: bool) -> None:
    """Dump the whole state (every block and report) as JSON (roles: read, admin).

    Written as the daemon's pages arrive, one row a line: neither side holds the whole.
    """
    _asking(lambda client: _write_export(client.export_pages()), ctx)


def _write_export(pages: Iterator[ExportPage]) -> None:
    """The export document, one row a line, written page by page (blocks come first)."""
    out = sys.stdout
    tables = ("blocks", "hits")
    opened = -1  # which table's list is open
    written = 0  # rows in it so far
    for page in pages:
        if opened < 0:
            version = json.dumps(page.get("schema_version"))
            out.write(f'{{\n  "kind": "export",\n  "schema_version": {version},\n  "blocks": [')
            opened = 0
        found: list[list[Any] | None] = [page.get("blocks"), page.get("hits")]  # as `tables`
        for index, rows in enumerate(found):
            for row in rows or []:
                while opened < index:
                    opened, written = opened + 1, 0
                    out.write(f'\n  ],\n  "{tables[opened]}": [')
                out.write(("," if written else "") + "\n    " + json.dumps(row))
                written += 1
    while opened < len(tables) - 1:
        opened += 1
        out.write(f'\n  ],\n  "{tables[opened]}": [')
    out.write("\n  ]\n}\n")


@main.command()
@click.pass_obj
def ping(ctx: CliContext) -> None:
    """Does the daemon answer this client? Exit 0 if so (any role, even none)."""
    result = cast(PongResult, call(ctx, "ping"))
    click.echo(f"pong (imr {result.get('version', '?')})")


# Unblock, stats, completion, man page (imr/cli_admin.py) ----------------------------

for _command in (cli_admin.unblock, cli_admin.stats, cli_admin.completion, cli_admin.man_page):
    main.add_command(_command)


# Server, tokens, configuration, contrib files (imr/cli_setup.py) --------------------

for _command in (
    cli_setup.server,
    cli_setup.token_group,
    cli_setup.config_group,
    cli_setup.contrib_path,
):
    main.add_command(_command)


# Helpers --------------------------------------------------------------------------


def _who(entry: BlockInfo | HitInfo) -> str:
    origin = entry.get("origin")
    if origin:  # a fleet member's block (docs/fleet.md)
        return f"fleet {escape(str(origin))}"
    uid, pid = entry.get("uid"), entry.get("pid")
    if uid is None:
        return "-"
    if uid < 0:
        return "tcp client"  # access.REMOTE_ID: the daemon's log names it
    return _user(uid) + (f" pid {pid}" if pid else "")


@functools.cache
def _user(uid: int) -> str:
    """The user's name where this host knows the uid (the daemon's host, usually), else it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _table(rows: list[list[str]]) -> str:
    # Cells hold client-supplied text (reasons, sources) from any state file, also one
    # written before the protocol refused control characters: never print them raw.
    rows = [[escape(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
