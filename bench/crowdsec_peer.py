"""The peer, side by side: CrowdSec's local API and nftables bouncers against fleet mode.

Run as root (Debian 12's crowdsec 1.4.6 and crowdsec-firewall-bouncer 0.0.25, installed by
`scripts/bootstrap.sh --crowdsec` without central-API registration and without starting any
service):

    .venv/bin/python bench/crowdsec_peer.py                  # 4 bouncers / 5 members
    .venv/bin/python bench/crowdsec_peer.py --bouncers 9 --frequencies 10s,1s,1ns

CrowdSec: its local API (`crowdsec -no-cs`: no agent, no central API) in one namespace,
with its own config and SQLite file in a temporary directory; N bouncers
(`crowdsec-firewall-bouncer`, nftables mode), each with its own config, in its own namespace
connected to the API's over a veth pair, so each programs its own namespace's nftables.
`cscli decisions add --ip 203.0.113.x` is run D times at random gaps of 0.2-0.6 s (so the
decisions fall at every phase of the bouncers' polling), and `nft monitor` in every bouncer
namespace stamps when the element arrived (bench/_propagation.py): measured from the moment
cscli was started and from the moment it returned (its acknowledgement; under load the
element can be in a bouncer's set before cscli has exited, hence negative times). Measured at each
`update_frequency` given: the default 10 s, and 1ns, the smallest the bouncer accepts (any
Go duration above zero: 0s panics in time.NewTicker; 1ns means polling back to back).

imr, in the same run: N + 1 fleet members (bench/fleet.py's namespaces, Redis with TLS and
ACLs), the same D addresses at the same gaps blocked on member a, measured the same way on
the N others: from the request (and from a's acknowledgement) to the element in each other
member's kernel. Printed: CrowdSec's p50 and p99 over imr's, for both references.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import Rows, load, require_root
from _propagation import Spread, Watcher, cpu_seconds, paced_blocks, spread
from fleet import fleet

from netns import Netns, connect, create_netns

PORT = 8080


def api_address(i: int) -> str:
    return f"198.51.100.{8 * i + 1}"


def bouncer_address(i: int) -> str:
    return f"198.51.100.{8 * i + 2}"


@dataclass
class CrowdSec:
    root: Path
    api: Netns
    bouncers: list[Netns] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def cscli(self, *args: str) -> str:
        argv = self.api.argv("cscli", "-c", str(self.config), *args)
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def api_config(root: Path) -> str:
    """The local API only: SQLite in `root`, no central API, no agent, no metrics port;
    access logging at warning (info logs every bouncer poll)."""
    return f"""common:
  daemonize: false
  log_media: stdout
  log_level: warning
  working_dir: {root}
config_paths:
  config_dir: {root}/
  data_dir: {root}/data/
  simulation_path: {root}/simulation.yaml
  hub_dir: {root}/hub/
  index_path: {root}/hub/.index.json
  notification_dir: {root}/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
crowdsec_service:
  acquisition_path: {root}/acquis.yaml
db_config:
  log_level: warning
  type: sqlite
  db_path: {root}/data/crowdsec.db
  use_wal: true
api:
  client:
    credentials_path: {root}/local_api_credentials.yaml
  server:
    log_level: warning
    listen_uri: 0.0.0.0:{PORT}
    profiles_path: /etc/crowdsec/profiles.yaml
    trusted_ips: [127.0.0.1]
prometheus:
  enabled: false
"""


def bouncer_config(work: Path, api: str, key: str, frequency: str) -> str:
    """Debian's shipped bouncer config, but logging to stdout, its pid file in `work`, no
    metrics port, and the update_frequency under test."""
    return f"""mode: nftables
pid_dir: {work}/
update_frequency: {frequency}
daemonize: false
log_mode: stdout
log_level: info
api_url: http://{api}:{PORT}/
api_key: {key}
disable_ipv6: false
deny_action: DROP
deny_log: false
supported_decisions_types: [ban]
blacklists_ipv4: crowdsec-blacklists
blacklists_ipv6: crowdsec6-blacklists
nftables:
  ipv4: {{enabled: true, set-only: false, table: crowdsec, chain: crowdsec-chain}}
  ipv6: {{enabled: true, set-only: false, table: crowdsec6, chain: crowdsec6-chain}}
prometheus:
  enabled: false
