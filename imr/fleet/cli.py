"""`imr fleet`: keygen (a member's signing key) and status (the daemon's view of the fleet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from imr.cli_context import CliContext
from imr.fleet import keys
from imr.terminal import escape


@click.group()
def fleet() -> None:
    """Fleet mode: one block on every member (docs/fleet.md)."""


@fleet.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def keygen(path: Path) -> None:
    """Write a new Ed25519 private key to PATH (mode 0600) and print its public key for
    every member's [fleet.members.NAME] public_key."""
    from imr.cli_context import fail

    try:
        public = keys.generate(path)
    except keys.FleetKeyError as exc:
        fail(str(exc))
    click.echo(public)


@fleet.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def status(ctx: CliContext, as_json: bool) -> None:
    """Members seen, last event per origin, lag, outbox depth, refused events (roles: any)."""
    from imr.cli import call
    from imr.cli_context import fail

    result = call(ctx, "status")
    found = result.get("fleet")
    if found is None:
        fail("fleet mode is off on this daemon ([fleet] enabled = false)")
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(_text(found))


def _text(found: dict[str, Any]) -> str:
    lines = [
        f"member {escape(found['member'])}:"
        f" publisher {'connected' if found['publisher_connected'] else 'DISCONNECTED'},"
        f" follower {'connected' if found['follower_connected'] else 'DISCONNECTED'}",
        *(
            [f"redis primary {escape(found['redis_primary'])} (named by Sentinel)"]
            if found.get("redis_primary")
            else []
        ),
        f"published {found['published']}, outbox {found['outbox_depth']},"
        f" applied {found['applied']}, full replays {found['full_replays']}",
    ]
    refused = found["refused"]
    lines.append(
        "refused: " + (", ".join(f"{k} {v}" for k, v in refused.items()) if refused else "none")
    )
    for origin, seen in found["origins"].items():
        lines.append(
            f"  from {escape(origin)}: {seen['applied']} applied, last {seen['last_seen_ago']} s"
            f" ago, lag {seen['lag_seconds'] * 1000:.1f} ms"
        )
    return "\n".join(lines)
