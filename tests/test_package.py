"""The Debian package, for real: built with dpkg-buildpackage, checked by lintian, then
installed, run, upgraded, removed and purged in a Debian 12 booted with systemd as PID 1.

The container (tests/container.py) has its own network namespace (--private-network), PID 1
and units: imr's nftables table lives in the container's namespace and dies with it, and the
host's services and firewall are never touched. The bootstrapped tree is cached between runs.

The steps run in file order on one container and depend on each other (install, start,
block, upgrade, remove, purge). The newer build for the upgrade is the same package repacked
with a higher version: what an upgrade exercises is dpkg and the maintainer scripts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from container import Machine, booted, cached_tree, tools_missing

ROOT = Path(__file__).resolve().parent.parent
UPGRADE_VERSION_SUFFIX = "+upgradetest1"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (systemd-nspawn, dpkg-buildpackage)"),
    pytest.mark.skipif(
        bool(tools_missing(["dpkg-buildpackage", "lintian"])),
        reason="needs debootstrap, systemd-container, debhelper, lintian (scripts/bootstrap.sh)",
    ),
]


@dataclass
class Debs:
    first: Path
    newer: Path
    lintian: str


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    out = tmp_path_factory.mktemp("debs")
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    first = Path(built.stdout.strip().splitlines()[-1])
    return Debs(first, _repack_newer(first, out), (out / "lintian.txt").read_text())


def _repack_newer(deb: Path, out: Path) -> Path:
    """The same package with a higher version, as the next release's build would be."""
    tree = out / "newer"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=120)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = re.search(r"^Version: (.+)$", text, re.M)
    assert version
    newer_version = version.group(1) + UPGRADE_VERSION_SUFFIX
    control.write_text(text.replace(version.group(0), f"Version: {newer_version}"))
    newer = out / f"imr_{newer_version}_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(newer)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    shutil.rmtree(tree)
    return newer


# --- The package itself ---


def test_lintian_errors_none_and_every_warning_documented(debs: Debs) -> None:
    # build-deb.sh already failed on an error; warnings must each have a reason in the docs.
    tags = set(re.findall(r"^W: imr[^:]*: ([a-z0-9-]+)", debs.lintian, re.M))
    assert not re.search(r"^E: ", debs.lintian, re.M), debs.lintian
    documented = (ROOT / "docs" / "packaging.md").read_text()
    missing = [tag for tag in sorted(tags) if f"`{tag}`" not in documented]
    assert not missing, f"lintian warnings without a reason in docs/packaging.md: {missing}"


def _contents(deb: Path) -> dict[str, str]:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in listing.splitlines():
        mode, _owner, _size, _date, _time, name = line.split(None, 5)
        entries[name.split(" -> ")[0].removeprefix(".")] = mode + " " + name
    return entries


