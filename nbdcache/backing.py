"""The backing disk image: a sparse raw file of the device's size.

Each page lives at its own offset, so at any flushed moment the file is a
plain raw disk image (mountable, `qemu-img`-readable).  This module owns the
file: creating or checking it, the exclusive `flock` that keeps a second
server off it, positional I/O (`os.preadv`/`os.pwritev`) on a dedicated
thread pool so the event loop never waits for the disk, hole punching
(`fallocate(PUNCH_HOLE)` through ctypes, falling back to writing zeroes where
the file system cannot punch), space reservation and `fdatasync`.

The blocking methods (`read`, `write`, ...) run on pool threads; the event
loop calls `submit` to get an asyncio future for one of them.  The one
exception is `read_nowait`: a read the page cache can answer at once
(``RWF_NOWAIT``) costs a microsecond or two on the loop, far less than the
hand-off to a thread and back.

Tests that need the image to fail set `NBDCACHE_TEST_IMAGE_EIO` to the path
of a control file: while that file exists, image reads, writes and syncs
fail with EIO, as from a dying disk.  Unset (always, outside tests), nothing
is checked.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

PAGE_SIZE = 4096

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: preadv2 flag: fail with EAGAIN rather than wait for the disk (Linux 4.14).
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

T = TypeVar("T")
log = logging.getLogger("nbdcache.backing")


#: Fault injection for tests only; see the module docstring.
_EIO_WHILE = os.environ.get("NBDCACHE_TEST_IMAGE_EIO") or None


def _injected_eio() -> None:
    if _EIO_WHILE is not None and os.path.exists(_EIO_WHILE):
        raise OSError(errno.EIO, "injected I/O error (NBDCACHE_TEST_IMAGE_EIO)")


class ImageError(Exception):
    """The image cannot be used as configured; the message is for the operator."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BackingImage:
    """One export's image file, locked for the life of the process."""

    def __init__(
        self,
        path: str | Path,
        size: int,
        *,
        volatile: bool,
        io_threads: int = 4,
        preallocate: bool = False,
    ) -> None:
        self.path = Path(path)
        self.size = size
        self.fd = self._open(volatile)
        self.can_punch = True
        self.can_reserve = True
        self.can_nowait = _RWF_NOWAIT != 0
        self.bytes_punched_by_writing = 0
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="nbdcache-io")
        if preallocate:
            try:
                os.posix_fallocate(self.fd, 0, size)
            except OSError as exc:
                self.close()
                raise ImageError(
                    f"{self.path}: cannot preallocate {size} bytes: {exc.strerror}"
                ) from None

    def _open(self, volatile: bool) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ImageError(f"{self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ImageError(
                f"{self.path} is in use by another nbdcache server (it holds the lock)"
            ) from None
        current = os.fstat(fd).st_size
        if volatile or current == 0:
            # Scratch space: nothing from an earlier run may leak.
            os.ftruncate(fd, 0)
            os.ftruncate(fd, self.size)
        elif current != self.size:
            os.close(fd)
            raise ImageError(
                f"{self.path} holds {current} bytes but the export is {self.size} bytes; "
                "refusing to resize an image with contents"
            )
        return fd

    # --- blocking operations, run on the pool ---------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if _EIO_WHILE is not None:
            _injected_eio()
        buf = bytearray(length)
        done = 0
        view = memoryview(buf)
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:  # past the end of a short file: zeroes
                break
            done += n
        return bytes(buf)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """The range if the page cache holds all of it, else None: a read that
        never waits for the disk (``RWF_NOWAIT``), so the event loop may make it."""
        if not self.can_nowait or _EIO_WHILE is not None:
            return None  # (an injected fault is for the pool's read to report)
        buf = bytearray(length)
        try:
            n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self.can_nowait = False  # not on this kernel or file system
            return None  # errors are for the pool's read to report
        return bytes(buf) if n == length else None

    def write(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        if _EIO_WHILE is not None:
            _injected_eio()
        total = sum(len(b) for b in buffers)
        done = os.pwritev(self.fd, buffers, offset)
        if done < total:  # short write: finish the rest one buffer at a time
            data = b"".join(buffers)[done:]
            while data:
                n = os.pwrite(self.fd, data, offset + done)
                done += n
                data = data[n:]

    def write_runs(
        self, runs: Sequence[tuple[int, Sequence[bytes | memoryview]]]
    ) -> list[tuple[int, OSError]]:
        """`write` of each (offset, buffers), in order, on one pool thread.

        A run that fails does not stop the others: returns the index and the
        error of each that failed."""
        failed: list[tuple[int, OSError]] = []
        for i, (offset, buffers) in enumerate(runs):
            try:
                self.write(offset, buffers)
            except OSError as exc:
                failed.append((i, exc))
        return failed

    def punch(self, offset: int, length: int) -> None:
        """Deallocate the range; it reads as zeroes afterwards."""
        if self.can_punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.can_punch = False
        self.write(offset, [bytes(length)])
        self.bytes_punched_by_writing += length

    def zero_allocated(self, offset: int, length: int) -> None:
        """Make the range read as zeroes and keep its blocks allocated."""
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            self.write(offset, [bytes(length)])

    def reserve(self, offset: int, length: int) -> None:
        """Allocate blocks for the range so later writes cannot hit ENOSPC.

        On a file system without `fallocate` (some NFS, old ZFS) nothing can
        be reserved: the first time says so in the log, and writeback may then
        meet ENOSPC (the page stays dirty in RAM and is retried).
        """
        if not self.can_reserve:
            return
        try:
            fallocate(self.fd, FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.can_reserve = False
            log.warning(
                "%s: the file system cannot reserve space (fallocate: %s); "
                "first writes are accepted without a reservation",
                self.path,
                exc.strerror,
            )

    def sync(self) -> None:
        if _EIO_WHILE is not None:
            _injected_eio()
        os.fdatasync(self.fd)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    # --- event-loop side ------------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run one of the blocking operations on the pool."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1
