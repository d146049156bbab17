"""Issue #18 ("Speed, round two"), before and after in one run on one machine.

Run as root, from the checkout (the "after" build):

    .venv/bin/python bench/round_two.py                 # ~15-20 min; markdown on stdout
    .venv/bin/python bench/round_two.py --quick         # small sizes, ~4 min: a smoke run
    .venv/bin/python bench/round_two.py --before /tmp/old --rounds 3 --out /tmp/r2.md

"before" is the code before any #18 work (commit ff9f01c unless --before-commit): a
detached worktree of it is made in a temporary directory and removed at the end, even on
failure (or give one with --before). Both builds run the *current* bench scripts, with
PYTHONPATH naming the build's tree: the bench imports that build's imr, and the daemon it
starts inherits the variable. This checks both: `import imr` resolves into each tree, and
every daemon's /proc/PID/environ names its tree (bench/_common.py prints it).

For each measure (bench/_round_two_measures.py) the builds alternate, before then after, for
--rounds rounds, then the next measure starts. fail2ban (iptables-multiport) and
fail2ban-regex run once, in the first "after" run of their measure. Each bench script runs
under a time limit (SIGINT first, so its clean-up removes its namespaces); a failed run is
shown as such and the others go on. Prints the machine, the builds, one table per target
(before, after, target, met?), each run's load average at its start and end, and the exact
commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _round_two_measures import QUICK, SKIP, TARGETS, Measure, Sizes, measures
from _round_two_report import Run, target_section

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BEFORE = "ff9f01c"


@dataclass(frozen=True)
class Build:
    name: str  # "before" or "after"
    tree: Path
    commit: str


def loadavg() -> str:
    return " / ".join(Path("/proc/loadavg").read_text().split()[:3])


def git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


def describe(tree: Path) -> str:
    try:
        line = git("log", "-1", "--format=%h %s", cwd=tree)
        dirty = git("status", "--porcelain", "--untracked-files=no", cwd=tree)
    except (OSError, subprocess.SubprocessError):
        return "(not a git tree)"
    return textwrap.shorten(line, 90, placeholder=" …") + (" (+ uncommitted changes)" * bool(dirty))


@contextlib.contextmanager
def before_tree(path: Path | None, commit: str, work: Path) -> Iterator[Path]:
    """The given tree, or a detached worktree of `commit`, removed afterwards."""
    if path is not None:
        yield path.resolve()
        return
    tree = work / "before"
    try:
        git("worktree", "add", "--detach", str(tree), commit)
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"git worktree add {commit}: {exc.stderr.strip()}") from None
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(tree)],
            cwd=REPO,
            capture_output=True,
            timeout=120,
            check=False,
        )
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True, check=False)


def check_build(build: Build, work: Path) -> None:
    """`import imr` with the build's PYTHONPATH resolves into its tree; compiled once, so
    neither build's first run pays for compiling."""
    probe = "import imr, imr.hook, imr.logscan.engine; print(imr.__file__)"
    env = {**os.environ, "PYTHONPATH": str(build.tree)}
    found = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    where = Path(found.stdout.strip() or "?").resolve()
    if found.returncode != 0 or not where.is_relative_to(build.tree.resolve()):
        why = found.stderr.strip().splitlines()[-1:] or [f"imports from {where}"]
        raise SystemExit(
            f"{build.name}: `import imr` with PYTHONPATH={build.tree} under {sys.executable}:"
            f" {why[0]} (run this with the checkout's .venv/bin/python)"
        )
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(build.tree / "imr")],
        capture_output=True,
        timeout=300,
        check=False,
    )


def command(measure: Measure, build: Build, rows: Path, fail2ban: bool) -> list[str]:
    args = [a for a in measure.args if not (fail2ban and a == SKIP)]
    return [sys.executable, str(BENCH / measure.script), *args, "--rows", str(rows)]


