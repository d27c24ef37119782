"""The server's memory through libc: `mlockall`, `PR_SET_IO_FLUSHER`, the heap.

A server that serves swap to its own host can deadlock: the kernel swaps
because it is short of memory, and the server needs memory to take the page
(see deploy/README.md).  `--mlock` (`server.mlock`) does what a process can
do about it on Linux, through libc with `ctypes` (no extra dependency):

- `lock_all`: ``mlockall(MCL_CURRENT | MCL_FUTURE)``.  Every page the
  process has is made resident and locked, and so is every later mapping.
  The RAM tier's arena is one mapping, so it becomes resident as a whole,
  and it stays so: the kernel refuses ``MADV_DONTNEED`` on locked memory, so
  the arena keeps frames freed by TRIM (see `nbdcache.tier.arena`).  Without
  ``CAP_IPC_LOCK`` the locked total is bounded by ``RLIMIT_MEMLOCK``; a
  refusal is a `MemoryLockError` naming the limit.
- `prepare_threads`: ``prctl(PR_SET_IO_FLUSHER, 1)`` (Linux 5.6): the
  kernel treats the process as part of the I/O path, so its allocations do
  not recurse into I/O reclaim and it is not throttled as a writer of dirty
  pages.  It needs ``CAP_SYS_RESOURCE``; without it the server goes on and
  says so.  The flag belongs to the calling thread and threads inherit it,
  so this runs before any thread is started.  It also makes the stacks of
  threads started later small (`THREAD_STACK`): locked, a thread's stack is
  resident in full, 8 MiB by default, and the image I/O threads need little.

Always, `keep_heap` (glibc's ``mallopt``): a large write is copied out of the
receive buffer and encoded into a new buffer, and a large read is expanded
into one, a few hundred KiB each.  With glibc's defaults such buffers are
mapped afresh for each request, or the heap's top is given back after each,
and the kernel faults every page of them in again: on the first write of a
set of files that was the largest share of the event loop's time in the
kernel.  Buffers up to `HEAP_BUFFER_MAX` (the largest request) now come
from the heap, which keeps up to `HEAP_KEEP` bytes of free memory at its top
(resident, and locked with `--mlock`).  An operator's own malloc settings in
the environment win.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import threading

MCL_CURRENT = 1
MCL_FUTURE = 2
PR_SET_IO_FLUSHER = 57
CAP_IPC_LOCK = 14
#: Stack of threads started once memory is to be locked (resident in full).
THREAD_STACK = 1 << 20
#: glibc's ``mallopt`` parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap, not a mapping of their
#: own: glibc's largest, which its own sliding threshold also ends at.
HEAP_BUFFER_MAX = 32 << 20
#: Free memory the heap keeps rather than give back to the kernel.
HEAP_KEEP = 32 << 20
#: Environment through which an operator tunes glibc's malloc instead.
MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class MemoryLockError(Exception):
    """mlockall failed; the message says why and what to change."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else f"{value} bytes"


def _has_cap_ipc_lock() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return False


def lock_all() -> None:
    """Lock every current and future page of the process in RAM.

    Refused unless the lock is unbounded (`RLIMIT_MEMLOCK` unlimited, or
    ``CAP_IPC_LOCK``): with ``MCL_FUTURE`` under a finite limit, start-up
    may fit and a later allocation in the data path would then fail.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_cap_ipc_lock():
        raise MemoryLockError(
            f"--mlock needs RLIMIT_MEMLOCK unlimited or CAP_IPC_LOCK; the limit is "
            f"{_limit(soft)} (ulimit -l unlimited, systemd LimitMEMLOCK=infinity, "
            "docker --ulimit memlock=-1)"
        )
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        return
    err = ctypes.get_errno()
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if err in (errno.ENOMEM, errno.EAGAIN):
        raise MemoryLockError(
            f"cannot lock memory (mlockall: {os.strerror(err)}): RLIMIT_MEMLOCK is "
            f"{_limit(soft)}; raise it to unlimited (ulimit -l unlimited, systemd "
            "LimitMEMLOCK=infinity, docker --ulimit memlock=-1) or give the process "
            "CAP_IPC_LOCK"
        )
    raise MemoryLockError(f"cannot lock memory (mlockall: {os.strerror(err)})")


def prepare_threads() -> str | None:
    """Mark the calling thread (and threads it starts) as an I/O flusher,
    and give threads started from now on a `THREAD_STACK` stack.

    Returns None on success, else why the kernel refused the flag.
    """
    threading.stack_size(THREAD_STACK)
    if _libc().prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        return None
    err = ctypes.get_errno()
    if err == errno.EPERM:
        return "needs CAP_SYS_RESOURCE"
    if err == errno.EINVAL:
        return "not supported by this kernel (Linux 5.6 or later)"
    return os.strerror(err)


def is_glibc() -> bool:
    """Whether the C library is glibc (its ``mallopt`` parameters apply)."""
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


def keep_heap() -> bool:
    """Serve request-sized buffers from a heap that keeps its memory (see
    the module docstring); returns whether libc took the settings.

    Only glibc has these parameters; other C libraries are left alone, and
    so is a glibc the environment tunes (`MALLOC_ENVIRONMENT`).
    """
    if any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return False
    mallopt = getattr(_libc(), "mallopt", None) if is_glibc() else None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BUFFER_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, HEAP_KEEP)
    )


def locked_bytes() -> int:
    """VmLck of this process, from /proc/self/status (0 if unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