"""


def wait_listening(ns: Netns, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with ns.entered():
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.05)
    raise RuntimeError(f"CrowdSec's local API did not listen on port {port} in {timeout:.0f} s")


def wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no {text!r} in {path} after {timeout:.0f} s: {path.read_text()[-500:]}")


@contextlib.contextmanager
def crowdsec(bouncers: int, frequency: str) -> Iterator[CrowdSec]:
    """The local API and `bouncers` bouncers running; everything stopped by pid and every
    namespace deleted afterwards, even on failure."""
    root = Path(tempfile.mkdtemp(prefix="fpe-crowdsec-"))
    peer = CrowdSec(root, create_netns("fpecsapi"))
    try:
        (root / "data").mkdir()
        (root / "simulation.yaml").write_text("simulation: off\n")
        peer.config.write_text(api_config(root))
        # Its credentials for cscli, in the temporary directory (-f: cscli's default is
        # the host's /etc/crowdsec file).
        credentials = str(root / "local_api_credentials.yaml")
        url = f"http://127.0.0.1:{PORT}"
        peer.cscli("machines", "add", "fpebench", "--auto", "--force", "-u", url, "-f", credentials)
        peer.start(peer.api.argv("crowdsec", "-c", str(peer.config), "-no-cs"), root / "api.log")
        wait_listening(peer.api, PORT, 30)
        for i in range(bouncers):
            ns = create_netns(f"fpecsb{i}")
            peer.bouncers.append(ns)
            connect(peer.api, ns, [f"{api_address(i)}/29"], [f"{bouncer_address(i)}/29"])
            key = peer.cscli("bouncers", "add", f"fpe-bouncer-{i}", "-o", "raw").strip()
            work = root / f"bouncer{i}"
            work.mkdir()
            (work / "bouncer.yaml").write_text(bouncer_config(work, api_address(i), key, frequency))
            argv = ns.argv("crowdsec-firewall-bouncer", "-c", str(work / "bouncer.yaml"))
            peer.start(argv, work / "log")
        for i in range(bouncers):
            wait_for(root / f"bouncer{i}" / "log", "Processing new and deleted decisions", 30)
        yield peer
    finally:
        peer.stop()
        for ns in [*peer.bouncers, peer.api]:
            ns.delete()
        shutil.rmtree(root, ignore_errors=True)


def in_set(ns: Netns) -> set[str]:
    """The bench's addresses in the bouncer's IPv4 set, read back from the kernel."""
    listing = ns.run("nft", "list", "set", "ip", "crowdsec", "crowdsec-blacklists").stdout
    return set(re.findall(r"203\.0\.113\.[0-9]+", listing))


def gaps(count: int, seed: int) -> list[float]:
    """Offsets from the start: random gaps of 0.2-0.6 s, the same for both systems."""
    rng, at, offsets = random.Random(seed), 0.0, []
    for _ in range(count):
        at += rng.uniform(0.2, 0.6)
        offsets.append(at)
    return offsets


@dataclass
class Result:
    """Kernel entry on the receiving hosts, from the command and from its acknowledgement."""

    from_command: Spread
    from_ack: Spread


def measure_crowdsec(
    bouncers: int, frequency: str, seconds: float, offsets: list[float], rows: Rows
) -> Result:
    with crowdsec(bouncers, frequency) as peer:
        watchers = [Watcher(ns.name) for ns in peer.bouncers]
        try:
            cpu0 = sum(cpu_seconds(p.pid) for p in peer.processes)
            starts: dict[str, tuple[int, float]] = {}
            acks: dict[str, tuple[int, float]] = {}
            failures: list[str] = []
            t0 = time.monotonic()
            for n, offset in enumerate(offsets):
                time.sleep(max(0.0, t0 + offset - time.monotonic()))
                ip = f"203.0.113.{n + 1}"
                started = time.monotonic()
                try:
                    peer.cscli("decisions", "add", "--ip", ip, "--duration", "1h")
                except subprocess.CalledProcessError as failed:
                    # Counted and shown, not measured: the decision was not made.
                    words = failed.stderr.strip().splitlines() or ["(no message)"]
                    failures.append(words[-1][:200])
                    continue
                starts[ip], acks[ip] = (-1, started), (-1, time.monotonic())
            # One more poll and its nftables change; a late bouncer gets up to 30 s more.
            time.sleep(seconds + 0.5)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(
                in_set(ns) >= acks.keys() for ns in peer.bouncers
            ):
                time.sleep(0.2)
            held = [in_set(ns) for ns in peer.bouncers]
            cpu = sum(cpu_seconds(p.pid) for p in peer.processes) - cpu0
            wall = time.monotonic() - t0
            seen = [w.stop() for w in watchers]
        finally:
            for w in watchers:
                w.kill()
    result = Result(spread(starts, seen), spread(acks, seen))
    took = sorted(acks[ip][1] - starts[ip][1] for ip in acks) or [0.0]
    head = f"CrowdSec, {bouncers} bouncers, update_frequency {frequency}"
    rows.add(
        f"{head}: `cscli decisions add` started to the element in each bouncer's set,"
        f" p50 / p99 / max ms ({len(result.from_command.latencies)} pairs; {load()})",
        result.from_command.text(),
    )
    rows.add(
        f"{head}: `cscli decisions add` returned to the element, p50 / p99 / max ms",
        result.from_ack.text(),
    )
    rows.add(
        f"{head}: CPU of the API and the bouncers (% of one CPU over the run);"
        " `cscli decisions add` itself p50 / max (ms)",
        f"{cpu / wall * 100:.0f} %; {took[len(took) // 2] * 1000:.0f} / {took[-1] * 1000:.0f}",
    )
    absent = sum(1 for found in held for ip in acks if ip not in found)
    if absent or result.from_ack.missing:
        rows.add(
            f"{head}: (address, bouncer) pairs not in the set at the end; in it but not seen"
            " by the watcher",
            f"{absent}; {result.from_ack.missing - absent}",
        )
    if failures:
        # cscli can fail after the decision was stored: then the bouncers get it anyway.
        extra = sum(len(found - acks.keys()) for found in held) / max(1, len(held))
        rows.add(
            f"{head}: `cscli decisions add` failed; of those, decisions in the sets anyway",
            f"{len(failures)} times ({failures[-1]}); {extra:.0f}",
        )
    return result


def measure_imr(members: int, tls: bool, offsets: list[float], rows: Rows) -> Result:
    ips = [f"203.0.113.{n + 1}" for n in range(len(offsets))]
    with fleet(members, tls, prefix="fpeimr") as (daemons, _server, _hub):
        watchers = [Watcher(m.ns) for m in daemons]
        try:
            cpu0 = sum(cpu_seconds(m.pid()) for m in daemons)
            t0 = time.monotonic()
            sent = paced_blocks([daemons[0].socket], ips, offsets, connections=1)
            time.sleep(2)
            cpu = sum(cpu_seconds(m.pid()) for m in daemons) - cpu0
            wall = time.monotonic() - t0
            seen = [w.stop() for w in watchers]
        finally:
            for w in watchers:
                w.kill()
    result = Result(spread(sent.starts, seen), spread(sent.acks, seen))
    head = f"imr fleet, {members} members (TLS {'on' if tls else 'off'}), same addresses and gaps"
    rows.add(
        f"{head}: block request sent on a to the element in each other member's set,"
        f" p50 / p99 / max ms ({len(result.from_command.latencies)} pairs; {load()})",
        result.from_command.text(),
    )
    rows.add(f"{head}: acknowledgement on a to the element", result.from_ack.text())
    rows.add(
        f"{head}: CPU of the member daemons (% of one CPU over the run; Redis not counted)",
        f"{cpu / wall * 100:.0f} %",
    )
    return result


def ratio(peer: Spread, imr: Spread) -> str:
    """CrowdSec's p50 and p99 over imr's."""
    if not peer.latencies or not imr.latencies:
        return "n/a (nothing arrived)"
    cells = []
    for q in (0.5, 0.99):
        mine, theirs = imr.p(q), peer.p(q)
        share = theirs / mine if theirs > 0 and mine > 0 else 0.0
        cells.append(f"{share:.{0 if share >= 10 else 1}f}x" if share else f"n/a ({theirs:.1f} ms)")
    return ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bouncers", type=int, default=4, help="imr runs one member more")
    parser.add_argument("--decisions", type=int, default=30)
    parser.add_argument("--frequencies", default="10s,1ns", help="update_frequency values")
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--rows", type=Path, default=None)
    args = parser.parse_args()
    require_root()
    # SIGTERM (from timeout, say) unwinds: processes stopped, namespaces deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    if not shutil.which("crowdsec-firewall-bouncer") or not shutil.which("cscli"):
        sys.exit("crowdsec is not installed: scripts/bootstrap.sh --crowdsec")
    if not 0 < args.bouncers <= 14:
        sys.exit("--bouncers: 1 to 14 (imr's fleet has one 192.0.2.0/28 per member)")
    if not 0 < args.decisions <= 250:
        sys.exit("--decisions: 1 to 250 (one 203.0.113.0/24 address each)")
    rows = Rows("crowdsec_peer")
    offsets = gaps(args.decisions, args.seed)
    print(f"# crowdsec_peer: {args.bouncers} bouncers / {args.bouncers + 1} members; {load()}")
    imr = measure_imr(args.bouncers + 1, not args.no_tls, offsets, rows)
    for frequency in args.frequencies.split(","):
        seconds = parse_seconds(frequency)
        peer = measure_crowdsec(args.bouncers, frequency, seconds, offsets, rows)
        rows.add(
            f"CrowdSec at update_frequency {frequency} / imr, p50 and p99: from the command",
            ratio(peer.from_command, imr.from_command),
        )
        rows.add(
            f"CrowdSec at update_frequency {frequency} / imr, p50 and p99: from the"
            " acknowledgement (cscli returned / imr's reply)",
            ratio(peer.from_ack, imr.from_ack),
        )
    print(f"# {load()}")
    rows.print_table()
    rows.save(args.rows)


def parse_seconds(frequency: str) -> float:
    """A Go duration as the bouncer writes it, the few units this bench uses."""
    for unit, factor in (("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if frequency.endswith(unit) and frequency[: -len(unit)].replace(".", "").isdigit():
            return float(frequency[: -len(unit)]) * factor
    sys.exit(f"--frequencies: {frequency!r} is not a duration like 10s, 500ms or 1ns")


if __name__ == "__main__":
    main()
