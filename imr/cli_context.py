"""What every CLI command receives: the one config object and a way to reach the daemon,
and the one way every CLI command fails (`CliError`).

Exit status, the same for every command: 0 success, 1 refused or failed, 2 usage or
configuration error, 3 the daemon is not running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import click

from imr.client import Client, ClientError, DaemonUnavailable, RequestFailed, TcpTarget
from imr.config import Config

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


class CliError(click.ClickException):
    """Every error a CLI command reports: the message is for the user; it is printed as
    `imr: <message>` on stderr and the command exits with `exit_code`.

    click's own main loop prints and exits (one place, like the bouncer's cmd/root.go),
    so a command only raises. Subclass for another exit status, never test the text.
    """

    exit_code = EXIT_FAILED

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"imr: {self.format_message()}", file=file, err=file is None)


class UsageFailure(CliError):
    """A wrong option or argument that click itself cannot see (they depend on each other)."""

    exit_code = EXIT_USAGE


class NotRunning(CliError):
    """No daemon answers (client.DaemonUnavailable) or none holds the pid file
    (server.daemon.DaemonNotRunning): exit 3, so cron mails say what happened."""

    exit_code = EXIT_NOT_RUNNING


def error_for(code: int) -> type[CliError]:
    """The CliError class that exits with `code` (1, 2 or 3)."""
    return {EXIT_USAGE: UsageFailure, EXIT_NOT_RUNNING: NotRunning}.get(code, CliError)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Stop the command with `imr: message` and exit status `code` (see CliError)."""
    raise error_for(code)(message)


@dataclass(frozen=True)
class CliContext:
    config: Config
    config_path: Path
    tcp: TcpTarget | None = None  # --connect: a daemon's TCP listener instead of the socket

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.config.server.socket, timeout=timeout, tcp=self.tcp)


@contextlib.contextmanager
def client_errors(refused: str = "") -> Iterator[None]:
    """Client errors as CliErrors: no daemon exits 3, a refusal shows its message and code
    (after `refused`, which says what was refused), anything else exits 1."""
    try:
        yield
    except DaemonUnavailable as exc:
        raise NotRunning(str(exc)) from None
    except RequestFailed as exc:
        raise CliError(f"{refused}{exc.message} [{exc.code}]") from None
    except ClientError as exc:
        raise CliError(str(exc)) from None
