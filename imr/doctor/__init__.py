"""`imr doctor`: check the environment and say what is wrong and how to fix it.

Every check returns findings; a finding is ok, a warning, or a problem, and
every warning and problem carries a fix. Exit status: 0 no problems (warnings
allowed unless --strict), 1 problems found, 2 usage or configuration error
(the configuration itself is checked when the CLI loads it).

Nothing here changes the host: the kernel probes create their test objects in
a network namespace of their own (`unshare --net`), which vanishes with them;
everything else only reads (tool versions, `*-save` listings, file metadata,
the state file opened read-only, a ping to the daemon).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict

import click

from imr.cli_context import CliContext
from imr.doctor.access import check_access
from imr.doctor.clock import check_clock
from imr.doctor.daemon import check_daemon, check_socket
from imr.doctor.findings import Finding, Level
from imr.doctor.kernel import check_kernel, kernel_probes, throwaway_netns
from imr.doctor.state import check_state
from imr.doctor.tools import Tools, check_tools

__all__ = ["Finding", "Level", "diagnose", "doctor", "render"]


def diagnose(ctx: CliContext, probe_kernel: bool = True) -> list[Finding]:
    config = ctx.config
    tools = Tools.find()
    findings = check_tools(config, tools)
    if probe_kernel:

        def probe() -> dict[str, str | None]:
            with throwaway_netns() as inside:
                return kernel_probes(tools, inside)

        findings += check_kernel(config, probe)
    findings += check_daemon(ctx)
    if config.server.socket.exists() or config.server.socket.is_symlink():
        findings += check_socket(config)  # a missing socket is the daemon finding's business
    findings += check_state(config, time.time())
    findings += check_clock()
    findings += check_access(config)
    if config.fleet.enabled:
        from imr.fleet.doctor import check_fleet

        findings += check_fleet(config)
    return findings


MARK = {Level.OK: "ok", Level.WARNING: "WARNING", Level.PROBLEM: "PROBLEM"}


def render(findings: Sequence[Finding]) -> str:
    lines = []
    for finding in findings:
        lines.append(f"{MARK[finding.level]:8} {finding.check}: {finding.message}")
        if finding.fix:
            lines.append(f"{'':8} fix: {finding.fix}")
    problems = sum(f.level is Level.PROBLEM for f in findings)
    warnings = sum(f.level is Level.WARNING for f in findings)
    lines.append(f"{problems} problem(s), {warnings} warning(s)")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--strict", is_flag=True, help="Warnings count as problems (exit 1).")
@click.option(
    "--no-kernel-probe",
    is_flag=True,
    help="Skip the kernel checks (they run as root in a throwaway network namespace).",
)
@click.pass_obj
def doctor(ctx: CliContext, as_json: bool, strict: bool, no_kernel_probe: bool) -> None:
    """Check tools, kernel, socket, state file, daemon, clock and [access]; say how to fix each.

    Exit 0: no problems; 1: problems found; 2: usage or configuration error.
    """
    findings = diagnose(ctx, probe_kernel=not no_kernel_probe)
    if as_json:
        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        click.echo(f"imr doctor: configuration {ctx.config_path}")
        click.echo(render(findings))
    bad = {Level.PROBLEM, Level.WARNING} if strict else {Level.PROBLEM}
    raise SystemExit(1 if any(f.level in bad for f in findings) else 0)
