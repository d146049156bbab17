"""Kernel support, probed in a throwaway network namespace that vanishes with the probe.

Also what `auto` would choose, read from the one backend table (imr/backends/__init__.py)
and the daemon's own flavour detection, so doctor and the daemon cannot disagree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

from imr.backends import auto_choice
from imr.backends.base import BackendError
from imr.backends.xtables import resolve_flavour
from imr.config import Config
from imr.doctor.findings import (
    APT_HINT,
    Finding,
    Runner,
    first_line,
    ok,
    problem,
    run,
    warning,
)
from imr.doctor.tools import Tools

TEST_ADDRESS_V4, TEST_ADDRESS_V6 = "192.0.2.1", "2001:db8::1"


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
                raise OSError(f"unshare --net failed: {first_line(error)}")
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


_Steps = Sequence[tuple[list[str], str | None]]


def kernel_probes(tools: Tools, inside: Runner) -> dict[str, str | None]:
    """mechanism -> None if the kernel accepted imr's kind of objects, else why not."""
    results: dict[str, str | None] = {}

    def attempt(name: str, steps: _Steps) -> None:
        for argv, stdin in steps:
            result = inside(argv, stdin)
            if result.returncode != 0:
                results[name] = f"{' '.join(argv[:2])}: {first_line(result.stderr)}"
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
        attempt("ipset", _ipset_probe_steps(tools))
    return results


def _ipset_probe_steps(tools: Tools) -> _Steps:
    """Two sets and an entry; and a rule matching the set when iptables-nft is there."""
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
    return steps


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
        findings.append(check_auto_choice(config, results))
    return findings


def check_auto_choice(config: Config, results: dict[str, str | None]) -> Finding:
    """What the daemon's `auto` would take: the registry's order, and for iptables the
    flavour the daemon's own detection picks (never a re-detection of doctor's own)."""
    choice = auto_mechanism(config, lambda mechanism: results.get(mechanism, "") is None)
    if results.get(choice, "") is None:
        return ok("backend", f"auto would choose {choice}")
    return problem(
        "backend",
        f"auto would choose {choice}, which the kernel refuses here",
        "set firewall.backend (and firewall.iptables_flavour) to one the kernel takes",
    )


def auto_mechanism(config: Config, works: Callable[[str], bool]) -> str:
    """The kernel mechanism `auto` takes given which ones `works`; iptables is the last resort."""

    def mechanism(name: str) -> str:
        if name != "iptables":
            return name
        try:
            flavour, _ = resolve_flavour(config.firewall)
        except BackendError as exc:
            return f"iptables ({exc})"
        return f"iptables-{flavour}"

    return mechanism(auto_choice(lambda name: works(mechanism(name))) or "iptables")


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
