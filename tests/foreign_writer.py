"""Another firewall user, run inside the server namespace next to the imr daemon.

    python foreign_writer.py ROUNDS

Each round adds its own objects and deletes them again with the ordinary tools:
an iptables rule in INPUT, a rule in its own chain FOREIGN, an IPv6 rule, an
element and a chain in its own nftables table, an entry in its own ipset. Any
command that fails (e.g. a delete because someone removed its rule) ends the
run with exit status 1 and the failing command on stderr. Bounded in rounds and
in time. Prints "done N" at the end.
"""

from __future__ import annotations

import subprocess
import sys
import time

TIME_LIMIT = 60.0  # seconds


def run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    if result.returncode != 0:
        sys.stderr.write(f"{' '.join(argv)} failed: {result.stderr.strip()}\n")
        sys.exit(1)


def one_round(n: int) -> None:
    churn = f"foreign-churn-{n}"
    run("iptables-nft", "-I", "INPUT", "2", "-s", "192.0.2.200", "-m", "comment",
        "--comment", churn, "-j", "ACCEPT")  # fmt: skip
    run("iptables-nft", "-A", "FOREIGN", "-s", "192.0.2.201", "-p", "udp", "-j", "RETURN")
    run("ip6tables-nft", "-A", "INPUT", "-s", "2001:db8:200::201", "-j", "ACCEPT")
    run("nft", f"add element inet foreign watch {{ 192.0.2.{n % 200 + 1} }}")
    run("nft", "add chain inet foreign churn; add rule inet foreign churn counter accept")
    run("ipset", "add", "foreign4", f"198.51.100.{n % 200 + 1}")
    time.sleep(0.05)  # let imr's changes interleave with ours
    run("iptables-nft", "-D", "INPUT", "-s", "192.0.2.200", "-m", "comment",
        "--comment", churn, "-j", "ACCEPT")  # fmt: skip
    run("iptables-nft", "-D", "FOREIGN", "-s", "192.0.2.201", "-p", "udp", "-j", "RETURN")
    run("ip6tables-nft", "-D", "INPUT", "-s", "2001:db8:200::201", "-j", "ACCEPT")
    run("nft", f"delete element inet foreign watch {{ 192.0.2.{n % 200 + 1} }}")
    run("nft", "flush chain inet foreign churn; delete chain inet foreign churn")
    run("ipset", "del", "foreign4", f"198.51.100.{n % 200 + 1}")


def main() -> None:
    rounds = int(sys.argv[1])
    deadline = time.monotonic() + TIME_LIMIT
    done = 0
    while done < rounds and time.monotonic() < deadline:
        one_round(done)
        done += 1
    print(f"done {done}", flush=True)


if __name__ == "__main__":
    main()
