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

import contextlib
import ctypes
import ctypes.util
import grp
import json
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import click

from imr.cli_context import CliContext
from imr.config import Config
from imr.store import SCHEMA_VERSION

PROBE_TIMEOUT = 15.0
# No clock running before this can be right: imr did not exist yet.
EARLIEST_PLAUSIBLE = 1_735_689_600  # 2025-01-01T00:00:00Z
LATEST_PLAUSIBLE = 4_102_444_800  # 2100-01-01T00:00:00Z
FUTURE_SLACK = 300.0  # seconds a state file time may lie ahead of the clock
TEST_ADDRESS_V4, TEST_ADDRESS_V6 = "192.0.2.1", "2001:db8::1"
APT_HINT = {
    "iptables": "apt-get install iptables",
    "nftables": "apt-get install nftables",
    "ipset": "apt-get install ipset",
    "util-linux": "apt-get install util-linux",
}


class Level(StrEnum):
    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str
    fix: str = ""


def ok(check: str, message: str) -> Finding:
    return Finding(check, Level.OK, message)


def warning(check: str, message: str, fix: str) -> Finding:
    return Finding(check, Level.WARNING, message, fix)


def problem(check: str, message: str, fix: str) -> Finding:
    return Finding(check, Level.PROBLEM, message, fix)


Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


def run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool with an argument list (never a shell); a missing or hung tool is a result."""
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: not found")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(argv), 126, "", f"{argv[0]}: {exc}")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else "(no message)"


# Tools and the iptables flavour ------------------------------------------------------

IPTABLES_NFT = ("iptables-nft-restore", "ip6tables-nft-restore", "iptables-nft", "ip6tables-nft")
IPTABLES_LEGACY = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-legacy")


def _missing(tools: Sequence[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def _has_libnftables() -> bool:
    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return False
    return True


def _has_python_iptables() -> bool:
    try:
        import iptc  # noqa: F401  (python-iptables; loads libiptc)
    except Exception:  # ImportError, or its own errors when libxtables is missing
        return False
    return True


@dataclass(frozen=True)
class Tools:
    """What the host has, for each way imr can talk to the kernel."""

    iptables_nft: list[str]  # missing tools
    iptables_legacy: list[str]
    python_iptables: bool
    nft: bool
    libnftables: bool
    ipset: bool

    @classmethod
    def find(cls) -> Tools:
        return cls(
            iptables_nft=_missing(IPTABLES_NFT),
            iptables_legacy=_missing(IPTABLES_LEGACY),
            python_iptables=_has_python_iptables(),
            nft=shutil.which("nft") is not None,
            libnftables=_has_libnftables(),
            ipset=shutil.which("ipset") is not None,
        )


def check_tools(config: Config, tools: Tools, run_tool: Runner = run) -> list[Finding]:
    findings: list[Finding] = []
    have = []
    if not tools.iptables_nft:
        have.append("iptables-nft")
    if not tools.iptables_legacy and tools.python_iptables:
        have.append("iptables-legacy (python-iptables)")
    if tools.libnftables or tools.nft:
        have.append("nftables (" + ("libnftables" if tools.libnftables else "nft") + ")")
    if tools.ipset:
        have.append("ipset")
    backend = config.firewall.backend
    if backend == "dryrun":
        return [ok("tools", "backend 'dryrun' needs no firewall tools")]
    needs: dict[str, list[str]] = {
        "nftables": [] if (tools.libnftables or tools.nft) else ["nft or libnftables.so.1"],
        "ipset": (["ipset"] if not tools.ipset else []) + tools.iptables_nft,
        "iptables": _iptables_needs(config, tools),
    }
    if backend == "auto":
        usable = [name for name, missing in needs.items() if not missing]
        if not usable:
            findings.append(
                problem(
                    "tools",
                    "no firewall backend has its tools: "
                    + "; ".join(f"{name} needs {', '.join(m)}" for name, m in needs.items()),
                    f"{APT_HINT['nftables']} (or {APT_HINT['iptables']})",
                )
            )
        else:
            findings.append(ok("tools", f"found {', '.join(have) or 'nothing'}"))
    elif needs[backend]:
        package = {"nftables": "nftables", "ipset": "ipset", "iptables": "iptables"}[backend]
        findings.append(
            problem(
                "tools",
                f"firewall.backend = {backend!r} needs {', '.join(needs[backend])}, not found"
                f" on PATH ({os.environ.get('PATH', '')})",
                f"{APT_HINT[package]}"
                + (" and iptables" if backend == "ipset" and tools.iptables_nft else "")
                + "; or choose another firewall.backend",
            )
        )
    else:
        findings.append(ok("tools", f"found {', '.join(have)}"))
    if backend in ("auto", "iptables", "ipset"):
        findings.append(check_flavour(config, tools, run_tool))
    return findings


def _iptables_needs(config: Config, tools: Tools) -> list[str]:
    flavour = config.firewall.iptables_flavour
    nft_ok, legacy_ok = not tools.iptables_nft, not tools.iptables_legacy and tools.python_iptables
    if flavour == "nft" or (flavour == "auto" and not legacy_ok):
        return tools.iptables_nft
    if flavour == "legacy" or (flavour == "auto" and not nft_ok):
        legacy = list(tools.iptables_legacy)
        return legacy + ([] if tools.python_iptables else ["python-iptables (pip)"])
    return []


def check_flavour(config: Config, tools: Tools, run_tool: Runner = run) -> Finding:
    """Which iptables the host uses, and whether rules sit in both (never right)."""
    version = run_tool(["iptables", "-V"], None)
    says = (version.stdout + version.stderr).strip()
    if version.returncode == 127:
        return problem("iptables flavour", "'iptables' is not installed", APT_HINT["iptables"])
    counts: dict[str, int | None] = {}
    for flavour, tool in (("nf_tables", "iptables-nft-save"), ("legacy", "iptables-legacy-save")):
        result = run_tool([tool], None)
        counts[flavour] = (
            sum(line.startswith("-A ") for line in result.stdout.splitlines())
            if result.returncode == 0
            else None
        )
    configured = config.firewall.iptables_flavour
    host = "nft" if "(nf_tables)" in says else "legacy" if "(legacy)" in says else None
    detail = f"{says or 'iptables -V said nothing'}; rules: " + ", ".join(
        f"{k} {'?' if v is None else v}" for k, v in counts.items()
    )
    if counts["nf_tables"] and counts["legacy"]:
        return problem(
            "iptables flavour",
            f"rules exist in both the nf_tables and the legacy tables ({detail}):"
            " the two do not see each other",
            "move every rule to one flavour (Debian: update-alternatives --config iptables),"
            " then set firewall.iptables_flavour to it",
        )
    if configured != "auto" and host is not None and configured != host:
        return problem(
            "iptables flavour",
            f"firewall.iptables_flavour = {configured!r} but the host's iptables is {host}"
            f" ({detail}): imr's rules would be invisible to `iptables -L`",
            f"set firewall.iptables_flavour = {host!r} (or 'auto')",
        )
    return ok("iptables flavour", detail)


# Kernel support, probed in a throwaway network namespace -----------------------------


@contextlib.contextmanager
def throwaway_netns(timeout: float = 5.0) -> Iterator[Runner]:
    """A fresh network namespace held by `unshare --net sleep`, and a runner into it.

    Every command goes through `nsenter --net` into that namespace, and only once
    the holder is verified to be in a namespace other than ours; the objects it
    creates die with the namespace when the holder is killed (by its pid).
    """
    ours = os.readlink("/proc/thread-self/ns/net")
    holder = subprocess.Popen(
        ["unshare", "--net", "--", "sleep", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{holder.pid}/ns/net") != ours:
                    break
            if holder.poll() is not None or time.monotonic() > deadline:
                error = holder.stderr.read() if holder.stderr else ""
                raise OSError(f"unshare --net failed: {_first_line(error)}")
            time.sleep(0.01)

        def inside(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
            return run(["nsenter", f"--target={holder.pid}", "--net", "--", *argv], stdin)

        yield inside
    finally:
        holder.kill()
        holder.wait(5)


NFT_PROBE = f"""
add table inet imr_doctor
add set inet imr_doctor v4 {{ type ipv4_addr; flags timeout; }}
add set inet imr_doctor v6 {{ type ipv6_addr; flags timeout; }}
add chain inet imr_doctor input {{ type filter hook input priority -10; }}
add rule inet imr_doctor input ip saddr @v4 tcp dport {{ 80 }} reject with tcp reset
add rule inet imr_doctor input ip6 saddr @v6 reject with icmpv6 type addr-unreachable
add element inet imr_doctor v4 {{ {TEST_ADDRESS_V4} timeout 60s }}
add element inet imr_doctor v6 {{ {TEST_ADDRESS_V6} timeout 60s }}
"""


def _iptables_probe(family: int) -> str:
    address = TEST_ADDRESS_V4 if family == 4 else TEST_ADDRESS_V6
    reject = "icmp-host-unreachable" if family == 4 else "icmp6-addr-unreachable"
    return (
        "*filter\n:IMR_DOCTOR - [0:0]\n-A INPUT -j IMR_DOCTOR\n"
        f"-A IMR_DOCTOR -s {address} -p tcp -m multiport --dports 80,443"
        f" -j REJECT --reject-with {reject}\n"
        "COMMIT\n"
    )


def kernel_probes(tools: Tools, inside: Runner) -> dict[str, str | None]:
    """mechanism -> None if the kernel accepted imr's kind of objects, else why not."""
    results: dict[str, str | None] = {}

    Steps = Sequence[tuple[list[str], str | None]]

    def attempt(name: str, steps: Steps) -> None:
        for argv, stdin in steps:
            result = inside(argv, stdin)
            if result.returncode != 0:
                results[name] = f"{' '.join(argv[:2])}: {_first_line(result.stderr)}"
                return
        results[name] = None

    if tools.nft:
        attempt("nftables", [(["nft", "-f", "-"], NFT_PROBE)])
    if not tools.iptables_nft:
        attempt(
            "iptables-nft",
            [
                (["iptables-nft-restore", "--noflush"], _iptables_probe(4)),
                (["ip6tables-nft-restore", "--noflush"], _iptables_probe(6)),
            ],
        )
    if shutil.which("iptables-legacy-restore") and shutil.which("ip6tables-legacy-restore"):
        attempt(
            "iptables-legacy",
            [
                (["iptables-legacy-restore", "--noflush"], _iptables_probe(4)),
                (["ip6tables-legacy-restore", "--noflush"], _iptables_probe(6)),
            ],
        )
    if tools.ipset:
        steps: list[tuple[list[str], str | None]] = [
            (["ipset", "create", "imr-doctor4", "hash:ip", "family", "inet", "timeout", "0"], None),
            (
                ["ipset", "create", "imr-doctor6", "hash:ip", "family", "inet6", "timeout", "0"],
                None,
            ),
            (["ipset", "add", "imr-doctor4", TEST_ADDRESS_V4, "timeout", "60"], None),
        ]
        if not tools.iptables_nft:
            steps.append(
                (
                    [
                        "iptables-nft",
                        "-A",
                        "INPUT",
                        "-m",
                        "set",
                        "--match-set",
                        "imr-doctor4",
                        "src",
                        "-j",
                        "REJECT",
                    ],
                    None,
                )
            )
        attempt("ipset", steps)
    return results


