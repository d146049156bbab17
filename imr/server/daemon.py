"""The daemon's life cycle: pid file, background start with readiness, signals, shutdown.

`imr server start` forks into the background and returns only once the
daemon listens (or with the daemon's own error message); `--foreground` runs
in the calling process for systemd and containers. A clean stop leaves every
block in the kernel and the state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from imr.backends import make_backend
from imr.backends.base import Backend, BackendError
from imr.config import Config
from imr.core.clock import SystemClock
from imr.server.adopt import KernelNotEmpty, check_kernel_against_state
from imr.server.broker import Broker, BrokerError
from imr.server.files import FileError, make_dirs, open_log, open_owned
from imr.server.jsonlog import use_log_format
from imr.server.listener import Listener, ListenerError, UnixListener
from imr.server.local_addresses import LocalAddresses
from imr.server.metrics import MetricsError, MetricsServer
from imr.server.reload import Reloader
from imr.server.systemd import (
    ActivationError,
    Notifier,
    listen_fds,
    unix_listener_for,
    watchdog_interval,
)
from imr.server.tcp_listener import TcpListener
from imr.store import Store, StoreError

log = logging.getLogger("imr.daemon")

READY_TIMEOUT = 60.0


class DaemonError(Exception):
    """The daemon cannot start or stop; the message says why and what to do."""


class DaemonNotRunning(DaemonError):
    """No daemon holds the pid file (`imr server stop` and `reload` exit 3)."""


# Running ----------------------------------------------------------------------


def run_foreground(
    config: Config,
    on_ready: Callable[[], None] = lambda: None,
    *,
    adopt_kernel: bool = False,
    reload_config: Callable[[], Config] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT. Raises DaemonError if start-up fails.

    `adopt_kernel`: record the blocks found in the kernel when the state file is new
    (see check_kernel_against_state). `reload_config` reads the configuration again
    for SIGHUP (raises ConfigError); without it SIGHUP only reopens the log.
    """
    os.umask(0o077)  # every file the daemon creates starts private (files.py widens it)
    # SIGHUP reloads once the daemon serves (reload.py); until then it must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    use_log_format(config.server.log_format)
    if config.firewall.backend != "dryrun" and os.geteuid() != 0:
        raise DaemonError(
            "the daemon must run as root to change the firewall"
            ' (or set firewall.backend = "dryrun" to try it without root)'
        )
    # systemd (contrib/systemd): readiness and watchdog over $NOTIFY_SOCKET, and
    # the listening socket from imr.socket; all absent outside systemd.
    notifier = Notifier.from_environ(os.environ)
    try:
        inherited = unix_listener_for(listen_fds(os.environ, os.getpid()), config.server.socket)
    except ActivationError as exc:
        raise DaemonError(str(exc)) from None
    with _pid_file(config.server.pid_file):
        store = _open_store(config)
        backend: Backend | None = None
        local = LocalAddresses()
        try:
            selection = make_backend(config.firewall)
            backend = selection.backend
            log.info("firewall backend %s: %s", backend.name, selection.why)
            check_kernel_against_state(config, store, backend, SystemClock().now(), adopt_kernel)
            local.start()
            broker = Broker(config, store, backend, SystemClock(), local, selection.why)
            notifier.status("starting: putting active blocks back into the kernel")
            _reconcile(config, broker)
            _tune_garbage_collector()
            asyncio.run(_serve(config, broker, on_ready, notifier, inherited, reload_config))
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the loop's close restored SIG_DFL
        except BackendError as exc:
            raise DaemonError(f"firewall backend: {exc}") from None
        except (ListenerError, MetricsError, KernelNotEmpty) as exc:
            raise DaemonError(str(exc)) from None
        except sqlite3.DatabaseError as exc:
            raise DaemonError(_damaged(config, exc)) from None
        except RuntimeError as exc:
            raise DaemonError(str(exc)) from None
        finally:
            local.stop()
            if backend is not None:
                backend.close()
            store.close()
    log.info("stopped; blocks stay in force in the kernel and the state file")


def _reconcile(config: Config, broker: Broker) -> None:
    """broker.reconcile(), with a damaged state file named (it reads every active row
    before it changes the kernel, so the kernel is untouched when this refuses)."""
    try:
        broker.reconcile()
    except (sqlite3.DatabaseError, ValueError) as exc:
        raise DaemonError(_damaged(config, exc)) from None


