"""The clock: plausible, synchronised, not stepping."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

from imr.doctor.findings import (
    Finding,
    iso,
    ok,
    problem,
    run,
    warning,
)
from imr.doctor.state import EARLIEST_PLAUSIBLE, LATEST_PLAUSIBLE

TIME_ERROR = 5  # adjtimex(2): the clock is not synchronised


def ntp_synchronised() -> bool | None:
    """What `timedatectl` calls NTPSynchronized: the kernel's view, from adjtimex(2)."""
    timedatectl = run(["timedatectl", "show", "--property=NTPSynchronized", "--value"])
    if timedatectl.returncode == 0 and timedatectl.stdout.strip() in ("yes", "no"):
        return timedatectl.stdout.strip() == "yes"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    buffer = ctypes.create_string_buffer(512)  # struct timex with modes = 0: read only
    state = libc.adjtimex(buffer)
    return None if state < 0 else state != TIME_ERROR


def check_clock(
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    synchronised: Callable[[], bool | None] = ntp_synchronised,
) -> list[Finding]:
    findings = []
    now = wall()
    if not EARLIEST_PLAUSIBLE <= now < LATEST_PLAUSIBLE:
        findings.append(
            problem(
                "clock",
                f"the clock says {iso(now)}, which cannot be right: blocks would expire at"
                " the wrong time",
                "set the clock (timedatectl set-ntp true, or date -s) and restart the daemon",
            )
        )
    wall0, mono0 = wall(), monotonic()
    time.sleep(0.2)
    drift = (wall() - wall0) - (monotonic() - mono0)
    if abs(drift) > 0.1:
        findings.append(
            warning(
                "clock",
                f"the wall clock moved {drift:+.2f}s against the monotonic clock in 0.2s:"
                " something is stepping it",
                "run one time service only (systemd-timesyncd, chrony or ntpd)",
            )
        )
    synced = synchronised()
    if synced is False:
        findings.append(
            warning(
                "clock",
                "the clock is not synchronised (NTP): block expiry follows the wall clock",
                "timedatectl set-ntp true (or install chrony)",
            )
        )
    if not findings:
        detail = {True: "NTP synchronised", None: "NTP state unknown"}[synced]
        findings.append(ok("clock", f"{iso(now)}, {detail}"))
    return findings
