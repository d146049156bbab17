"""Per-packet cost of the firewall backends with 0, 10,000 and 100,000 blocked addresses.

Run as root:  .venv/bin/python bench/packet_cost.py [--quick] [--rounds N] [--ipv4]

Issue 3 asks that the set backends (nftables, ipset) stay within 10 % of the empty rate
for traffic from an address that is not blocked. A single run cannot show 10 % on a
shared 2-CPU machine, so this script measures in many short interleaved rounds:

* Throwaway namespaces (tests/netns.py), the same for every size: a client joined by one
  veth to the server, whose namespace holds the backend's rule and sets, and by another
  veth to a reference namespace without any firewall. Each of the two holds a UDP socket
  that is never read (its receive buffer is full after a few packets, so every later
  packet takes the same path: firewall if any, socket lookup, drop on the full buffer).
* The sender is one process pinned to one CPU (--cpu), sending 64-byte UDP payloads over
  IPv6 from 2001:db8:66::66, which is never blocked. On a veth the receiving namespace's
  whole input path, firewall included, runs in the sender's system call (softirq on the
  same CPU; this kernel charges softirq time to the running thread), so the sender's CPU
  time per packet is the per-packet cost. The script itself runs on the other CPUs, so
  loading a set does not share the sender's CPU.
* A measurement is 20 pairs of 5 ms chunks (two more pairs before them are discarded):
  in each pair the sender sends to the server, then to the reference. A chunk's rate is
  packets / the sender thread's CPU time in it. The measurement's rate is the 75th
  percentile of its server chunks' rates (interference only ever adds time, and the
  firewall's cost is in every chunk alike); its relative rate is the median over the pairs
  of server rate / reference rate. The machine's speed here drifts by 30 % within seconds
  (other jobs on the other CPU and on the host: the sender's CPU time per packet changes
  even when it has its CPU to itself); the reference chunk, 5 ms away on the same CPU,
  takes the same path less the firewall, so the relative rate cancels that drift.
* Each round loads every size once, in a shuffled order, with the backend's replace_all,
  and measures it. Round 0 is a warm-up and is discarded; it also checks that the kernel
  holds the set and that a packet from a blocked address is refused while ours pass.
* Per size: the median rate over the rounds and the ratio to the empty rate as the median
  of the per-round ratios, with a bootstrap 95 % confidence interval (resampling rounds),
  both raw (rate / empty rate) and paired (relative rate / empty relative rate).
  "within 10 %" means the paired interval lies inside [0.90, 1.10]. The raw one is shown
  beside it: measurements seconds apart, so the machine's drift widens it (the paired and
  raw medians agree wherever the raw interval is narrow, e.g. in the control).
* Control: the per-address iptables backend (one rule per address, walked in order) with
  the same method at 5, 30 and 10,000 addresses: a few rules' cost must show, and 10,000
  must come out far slower, or the method could not see a slowdown.

The kernel's UDP counters in the server and reference namespaces (/proc/net/snmp6) must
show that every packet sent reached its socket: nothing was blocked or lost before it.
Reference traffic: 2001:db8:66:1::66 -> 2001:db8:66:1::1. With --ipv4 the same is done
for IPv4 (192.0.2.2 -> 192.0.2.1, reference 198.51.100.2 -> 198.51.100.1; the blocked IPv4
addresses come from the benchmarking range 198.18.0.0/15, since the documentation ranges
hold only 768; no packet is ever sent from or to them). Prints markdown tables; exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import Rows, load, require_root

from imr.backends.base import Backend, KernelBlock
from imr.backends.ipset import IpsetBackend
from imr.backends.iptables import IptablesBackend
from imr.backends.nftables import NftablesBackend
from imr.config import FirewallConfig

# The test helpers' namespaces (tests/ is not a package; mypy checks it on its own).
from netns import Netns, connect, netns  # type: ignore[import-not-found, unused-ignore]

PORT = 5201
CONFIG = FirewallConfig(protocol="udp", ports=[str(PORT)])
PAYLOAD = bytes(64)
CHUNKS, WARM_CHUNKS, CHUNK_MS = 20, 2, 5  # pairs of chunks (server, reference)
SETTLE = 0.3  # seconds after a load, for the freed set's deferred (RCU) work to pass
BOOTSTRAP = 4000
SUB_BATCH = 8  # packets between clock reads in the sender


@dataclass(frozen=True)
class Family:
    """One address family's flow: who sends to whom, and where blocked addresses come from."""

    name: str
    server: str
    client: str
    reference: str  # the reference namespace's address
    reference_client: str  # the client's address on the reference link
    prefix: int
    blocked_base: str  # blocked entries are blocked_base + i; entry 1 doubles as the probe
    snmp: str  # the /proc/net file with this family's UDP counters
    udp: tuple[str, ...]  # counters whose sum is the packets that reached the socket

    def blocks(self, count: int, expires_at: float) -> list[KernelBlock]:
        base = int(ipaddress.ip_address(self.blocked_base))
        return [KernelBlock(ipaddress.ip_address(base + i), expires_at) for i in range(count)]

    @property
    def host_prefix(self) -> int:
        return 128 if ":" in self.server else 32

    @property
    def probe(self) -> str:
        return str(ipaddress.ip_address(int(ipaddress.ip_address(self.blocked_base)) + 1))