BACKEND_MECHANISMS = {
    "nftables": ("nftables",),
    "ipset": ("ipset",),
    "iptables": ("iptables-nft", "iptables-legacy"),
}


def check_kernel(config: Config, probe: Callable[[], dict[str, str | None]]) -> list[Finding]:
    backend = config.firewall.backend
    if backend == "dryrun":
        return [ok("kernel", "backend 'dryrun' changes nothing in the kernel")]
    if os.geteuid() != 0:
        return [
            warning(
                "kernel",
                "kernel support was not probed: that needs root (a throwaway network namespace)",
                "run `sudo imr doctor`",
            )
        ]
    try:
        results = probe()
    except OSError as exc:
        return [
            warning(
                "kernel",
                f"cannot make a throwaway network namespace to probe the kernel: {exc}",
                f"install util-linux ({APT_HINT['util-linux']}) and run as root",
            )
        ]
    wanted = _wanted_mechanisms(config)
    usable = [m for m in wanted if m in results and results[m] is None]
    if not usable:
        failures = [f"{m}: {results.get(m) or 'not probed, its tools are missing'}" for m in wanted]
        return [
            problem(
                "kernel",
                f"firewall.backend = {backend!r} cannot work here: " + "; ".join(failures),
                "load the modules (modprobe nf_tables nft_reject_inet ip_tables ip6_tables"
                " xt_multiport ipt_REJECT ip6t_REJECT ip_set ip_set_hash_ip xt_set;"
                " contrib/systemd/imr-modules.conf loads them at boot) or use a kernel with"
                " netfilter support",
            )
        ]
    findings = [ok("kernel", f"{m}: the kernel takes imr's rules and sets") for m in usable]
    if backend == "auto":
        findings.append(ok("backend", f"auto would choose {usable[0]}"))
    return findings


