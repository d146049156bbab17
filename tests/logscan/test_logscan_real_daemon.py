"""The log follower against the real daemon: a line written to a log becomes a kernel block.

`imr watch` runs as an unprivileged user (the block role), the daemon as root
with the iptables backend inside a throwaway namespace (tests/daemon_harness.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from daemon_harness import (
    ATTACKER_V4,
    BLOCKER,
    SERVER_V4,
    daemon_world,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
    pytest.mark.usefixtures("test_users"),
]

DFIND = (
    f'{ATTACKER_V4} - - [30/Jan/2009:13:36:51 -0500] "GET /w00tw00t.at.ISC.SANS.DFind:) HTTP/1.1"'
    ' 400 311 "-" "-"\n'
)


def test_watch_turns_a_log_line_into_a_kernel_block() -> None:
    with daemon_world() as world:
        world.write_config()
        assert world.start().returncode == 0
        world.listen(80)
        log = world.root / "access.log"
        log.write_text("")
        log.chmod(0o644)
        # --from-start: the log is empty now, so the line below is read however long the
        # watcher takes to start on a loaded machine (at the end, it could start after it).
        argv = ["runuser", "-u", BLOCKER, "--", *world.imr_argv("watch", "--from-start", str(log))]
        watcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)  # let it start and watch the file
            assert watcher.poll() is None, watcher.communicate()
            with open(log, "a") as f:
                f.write(DFIND)
            written = time.monotonic()
            blocked = world.wait_for(lambda: f"-s {ATTACKER_V4}/32" in world.rules(4), timeout=5)
            latency = time.monotonic() - written
            assert blocked, world.log_file.read_text()
            print(f"log write to kernel rule (incl. polling iptables): {latency * 1000:.0f} ms")
            assert world.probe(world.attacker, SERVER_V4, 80) == "EHOSTUNREACH"
            shown = world.as_root("show", ATTACKER_V4, "--json")
            assert '"source": "logscan:dfind"' in shown.stdout
        finally:
            watcher.terminate()
            out, _ = watcher.communicate(timeout=10)
        expires = json.loads(shown.stdout)["active"]["expires_at"]
        assert f"blocked {ATTACKER_V4} dfind" in out and f"(until {expires})" in out, out