def _damaged(config: Config, exc: Exception) -> str:
    return (
        f"state file {config.state.path} is damaged: {exc}; restore it from a backup or"
        " move it aside (docs/operations.md, state-file recovery)"
    )


def _tune_garbage_collector() -> None:
    """Keep Python's cycle collector from walking every active block again and again.

    The daemon holds one record (and index, heap and quota entries) per active block:
    100,000 of them are ~400,000 tracked objects, and a flood that adds blocks makes the
    collector run full passes over all of them (a flood of 66,000 blocks: 0.47 s of
    ~4.4 s of CPU, 7 full passes). The restored blocks are frozen out of the collector
    (they are freed by reference counting as usual when they expire), and it runs less
    often: the daemon makes few reference cycles (an exception's traceback, say).
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _serve(
    config: Config,
    broker: Broker,
    on_ready: Callable[[], None],
    notifier: Notifier | None = None,
    inherited: socket.socket | None = None,
    reload_config: Callable[[], Config] | None = None,
) -> None:
    notifier = notifier or Notifier(None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await broker.start()
    listeners: list[Listener] = [
        UnixListener(
            config.server, config.access, broker.handle, BrokerError, inherited, broker.submit_block
        )
    ]
    if config.server.tcp.enabled:  # off by default: clients on other hosts (tcp_listener.py)
        listeners.append(TcpListener(config.server, config.access, broker.handle, BrokerError))
    reloader = Reloader(config, reload_config, _reopen_log, [broker, *listeners])
    loop.add_signal_handler(signal.SIGHUP, reloader.reload)
    watchdog: asyncio.Task[None] | None = None
    # Prometheus endpoint (off by default) in its own threads: scrapes never wait on the loop.
    metrics = MetricsServer(config.metrics, broker.metrics) if config.metrics.enabled else None
    try:
        if metrics is not None:
            metrics.start()
        for listener in listeners:
            await listener.start()
        status = broker.status()
        log.info(
            "ready: pid %d, %s, %d active blocks",
            os.getpid(),
            status["backend_detail"],
            status["active_blocks"],
        )
        on_ready()
        # READY=1 only now: the socket accepts requests and the kernel holds every block.
        notifier.ready(f"serving: {status['backend_detail']}, {status['active_blocks']} active")
        interval = watchdog_interval(os.environ, os.getpid())
        if interval is not None:
            watchdog = asyncio.create_task(_watchdog(notifier, interval))
        await stop.wait()
        log.info("stopping")
        notifier.stopping()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if metrics is not None:
            metrics.stop()
        for listener in reversed(listeners):
            await listener.close()
        await broker.stop()


def _reopen_log(config: Config) -> None:
    reopen_log_files(config.server.log_file)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop: if the loop hangs, systemd restarts the daemon."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _open_store(config: Config) -> Store:
    try:
        return Store(config.state.path)
    except StoreError as exc:
        raise DaemonError(str(exc)) from None
    except OSError as exc:
        raise DaemonError(f"{config.state.path}: {exc.strerror}") from None


@contextlib.contextmanager
def _pid_file(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the pid file for the daemon's lifetime: one daemon per file.

    The lock also tells `imr server stop` that the pid in the file is the daemon's
    (daemon_pid). Opened without following links and only if it is our own file (files.py).
    """
    try:
        make_dirs(path.parent, 0o755)
        fd, _ = open_owned(path, os.O_RDWR, 0o644)
    except FileError as exc:
        raise DaemonError(f"pid file: {exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise DaemonError(
                f"imr is already running (pid {other or '?'}, pid file {path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


# Background start ---------------------------------------------------------------


def start_background(
    config: Config,
    configure_logging: Callable[[Path | None], None],
    **options: Any,
) -> int:
    """Fork a daemon; return its pid once it is ready, or raise with its error.

    `options` are run_foreground's keyword options (adopt_kernel, reload_config).
    """
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        _become_daemon(config, configure_logging, write_end, options)
    os.close(write_end)
    os.waitpid(first, 0)  # the intermediate child exits at once
    message = _read_all(read_end, READY_TIMEOUT)
    os.close(read_end)
    if message.startswith("ready "):
        return int(message.split()[1])
    raise DaemonError(message or "the daemon exited before it was ready; see its log")


def _become_daemon(  # pragma: no cover - runs in the child
    config: Config,
    configure_logging: Callable[[Path | None], None],
    ready_fd: int,
    options: dict[str, Any],
) -> None:
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    code = 0
    try:
        configure_logging(config.server.log_file)

        def ready() -> None:
            os.write(ready_fd, f"ready {os.getpid()}".encode())
            os.close(ready_fd)

        run_foreground(config, ready, **options)
    except DaemonError as exc:
        log.error("%s", exc)
        _write_quietly(ready_fd, str(exc))
        code = 1
    except Exception as exc:
        log.exception("daemon failed")
        _write_quietly(ready_fd, f"the daemon failed: {exc}")
        code = 1
    os._exit(code)


def _write_quietly(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, text.encode())


def _read_all(fd: int, timeout: float) -> str:
    import select

    deadline = time.monotonic() + timeout
    chunks = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


# Stop ---------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, PermissionError):
        return None
    return int(text) if text.isdigit() else None


def is_imr_process(pid: int) -> bool:
    """Guard against a stale pid file naming a recycled pid of another program."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"imr" in cmdline


def daemon_pid(path: Path) -> int | None:
    """The pid of the daemon that holds the pid file's lock, or None if none does.

    A pid file nobody holds locked is stale, whatever its pid runs now, and the
    pid must be the lock's holder as /proc/locks names it (a command line that
    merely contains "imr" proves nothing). Reading /proc/locks takes no lock, so
    a daemon starting at this moment is not disturbed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        holders = _flock_holders(info)
        if holders is None:  # no /proc/locks: is the lock held at all?
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holders = {int(text)} if text.isdigit() else set()
            else:
                holders = set()
    finally:
        os.close(fd)
    if not text.isdigit() or int(text) not in holders:
        return None
    return int(text)