def _wanted_mechanisms(config: Config) -> list[str]:
    backend = config.firewall.backend
    if backend == "auto":
        return ["nftables", "ipset", *_flavour_mechanisms(config)]
    if backend == "iptables":
        return _flavour_mechanisms(config)
    return list(BACKEND_MECHANISMS[backend])


def _flavour_mechanisms(config: Config) -> list[str]:
    flavour = config.firewall.iptables_flavour
    if flavour == "auto":
        return ["iptables-nft", "iptables-legacy"]
    return [f"iptables-{flavour}"]


# The socket, the daemon -----------------------------------------------------------


def check_socket(config: Config) -> list[Finding]:
    server = config.server
    path = server.socket
    try:
        info = path.lstat()
    except FileNotFoundError:
        return [
            problem(
                "socket",
                f"no socket at {path} (server.socket)",
                "start the daemon: systemctl start imr.socket imr.service, or imr server start",
            )
        ]
    except OSError as exc:
        return [problem("socket", f"cannot look at {path}: {exc.strerror}", "run as root")]
    if not stat.S_ISSOCK(info.st_mode):
        return [
            problem(
                "socket",
                f"{path} is not a socket (the daemon will refuse to replace it)",
                f"find out what made it, then remove it: rm {path}",
            )
        ]
    findings = []
    mode = stat.S_IMODE(info.st_mode)
    if mode != server.socket_mode_bits:
        findings.append(
            problem(
                "socket",
                f"{path} has mode {mode:04o}, the config says server.socket_mode = "
                f"{server.socket_mode!r}",
                f"chmod {server.socket_mode_bits:04o} {path}; under systemd set SocketMode="
                f"{server.socket_mode_bits:04o} in imr.socket (a restart of the daemon"
                " alone also sets it when the daemon makes the socket)",
            )
        )
    if mode & 0o007:
        findings.append(
            warning(
                "socket",
                f"{path} is open to every local user (mode {mode:04o}): any of them may ping,"
                " and any that [access] gives a role may use it",
                "use mode 0660 and server.socket_group for the clients",
            )
        )
    if info.st_uid != 0:
        findings.append(
            problem(
                "socket",
                f"{path} is owned by {_user(info.st_uid)}, not root: that user can replace it",
                f"chown root {path} (or restart the daemon as root)",
            )
        )
    wanted_group = server.socket_group or "root"
    try:
        wanted_gid = grp.getgrnam(wanted_group).gr_gid
    except KeyError:
        findings.append(
            problem(
                "socket",
                f"server.socket_group = {wanted_group!r}: no such group",
                f"groupadd --system {wanted_group} (contrib/systemd/imr.sysusers.conf makes 'imr')",
            )
        )
    else:
        if info.st_gid != wanted_gid:
            findings.append(
                problem(
                    "socket",
                    f"{path} has group {_group(info.st_gid)}, the config says"
                    f" server.socket_group = {wanted_group!r}",
                    f"chgrp {wanted_group} {path}; under systemd set SocketGroup={wanted_group}"
                    " in imr.socket",
                )
            )
    findings += _unreachable_parents(path, mode)
    if not findings:
        findings.append(
            ok("socket", f"{path}: mode {mode:04o}, owner root, group {_group(info.st_gid)}")
        )
    return findings


