"""When each address reached this namespace's nftables sets: `nft monitor` with a clock.

Not a benchmark itself: bench/_propagation.py starts one per namespace (`ip netns exec NS
python _nft_watch.py`). It prints `ready` once `nft monitor elements` runs, stamps every
added element with CLOCK_MONOTONIC (one clock for every process on the machine, so the
bench compares it with the moment a client heard its acknowledgement), and on SIGTERM
prints one JSON object: `seen` {address: seconds} (the first time each address was seen),
`cpu` (seconds this watcher and its nft used) and, if nft stopped on its own (a netlink
overrun), `error` with its last words.
"""

from __future__ import annotations

import ctypes
import json
import re
import resource
import signal
import subprocess
import threading
import time

PR_SET_PDEATHSIG = 1

# "add element inet imr blocked_v6 { 2001:db8::1 timeout 1h expires 59m59s, ... }"
ELEMENTS = re.compile(r"^add element \S+ \S+ \S+ \{ (.*) \}")


def addresses(line: str) -> list[str]:
    found = ELEMENTS.match(line)
    if found is None:
        return []
    return [part.split(" ", 1)[0] for part in found.group(1).split(", ")]


def _die_with_parent() -> None:
    """nft gets SIGKILL when this watcher dies, even by SIGKILL: no orphaned monitors."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main() -> None:
    monitor = subprocess.Popen(
        ["nft", "monitor", "elements"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        preexec_fn=_die_with_parent,  # a prctl before exec; no other thread exists yet
    )
    seen: dict[str, float] = {}
    stop = threading.Event()
    told = threading.Event()

    def on_term(*_: object) -> None:
        told.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_term)

    def read() -> None:
        assert monitor.stdout is not None
        for line in monitor.stdout:
            now = time.monotonic()
            for address in addresses(line):
                seen.setdefault(address, now)
        stop.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.2)  # nft has subscribed by then (it does so before its first read)
    print("ready", flush=True)
    stop.wait()
    # nft gone before we were told to stop: it gave up (a netlink overrun), say why.
    monitor.kill()
    error = "" if told.is_set() or monitor.stderr is None else monitor.stderr.read()
    monitor.wait()
    reader.join(5)
    # What watching cost (this process and nft): the bench shares its CPUs with what it measures.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    print(json.dumps({"seen": seen, "error": error[-300:], "cpu": cpu}), flush=True)


if __name__ == "__main__":
    main()
