"""How the nftables backend hands nft scripts to the kernel: one *transport* runs one
script (nft syntax) as one nf_tables transaction, all of it or nothing.

* LibNftables: libnftables.so.1 through ctypes, in-process. It keeps one *context*
  (libnftables' handle, holding a netlink socket) between calls, made anew when the
  calling thread is in another network namespace or process.
* NftCommand: `nft -f -`, one process per script, for hosts where the library cannot
  be loaded.

Nothing here knows imr's table; the backend (nftables.py) writes the scripts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass

from imr.backends.base import BackendError
from imr.netlink import where_we_are

TOOL_TIMEOUT = 60.0  # seconds for `nft -f -`; 100,000 elements take well under one
PACKAGE_HINT = "install the Debian package 'nftables' (apt-get install nftables)"
_JSON_OUTPUT = 1 << 4  # NFT_CTX_OUTPUT_JSON


class Transport(ABC):
    label: str

    @abstractmethod
    def run(self, script: str, json_output: bool = False) -> str:
        """Run `script` (nft syntax) as one transaction; its output, or BackendError."""

    def close(self) -> None:  # noqa: B027 - only a transport with handles needs it
        """Release what is kept between calls."""


class LibNftables(Transport):
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
        self._kept = _KeptContext()
        # A context is not thread-safe; the backend serialises too, this keeps run() safe alone.
        self._mutex = threading.Lock()
        # Free the kept context (releasing its namespace) when the transport goes away.
        weakref.finalize(self, self._kept.free, lib)

    def _context(self) -> int:
        """The kept context, made anew if this thread is in another namespace (or process)."""
        where = where_we_are()
        if self._kept.ctx is not None and where == self._kept.where:
            return self._kept.ctx
        self._kept.free(self._lib)
        ctx: int | None = self._lib.nft_ctx_new(0)  # its netlink socket is in this namespace
        if not ctx:
            raise BackendError("libnftables: could not create a context")
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        self._kept.ctx, self._kept.where = ctx, where
        return ctx

    def run(self, script: str, json_output: bool = False) -> str:
        lib = self._lib
        with self._mutex:
            ctx = self._context()
            lib.nft_ctx_output_set_flags(ctx, _JSON_OUTPUT if json_output else 0)
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            # Reading a buffer also empties it for the next call.
            output = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            if rc != 0:
                # Start the next call afresh: no socket or cache state outlives a failure.
                self._kept.free(lib)
        if len(script) > _TRIM_AFTER:
            _release_heap()
        if rc != 0:
            raise BackendError(f"nftables refused the change: {_trim(error)}")
        return output

    def close(self) -> None:
        with self._mutex:
            self._kept.free(self._lib)


# libnftables parses a 100,000-element script into ~50 MB of small allocations and frees
# them afterwards, but glibc keeps freed heap for reuse: the daemon's RSS would stay that
# much higher for its whole life. After a script this big, hand free heap back to the OS.
_TRIM_AFTER = 1 << 20  # bytes of script (~20,000 elements)


def _release_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


@dataclass
class _KeptContext:
    """A libnftables context kept between calls, and where it was made."""

    ctx: int | None = None
    where: tuple[int, str] | None = None  # (pid, namespace): netlink.where_we_are

    def free(self, lib: ctypes.CDLL) -> None:
        # A context inherited over fork is the parent's: only forgotten, never freed here.
        if self.ctx is not None and self.where is not None and self.where[0] == os.getpid():
            lib.nft_ctx_free(self.ctx)
        self.ctx = self.where = None


class NftCommand(Transport):
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
