"""Fleet mode at hundreds of members, simulated: one XADD, how long until every reader woke.

Run as root (a namespace of its own):

    .venv/bin/python bench/fleet_fanout.py                           # 100, 300, 1000 readers
    .venv/bin/python bench/fleet_fanout.py --readers 1000 --layouts shared --events 20

Not imr's daemons: lightweight readers (redis.asyncio connections, each blocked in
`XREAD BLOCK 0` as a member's follower is), spread over --processes processes, against one
redis-server of its own (tests/fleet_harness.py: appendonly, appendfsync always, ACLs) in a
namespace. One writer appends --events events, one at a time: the next only once every
reader is blocked again. Each reader stamps its wake-up with CLOCK_MONOTONIC against the
writer's stamp inside the event (one clock, one machine). Two layouts (docs/fleet.md, Sizing):
  - mesh: today's layout: one stream per member, every reader XREADs every stream (at 1,000
    members, 1,000 keys in every XREAD, re-registered after every wake-up);
  - shared: one stream for the fleet, every reader XREADs that one key.
The figures bound a real fleet from above on the Redis side (here the readers share two CPUs
with Redis); they say nothing of a member's apply path (bench/fleet.py measures that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import Rows, load, percentile, require_root
from _propagation import cpu_seconds
from redis import Redis
from redis import asyncio as aioredis

from fleet_harness import start_redis
from netns import create_netns

PASSWORD = "adminpw"  # noqa: S105 - the bench server's own admin user (tests/fleet_harness.py)


def keys(layout: str, readers: int) -> list[str]:
    """Mesh: member 0 writes, members 1 .. readers read every stream but their own."""
    return ["fpe:fleet"] if layout == "shared" else [f"fpe:fleet:{n}" for n in range(readers + 1)]


async def read(port: int, streams: list[str], events: int) -> list[float]:
    """One reader: XREAD BLOCK over `streams` until `events` events came; their delays."""
    client = aioredis.Redis(port=port, username="admin", password=PASSWORD, socket_timeout=None)
    positions: dict[str | bytes, str | bytes] = dict.fromkeys(streams, "$")
    delays: list[float] = []
    try:
        while len(delays) < events:
            answer: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
            answer = await client.xread(positions, block=0)  # type: ignore[arg-type,assignment]
            now = time.monotonic()
            for stream, entries in answer:
                for entry_id, fields in entries:
                    delays.append(now - float(fields[b"t"]))
                    positions[stream.decode()] = entry_id
    finally:
        await client.aclose()
    return delays


def reader_process(
    port: int, layout: str, readers: int, first: int, share: int, events: int
) -> None:
    """Readers first .. first + share - 1 in this process; prints every delay as one JSON
    list."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one descriptor per reader
    streams = keys(layout, readers)

    async def main() -> list[float]:
        # A member does not read its own stream (mesh only): reader n is member n + 1.
        tasks = [
            read(port, [s for s in streams if s != f"fpe:fleet:{n + 1}"], events)
            for n in range(first, first + share)
        ]
        return [d for found in await asyncio.gather(*tasks) for d in found]

    print(json.dumps(asyncio.run(main())), flush=True)


def blocked(admin: Redis) -> int:
    return int(admin.info("clients")["blocked_clients"])


def run_layout(
    ns: str, port: int, admin: Redis, layout: str, readers: int, processes: int, events: int
) -> tuple[list[float], float]:
    """Delays over every (event, reader) pair, and redis-server's CPU seconds per event."""
    shares = [readers // processes + (p < readers % processes) for p in range(processes)]
    argv = [sys.executable, __file__, "--reader", str(port), layout, str(readers)]
    firsts = [sum(shares[:p]) for p in range(processes)]
    children = [
        subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv, str(first), str(share), str(events)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for first, share in zip(firsts, shares, strict=True)
        if share
    ]
    try:
        streams = keys(layout, readers)
        target, expected = streams[0], readers
        if not wait_blocked(admin, readers, 120):
            raise RuntimeError(f"only {blocked(admin)} of {readers} readers blocked")
        pid = int(admin.info("server")["process_id"])
        cpu0 = cpu_seconds(pid)
        for n in range(events):
            admin.xadd(target, {"t": repr(time.monotonic()), "e": "x" * 250})
            # Every reader woke and blocked again (the woken ones re-register their XREAD);
            # after the last event they stop.
            if n < events - 1 and not wait_blocked(admin, readers, 60):
                raise RuntimeError("readers did not block again within 60 s")
            time.sleep(0.02)
        delays = [d for child in children for d in json.loads(child.communicate(timeout=120)[0])]
        cpu = (cpu_seconds(pid) - cpu0) / events
        if len(delays) != expected * events:
            raise RuntimeError(f"{len(delays)} wake-ups, expected {expected * events}")
        return delays, cpu
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        admin.delete(*streams)


def wait_blocked(admin: Redis, readers: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if blocked(admin) >= readers:
            return True
        time.sleep(0.005)  # INFO costs Redis a little CPU: counted in the per-event figure
    return False


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        port, layout, readers, first, share, events = sys.argv[2:8]
        reader_process(int(port), layout, int(readers), int(first), int(share), int(events))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", default="100,300,1000", help="comma-separated")
    parser.add_argument("--layouts", default="shared,mesh", help="shared, mesh")
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rows", type=Path, default=None)
    args = parser.parse_args()
    require_root()
    # SIGTERM (from timeout, say) unwinds: processes stopped, namespaces deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    rows = Rows("fleet_fanout")
    print(f"# fleet_fanout; {load()}")
    ns = create_netns("fpefan")
    root = Path(tempfile.mkdtemp(prefix="fpe-fanout-"))
    server = None
    try:
        server = start_redis([], netns=ns.name, root=root)
        with ns.entered():
            admin = Redis(port=server.port, username="admin", password=PASSWORD)
            admin.config_set("maxclients", 10000)
            for layout in args.layouts.split(","):
                for count in (int(r) for r in args.readers.split(",")):
                    delays, cpu = run_layout(
                        ns.name, server.port, admin, layout, count, args.processes, args.events
                    )
                    ms = [d * 1000 for d in delays]
                    rows.add(
                        f"{layout}: {count} readers, one XADD to every reader's wake-up,"
                        f" p50 / p99 / max ms; redis-server CPU per event ({load()})",
                        f"{percentile(ms, 0.5):.1f} / {percentile(ms, 0.99):.1f} /"
                        f" {max(ms):.1f}; {cpu * 1000:.1f} ms",
                    )
            admin.close()
    finally:
        if server is not None:
            server.stop()
        ns.delete()
        shutil.rmtree(root, ignore_errors=True)
    print(f"# {load()}")
    rows.print_table()
    rows.save(args.rows)


if __name__ == "__main__":
    main()