def _flock_holders(info: os.stat_result) -> set[int] | None:
    """Pids holding a flock on the file (from /proc/locks), or None if it cannot be read."""
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    holders = set()
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after "1:"
        if fields[1:2] == ["FLOCK"] and fields[5:6] == [device] and fields[4].isdigit():
            holders.add(int(fields[4]))
    return holders


def stop_daemon(config: Config, timeout: float = 20.0) -> int:
    pid = _running_pid(config)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return pid
        time.sleep(0.05)
    raise DaemonError(f"imr (pid {pid}) did not stop within {timeout:.0f}s")


def reload_daemon(config: Config) -> int:
    """Send SIGHUP to the daemon (reload.py says what it does); its pid."""
    pid = _running_pid(config)
    os.kill(pid, signal.SIGHUP)
    return pid


def _running_pid(config: Config) -> int:
    pid = daemon_pid(config.server.pid_file)
    if pid is None:
        raise DaemonNotRunning(
            f"imr is not running (no daemon holds the pid file {config.server.pid_file})"
        )
    return pid


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def configure_logging(log_file: Path | None, level: int = logging.INFO) -> None:
    """Plain lines to stderr (journald adds time) or, in the background, to a file.

    The file is opened as files.open_log does (no links, our own, 0640 root:adm);
    a FileError becomes a DaemonError.
    """
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = LogFileHandler(log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    root = logging.getLogger("imr")
    root.handlers[:] = [handler]
    root.setLevel(level)


class LogFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to a log file that reopen() opens anew (after logrotate renamed it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._open(path))

    @staticmethod
    def _open(path: Path) -> TextIO:
        try:
            fd = open_log(path)
        except FileError as exc:
            raise DaemonError(f"log file: {exc}") from None
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def reopen(self, path: Path | None = None) -> None:
        """Switch to a freshly opened file at `path` (default: the same name); raises
        DaemonError and keeps the old file if it cannot be opened."""
        stream = self._open(path or self.path)
        self.acquire()
        try:
            old, self.stream = self.stream, stream
            self.path = path or self.path
        finally:
            self.release()
        with contextlib.suppress(OSError):
            old.close()

    def close(self) -> None:
        self.acquire()
        try:
            with contextlib.suppress(OSError):
                self.stream.close()
        finally:
            self.release()
        super().close()


def reopen_log_files(log_file: Path | None = None) -> None:
    """Reopen the daemon's log file, if it logs to one (SIGHUP, after a rotation)."""
    for handler in logging.getLogger("imr").handlers:
        if isinstance(handler, LogFileHandler):
            handler.reopen(log_file)