def wait_bounded(process: subprocess.Popen[bytes], timeout: float) -> str:
    """ "" when it exited in time; otherwise stop it as Ctrl-C would, so that its clean-up
    removes its namespaces and daemons, then kill it."""
    try:
        process.wait(timeout)
        return ""
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    except KeyboardInterrupt:
        error = "interrupted"
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        process.wait(90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
    if error == "interrupted":
        raise KeyboardInterrupt
    return error


def run_one(measure: Measure, build: Build, n: int, work: Path, fail2ban: bool) -> Run:
    """One bench script run; its figures, or why it failed."""
    base = work / f"{measure.key}-{build.name}-{n}"
    rows = base.with_suffix(".jsonl")
    rows.unlink(missing_ok=True)
    argv = command(measure, build, rows, fail2ban)
    env = {**os.environ, "PYTHONPATH": str(build.tree)}
    shown = [str(Path(a).relative_to(REPO)) if a.startswith(f"{REPO}/") else a for a in argv]
    shown[-1] = "ROWS"  # the run's own file, so that the rounds' commands read the same
    run = Run(measure.key, build.name, n, f"PYTHONPATH={build.tree} {shlex.join(shown)}")
    run.started, run.load_start = time.strftime("%H:%M:%S", time.gmtime()), loadavg()
    t0 = time.monotonic()
    with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
        # A session of its own: a Ctrl-C reaches only this script, which passes one SIGINT
        # on; a second one could cut the bench's clean-up short.
        process = subprocess.Popen(
            argv, env=env, cwd=work, stdout=out, stderr=err, start_new_session=True
        )
        run.error = wait_bounded(process, measure.timeout)
    run.seconds, run.load_end = time.monotonic() - t0, loadavg()
    stderr = Path(f"{base}.err").read_text(errors="replace")
    if not run.error and process.returncode != 0:
        run.error = f"exit {process.returncode}"
    if not run.error and measure.daemon:
        run.error = check_daemons(stderr, build)
    if not run.error:
        try:
            lines = rows.read_text().splitlines() if rows.exists() else []
            found = [json.loads(line) for line in lines]
            run.error = check_modules(found, build)
            run.figures = measure.parse(found)
            if not run.figures and not run.error:
                run.error = "no figures in its rows (has the bench's output changed?)"
        except (ValueError, KeyError, TypeError) as exc:
            run.error = f"unreadable rows: {exc}"
    if run.error:
        tail = "\n    ".join(stderr.splitlines()[-15:])
        print(f"  {measure.key} {build.name} failed ({run.error}):\n    {tail}", file=sys.stderr)
    return run


def check_daemons(stderr: str, build: Build) -> str:
    """ "" when every daemon the bench started ran with the build's tree on PYTHONPATH."""
    seen = [
        line.split("PYTHONPATH=", 1)[1]
        for line in stderr.splitlines()
        if line.startswith("daemon ") and "PYTHONPATH=" in line
    ]
    if not seen:
        return "no daemon reported its environment"
    wrong = [p for p in seen if Path(p).resolve() != build.tree.resolve()]
    return f"a daemon ran with PYTHONPATH={wrong[0]}" if wrong else ""


def check_modules(rows: list[dict[str, object]], build: Build) -> str:
    """ "" when the imr files a bench names in its rows (the hook it ran, the scanner it
    imported) are the build's."""
    tree = build.tree.resolve()
    for row in rows:
        for key in ("hook", "imr_file"):
            if key in row and not Path(str(row[key])).resolve().is_relative_to(tree):
                return f"ran {row[key]}, not the build's"
    return ""


def run_all(plan: list[Measure], builds: list[Build], rounds: int, work: Path) -> list[Run]:
    """Measure by measure, the builds alternating, `rounds` times; fail2ban once."""
    runs: list[Run] = []
    total = len(plan) * rounds * len(builds)
    try:
        for measure in plan:
            if measure.prepare:
                print(f"{measure.key}: one uncounted run (writes its log)", file=sys.stderr)
                run_one(measure, builds[-1], 0, work, fail2ban=False)
            for n in range(1, rounds + 1):
                for build in builds:
                    fail2ban = measure.fail2ban_once and n == 1 and build.name == "after"
                    run = run_one(measure, build, n, work, fail2ban)
                    runs.append(run)
                    print(
                        f"[{len(runs)}/{total}] {measure.key} {build.name} round {n}:"
                        f" {run.seconds:.0f} s, load {run.load_start} -> {run.load_end}"
                        f"{' FAILED ' + run.error if run.error else ''}",
                        file=sys.stderr,
                        flush=True,
                    )
            mine = [r.figures for r in runs if r.measure == measure.key and not r.error]
            measure.derive(mine)
    except KeyboardInterrupt:
        print("interrupted: the report shows the runs done so far", file=sys.stderr)
    return runs


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def header(builds: list[Build], rounds: int, sizes: Sizes, started: str, load: str) -> list[str]:
    ended = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    f2b = subprocess.run(
        ["fail2ban-server", "-V"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    out = [
        "## Speed round two: before and after in one run (`bench/round_two.py`)",
        "",
        f"- When: {started} to {ended} UTC; load average (1 / 5 / 15 min) {load} at the start,"
        f" {loadavg()} at the end.",
        f"- Machine: {os.cpu_count()} CPUs ({cpu_model()}), kernel {platform.release()},"
        f" Python {platform.python_version()}, fail2ban {f2b or 'not installed'}.",
    ]
    for build in builds:
        out.append(f"- {build.name}: {build.commit}, tree {build.tree} (on PYTHONPATH).")
    out += [
        f"- Rounds: {rounds}; each measure runs before, after, before, after, …, then the next"
        ' measure starts. Commands are run from the checkout (the "after" tree); every'
        " daemon's environment named its build's tree. ROWS is each run's own file of"
        " figures (JSON lines) in a temporary directory.",
        f"- Sizes: one_address {sizes.count:,} blocks with 1 client and {sizes.many:,} with"
        f" 50 a form; ipset --count {sizes.ipset:,}; iptables --count {sizes.iptables:,};"
        f' logs of {sizes.lines:,} lines (each written once by an uncounted "after" run'
        f" first); hook programs {sizes.hook_runs} runs each.",
        "",
    ]
    return out


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="a tree of the before build (else made)")
    parser.add_argument("--before-commit", default=BEFORE, help=f"default {BEFORE}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", action="append", help="measure keys (default: all)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benches build network namespaces")
    # Ctrl-C or a SIGTERM stops the current bench cleanly, removes the before tree and
    # prints the runs done so far (SIGINT too when started in the background, which
    # ignores it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    started, load = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), loadavg()
    with tempfile.TemporaryDirectory(prefix="imr-round-two-") as tmp:
        work = Path(tmp)
        sizes = replace(QUICK if args.quick else Sizes(), work=work)
        plan = [m for m in measures(sizes) if not args.only or m.key in args.only]
        if not plan:
            sys.exit(f"--only: no such measure; known: {[m.key for m in measures(sizes)]}")
        with before_tree(args.before, args.before_commit, work) as old:
            builds = [Build("before", old, describe(old)), Build("after", REPO, describe(REPO))]
            for build in builds:
                check_build(build, work)
            runs = run_all(plan, builds, max(1, args.rounds), work)
            text = header(builds, args.rounds, sizes, started, load)
    keys = {m.key for m in plan}
    for target in TARGETS:
        if keys & set(target.measures):
            text += target_section(target, runs)
    print("\n".join(text))
    if args.out is not None:
        args.out.write_text("\n".join(text) + "\n")
    if any(r.error for r in runs) or len(runs) < len(plan) * max(1, args.rounds) * 2:
        sys.exit(1)


if __name__ == "__main__":
    main()
