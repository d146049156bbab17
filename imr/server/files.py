"""The daemon's own files, opened so that nobody else can steer where root writes.

The daemon runs as root and writes a pid file, a log file, a state file (with
SQLite's `-wal` and `-shm` beside it) and a Unix socket, in directories an
administrator chose. Each is opened the same careful way:

* *never follow*: a symbolic link where a file should be is refused (O_NOFOLLOW),
  so a link planted in a writable directory cannot make root truncate, append to
  or chmod the file it points at;
* *owned*: a file that already exists must be a regular file with one link,
  owned by the daemon's own user; one that another user created is refused;
* *private first*: files are created owner-only and then given their mode
  (fchmod on the open descriptor, not chmod on a path that can be swapped);
* the socket is bound in a fresh directory only the daemon can enter, given its
  group and mode there, and renamed into place: nobody can swap it between the
  bind and the chmod.

A refusal is a FileError whose message names the file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
import tempfile
from pathlib import Path

LOG_FILE_MODE = 0o640
LOG_GROUP = "adm"  # Debian's group for reading logs (logrotate's `create 0640 root adm`)


class FileError(Exception):
    """One of the daemon's files cannot be used safely; the message says which and why."""


def make_dirs(path: Path, mode: int) -> None:
    """Create `path` and missing parents with exactly `mode` (the umask would narrow it)."""
    missing: list[Path] = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        except OSError as exc:
            raise FileError(f"cannot create the directory {directory}: {exc.strerror}") from None
        os.chmod(directory, mode)


def open_owned(path: Path, flags: int, mode: int) -> tuple[int, bool]:
    """Open (or create with `mode`) a regular file of the daemon's own; (fd, created).

    Refuses a symbolic link, anything but a regular file, a file with several
    hard links, and a file another user owns.
    """
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    created = True
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        created = False
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise _refusal(path, exc) from None
    except OSError as exc:
        raise _refusal(path, exc) from None
    try:
        if not created:
            check_owned(path, os.fstat(fd))
        else:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def check_owned(path: Path, info: os.stat_result | None = None) -> None:
    """Refuse (FileError) unless `path` is absent or a regular file the daemon's user owns."""
    if info is None:
        try:
            info = path.lstat()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise FileError(f"{path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise FileError(f"{path} is a symbolic link; refusing to follow it (remove the link)")
    if not stat.S_ISREG(info.st_mode):
        raise FileError(f"{path} exists and is not a regular file; refusing to use it")
    euid = os.geteuid()
    if info.st_uid != euid:
        raise FileError(
            f"{path} belongs to uid {info.st_uid}, not to the daemon's user (uid {euid}):"
            " someone else created it; check its content, then remove it or chown it"
        )
    if info.st_nlink > 1:
        raise FileError(
            f"{path} has {info.st_nlink} hard links; refusing to write through them"
            " (remove the other names, or the file)"
        )


def _refusal(path: Path, exc: OSError) -> FileError:
    if exc.errno == errno.ELOOP:
        return FileError(f"{path} is a symbolic link; refusing to follow it (remove the link)")
    return FileError(f"cannot open {path}: {exc.strerror}")


def open_log(path: Path) -> int:
    """The log file for appending: mode 0640, group adm when the daemon creates it as root."""
    make_dirs(path.parent, 0o755)
    fd, created = open_owned(path, os.O_WRONLY | os.O_APPEND, LOG_FILE_MODE)
    try:
        os.fchmod(fd, LOG_FILE_MODE)  # also narrows a log an older imr left 0644
        if created and os.geteuid() == 0:
            with contextlib.suppress(KeyError, OSError):
                os.fchown(fd, 0, grp.getgrnam(LOG_GROUP).gr_gid)
    except OSError as exc:
        os.close(fd)
        raise FileError(f"cannot set the mode of {path}: {exc.strerror}") from None
    return fd


def bind_unix_socket(path: Path, mode: int, group_id: int | None) -> socket.socket:
    """A listening Unix stream socket at `path` with `mode` and group from the first moment.

    Bound in a new directory only we can enter (mode 0700), chowned and chmodded
    there, then renamed over `path` (rename never follows a link at the target).
    Every step goes through descriptors of the two directories, so renaming or
    replacing them by path (in a parent others may write) changes nothing we touch.
    """
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        private_path = tempfile.mkdtemp(prefix=".imr-", dir=path.parent)
        private = os.open(private_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(private)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
                raise OSError(errno.EPERM, "the private directory was replaced")
            return _bind_in(private, parent, path.name, mode, group_id)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(private_path)
            os.close(private)
    finally:
        os.close(parent)


def _bind_in(
    private: int, parent: int, name: str, mode: int, group_id: int | None
) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"/proc/self/fd/{private}/s")  # resolved through our descriptor
        if group_id is not None:
            os.chown("s", -1, group_id, dir_fd=private)
        os.chmod("s", mode, dir_fd=private)
        sock.listen(128)
        os.rename("s", name, src_dir_fd=private, dst_dir_fd=parent)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink("s", dir_fd=private)
        raise
    return sock
