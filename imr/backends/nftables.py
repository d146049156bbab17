"""Blocked addresses as elements of two nftables hash sets, with kernel-side timeouts.

imr owns one table and nothing else:

    table inet imr {
        set blocked_v4 { type ipv4_addr; flags timeout; }
        set blocked_v6 { type ipv6_addr; flags timeout; }
        chain input {
            type filter hook input priority -10; policy accept;
            ip saddr @blocked_v4 tcp dport { 25, 80 } reject with icmp type host-unreachable
            ip6 saddr @blocked_v6 tcp dport { 25, 80 } reject with icmpv6 type addr-unreachable
        }
    }

A packet costs one hash lookup per family however many addresses are blocked,
and each element carries the block's remaining time as its timeout, so the
kernel lifts a block on time even while the daemon is down.

Priority -10 runs the chain before every filter-priority (0) chain: iptables'
INPUT in both flavours and the usual `inet filter` table. An accept elsewhere
never overrides a reject here anyway (a drop is final in nftables); running
first only means a blocked packet is refused before other rulesets spend time
on it, as the iptables backend's jump at INPUT position 1 does.

Every change is one nftables transaction (all or nothing), run in-process
through libnftables (the library behind `nft`) via ctypes, or through
`nft -f -` if the library cannot be loaded. A libnftables context opens its
netlink socket when it is created, so a fresh one is made for every call: it
then always acts in the calling thread's network namespace.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import math
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from imr.backends.base import Backend, BackendError, KernelBlock
from imr.config import FirewallConfig
from imr.core.addresses import IPAddress

log = logging.getLogger("imr.backend")

TABLE = "imr"
FAMILY = "inet"
CHAIN = "input"
PRIORITY = -10
SETS: dict[int, str] = {4: "blocked_v4", 6: "blocked_v6"}
TOOL_TIMEOUT = 60.0  # seconds for `nft -f -`; 100,000 elements take well under one
PACKAGE_HINT = "install the Debian package 'nftables' (apt-get install nftables)"
# The kernel keeps timeouts in milliseconds in 64 bits; a longer block gets no timeout
# (the broker lifts it) rather than a wrapped or refused one.
MAX_TIMEOUT = (2**64 - 1) // 1000 // 1000

_REJECT_V4 = {
    "icmp-host-unreachable": "reject with icmp type host-unreachable",
    "icmp-port-unreachable": "reject with icmp type port-unreachable",
    "icmp-net-unreachable": "reject with icmp type net-unreachable",
    "icmp-admin-prohibited": "reject with icmp type admin-prohibited",
    "tcp-reset": "reject with tcp reset",
}
_REJECT_V6 = {
    "icmp6-addr-unreachable": "reject with icmpv6 type addr-unreachable",
    "icmp6-port-unreachable": "reject with icmpv6 type port-unreachable",
    "icmp6-adm-prohibited": "reject with icmpv6 type admin-prohibited",
    "icmp6-no-route": "reject with icmpv6 type no-route",
    "tcp-reset": "reject with tcp reset",
}
_JSON_OUTPUT = 1 << 4  # NFT_CTX_OUTPUT_JSON


# ---------------------------------------------------------------------------
# Transports: both run one nft script as one transaction


class _Transport(ABC):
    label: str

    @abstractmethod
    def run(self, script: str, json_output: bool = False) -> str:
        """Run `script` (nft syntax) as one transaction; its output, or BackendError."""


class _LibNftables(_Transport):
    """libnftables.so.1 through ctypes: no process per change, nothing beyond libnftables1."""

    label = "libnftables, in-process"

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnftables.so.1")  # OSError if missing: the caller falls back
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib

    def run(self, script: str, json_output: bool = False) -> str:
        lib = self._lib
        ctx = lib.nft_ctx_new(0)  # opens its netlink socket in this thread's namespace
        if not ctx:
            raise BackendError("libnftables: could not create a context")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            if json_output:
                lib.nft_ctx_output_set_flags(ctx, _JSON_OUTPUT)
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lib.nft_ctx_free(ctx)
        if rc != 0:
            raise BackendError(f"nftables refused the change: {_trim(error)}")
        return output


class _NftCommand(_Transport):
    """`nft -f -` with the script on stdin, for hosts where the library cannot be loaded."""

    label = "nft -f -"

    def __init__(self) -> None:
        if shutil.which("nft") is None:
            raise BackendError(f"neither libnftables.so.1 nor nft found: {PACKAGE_HINT}")

    def run(self, script: str, json_output: bool = False) -> str:
        # With -j, nft also reads its input as JSON: listings (plain words) go as arguments.
        argv = ["nft", "-j", *script.split()] if json_output else ["nft", "-f", "-"]
        stdin = None if json_output else script
        try:
            result = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"nft could not be run: {exc}") from None
        if result.returncode != 0:
            raise BackendError(f"nftables refused the change: {_trim(result.stderr)}")
        return result.stdout


def _trim(text: str, limit: int = 400) -> str:
    """The "Error: ..." lines, without the echoed script (which may hold 100,000 addresses)."""
    lines = [line.strip() for line in text.splitlines()]
    errors = [line for line in lines if line.startswith("Error:") or ": Error:" in line]
    message = " / ".join(errors or [line for line in lines if line][:1]) or "(no message)"
    return message if len(message) <= limit else message[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# The script pieces


def _rules(config: FirewallConfig) -> dict[int, str]:
    """The reject rule for each family, from the same settings as the iptables backend."""
    protocol = None if config.protocol == "all" else config.protocol
    match = ""
    if config.ports:
        ports = ", ".join(_port(spec) for spec in config.ports)
        match = f" {protocol} dport {{ {ports} }}"
    elif protocol:
        match = f" meta l4proto {protocol}"
    return {
        4: f"ip saddr @{SETS[4]}{match} {_REJECT_V4[config.reject_with_ipv4]}",
        6: f"ip6 saddr @{SETS[6]}{match} {_REJECT_V6[config.reject_with_ipv6]}",
    }


def _port(spec: str) -> str:
    low, _, high = spec.partition(":")
    if not high or int(high) == int(low):
        return str(int(low))
    return f"{int(low)}-{int(high)}"


def _timeout(seconds: int) -> str:
    # nft's parser refuses a number of more than 8 digits in one unit ("value too large"),
    # so far expiries are written as days plus seconds.
    return f" timeout {seconds // 86400}d{seconds % 86400}s"


def _element(address: IPAddress, expires_at: float, now: float) -> str:
    remaining = math.ceil(expires_at - now)
    return f"{address}{_timeout(remaining) if remaining <= MAX_TIMEOUT else ''}"


def _elements(set_name: str, elements: Sequence[str], verb: str = "add") -> str:
    return f"{verb} element {FAMILY} {TABLE} {set_name} {{ {', '.join(elements)} }}\n"


def _addresses_in(listing: Any) -> list[IPAddress]:
    """Addresses of every set element in `nft -j list ...` output."""
    found: list[IPAddress] = []
    for item in listing.get("nftables", []):
        for entry in item.get("set", {}).get("elem", []):
            value = entry["elem"]["val"] if isinstance(entry, dict) else entry
            if isinstance(value, str):
                found.append(ipaddress.ip_address(value))
    return found


# ---------------------------------------------------------------------------
# The backend


class NftablesBackend(Backend):
    name = "nftables"

    def __init__(self, config: FirewallConfig, use_library: bool = True) -> None:
        """`use_library=False` forces `nft -f -` (the fallback), for tests and comparison."""
        self.config = config
        self._rules = _rules(config)
        self._transport: _Transport
        why = ""
        if use_library:
            try:
                self._transport = _LibNftables()
            except OSError as exc:
                why = f"; libnftables.so.1 not loadable: {exc}"
                self._transport = _NftCommand()
        else:
            self._transport = _NftCommand()
        self._via = self._transport.label + why
        # One change at a time: the structure check and the retry must not interleave.
        self._lock = threading.Lock()

    def describe(self) -> str:
        return (
            f"nftables (table {FAMILY} {TABLE}: hash sets {SETS[4]}/{SETS[6]} with "
            f"kernel-side timeouts, one lookup per packet at any size; via {self._via})"
        )

    def _structure(self) -> str:
        """Creates what is missing and rewrites the two rules; set elements are kept."""
        return (
            f"add table {FAMILY} {TABLE}\n"
            f"add set {FAMILY} {TABLE} {SETS[4]} {{ type ipv4_addr; flags timeout; }}\n"
            f"add set {FAMILY} {TABLE} {SETS[6]} {{ type ipv6_addr; flags timeout; }}\n"
            f"add chain {FAMILY} {TABLE} {CHAIN} "
            f"{{ type filter hook input priority {PRIORITY}; policy accept; }}\n"
            f"flush chain {FAMILY} {TABLE} {CHAIN}\n"
            f"add rule {FAMILY} {TABLE} {CHAIN} {self._rules[4]}\n"
            f"add rule {FAMILY} {TABLE} {CHAIN} {self._rules[6]}\n"
        )

    def prepare(self) -> None:
        with self._lock:
            self._transport.run(self._structure())

    def apply(self, add: Sequence[KernelBlock], remove: Sequence[IPAddress]) -> None:
        now = time.time()
        latest: dict[IPAddress, float] = {}
        for block in add:
            latest[block.address] = max(
                block.expires_at, latest.get(block.address, block.expires_at)
            )
        # A block that has already expired is not put in; it is taken out if still there.
        expired = [address for address, expires_at in latest.items() if expires_at <= now]
        adding = {address: at for address, at in latest.items() if at > now}
        removing = [a for a in dict.fromkeys([*remove, *expired]) if a not in adding]
        script = ""
        for family, set_name in SETS.items():
            gone = [str(a) for a in removing if a.version == family]
            new = [a for a in adding if a.version == family]
            # Deleting an absent element aborts the whole transaction and nft 1.0.6 has no
            # `destroy`; adding first (a no-op for a present element) makes the delete always
            # valid. Re-adding does not change a present element's timeout either, so every
            # added address is deleted and added again with its own timeout (an escalation).
            touched = gone + [str(a) for a in new]
            if touched:
                script += _elements(set_name, touched)
                script += _elements(set_name, touched, "delete")
            if new:
                script += _elements(set_name, [_element(a, adding[a], now) for a in new])
        if not script:
            return
        with self._lock:
            try:
                self._transport.run(script)
            except BackendError:
                if self._complete():
                    raise
                # Someone deleted imr's table (or a part of it): build it again, then retry.
                log.warning("nftables table %s %s is incomplete; creating it again", FAMILY, TABLE)
                self._transport.run(self._structure() + script)

    def replace_all(self, blocks: Sequence[KernelBlock]) -> None:
        now = time.time()
        latest: dict[IPAddress, float] = {}
        for block in blocks:
            latest[block.address] = max(
                block.expires_at, latest.get(block.address, block.expires_at)
            )
        script = self._structure()
        for family, set_name in SETS.items():
            script += f"flush set {FAMILY} {TABLE} {set_name}\n"
            elements = [
                _element(a, at, now) for a, at in latest.items() if a.version == family and at > now
            ]
            if elements:
                script += _elements(set_name, elements)
        with self._lock:
            self._transport.run(script)  # one transaction: the old and new sets never mix

    def installed(self) -> set[IPAddress]:
        with self._lock:
            if not self._has_table():
                return set()
            found: set[IPAddress] = set()
            for family, set_name in SETS.items():
                listing = self._list(f"list set {FAMILY} {TABLE} {set_name}", missing_ok=True)
                found.update(a for a in _addresses_in(listing) if a.version == family)
            return found

    def teardown(self) -> None:
        with self._lock:
            # "add" first so that the delete is valid whether or not the table exists.
            self._transport.run(f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")

    # -- reading ---------------------------------------------------------------

    def _list(self, command: str, missing_ok: bool = False) -> Any:
        try:
            output = self._transport.run(command, json_output=True)
        except BackendError:
            if missing_ok:
                return {}
            raise
        try:
            return json.loads(output)
        except ValueError as exc:
            raise BackendError(f"unreadable nft JSON output: {exc}") from None

    def _has_table(self) -> bool:
        listing = self._list(f"list tables {FAMILY}")
        return any(
            item.get("table", {}).get("name") == TABLE for item in listing.get("nftables", [])
        )

    def _complete(self) -> bool:
        """Whether imr's table has both sets and its chain."""
        if not self._has_table():
            return False
        listing = self._list(f"list table {FAMILY} {TABLE}", missing_ok=True)
        names = {
            (kind, item[kind].get("name"))
            for item in listing.get("nftables", [])
            for kind in ("set", "chain")
            if kind in item
        }
        return {("set", SETS[4]), ("set", SETS[6]), ("chain", CHAIN)} <= names
