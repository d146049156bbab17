"""The systemd service protocol, with the standard library only.

* Readiness and status (sd_notify): datagrams such as ``READY=1`` to the socket
  named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).
* Watchdog: ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) ask for ``WATCHDOG=1``
  at least that often; we ping at half the interval, as sd_watchdog_enabled(3)
  recommends.
* Socket activation (sd_listen_fds): ``$LISTEN_FDS`` sockets start at fd 3,
  meant for us only if ``$LISTEN_PID`` is our pid; ``$LISTEN_FDNAMES`` names them.

Outside systemd every variable is absent and all of this does nothing. The
environment is passed in (not read globally) so tests can drive it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("imr.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The sockets systemd passed cannot be used; the message says what to change."""


# Notification ------------------------------------------------------------------


@dataclass(frozen=True)
class Notifier:
    """Sends sd_notify messages; a Notifier without an address does nothing."""

    address: str | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        value = environ.get("NOTIFY_SOCKET") or None
        if value is not None and not (value.startswith("/") or value.startswith("@")):
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract name", value)
            value = None
        return cls(value)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of NAME=value lines; False (logged once per call) if it fails.

        Never raises: a lost notification must not take the firewall broker down.
        """
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(message)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={_one_line(status)}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None if no watchdog is asked for."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # meant for another process (e.g. a wrapper that exec'd us)
    return int(usec) / 1_000_000 / 2


# Socket activation ---------------------------------------------------------------


@dataclass(frozen=True)
class PassedSocket:
    fd: int
    name: str


def listen_fds(environ: MutableMapping[str, str], pid: int) -> list[PassedSocket]:
    """The sockets systemd passed to this process; [] when not socket-activated.

    Removes the LISTEN_* variables (like sd_listen_fds(1)) so that the firewall
    tools we run do not believe the sockets are theirs, and marks the fds
    close-on-exec for the same reason.
    """
    count = environ.get("LISTEN_FDS", "")
    owner = environ.get("LISTEN_PID", "")
    names_text = environ.get("LISTEN_FDNAMES", "")
    for variable in LISTEN_VARIABLES:
        environ.pop(variable, None)
    if not count:
        return []
    if not count.isdigit() or not owner.isdigit():
        raise ActivationError(f"malformed LISTEN_FDS={count!r} LISTEN_PID={owner!r}")
    if int(owner) != pid:
        return []  # passed to another process (a wrapper); not ours
    names = names_text.split(":") if names_text else []
    passed = []
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        passed.append(PassedSocket(fd, names[index] if index < len(names) else "unknown"))
    return passed


def unix_listener_for(passed: list[PassedSocket], path: Path) -> socket.socket | None:
    """The passed listening Unix stream socket bound to `path`, as a socket object.

    None if systemd passed nothing. Refuses (ActivationError) when sockets were
    passed but none is the configured path: clients would look in the wrong place.
    Passed sockets that are not used are closed.
    """
    if not passed:
        return None
    chosen: socket.socket | None = None
    seen: list[str] = []
    for item in passed:
        sock = socket.socket(fileno=item.fd)
        where = _describe(sock)
        seen.append(f"fd {item.fd} ({item.name}): {where}")
        if (
            chosen is None
            and sock.family == socket.AF_UNIX
            and sock.type == socket.SOCK_STREAM
            and _is_listening(sock)
            and where == str(path)
        ):
            chosen = sock
        else:
            log.warning("ignoring a socket from systemd: fd %d (%s) %s", item.fd, item.name, where)
            sock.close()
    if chosen is None:
        raise ActivationError(
            f"systemd passed {len(passed)} socket(s) but none is a listening Unix stream socket"
            f" at server.socket = {path} ({'; '.join(seen)}); make ListenStream= in imr.socket"
            " and server.socket in the config name the same path"
        )
    return chosen


def _describe(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name else "unnamed"
    return str(name)


def _is_listening(sock: socket.socket) -> bool:
    with contextlib.suppress(OSError):
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    return False


def socket_file_mode(path: Path) -> tuple[int, int, int] | None:
    """(mode bits, uid, gid) of the socket file at path, or None if it is not a socket."""
    try:
        info = path.lstat()
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return None
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid
