"""Fleet mode: propagation, catch-up, and the cost on the local path (docs/fleet.md).

Run as root:

    .venv/bin/python bench/fleet.py                      # 3 members, catch-up of 100,000
    .venv/bin/python bench/fleet.py --members 5 --catchup 100000
    .venv/bin/python bench/fleet.py --quick              # 3 members, catch-up of 10,000
    .venv/bin/python bench/fleet.py --members 10 --phases propagation --rates 100,1000 --seconds 5

One redis-server of its own (a hub namespace, ACLs on, TLS unless --no-tls) and one
daemon per member, each in its own namespace with its own state file and nftables table
(tests/fleet_harness.py builds them, as the tests do). It measures:
  - propagation: single blocks paced at each of --rates blocks/s in aggregate, the members
    taking turns as origin (open loop, --count, or rate times --seconds, of them), from the
    origin's acknowledgement to the element in every other member's kernel (`nft monitor`
    in each namespace, bench/_propagation.py: one clock, one machine), and the CPU the
    daemons, Redis and the watchers used;
  - catch-up: member b stopped, N blocks made on a, b started: seconds from `imr server
    start` to b's state holding all N (its kernel then holds them too);
  - the local path: single-block latency and 50-client throughput on a fleet member versus
    a daemon without [fleet], in the same run;
  - Redis memory per 100,000 retained events (INFO memory before and after the catch-up set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import (
    BenchDaemon,
    Rows,
    bench_daemon,
    block_load,
    load,
    percentile,
    require_root,
    v6_address,
)
from _propagation import Watcher, cpu_seconds, paced_blocks, spread
from redis import Redis

from fleet_harness import (
    RedisServer,
    fleet_section,
    free_port,
    hub_address,
    make_key,
    member_address,
    start_redis,
)
from netns import Netns, connect, create_netns


class Member(BenchDaemon):
    fleet_text: str = ""

    def write_config(self) -> None:
        super().write_config()
        with self.config.open("a") as out:
            out.write("[quota]\nblocks_per_minute = 0\nactive_per_client = 0\n")
            out.write(self.fleet_text)


@contextlib.contextmanager
def fleet(
    members: int, tls: bool, prefix: str = "imrb"
) -> Iterator[tuple[list[Member], RedisServer, Netns]]:
    root = Path(tempfile.mkdtemp(prefix="imrbench-fleet-"))
    names = [chr(ord("a") + i) for i in range(members)]
    namespaces: list[Netns] = []
    daemons: list[Member] = []
    server: RedisServer | None = None
    try:
        hub = create_netns(f"{prefix}hub")
        namespaces.append(hub)
        port = free_port()
        hubs = [hub_address(i) for i in range(members)]
        (root / "redis").mkdir()
        server = start_redis(
            names,
            host="0.0.0.0",  # noqa: S104 - inside the hub namespace only
            port=port,
            netns=hub.name,
            root=root / "redis",
            tls_names=hubs if tls else (),
        )
        publics = {n: make_key(root / f"{n}.key") for n in names}
        addresses = {n: [member_address(i)] for i, n in enumerate(names)}
        for i, name in enumerate(names):
            ns = create_netns(f"{prefix}{name}")
            namespaces.append(ns)
            connect(hub, ns, [f"{hub_address(i)}/28"], [f"{member_address(i)}/28"])
            work = root / name
            work.mkdir()
            member = Member(ns.name, work, "nftables")
            scheme = "rediss" if tls else "redis"
            member.fleet_text = fleet_section(
                name,
                f"{scheme}://{hub_address(i)}:{port}/0",
                root,
                publics,
                addresses,
                extra="per_origin_per_minute = 10000000",
                tls_ca=server.ca,
            )
            member.write_config()
            member.start()
            daemons.append(member)
        yield daemons, server, hub
    finally:
        for member in daemons:
            member.stop()
        if server is not None:
            server.stop()
        for ns in namespaces:
            ns.delete()
        shutil.rmtree(root, ignore_errors=True)


def fleet_status(member: Member) -> dict[str, object]:
    out = subprocess.run(
        member.imr("fleet", "status", "--json"), capture_output=True, text=True, check=True
    )
    found: dict[str, object] = json.loads(out.stdout)
    return found


def state_count(member: Member, where: str) -> int:
    with contextlib.closing(sqlite3.connect(member.state, timeout=30)) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM blocks WHERE {where}").fetchone()[0])  # noqa: S608


def wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def lag(member: Member) -> dict[str, float]:
    found = fleet_status(member)["lag_ms"]
    assert isinstance(found, dict)
    return found


def propagation(
    daemons: list[Member], server: RedisServer, rows: Rows, count: int, first: int, rate: float
) -> int:
    """`count` single blocks paced at `rate` per second in aggregate, the origins taking
    turns over every member; from the origin's acknowledgement to the element in each
    other member's kernel (bench/_propagation.py: nft monitor in every namespace)."""
    ips = [v6_address(first + n) for n in range(count)]
    remote = "origin IS NOT NULL"
    before = [state_count(m, remote) for m in daemons]
    pids = [m.pid() for m in daemons]
    cpu0 = [cpu_seconds(pid) for pid in pids], cpu_seconds(server.process.pid)
    t0 = time.monotonic()
    watchers = [Watcher(m.ns) for m in daemons]
    try:
        sent = paced_blocks([m.socket for m in daemons], ips, [n / rate for n in range(count)])
        for i, member in enumerate(daemons):
            expected = before[i] + sum(1 for origin, _ in sent.acks.values() if origin != i)
            wait(lambda m=member, e=expected: state_count(m, remote) >= e, 120)
        seen = [w.stop() for w in watchers]
    finally:
        for w in watchers:
            w.kill()
    wall = time.monotonic() - t0
    daemons_cpu = sum(cpu_seconds(pid) for pid in pids) - sum(cpu0[0])
    found = spread(sent.acks, seen)
    head = f"propagation, {len(daemons)} members, {count} blocks at {rate:g}/s aggregate"
    rows.add(
        f"{head} (acknowledged at {sent.rate():.0f}/s), origins in turn: acknowledgement on"
        " the origin to kernel entry on every other member, p50 / p99 / max ms"
        f" ({len(found.latencies)} pairs; {load()})",
        found.text(),
    )
    rows.add(
        f"{head}: CPU over the {wall:.1f} s (s): member daemons / redis-server / the bench's"
        " nft watchers",
        f"{daemons_cpu:.1f} / {cpu_seconds(server.process.pid) - cpu0[1]:.1f} /"
        f" {sum(w.cpu for w in watchers):.1f}",
    )
    return first + count


