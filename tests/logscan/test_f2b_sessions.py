"""sshd's session markers (<F-NOFAIL>, <F-MLFGAINED>, <F-MLFFORGET>, <F-MLFID>): a log of
successful logins blocks nobody, and a log of failures gives the same failures per address
as fail2ban-regex itself on the same file (skipped without Debian's fail2ban package)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from imr.cli_context import CliContext
from imr.config import Config, ServerConfig
from imr.logscan.cli import scan
from imr.logscan.fail2ban import parse_filter

from logscan_helpers import F2B_FILTERS

SSHD = F2B_FILTERS / "sshd.conf"
needs_sshd_filter = pytest.mark.skipif(not SSHD.exists(), reason="Debian fail2ban not installed")
needs_fail2ban_regex = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None or not SSHD.exists(),
    reason="fail2ban-regex not installed (apt-get install fail2ban, service not started)",
)


def _session(pid: int, minute: int, ip: str, port: int, accepted: str, end: str) -> str:
    at = f"Dec  7 04:{minute:02d}"
    return (
        f"{at}:01 host sshd[{pid}]: Connection from {ip} port {port} on 198.51.100.1 port 22\n"
        f"{at}:01 host sshd[{pid}]: {accepted} from {ip} port {port} ssh2\n"
        f"{at}:01 host sshd[{pid}]: pam_unix(sshd:session): session opened for user alice"
        " by (uid=0)\n"
        f"{at}:09 host sshd[{pid}]: {end}\n"
        f"{at}:09 host sshd[{pid}]: pam_unix(sshd:session): session closed for user alice\n"
    )


# Three publickey sessions and one password session, all successful, from one address.
SUCCESSES = (
    _session(
        2001,
        0,
        "192.0.2.10",
        50000,
        "Accepted publickey for alice",
        "Received disconnect from 192.0.2.10 port 50000:11: disconnected by user",
    )
    + _session(
        2002,
        1,
        "192.0.2.10",
        50002,
        "Accepted publickey for alice",
        "Disconnected from user alice 192.0.2.10 port 50002",
    )
    + _session(
        2003,
        2,
        "192.0.2.10",
        50004,
        "Accepted publickey for alice",
        "Disconnected from user alice 192.0.2.10 port 50004",
    )
    + _session(
        2004,
        3,
        "192.0.2.10",
        50006,
        "Accepted password for alice",
        "Connection closed by 192.0.2.10 port 50006",
    )
)

# Failures, a failure followed by success, and hostless failures that a later line of the
# same session (same sshd[pid]) names the host of.
FAILURES = """\
Dec  7 05:00:01 host sshd[3001]: Connection from 203.0.113.5 port 40000 on 198.51.100.1 port 22
Dec  7 05:00:02 host sshd[3001]: Failed password for root from 203.0.113.5 port 40000 ssh2
Dec  7 05:00:04 host sshd[3001]: Failed password for root from 203.0.113.5 port 40000 ssh2
Dec  7 05:00:06 host sshd[3001]: Failed password for root from 203.0.113.5 port 40000 ssh2
Dec  7 05:00:07 host sshd[3001]: error: maximum authentication attempts exceeded for root from 203.0.113.5 port 40000 ssh2 [preauth]
Dec  7 05:00:07 host sshd[3001]: Disconnecting authenticating user root 203.0.113.5 port 40000: Too many authentication failures [preauth]
Dec  7 05:00:10 host sshd[3002]: Invalid user admin from 203.0.113.6 port 40100
Dec  7 05:00:11 host sshd[3002]: Failed password for invalid user admin from 203.0.113.6 port 40100 ssh2
Dec  7 05:00:12 host sshd[3002]: Connection closed by invalid user admin 203.0.113.6 port 40100 [preauth]
Dec  7 05:00:20 host sshd[3003]: Connection from 192.0.2.20 port 40200 on 198.51.100.1 port 22
Dec  7 05:00:21 host sshd[3003]: Failed password for carol from 192.0.2.20 port 40200 ssh2
Dec  7 05:00:23 host sshd[3003]: Accepted password for carol from 192.0.2.20 port 40200 ssh2
Dec  7 05:00:30 host sshd[3003]: Connection closed by 192.0.2.20 port 40200
Dec  7 05:00:40 host sshd[3004]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=203.0.113.7  user=root
Dec  7 05:00:41 host sshd[3004]: Failed password for root from 203.0.113.7 port 40300 ssh2
Dec  7 05:00:42 host sshd[3004]: Failed password for root from 203.0.113.7 port 40300 ssh2
Dec  7 05:00:43 host sshd[3004]: Disconnecting: Too many authentication failures [preauth]
Dec  7 05:00:44 host sshd[3004]: Connection closed by 203.0.113.7 port 40300 [preauth]
Dec  7 05:00:50 host sshd[3005]: Failed password for root from 203.0.113.7 port 40301 ssh2
Dec  7 05:00:51 host sshd[3005]: Failed password for root from 203.0.113.7 port 40301 ssh2
Dec  7 05:00:52 host sshd[3005]: Received disconnect from 203.0.113.7 port 40301:11: Bye Bye [preauth]
Dec  7 05:01:00 host sshd[3006]: Disconnecting: Too many authentication failures [preauth]
Dec  7 05:01:01 host sshd[3006]: Connection closed by 203.0.113.8 port 40400 [preauth]
"""  # noqa: E501


def _scan_blocks(log: Path, tmp_path: Path) -> dict[str, int]:
    """imr scan --dry-run with the sshd filter: {address: hits} of what it decides to block."""
    ctx = CliContext(Config(server=ServerConfig(socket=tmp_path / "none.sock")), Path("imr.toml"))
    args = [str(log), "--dry-run", "--json", "--fail2ban-filter", str(SSHD)]
    result = CliRunner().invoke(scan, [*args, "--state-dir", str(tmp_path / "st")], obj=ctx)
    assert result.exit_code == 0, result.output
    return {b["ip"]: b["hits"] for b in json.loads(result.output)["blocks"]}


def _fail2ban_regex_ips(log: Path) -> Counter[str]:
    """The address of every failure fail2ban-regex finds (one line per failure)."""
    out = subprocess.run(
        ["fail2ban-regex", "-o", "ip", str(log), str(SSHD)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return Counter(line.strip() for line in out.splitlines() if line.strip())


@needs_sshd_filter
def test_successful_logins_are_not_failures(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_text(SUCCESSES)
    flt = parse_filter(SSHD)
    assert [line for line in SUCCESSES.splitlines() if flt.match(line)] == []
    assert _scan_blocks(log, tmp_path) == {}
    if shutil.which("fail2ban-regex") is not None:
        assert _fail2ban_regex_ips(log) == Counter()  # fail2ban agrees: no failure at all


@needs_fail2ban_regex
def test_sshd_failures_decide_as_fail2ban_regex(tmp_path: Path) -> None:
    log = tmp_path / "auth.log"
    log.write_text(FAILURES)
    theirs = _fail2ban_regex_ips(log)
    flt = parse_filter(SSHD)
    ours = Counter(found[0] for line in FAILURES.splitlines() if (found := flt.match(line)))
    assert ours == theirs
    # fail2ban's maxretry (5) within findtime: the same addresses are blocked.
    blocks = _scan_blocks(log, tmp_path)
    assert blocks == {ip: n for ip, n in theirs.items() if n >= 5}
    assert set(blocks) == {"203.0.113.7"}