def _unreachable_parents(path: Path, mode: int) -> list[Finding]:
    """Clients need search (x) permission on every directory above the socket."""
    if not mode & 0o077:
        return []
    for parent in path.parents:
        try:
            parent_mode = stat.S_IMODE(parent.stat().st_mode)
        except OSError:
            continue
        if not parent_mode & 0o011:
            return [
                problem(
                    "socket",
                    f"{parent} (mode {parent_mode:04o}) cannot be searched by the socket's group"
                    " or others, so clients cannot reach the socket",
                    f"chmod o+x {parent} (or g+x with the socket's group)",
                )
            ]
    return []


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)


def check_daemon(ctx: CliContext) -> list[Finding]:
    from imr.client import Client, ClientError
    from imr.server.daemon import is_imr_process, read_pid

    pid_file = ctx.config.server.pid_file
    pid = read_pid(pid_file)
    findings = []
    if pid is not None and not is_imr_process(pid):
        findings.append(
            warning(
                "daemon",
                f"{pid_file} names pid {pid}, which is not an imr daemon (a stale pid file)",
                f"rm {pid_file} (the daemon rewrites it when it starts)",
            )
        )
        pid = None
    try:
        reply = Client(ctx.config.server.socket, timeout=5.0).request("ping")
    except ClientError as exc:
        where = f" (pid {pid} holds {pid_file})" if pid is not None else ""
        return [
            *findings,
            problem(
                "daemon",
                f"the daemon does not answer on {ctx.config.server.socket}{where}: {exc}",
                "systemctl start imr.service (journalctl -u imr.service says why it stopped),"
                " or imr server start",
            ),
        ]
    version = reply.get("version", "?") if isinstance(reply, dict) else "?"
    running = f"pid {pid}" if pid is not None else "pid file unread"
    return [*findings, ok("daemon", f"answers ping ({running}, version {version})")]


# The state file ------------------------------------------------------------------