def local_cost(daemons: list[Member], rows: Rows, count: int, first: int) -> int:
    """The other members stopped meanwhile: their applying would share this machine's CPUs
    with a (on real hosts each has its own); a still publishes every block to Redis."""
    a = daemons[0]
    for member in daemons[1:]:
        member.stop()
    with bench_daemon("nftables") as plain:
        plain.start()
        # Interleaved (off, on, on, off): the shared machine's load drifts between runs.
        order = (("fleet off", plain), ("fleet on", a), ("fleet on", a), ("fleet off", plain))
        for label, daemon in order:
            ips = [v6_address(first + n) for n in range(count)]
            first += count
            _, latencies = block_load(daemon.socket, ips[: count // 4], 1)
            seconds, _ = block_load(daemon.socket, ips[count // 4 :], 50)
            p50, p99 = (percentile(latencies, q) * 1000 for q in (0.5, 0.99))
            rows.add(
                f"local path, {label}: single block p50 / p99 (ms); 50 clients (blocks/s)",
                f"{p50:.2f} / {p99:.2f}; {(count - count // 4) / seconds:.0f}",
            )
    for member in daemons[1:]:
        member.start()
    return first


def catch_up(
    daemons: list[Member], server: RedisServer, hub: Netns, rows: Rows, count: int, first: int
) -> int:
    a, b = daemons[0], daemons[1]
    with hub.entered():
        admin = Redis(
            host=hub_address(0),
            port=server.port,
            username="admin",
            password="adminpw",  # noqa: S106 - the test server's own user
            ssl=server.ca is not None,
            ssl_ca_certs=str(server.ca) if server.ca else None,
        )
        before = int(admin.info("memory")["used_memory"])
    b.stop()
    ips = [v6_address(first + n) for n in range(count)]
    block_load(a.socket, ips, 8, per_request=100)
    assert wait(lambda: fleet_status(a)["outbox_depth"] == 0, 600)
    with hub.entered():
        after = int(admin.info("memory")["used_memory"])
        admin.close()
    t0 = time.perf_counter()
    b.start()
    where = "origin = 'a' AND lifted_at IS NULL"
    assert wait(lambda: state_count(b, where) >= count, 900)
    seconds = time.perf_counter() - t0
    rows.add(
        f"catch-up of {count:,} missed events: start to all in b's state (s)", f"{seconds:.1f}"
    )
    # Less sensitive to the machine's load than the wall time (the daemon, all its threads,
    # from its fork to the last commit; the imports before the fork are not counted).
    rows.add(f"catch-up of {count:,}: b's daemon CPU (s)", f"{cpu_seconds(b.pid()):.2f}")
    rows.add(
        "Redis memory per 100,000 retained events (MB)",
        f"{(after - before) / count * 100_000 / 2**20:.0f}",
    )
    return first + count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--catchup", type=int, default=100_000)
    parser.add_argument("--count", type=int, default=300, help="paced single blocks per rate")
    parser.add_argument(
        "--rates", default="100", help="aggregate blocks/s of the propagation runs, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=0, help="per rate (overrides --count)")
    parser.add_argument("--local", type=int, default=2000, help="blocks per local-path run")
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--quick", action="store_true", help="catch-up of 10,000")
    parser.add_argument("--rows", type=Path, default=None)
    parser.add_argument(
        "--phases", default="propagation,local,catchup", help="comma-separated, in this order"
    )
    args = parser.parse_args()
    require_root()
    rows = Rows("fleet")
    catchup = 10_000 if args.quick else args.catchup
    print(f"# fleet: {args.members} members, TLS {'off' if args.no_tls else 'on'}; {load()}")
    with fleet(args.members, not args.no_tls) as (daemons, server, hub):
        phases, first = args.phases.split(","), 0
        if "propagation" in phases:
            for rate in (float(r) for r in args.rates.split(",")):
                count = round(rate * args.seconds) if args.seconds else args.count
                first = propagation(daemons, server, rows, count, first, rate)
        if "local" in phases:
            first = local_cost(daemons, rows, args.local, first)
        if "catchup" in phases:
            catch_up(daemons, server, hub, rows, catchup, first)
    print(f"# {load()}")
    rows.print_table()
    rows.save(args.rows)


if __name__ == "__main__":
    main()
