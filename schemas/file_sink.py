"""How the store's shard files reach the disk (issue #2: writing at the disk's bandwidth).

Three write modes, all giving the same bytes in the file:

* ``buffered``: plain ``writev`` calls into the page cache; the part's flush
  (:func:`schemas.store.fsync_tree`, before its seal) waits for the disk to take them all.
* ``streamed``: the same writes, and after each one the kernel is told to start writing those
  pages back at once (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the disk works while the
  part is still being written instead of all at the flush.  Buffered where the call is missing.
* ``direct``: ``O_DIRECT`` writes that skip the page cache, through a page-aligned staging
  buffer: whole aligned blocks are written as the staging buffer fills, the last block zero-padded,
  and the file then cut to its length.  Where the file system refuses ``O_DIRECT`` (tmpfs) the
  same aligned writes go through the page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from pathlib import Path

import numpy as np

WRITE_MODES = ("buffered", "streamed", "direct")
DEFAULT_WRITE_MODE = "buffered"
ALIGNMENT = 4096  # O_DIRECT's offset, length and address alignment (the page size on Linux hosts)
STAGING_BYTES = 16 << 20  # direct mode: bytes staged per write call
IOV_MAX = max(16, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024  # -1: no stated limit
SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def check_write_mode(mode: str) -> str:
    if mode not in WRITE_MODES:
        raise ValueError(f"write mode {mode!r} is not one of {', '.join(WRITE_MODES)}")
    return mode


def write_all(fd: int, views: list[memoryview]) -> None:
    """``os.writev`` until every byte of ``views`` is written (a call may write fewer)."""
    views = list(views)
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        if written == 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if written:
            views[0] = views[0][written:]


class FileSink:
    """One file being written in ``mode`` (:data:`WRITE_MODES`); :meth:`close` completes it.
    ``o_direct`` tells whether the direct mode's writes really skip the page cache."""

    def __init__(self, path: Path, mode: str = DEFAULT_WRITE_MODE):
        self.mode = check_write_mode(mode)
        self.size = 0  # bytes handed to write()
        self._flushed = 0  # bytes in the file (direct mode: whole aligned blocks)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.o_direct = False
        if mode == "direct" and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
                self.o_direct = True
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
        if not self.o_direct:
            self._fd = os.open(path, flags, 0o666)
        self._staging: mmap.mmap | None = None
        self._staged = 0

    def write(self, views: list[memoryview]) -> None:
        if self.mode == "direct":
            for view in views:
                self._stage(view)
        else:
            write_all(self._fd, views)
            nbytes = sum(view.nbytes for view in views)
            if self.mode == "streamed" and _SYNC_FILE_RANGE is not None and nbytes:
                _SYNC_FILE_RANGE(self._fd, self.size, nbytes, SYNC_FILE_RANGE_WRITE)  # a hint: errors ignored
            self.size += nbytes

    def _stage(self, view: memoryview) -> None:
        if self._staging is None:
            self._staging = mmap.mmap(-1, STAGING_BYTES)  # page-aligned
        source = np.frombuffer(view, dtype=np.uint8)
        staging = np.frombuffer(self._staging, dtype=np.uint8)
        try:
            taken = 0
            while taken < source.size:
                n = min(source.size - taken, STAGING_BYTES - self._staged)
                staging[self._staged : self._staged + n] = source[taken : taken + n]  # numpy copies without the GIL
                self._staged += n
                taken += n
                if self._staged == STAGING_BYTES:
                    self._write_staged(STAGING_BYTES)
        finally:
            del staging  # no export may outlive a write: the mmap is closed later
        self.size += source.size

    def _write_staged(self, nbytes: int) -> None:
        """Write the first ``nbytes`` staged bytes (a multiple of :data:`ALIGNMENT`)."""
        with memoryview(self._staging) as staged:
            write_all(self._fd, [staged[:nbytes]])
        self._flushed += nbytes
        self._staged = 0

    def _release_staging(self) -> None:
        if self._staging is not None:
            try:
                self._staging.close()
            except BufferError:  # a failed write's traceback still refers to it: freed with it
                pass
            self._staging = None

    def discard(self) -> None:
        """Close the file unfinished (the caller failed while writing it)."""
        os.close(self._fd)
        self._release_staging()

    def close(self) -> None:
        try:
            if self.mode == "direct" and self._staged:
                padded = -(-self._staged // ALIGNMENT) * ALIGNMENT
                self._staging[self._staged : padded] = bytes(padded - self._staged)
                self._write_staged(padded)
            if self._flushed > self.size:
                os.ftruncate(self._fd, self.size)  # drop the last block's padding
        finally:
            os.close(self._fd)
            self._release_staging()
