"""The host's own addresses, read over netlink with pyroute2 and kept current.

A thread listens for RTM_NEWADDR/RTM_DELADDR and re-reads the whole list on
any change, so an address added while the daemon runs is protected at once.
pyroute2 objects are created and used only in that thread.
"""

from __future__ import annotations

import ipaddress
import logging
import threading

from imr.core.addresses import IPAddress

log = logging.getLogger("imr.local")


class LocalAddresses:
    def __init__(self) -> None:
        self._own: frozenset[IPAddress] = frozenset()
        self._broadcast: frozenset[IPAddress] = frozenset()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="imr-local-addresses", daemon=True)

    @property
    def own(self) -> frozenset[IPAddress]:
        return self._own

    @property
    def broadcast(self) -> frozenset[IPAddress]:
        return self._broadcast

    def start(self, timeout: float = 10.0) -> None:
        """Read the addresses once and keep watching; raise if netlink cannot be read."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("could not read the host's addresses over netlink in time")
        if self._error is not None:
            raise RuntimeError(f"cannot read the host's addresses: {self._error}")

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR

        try:
            watcher = IPRoute()
            watcher.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            # Subscribe before the first read, so no change can fall in between.
            self._refresh(IPRoute)
        except Exception as exc:  # reported to start(); the daemon refuses to run blind
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while not self._stopping.is_set():
            try:
                events = watcher.get()
                if any(e.get("event") in ("RTM_NEWADDR", "RTM_DELADDR") for e in events):
                    self._refresh(IPRoute)
            except Exception:
                log.exception("watching local addresses failed; keeping the last known list")
                self._stopping.wait(5)
        watcher.close()

    def _refresh(self, iproute_class: type) -> None:
        own: set[IPAddress] = set()
        broadcast: set[IPAddress] = set()
        with iproute_class() as ipr:
            for message in ipr.get_addr():
                for attr, target in (
                    ("IFA_ADDRESS", own),
                    ("IFA_LOCAL", own),
                    ("IFA_BROADCAST", broadcast),
                ):
                    value = message.get_attr(attr)
                    if value:
                        target.add(_plain(ipaddress.ip_address(value)))
        changed = own != self._own
        self._own, self._broadcast = frozenset(own), frozenset(broadcast)
        if changed:
            log.info("local addresses: %s", " ".join(sorted(str(a) for a in own)))


def _plain(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
