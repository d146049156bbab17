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
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from imr.backends import make_backend
from imr.backends.base import Backend, BackendError
from imr.config import Config
from imr.core.clock import SystemClock
from imr.server.broker import Broker, BrokerError
from imr.server.jsonlog import use_log_format
from imr.server.listener import Listener, ListenerError, UnixListener
from imr.server.local_addresses import LocalAddresses
from imr.server.metrics import MetricsError, MetricsServer
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


# Running ----------------------------------------------------------------------


def run_foreground(config: Config, on_ready: Callable[[], None] = lambda: None) -> None:
    """Run until SIGTERM/SIGINT. Raises DaemonError if start-up fails."""
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
            local.start()
            broker = Broker(config, store, backend, SystemClock(), local, selection.why)
            notifier.status("starting: putting active blocks back into the kernel")
            broker.reconcile()
            _tune_garbage_collector()
            asyncio.run(_serve(config, broker, on_ready, notifier, inherited))
        except BackendError as exc:
            raise DaemonError(f"firewall backend: {exc}") from None
        except (ListenerError, MetricsError) as exc:
            raise DaemonError(str(exc)) from None
        except RuntimeError as exc:
            raise DaemonError(str(exc)) from None
        finally:
            local.stop()
            if backend is not None:
                backend.close()
            store.close()
    log.info("stopped; blocks stay in force in the kernel and the state file")


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
) -> None:
    notifier = notifier or Notifier(None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await broker.start()
    listeners: list[Listener] = [
        UnixListener(config.server, config.access, broker.handle, BrokerError, inherited)
    ]
    if config.server.tcp.enabled:  # off by default: clients on other hosts (tcp_listener.py)
        listeners.append(TcpListener(config.server, config.access, broker.handle, BrokerError))
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
    """Hold an exclusive lock on the pid file for the daemon's lifetime: one daemon per file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


def start_background(config: Config, configure_logging: Callable[[Path | None], None]) -> int:
    """Fork a daemon; return its pid once it is ready, or raise with its error."""
    read_end, write_end = os.pipe()
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        _become_daemon(config, configure_logging, write_end)
    os.close(write_end)
    os.waitpid(first, 0)  # the intermediate child exits at once
    message = _read_all(read_end, READY_TIMEOUT)
    os.close(read_end)
    if message.startswith("ready "):
        return int(message.split()[1])
    raise DaemonError(message or "the daemon exited before it was ready; see its log")


def _become_daemon(  # pragma: no cover - runs in the child
    config: Config, configure_logging: Callable[[Path | None], None], ready_fd: int
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

        run_foreground(config, ready)
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


def stop_daemon(config: Config, timeout: float = 20.0) -> int:
    pid = read_pid(config.server.pid_file)
    if pid is None or not is_imr_process(pid):
        raise DaemonError(f"imr is not running (no live pid in {config.server.pid_file})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return pid
        time.sleep(0.05)
    raise DaemonError(f"imr (pid {pid}) did not stop within {timeout:.0f}s")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def configure_logging(log_file: Path | None, level: int = logging.INFO) -> None:
    """Plain lines to stderr (journald adds time) or, in the background, to a file."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        )
    root = logging.getLogger("imr")
    root.handlers[:] = [handler]
    root.setLevel(level)
