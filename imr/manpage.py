"""imr(1), made from the click commands: every command, its help and its options.

`imr man > docs/man/imr.1` writes the page the Debian package installs; a test checks the
file is what this makes, so a new option cannot be missing from it. The page carries no
date: the same commands make the same bytes.
"""

from __future__ import annotations

import click

from imr import __version__

HEADER = f""".TH IMR 1 "" "imr {__version__}" "User Commands"
.SH NAME
imr \\- firewall broker: block attackers on request of unprivileged clients
.SH SYNOPSIS
.B imr
[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...
.SH DESCRIPTION
.B imr
talks to the imr daemon, a root process that keeps a kernel block list (nftables sets,
ipset sets or iptables rules), and starts that daemon.
Clients (ModSecurity rules, log scanners, administrators) ask for blocks over the Unix socket
.IR /run/imr/imr.sock ;
what each may do depends on its role in the configuration (block, read, admin).
Blocks escalate along a ladder of durations, expire by themselves and survive restarts.
"""

FOOTER = """.SH SHELL COMPLETION
.B imr completion bash
(or
.BR zsh ", " fish )
prints the completion script: for bash, write it to
.IR /etc/bash_completion.d/imr .
.SH FILES
.TP
.I /etc/imr/imr.toml
The configuration; every key with its default, commented.
.TP
.I /var/lib/imr/state.db
The state file: every block and report.
.TP
.I /run/imr/imr.sock
The daemon's socket (group imr).
.TP
.I /usr/share/imr/modsecurity/
Rules and hooks for ModSecurity in Apache and nginx.
.SH EXIT STATUS
0 success, 1 refused or failed, 2 usage or configuration error, 3 the daemon is not running.
Errors are printed on standard error as
.IR "imr: message" .
.SH SEE ALSO
.BR imr-hook (1),
.BR systemctl (1);
.I /usr/share/doc/imr/operations.md
and the other documents there.
"""


def roff(text: str) -> str:
    """Text safe in a roff body: backslashes and hyphens escaped, no line starts a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def render() -> str:
    """The whole page."""
    from imr.cli import main

    ctx = click.Context(main, info_name="imr")
    parts = [HEADER, ".SH OPTIONS\n", _options(main, ctx), ".SH COMMANDS\n"]
    parts += [_command(name, command, ctx) for name, command in _walk(main, ctx, "")]
    parts.append(FOOTER)
    return "".join(parts)


def _walk(group: click.Group, ctx: click.Context, prefix: str) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        full = f"{prefix}{name}"
        if isinstance(command, click.Group):
            found += _walk(command, click.Context(command, info_name=name, parent=ctx), full + " ")
        else:
            found.append((full, command))
    return found


def _command(name: str, command: click.Command, ctx: click.Context) -> str:
    sub = click.Context(command, info_name=name, parent=ctx)
    usage = " ".join(command.collect_usage_pieces(sub))
    lines = [f'.SS "imr {roff(name)} {roff(usage)}"\n']
    if command.help:
        paragraphs = [p for p in click.unstyle(command.help).split("\n\n") if p.strip()]
        lines += [roff(" ".join(p.split())) + "\n.PP\n" for p in paragraphs]
    lines.append(_options(command, sub))
    return "".join(lines)


def _options(command: click.Command, ctx: click.Context) -> str:
    lines = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is None:
            continue
        names, help_text = record
        lines.append(f".TP\n.B {roff(names)}\n{roff(' '.join(help_text.split())) or '.'}\n")
    return "".join(lines)
