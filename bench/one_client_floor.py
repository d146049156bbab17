"""What bounds one client waiting for each `block` reply: the same client as
bench/one_address.py against bare servers that each add one part of the daemon's work.

Run as root:

    .venv/bin/python bench/one_client_floor.py --count 3000

Each server is a bare asyncio.Protocol process in a namespace of its own, answering each
`block ADDRESS` line after:
  echo:    nothing (the client, the Unix socket and the wake-ups on both sides);
  sqlite:  one SQLite WAL transaction with synchronous=FULL writing one row of a one-table
           file (a commit's floor on this disk);
  store:   imr's own Store in one transaction: the history query (Store.offences), a block
           row and a hit row (imr's schema: five B-tree pages a commit), COMMIT;
  kernel:  store, plus the nftables element added by imr's ElementWriter (one netlink
           batch, add/delete/add as the daemon sends it) before the COMMIT.
The daemon (bench/one_address.py) adds imr's Python to the last: parsing, admission, the
policy, the reply, the event loop's turns. Printed: the rate, p50 and p99 of the round trip
and the server's CPU time (user + system) a request (docs/performance.md, "Speed round two,
one client").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load, percentile, require_root, v6_address
from one_address import cpu_split, run_load

STEPS = ("echo", "sqlite", "store", "kernel")

SERVER = r"""
import asyncio, socket, sqlite3, sys, time
from pathlib import Path

path, step = Path(sys.argv[1]), sys.argv[2]
db = store = writer = None
if step == "sqlite":
    db = sqlite3.connect(path.parent / "one.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, ip TEXT, at REAL)")
if step in ("store", "kernel"):
    from imr.store import BlockRecord, Store
    store = Store(path.parent / "state.db")
if step == "kernel":
    from imr.backends import nfnetlink
    from imr.backends.nftables import NftablesBackend
    from imr.config import FirewallConfig
    NftablesBackend(FirewallConfig()).prepare()
    writer = nfnetlink.ElementWriter("inet", "imr")
next_id = 1


class Server(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        global next_id
        ip, now = data[6:-1].decode(), time.time()
        if db is not None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (ip, at) VALUES (?, ?)", (ip, now))
            db.execute("COMMIT")
        if store is not None:
            with store.transaction():
                store.offences([ip])
                row = BlockRecord(next_id, ip, now, now + 86400, 1, 1, "", "", 0, 1)
                store.insert_blocks([row])
                store.record_hits([(ip, now, "block", "", "", 0, 1, next_id)])
                if writer is not None:
                    key = socket.inet_pton(socket.AF_INET6, ip)
                    element = nfnetlink.address_element(key, 86_400_000)
                    steps = [(nfnetlink.ADD, "blocked_v6", [element]),
                             (nfnetlink.DELETE, "blocked_v6", [element]),
                             (nfnetlink.ADD, "blocked_v6", [element])]
                    writer.commit(steps)
            next_id += 1
        self.transport.write(b"ok " + data)


async def main():
    await asyncio.get_running_loop().create_unix_server(Server, str(path))
    Path(f"{path}.ready").touch()
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def measure(step: str, count: int) -> str:
    """One step's row: a fresh namespace, work directory and server process."""
    work = Path(tempfile.mkdtemp(prefix="imrfloor-"))
    ns = f"imrfloor-{os.getpid()}-{step}"
    path = work / "floor.sock"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = None
    try:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(path), step]
        server = subprocess.Popen(argv)  # `ip netns exec` execs: this pid is the server's
        deadline = time.monotonic() + 30
        while not Path(f"{path}.ready").exists():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the {step} server did not start")
            time.sleep(0.05)
        ips = [v6_address(n) for n in range(count + 300)]
        run_load(path, "text", ips[:300], 1)  # warm-up (and the WAL's first growth)
        user0, system0 = cpu_split(server.pid)
        elapsed, latencies = run_load(path, "text", ips[300:], 1)
        user, system = cpu_split(server.pid)
        cpu = (user + system - user0 - system0) / count * 1e6
        return (
            f"| {step} | {count / elapsed:,.0f}/s | {percentile(latencies, 0.5) * 1000:.3f} /"
            f" {percentile(latencies, 0.99) * 1000:.2f} ms | {cpu:.0f} µs |"
        )
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--step", action="append", choices=STEPS)
    args = parser.parse_args()
    require_root()
    print(f"one_client_floor: {load()} at start", file=sys.stderr)
    rows = [measure(step, args.count) for step in args.step or STEPS]
    print(f"one_client_floor: {load()} at end", file=sys.stderr)
    print("| server | 1 client | p50 / p99 | server CPU a request |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