def test_layout(debs: Debs) -> None:
    files = _contents(debs.first)
    for path in (
        "/usr/lib/imr/bin/python3",
        "/usr/lib/imr/pyvenv.cfg",
        "/etc/imr/imr.toml",
        "/lib/systemd/system/imr.service",
        "/lib/systemd/system/imr.socket",
        "/lib/systemd/system/imr-watch.service",
        "/lib/systemd/system/imr-scan.service",
        "/lib/systemd/system/imr-scan.timer",
        "/usr/lib/sysusers.d/imr.conf",
        "/usr/lib/tmpfiles.d/imr.conf",
        "/usr/lib/modules-load.d/imr.conf",
        "/usr/share/imr/modsecurity/imr-rules.conf",
        "/usr/share/imr/modsecurity/imr-hook-exec.conf",
        "/usr/share/doc/imr/copyright",
        "/usr/share/doc/imr/operations.md",
        "/usr/share/man/man1/imr.1.gz",
        "/usr/share/man/man1/imr-hook.1.gz",
    ):
        assert path in files, f"{path} missing from the package"
    assert files["/usr/bin/imr"].startswith("l"), "imr must link into the venv"
    assert files["/usr/bin/imr-hook"].startswith("l")
    assert not [name for name in files if "__pycache__" in name], "bytecode is made by postinst"
    if (ROOT / "contrib" / "logrotate" / "imr").exists():
        assert "/etc/logrotate.d/imr" in files
    info = subprocess.run(
        ["dpkg-deb", "-f", str(debs.first), "Architecture", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Architecture: amd64" in info and "python3.11" in info


def test_no_build_paths_and_packaged_paths_in_units(debs: Debs, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(debs.first), str(tmp_path)], check=True)
    assert "home = /usr/bin" in (tmp_path / "usr/lib/imr/pyvenv.cfg").read_text()
    for program in ("imr", "imr-hook"):
        first = (tmp_path / "usr/lib/imr/bin" / program).read_text().splitlines()[0]
        assert first == "#!/usr/lib/imr/bin/python3"
    leaks = subprocess.run(
        ["grep", "-rlI", "-e", "/tmp/imr-deb", "-e", "/usr/local/bin/imr", "-e", ".pyenv", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout.split()
    # The wheel's own copy of contrib/ and the docs keep the hand-install paths (they describe
    # installing from a checkout); the packaged units and ModSecurity files do not.
    leaks = [p for p in leaks if "/site-packages/imr/contrib/" not in p and "/doc/" not in p]
    assert not leaks, f"build or hand-install paths in {leaks}"
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(debs.first), "conffiles"], capture_output=True, text=True
    ).stdout.split()
    assert "/etc/imr/imr.toml" in conffiles


# --- In a booted Debian 12 ---


@dataclass
class Scenario:
    machine: Machine
    debs: Debs

    def main_pid(self) -> int:
        shown = self.machine.run("systemctl", "show", "-p", "MainPID", "--value", "imr.service")
        return int(shown.stdout.strip())

    def elements(self) -> str:
        return self.machine.run("nft", "list", "set", "inet", "imr", "blocked_v4").stdout


@pytest.fixture(scope="module")
def scenario(debs: Debs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tar = cached_tree()
    with booted(tar, tmp_path_factory.mktemp("machine")) as machine:
        for deb in (debs.first, debs.newer):
            shutil.copy(deb, machine.root / "root" / deb.name)  # /tmp inside is a tmpfs
        yield Scenario(machine, debs)


def _unit_has(scenario: Scenario, key: str) -> bool:
    text = scenario.machine.run("systemctl", "cat", "imr.service").stdout
    return re.search(rf"^{key}=", text, re.M) is not None


def test_install_enables_but_does_not_start(scenario: Scenario) -> None:
    m = scenario.machine
    m.run("dpkg", "-i", f"/root/{scenario.debs.first.name}", timeout=300)
    assert m.run("systemctl", "is-enabled", "imr.service", "imr.socket").stdout.split() == [
        "enabled",
        "enabled",
    ]
    assert m.run("systemctl", "is-active", "imr.service", check=False).stdout.strip() == "inactive"
    assert "imr-logscan" in m.run("getent", "group", "imr").stdout
    owner = m.run("stat", "-c", "%U:%G %a", "/var/lib/imr/logscan").stdout.split()
    assert owner == ["imr-logscan:imr-logscan", "750"]
    assert m.run("stat", "-c", "%a", "/run/imr").stdout.strip() == "755"
    assert m.run("imr", "--version").stdout.startswith("imr, version")
    # The legacy backend's python-iptables, compiled at build time, loads on the target.
    m.run("/usr/lib/imr/bin/python3", "-c", "import iptc; iptc.Table(iptc.Table.FILTER)")


def test_start_is_ready_and_sandboxed(scenario: Scenario) -> None:
    m = scenario.machine
    m.run("systemctl", "start", "imr.service", timeout=120)
    # Type=notify: "active" only after READY=1, and the status line is the daemon's own.
    shown = m.run("systemctl", "show", "-p", "ActiveState,Type,StatusText", "imr.service").stdout
    assert "ActiveState=active" in shown and "Type=notify" in shown
    assert "StatusText=serving: nftables" in shown
    pid = scenario.main_pid()
    status = m.run("cat", f"/proc/{pid}/status").stdout
    caps = dict(re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.M))
    # CAP_NET_ADMIN (12) and CAP_NET_RAW (13) only.
    assert caps["CapBnd"] == caps["CapEff"] == "0000000000003000", caps
    assert caps["CapAmb"] == "0000000000000000"
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert re.search(r"^Seccomp:\s+2$", status, re.M)
    own = m.run("readlink", f"/proc/{pid}/ns/mnt").stdout
    assert own != m.run("readlink", "/proc/1/ns/mnt").stdout, "no mount namespace"
    mounts = m.run("cat", f"/proc/{pid}/mountinfo").stdout
    root = next(line for line in mounts.splitlines() if line.split()[4] == "/")
    assert " ro," in f" {root.split()[5]},", f"ProtectSystem=strict not applied: {root}"
    state = next(line for line in mounts.splitlines() if line.split()[4] == "/var/lib/imr")
    assert state.split()[5].startswith("rw"), state


def test_block_as_www_data_through_the_socket_with_activation(scenario: Scenario) -> None:
    m = scenario.machine
    m.run("usermod", "-aG", "imr", "www-data")
    blocked = m.run("runuser", "-u", "www-data", "--", "imr", "block", "203.0.113.7")
    assert blocked.stdout.startswith("blocked 203.0.113.7")
    assert "203.0.113.7" in scenario.elements()
    refused = m.run("runuser", "-u", "www-data", "--", "imr", "unblock", "203.0.113.7", check=False)
    assert refused.returncode == 1
    # Socket activation: with the service stopped, a client's connection starts it.
    m.run("systemctl", "stop", "imr.service")
    assert m.run("systemctl", "is-active", "imr.socket").stdout.strip() == "active"
    assert "203.0.113.7" in scenario.elements(), "stop must leave the blocks in the kernel"
    again = m.run("runuser", "-u", "www-data", "--", "imr", "block", "198.51.100.9", timeout=120)
    assert again.stdout.startswith("blocked 198.51.100.9")
    assert m.run("systemctl", "is-active", "imr.service").stdout.strip() == "active"
    hook = m.run(
        "runuser", "-u", "www-data", "--", "env", "IMR_IP=203.0.113.8", "imr-hook", timeout=30
    )
    assert hook.returncode == 0 and "203.0.113.8" in scenario.elements()


def test_reload(scenario: Scenario) -> None:
    if not _unit_has(scenario, "ExecReload"):
        pytest.skip("imr.service has no ExecReload= yet (it comes with `imr server reload`)")
    m = scenario.machine
    before = scenario.main_pid()
    m.run("systemctl", "reload", "imr.service", timeout=60)
    assert scenario.main_pid() == before
    assert m.run("imr", "ping").returncode == 0


def test_logrotate_postrotate(scenario: Scenario) -> None:
    m = scenario.machine
    if m.run("test", "-f", "/etc/logrotate.d/imr", check=False).returncode != 0:
        pytest.skip("no /etc/logrotate.d/imr yet (contrib/logrotate/imr comes with reload)")
    m.run("mkdir", "-p", "/var/log/imr")
    m.run("sh", "-c", "echo old line >> /var/log/imr/imr.log")
    before = scenario.main_pid()
    rotated = m.run("logrotate", "-v", "-f", "/etc/logrotate.d/imr", check=False, timeout=60)
    assert rotated.returncode == 0, rotated.stderr
    assert "error" not in rotated.stderr.lower(), rotated.stderr
    assert scenario.main_pid() == before
    assert m.run("imr", "ping").returncode == 0


def _sample_during(scenario: Scenario, stop: threading.Event, seen: list[str]) -> None:
    """Until stop: the kernel's set and one imr-hook run as www-data, again and again."""
    m = scenario.machine
    for number in range(60):  # bounded: about 0.5 s a round
        if stop.is_set():
            return
        kernel = m.run("nft", "list", "set", "inet", "imr", "blocked_v4", check=False)
        seen.append("kernel " + ("ok" if "203.0.113.7" in kernel.stdout else "MISSING"))
        hook = m.run(
            "runuser", "-u", "www-data", "--", "env", f"IMR_IP=192.0.2.{number + 10}",
            "imr-hook", check=False, timeout=30,
        )  # fmt: skip
        lines = hook.stdout.splitlines()
        seen.append(f"hook rc={hook.returncode} lines={len(lines)}")


def test_upgrade_keeps_blocks_and_hooks_fail_open(scenario: Scenario) -> None:
    m = scenario.machine
    before = scenario.main_pid()
    state_before = m.run("imr", "list", "--json").stdout
    stop, seen = threading.Event(), list[str]()
    sampler = threading.Thread(target=_sample_during, args=(scenario, stop, seen))
    sampler.start()
    try:
        time.sleep(1)
        m.run("dpkg", "-i", f"/root/{scenario.debs.newer.name}", timeout=300)
    finally:
        stop.set()
        sampler.join(timeout=60)
    version = m.run("dpkg-query", "-W", "-f", "${Version}", "imr").stdout
    assert version.endswith(UPGRADE_VERSION_SUFFIX)
    assert m.run("systemctl", "is-active", "imr.service").stdout.strip() == "active"
    assert scenario.main_pid() != before, "the upgrade must restart a running daemon"
    assert "kernel MISSING" not in seen, seen
    hooks = [s for s in seen if s.startswith("hook")]
    assert len(hooks) >= 3, f"the sampler did not overlap the upgrade: {seen}"
    assert all(s == "hook rc=0 lines=1" for s in hooks), seen
    assert "203.0.113.7" in scenario.elements()
    assert '"203.0.113.7"' in m.run("imr", "list", "--json").stdout
    assert '"203.0.113.7"' in state_before
    assert m.run("systemctl", "is-enabled", "imr.service").stdout.strip() == "enabled"


def test_remove_keeps_config_and_state(scenario: Scenario) -> None:
    m = scenario.machine
    m.run("dpkg", "-r", "imr", timeout=120)
    assert m.run("systemctl", "is-active", "imr.service", check=False).stdout.strip() != "active"
    assert m.run("test", "-S", "/run/imr/imr.sock", check=False).returncode != 0
    for kept in ("/etc/imr/imr.toml", "/var/lib/imr/state.db"):
        assert m.run("test", "-f", kept, check=False).returncode == 0, f"{kept} removed"
    assert m.run("test", "-e", "/usr/lib/imr", check=False).returncode != 0
    # The blocks stay in the kernel (docs/operations.md, "Uninstall" says how to drop them).
    assert "203.0.113.7" in scenario.elements()


def test_purge_deletes_config_and_state(scenario: Scenario) -> None:
    m = scenario.machine
    m.run("dpkg", "-P", "imr", timeout=120)
    for gone in ("/etc/imr", "/var/lib/imr", "/var/log/imr"):
        assert m.run("test", "-e", gone, check=False).returncode != 0, f"{gone} left by purge"
    assert m.run("dpkg-query", "-W", "imr", check=False).returncode != 0
    assert m.run("getent", "group", "imr").returncode == 0  # kept, as Debian does


def test_install_script_needs_nothing_beyond_the_runtime_packages(scenario: Scenario) -> None:
    """scripts/install.sh in the container, which has only the run-time packages and no
    network: apt must find every dependency already there and install imr alone."""
    m = scenario.machine
    shutil.copy(ROOT / "scripts" / "install.sh", m.root / "root" / "install.sh")
    installed = m.run("bash", "/root/install.sh", f"/root/{scenario.debs.first.name}", timeout=300)
    new = re.search(r"NEW packages will be installed:\n((?:  .*\n)+)", installed.stdout)
    assert new and new.group(1).split() == ["imr"], installed.stdout
    assert m.run("systemctl", "is-enabled", "imr.service").stdout.strip() == "enabled"
    assert m.run("systemctl", "is-active", "imr.service", check=False).stdout.strip() == "inactive"