def check_state(config: Config, now: float) -> list[Finding]:
    path = config.state.path
    if not path.exists():
        return [ok("state file", f"{path} does not exist yet; the daemon creates it")]
    findings = []
    info = path.stat()
    if info.st_uid != 0 or stat.S_IMODE(info.st_mode) & 0o022:
        findings.append(
            problem(
                "state file",
                f"{path} is owned by {_user(info.st_uid)} with mode"
                f" {stat.S_IMODE(info.st_mode):04o}: someone other than root can rewrite it",
                f"chown root {path}; chmod 0640 {path}",
            )
        )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        return [*findings, problem("state file", f"cannot open {path}: {exc}", "run as root")]
    with contextlib.closing(db):
        try:
            integrity = [row[0] for row in db.execute("PRAGMA integrity_check")]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            newest = _newest_time(db) if version >= 1 else None
        except sqlite3.DatabaseError as exc:
            return [*findings, _corrupt(path, str(exc))]
    if integrity != ["ok"]:
        return [*findings, _corrupt(path, "; ".join(integrity[:3]))]
    if version > SCHEMA_VERSION:
        findings.append(
            problem(
                "state file",
                f"{path} has schema version {version}, newer than this imr ({SCHEMA_VERSION})",
                "upgrade imr to the version that wrote it",
            )
        )
    elif version < SCHEMA_VERSION:
        findings.append(
            ok("state file", f"schema version {version}; the daemon upgrades it when it starts")
        )
    if newest is not None and newest > now + FUTURE_SLACK:
        findings.append(
            problem(
                "clock",
                f"{path} holds times up to {_iso(newest)}, after the clock's {_iso(now)}:"
                " the clock went back, so blocks will last longer than they should",
                "set the clock right (timedatectl set-ntp true); the blocks expire on their own",
            )
        )
    if not findings:
        findings.append(ok("state file", f"{path}: integrity ok, schema version {version}"))
    return findings


def _newest_time(db: sqlite3.Connection) -> float | None:
    row = db.execute(
        "SELECT MAX(t) FROM (SELECT MAX(blocked_at) AS t FROM blocks"
        " UNION ALL SELECT MAX(at) FROM hits)"
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def _corrupt(path: Path, detail: str) -> Finding:
    return problem(
        "state file",
        f"{path} is damaged: {detail}",
        f"stop the daemon, keep a copy (cp {path} {path}.bad), then try"
        f" `sqlite3 {path}.bad .recover | sqlite3 {path}.new` and move {path}.new into place;"
        " or move the file aside and start empty (the kernel's blocks are then removed)",
    )


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# The clock -----------------------------------------------------------------------

TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


def ntp_synchronised() -> bool | None:
    """What `timedatectl` calls NTPSynchronized: the kernel's view, from adjtimex(2)."""
    timedatectl = run(["timedatectl", "show", "--property=NTPSynchronized", "--value"])
    if timedatectl.returncode == 0 and timedatectl.stdout.strip() in ("yes", "no"):
        return timedatectl.stdout.strip() == "yes"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    buffer = ctypes.create_string_buffer(512)  # struct timex with modes = 0: read only
    state = libc.adjtimex(buffer)
    return None if state < 0 else state != TIME_ERROR


def check_clock(
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    synchronised: Callable[[], bool | None] = ntp_synchronised,
) -> list[Finding]:
    findings = []
    now = wall()
    if not EARLIEST_PLAUSIBLE <= now < LATEST_PLAUSIBLE:
        findings.append(
            problem(
                "clock",
                f"the clock says {_iso(now)}, which cannot be right: blocks would expire at"
                " the wrong time",
                "set the clock (timedatectl set-ntp true, or date -s) and restart the daemon",
            )
        )
    wall0, mono0 = wall(), monotonic()
    time.sleep(0.2)
    drift = (wall() - wall0) - (monotonic() - mono0)
    if abs(drift) > 0.1:
        findings.append(
            warning(
                "clock",
                f"the wall clock moved {drift:+.2f}s against the monotonic clock in 0.2s:"
                " something is stepping it",
                "run one time service only (systemd-timesyncd, chrony or ntpd)",
            )
        )
    synced = synchronised()
    if synced is False:
        findings.append(
            warning(
                "clock",
                "the clock is not synchronised (NTP): block expiry follows the wall clock",
                "timedatectl set-ntp true (or install chrony)",
            )
        )
    if not findings:
        detail = {True: "NTP synchronised", None: "NTP state unknown"}[synced]
        findings.append(ok("clock", f"{_iso(now)}, {detail}"))
    return findings


# Putting it together -------------------------------------------------------------


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
    """Check tools, kernel, socket, state file, daemon and clock; say how to fix each problem.

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