IPV6 = Family(
    "IPv6",
    "2001:db8:66::1",
    "2001:db8:66::66",
    "2001:db8:66:1::1",
    "2001:db8:66:1::66",
    64,
    "2001:db8:1::",
    "snmp6",
    ("Udp6InDatagrams", "Udp6RcvbufErrors"),
)
IPV4 = Family(
    "IPv4",
    "192.0.2.1",
    "192.0.2.2",
    "198.51.100.1",
    "198.51.100.2",
    24,
    "198.18.0.0",
    "snmp",
    ("Udp:InDatagrams", "Udp:RcvbufErrors"),
)


# -- the sender (its own process, in the client namespace, pinned to one CPU) ------------


def sender_main(cpu: int, targets: Sequence[str]) -> None:
    """Serve `measure FAMILY` and `probe FAMILY SOURCE COUNT` lines on stdin.

    `targets` are "source,server,reference source,reference" per family (index = FAMILY).
    `measure` answers one "packets:cpu_ns:wall_ns" field per chunk, server and reference
    chunks alternating; `probe` sends COUNT packets from SOURCE to the server and answers
    "sent"; `times` answers the user and system seconds since it started serving (how much
    of the sender's time is its own code, not the kernel's).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops it by closing stdin
    os.sched_setaffinity(0, {cpu})
    pairs = []
    for target in targets:
        source, server, reference_source, reference = target.split(",")
        pairs.append((_udp(source, server), _udp(reference_source, reference)))
    start = os.times()  # after the imports: only the sending counts
    for line in sys.stdin:
        words = line.split()
        if words[0] == "measure":
            print(" ".join(_chunks(*pairs[int(words[1])])), flush=True)
        elif words[0] == "probe":
            destination = targets[int(words[1])].split(",")[1]
            with _udp(words[2], destination) as sock:
                for _ in range(int(words[3])):
                    sock.send(PAYLOAD)
            print("sent", flush=True)
        elif words[0] == "times":
            now = os.times()
            print(f"{now.user - start.user} {now.system - start.system}", flush=True)


def _udp(source: str, destination: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.connect((destination, PORT))
    return sock


def _chunks(server: socket.socket, reference: socket.socket) -> list[str]:
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    out = []
    for _ in range(WARM_CHUNKS + CHUNKS):
        for send in (server.send, reference.send):
            packets = 0
            w0, c0 = wall(), cpu()
            deadline = w0 + CHUNK_MS * 1_000_000
            while wall() < deadline:
                for _ in range(SUB_BATCH):
                    send(PAYLOAD)
                packets += SUB_BATCH
            out.append(f"{packets}:{cpu() - c0}:{wall() - w0}")
    return out


@dataclass
class Sender:
    process: subprocess.Popen[str]

    @classmethod
    def start(cls, client: Netns, cpu: int, families: Sequence[Family]) -> Sender:
        targets = [f"{f.client},{f.server},{f.reference_client},{f.reference}" for f in families]
        argv = [sys.executable, __file__, "--sender", str(cpu), *targets]
        process = subprocess.Popen(
            client.argv(*argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        return cls(process)

    def ask(self, line: str) -> str:
        stdin: IO[str] | None = self.process.stdin
        stdout: IO[str] | None = self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(line + "\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            raise RuntimeError(f"the sender died (exit {self.process.wait(5)})")
        return answer.strip()

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


# -- one backend: rounds of measurements ----------------------------------------------


@dataclass
class Measurement:
    rate: float  # packets per second of the sender's CPU time (fast quartile of chunks)
    relative: float  # median over the chunk pairs of server rate / reference rate
    wall_rate: float  # packets per wall-clock second over the server chunks
    cpu_share: float  # the sender's CPU time / wall time (1.0: it had its CPU to itself)


@dataclass
class Result:
    backend: str
    family: str
    sizes: list[int]
    rounds: list[dict[int, Measurement]] = field(default_factory=list)
    sender_user_share: float = 0.0


class Bench:
    """Namespaces, backend and sender for one backend's rounds."""

    def __init__(
        self, server: Netns, reference: Netns, backend: Backend, families: Sequence[Family]
    ) -> None:
        self.server, self.reference = server, reference
        self.backend, self.families = backend, families

    @staticmethod
    def counters(ns: Netns, family: Family) -> int:
        """UDP packets that reached a socket in `ns` (queued, or dropped on a full buffer)."""
        with ns.entered(), open(f"/proc/thread-self/net/{family.snmp}") as f:
            text = f.read()
        values: dict[str, int] = {}
        if family.snmp == "snmp6":
            for line in text.splitlines():
                name, value = line.split()
                values[name] = int(value)
        else:  # snmp: a header line of names, then a line of values, per protocol
            lines = text.splitlines()
            for names, numbers in zip(lines[::2], lines[1::2], strict=True):
                proto = names.split(":")[0]
                for name, value in zip(names.split()[1:], numbers.split()[1:], strict=True):
                    values[f"{proto}:{name}"] = int(value)
        return sum(values[name] for name in family.udp)

    def load(self, blocks: Sequence[KernelBlock]) -> None:
        with self.server.entered():
            self.backend.replace_all(blocks)
        time.sleep(SETTLE)

    def measure(self, sender: Sender, index: int) -> Measurement:
        family = self.families[index]
        namespaces = (self.server, self.reference)
        before = [self.counters(ns, family) for ns in namespaces]
        answer = sender.ask(f"measure {index}").split()
        arrived = [self.counters(ns, family) - b for ns, b in zip(namespaces, before, strict=True)]
        every = [tuple(map(int, c.split(":"))) for c in answer]
        for which, (ns, count) in enumerate(zip(namespaces, arrived, strict=True)):
            sent = sum(c[0] for c in every[which::2])
            if count != sent:
                raise RuntimeError(
                    f"{family.name}: sent {sent} packets to {ns.name}, {count} reached the socket"
                )
        server = every[2 * WARM_CHUNKS :: 2]
        reference = every[2 * WARM_CHUNKS + 1 :: 2]
        rates = [p / (c / 1e9) for p, c, _ in server]
        reference_rates = [p / (c / 1e9) for p, c, _ in reference]
        kept = server + reference
        cpu_ns, wall_ns = sum(c[1] for c in kept), sum(c[2] for c in kept)
        return Measurement(
            rate=sorted(rates)[(3 * len(rates)) // 4],
            relative=statistics.median(a / b for a, b in zip(rates, reference_rates, strict=True)),
            wall_rate=sum(c[0] for c in server) / (sum(c[2] for c in server) / 1e9),
            cpu_share=cpu_ns / wall_ns,
        )

    def check(self, sender: Sender, index: int, size: int) -> None:
        """The set is in the kernel and on the packets' path: a blocked source is refused."""
        family = self.families[index]
        with self.server.entered():
            installed = self.backend.installed()
        if len(installed) != size * len(self.families):
            raise RuntimeError(f"kernel holds {len(installed)} entries, expected {size} per family")
        before = self.counters(self.server, family)
        sender.ask(f"probe {index} {family.probe} 100")
        passed = self.counters(self.server, family) - before
        expected = 100 if size == 0 else 0
        if passed != expected:
            raise RuntimeError(
                f"{family.name}, {size} blocked: {passed} of 100 packets from the blocked "
                f"address {family.probe} reached the socket, expected {expected}"
            )


def run_backend(
    label: str,
    make: Callable[[], Backend],
    sizes: Sequence[int],
    rounds: int,
    families: Sequence[Family],
    cpu: int,
    rng: random.Random,
) -> list[Result]:
    expires = time.time() + 86400
    loads = {n: [b for f in families for b in f.blocks(n, expires)] for n in sizes}
    results = [Result(label, f.name, list(sizes)) for f in families]
    with netns("imrpc") as server, netns("imrpc") as client, netns("imrpc") as reference:
        connect(
            server,
            client,
            [f"{f.server}/{f.prefix}" for f in families],
            [f"{f.client}/{f.prefix}" for f in families],
        )
        connect(
            reference,
            client,
            [f"{f.reference}/{f.prefix}" for f in families],
            [f"{f.reference_client}/{f.prefix}" for f in families],
        )
        for f in families:  # the probe's blocked source; replies to it have no route back
            client.run("ip", "addr", "add", f"{f.probe}/{f.host_prefix}", "dev", "lo")
        sinks = []
        for ns, address in ((server, "server"), (reference, "reference")):
            with ns.entered():
                for f in families:
                    sink = socket.socket(
                        socket.AF_INET6 if ":" in f.server else socket.AF_INET, socket.SOCK_DGRAM
                    )
                    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the minimum
                    sink.bind((getattr(f, address), PORT))
                    sinks.append(sink)
        with server.entered():
            backend = make()
            backend.prepare()
        bench = Bench(server, reference, backend, families)
        sender = Sender.start(client, cpu, families)
        try:
            for i in range(len(families)):  # resolve the neighbours before counting packets
                sender.ask(f"measure {i}")
            time.sleep(0.2)
            for r in range(rounds + 1):
                order = list(sizes)
                rng.shuffle(order)
                measured: list[dict[int, Measurement]] = [{} for _ in families]
                for n in order:
                    bench.load(loads[n])
                    for i in range(len(families)):
                        if r == 0:
                            bench.check(sender, i, n)
                        measured[i][n] = bench.measure(sender, i)
                if r > 0:  # round 0 is the warm-up
                    for result, m in zip(results, measured, strict=True):
                        result.rounds.append(m)
                print(
                    f"  {label}: round {r}/{rounds} ({'warm-up, ' if r == 0 else ''}"
                    f"{os.getloadavg()[0]:.2f} load) "
                    + ", ".join(
                        f"{n:,}: {measured[0][n].rate:,.0f} ({measured[0][n].relative:.3f})"
                        for n in sizes
                    ),
                    file=sys.stderr,
                    flush=True,
                )
            user, system = map(float, sender.ask("times").split())
            for result in results:
                result.sender_user_share = user / (user + system)
        finally:
            sender.stop()
            for sink in sinks:
                sink.close()
            with server.entered():
                backend.teardown()
            backend.close()
    return results


# -- statistics and tables ---------------------------------------------------------------


def bootstrap_median(values: Sequence[float], rng: random.Random) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the median (resampling the rounds)."""
    k = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=k)) for _ in range(BOOTSTRAP))
    return medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]


def verdict(low: float, high: float) -> str:
    """Issue 3's test on the paired interval, and whether it sees any difference at all."""
    if high < 0.90:
        return "**slower** (> 10 %)"
    if low < 0.90 or high > 1.10:
        return "not shown"
    if high < 1.0:
        return f"within 10 % (measurably slower: by {1 - high:.1%} to {1 - low:.1%})"
    if low > 1.0:
        return "within 10 % (measurably faster)"
    return "within 10 % (no difference measured)"


def ratio(values: Sequence[float], rng: random.Random) -> tuple[float, float, float]:
    """The median and its bootstrap 95 % interval."""
    low, high = bootstrap_median(values, rng)
    return statistics.median(values), low, high


def report(results: Sequence[Result], rows: Rows, rng: random.Random) -> None:
    print(
        "| backend | family | blocked | rounds | packets/s per CPU-second (median) "
        "| packets/s wall (median) | ratio to empty, raw: median [95 % CI] "
        "| ratio to empty, paired with the reference: median [95 % CI] | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        empty = [r[0] for r in result.rounds]
        for n in result.sizes:
            this = [r[n] for r in result.rounds]
            rate = statistics.median(m.rate for m in this)
            wall = statistics.median(m.wall_rate for m in this)
            cells = [result.backend, result.family, f"{n:,}", str(len(this))]
            cells += [f"{rate:,.0f}", f"{wall:,.0f}"]
            if n == 0:
                cells += ["1 (reference)", "1 (reference)", ""]
                summary = f"{rate:,.0f} packets/s per CPU-second"
            else:
                raw = ratio([m.rate / e.rate for m, e in zip(this, empty, strict=True)], rng)
                paired = ratio(
                    [m.relative / e.relative for m, e in zip(this, empty, strict=True)], rng
                )
                text = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in (raw, paired)]
                said = verdict(paired[1], paired[2])
                cells += [*text, said]
                summary = (
                    f"{text[1]} of empty (paired; raw {text[0]}; {len(this)} rounds): "
                    + said.replace("*", "")
                )
            print("| " + " | ".join(cells) + " |")
            rows.add(f"{result.backend}, {result.family}, {n:,} blocked: per-packet rate", summary)
    print()
    for result in results:
        shares = [m.cpu_share for r in result.rounds for m in r.values()]
        print(
            f"- {result.backend} ({result.family}): the sender had {statistics.median(shares):.0%}"
            f" of its CPU (median; min {min(shares):.0%}); {result.sender_user_share:.0%} of"
            " its time was its own code, the rest the kernel's send and receive path."
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~2 min)")
    parser.add_argument("--rounds", type=int, help="rounds per set backend (default 30, quick 12)")
    parser.add_argument(
        "--control-rounds", type=int, help="rounds for iptables (default 10, quick 6)"
    )
    parser.add_argument(
        "--only", nargs="*", choices=["nftables", "ipset", "iptables"], help="backends to run"
    )
    parser.add_argument("--ipv4", action="store_true", help="measure IPv4 too (about 2x longer)")
    parser.add_argument("--cpu", type=int, default=0, help="the sender's CPU (default 0)")
    parser.add_argument("--seed", type=int, default=1, help="shuffle and bootstrap seed")
    parser.add_argument("--rows", type=Path, help="append result rows (JSON lines) for run-all")
    args = parser.parse_args()
    require_root()
    cpus = os.sched_getaffinity(0)
    if args.cpu not in cpus:
        parser.error(f"--cpu {args.cpu}: not one of this process's CPUs {sorted(cpus)}")
    if len(cpus) > 1:  # keep set loading and the bootstrap off the sender's CPU
        os.sched_setaffinity(0, cpus - {args.cpu})
    rounds = args.rounds or (12 if args.quick else 30)
    control_rounds = args.control_rounds or (6 if args.quick else 10)
    families = [IPV6, IPV4] if args.ipv4 else [IPV6]
    rng = random.Random(args.seed)
    candidates: list[tuple[str, Callable[[], Backend], list[int], int]] = [
        ("nftables", lambda: NftablesBackend(CONFIG), [0, 10_000, 100_000], rounds),
        ("ipset", lambda: IpsetBackend(CONFIG, "nft"), [0, 10_000, 100_000], rounds),
        ("iptables", lambda: IptablesBackend(CONFIG, "nft"), [0, 5, 30, 10_000], control_rounds),
    ]
    start_load, started = Path("/proc/loadavg").read_text().split()[:3], time.monotonic()
    results: list[Result] = []
    for label, make, sizes, n in candidates:
        if args.only and label not in args.only:
            continue
        print(f"running {label} ({n} rounds + warm-up) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            results += run_backend(label, make, sizes, n, families, args.cpu, rng)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"packet_cost: {label}: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # namespaces and the sender are gone by now
            print(f"packet_cost: interrupted during {label}", file=sys.stderr)
            return 130
        print(f"{label}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = Rows("packet_cost")
    print(
        f"Per-packet cost, {len(CONFIG.ports)} UDP port, 64-byte payload, sender on CPU "
        f"{args.cpu}; /proc/loadavg at start {' '.join(start_load)}, at end "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} ({load()}); "
        f"{time.monotonic() - started:.0f} s.\n"
    )
    report(results, rows, rng)
    rows.save(args.rows)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--sender":
        sender_main(int(sys.argv[2]), sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
