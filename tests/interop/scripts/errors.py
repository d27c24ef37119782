"""Error replies exactly as nbd-proto.md ("Error values") asks, and requests
that must be answered without a disconnect.

Strict mode is off in every check so that libnbd sends what it would
otherwise refuse; each expected error must come from the server. ``h`` is a
connected writable export unless the check says otherwise.
"""

import errno

import nbd
from common import (
    HOLE,
    MAX_PAYLOAD,
    ZERO,
    KiB,
    MiB,
    assert_alive,
    data,
    expect_data,
    expect_error,
    expect_status,
    expect_zero,
    extents,
    loose,
)

EINVAL = errno.EINVAL
ENOSPC = errno.ENOSPC
EPERM = errno.EPERM


def check_read_past_end(h):
    loose(h)
    size = h.get_size()
    expect_error(EINVAL, "read starting at the end", h.pread, 4096, size)
    expect_error(EINVAL, "read straddling the end", h.pread, 8192, size - 4096)
    expect_error(EINVAL, "one-byte read straddling the end", h.pread, 2, size - 1)
    expect_error(EINVAL, "read far beyond the end", h.pread, 512, size * 4)
    assert_alive(h, "after reads past the end")
    expect_zero(h, 4096, size - 4096, "last page still readable")


def check_write_past_end(h):
    loose(h)
    size = h.get_size()
    expect_error(ENOSPC, "write starting at the end", h.pwrite, data(1, 4096), size)
    expect_error(ENOSPC, "write straddling the end", h.pwrite, data(2, 8192), size - 4096)
    expect_error(ENOSPC, "one-byte write past the end", h.pwrite, b"x", size)
    assert_alive(h, "after writes past the end")
    tail = data(3, 4096)
    h.pwrite(tail, size - 4096)
    expect_data(h, tail, size - 4096, "write ending exactly at the end")


def check_trim_past_end(h):
    loose(h)
    size = h.get_size()
    expect_error(EINVAL, "trim starting at the end", h.trim, 4096, size)
    expect_error(EINVAL, "trim straddling the end", h.trim, 8192, size - 4096)
    assert_alive(h, "after trims past the end")


def check_write_zeroes_past_end(h):
    loose(h)
    size = h.get_size()
    expect_error(ENOSPC, "write-zeroes starting at the end", h.zero, 4096, size)
    expect_error(ENOSPC, "write-zeroes straddling the end", h.zero, 8192, size - 4096)
    expect_error(
        ENOSPC, "write-zeroes NO_HOLE past the end", h.zero, 4096, size, nbd.CMD_FLAG_NO_HOLE
    )
    assert_alive(h, "after write-zeroes past the end")


def check_cache_past_end(h):
    loose(h)
    size = h.get_size()
    expect_error(EINVAL, "cache starting at the end", h.cache, 4096, size)
    expect_error(EINVAL, "cache straddling the end", h.cache, 8192, size - 4096)
    h.cache(4096, size - 4096)
    assert_alive(h, "after cache past the end")


def check_block_status_past_end(h):
    # needs nbdsh --base-allocation
    loose(h)
    size = h.get_size()
    expect_error(
        EINVAL, "block status starting at the end", h.block_status, 4096, size, lambda *a: 0
    )
    expect_error(
        EINVAL, "block status far beyond the end", h.block_status, 4096, size * 2, lambda *a: 0
    )
    assert_alive(h, "after block status past the end")


def check_offset_overflow(h):
    """offset + length wraps around 2**64: still just 'past the end'."""
    loose(h)
    top = 2**64 - 4096
    expect_error(EINVAL, "read wrapping 2**64", h.pread, 8192, top)
    expect_error(ENOSPC, "write wrapping 2**64", h.pwrite, data(4, 8192), top)
    expect_error(EINVAL, "trim wrapping 2**64", h.trim, 8192, top)
    expect_error(ENOSPC, "write-zeroes wrapping 2**64", h.zero, 8192, top)
    expect_error(EINVAL, "cache wrapping 2**64", h.cache, 8192, top)
    assert_alive(h, "after requests wrapping 2**64")


def check_read_only(h):
    """On a read-only export writes are refused with EPERM, reads work."""
    loose(h)
    assert h.is_read_only(), "export should be read-only"
    expect_error(EPERM, "write on a read-only export", h.pwrite, data(5, 4096), 0)
    expect_error(EPERM, "unaligned write on a read-only export", h.pwrite, b"abc", 4097)
    expect_error(EPERM, "trim on a read-only export", h.trim, 4096, 0)
    expect_error(EPERM, "write-zeroes on a read-only export", h.zero, 4096, 0)
    expect_error(
        EPERM, "write-zeroes NO_HOLE on a read-only export", h.zero, 4096, 0, nbd.CMD_FLAG_NO_HOLE
    )
    expect_error(
        EPERM, "fast write-zeroes on a read-only export", h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO
    )
    expect_zero(h, 8192, 0, "read on a read-only export")
    h.cache(8192, 0)
    assert_alive(h, "after refused writes")


# (command, flags that are not valid for it)
UNKNOWN_FLAG = 1 << 10


def check_invalid_flags(h):
    loose(h)
    DF, NO_HOLE, REQ_ONE, FAST_ZERO = (
        nbd.CMD_FLAG_DF,
        nbd.CMD_FLAG_NO_HOLE,
        nbd.CMD_FLAG_REQ_ONE,
        nbd.CMD_FLAG_FAST_ZERO,
    )
    cases = [
        ("read", lambda f: h.pread(4096, 0, f), [UNKNOWN_FLAG, NO_HOLE, REQ_ONE, FAST_ZERO]),
        (
            "write",
            lambda f: h.pwrite(data(6, 4096), 0, f),
            [UNKNOWN_FLAG, DF, NO_HOLE, REQ_ONE, FAST_ZERO],
        ),
        ("trim", lambda f: h.trim(4096, 0, f), [UNKNOWN_FLAG, DF, NO_HOLE, REQ_ONE, FAST_ZERO]),
        ("write-zeroes", lambda f: h.zero(4096, 0, f), [UNKNOWN_FLAG, DF, REQ_ONE]),
        ("cache", lambda f: h.cache(4096, 0, f), [UNKNOWN_FLAG, DF, NO_HOLE, REQ_ONE, FAST_ZERO]),
        (
            "block status",
            lambda f: h.block_status(4096, 0, lambda *a: 0, f),
            [UNKNOWN_FLAG, DF, NO_HOLE, FAST_ZERO],
        ),
    ]
    for name, call, bad_flags in cases:
        for flag in bad_flags:
            expect_error(EINVAL, f"{name} with flag {flag:#x}", call, flag)
            assert_alive(h, f"after {name} with flag {flag:#x}")
    # nothing was written by the refused requests
    expect_zero(h, 4096, 0, "page 0 after refused writes")


def check_valid_flags(h):
    """Every flag valid for a command is accepted."""
    loose(h)
    h.pread(4096, 0, nbd.CMD_FLAG_DF)
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
    # FAST_ZERO that would need a read-modify-write fails at once with
    # ENOTSUP and changes nothing.
    h.pwrite(b"\x5a" * 8192, 8192)
    expect_error(
        errno.ENOTSUP, "unaligned fast zero", h.zero, 100, 8192 + 7, nbd.CMD_FLAG_FAST_ZERO
    )
    if h.pread(8192, 8192) != b"\x5a" * 8192:
        raise AssertionError("a refused fast zero changed the data")
    h.zero(100, 8192 + 7)  # without FAST_ZERO the same request succeeds


def check_zero_length(h):
    """Zero-length requests are answered (success or error), never a disconnect."""
    loose(h)
    size = h.get_size()
    calls = [
        ("read", lambda off: h.pread(0, off)),
        ("write", lambda off: h.pwrite(b"", off)),
        ("trim", lambda off: h.trim(0, off)),
        ("write-zeroes", lambda off: h.zero(0, off)),
        ("cache", lambda off: h.cache(0, off)),
        ("block status", lambda off: h.block_status(0, off, lambda *a: 0)),
    ]
    page = data(7, 4096)
    h.pwrite(page, 0)
    for name, call in calls:
        for off in (0, 4096, size):
            try:
                call(off)
            except nbd.Error as e:
                assert "command failed" in (e.string or ""), e.string
            assert_alive(h, f"after zero-length {name} at {off}")
    expect_data(h, page, 0, "data after zero-length requests")


def check_max_payload(h):
    """A write and a read of exactly the advertised maximum payload work."""
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD
    blob = data(8, MAX_PAYLOAD)
    h.pwrite(blob, 4096)
    assert h.pread(MAX_PAYLOAD, 4096) == blob, "32 MiB read differs from 32 MiB write"


def check_oversized_write(h):
    """A write payload over the maximum is refused, by an error or a disconnect."""
    loose(h)
    try:
        h.pwrite(data(9, MAX_PAYLOAD + 4096), 0)
    except nbd.Error as e:
        if not (h.aio_is_dead() or h.aio_is_closed()):
            assert "command failed" in (e.string or ""), e.string
            assert_alive(h, "after an oversized write refused with an error")
        print("oversized write refused:", e.string)
        return
    raise AssertionError("a write of 32 MiB + 4 KiB succeeded; the maximum is 32 MiB")


def check_large_requests_without_payload(h):
    """TRIM, WRITE_ZEROES and BLOCK_STATUS longer than 32 MiB are served."""
    size = h.get_size()
    assert size > MAX_PAYLOAD + 4096, size
    spots = [0, 5 * MiB + 17, MAX_PAYLOAD - 3, size - 4096]
    for i, off in enumerate(spots):
        h.pwrite(data(10 + i, 4096), off)

    h.trim(size, 0)
    assert_alive(h, "after a whole-device trim")
    expect_status(h, size, 0, HOLE | ZERO, "after a whole-device trim")
    for off in spots:
        expect_zero(h, 4096, off, "after a whole-device trim")

    for i, off in enumerate(spots):
        h.pwrite(data(20 + i, 4096), off)
    h.zero(size, 0, nbd.CMD_FLAG_NO_HOLE)
    assert_alive(h, "after a whole-device write-zeroes NO_HOLE")
    expect_status(h, size, 0, ZERO, "after a whole-device write-zeroes NO_HOLE")
    for off in spots:
        expect_zero(h, 4096, off, "after a whole-device write-zeroes")

    h.zero(MAX_PAYLOAD + 8 * MiB, 4096)
    assert_alive(h, "after a 40 MiB write-zeroes")
    expect_status(h, MAX_PAYLOAD + 8 * MiB, 4096, HOLE | ZERO, "after a 40 MiB write-zeroes")
    expect_status(h, 4096, 0, ZERO, "page before the 40 MiB write-zeroes")

    got = extents(h, size, 0)
    assert got[0][0] == 0
    assert_alive(h, "after a whole-device block status")


def check_fast_zero(h):
    """FAST_ZERO write-zeroes of whole pages succeeds (zeroing them is metadata only)."""
    assert h.can_fast_zero()
    blob = data(30, 64 * KiB)
    h.pwrite(blob, MiB)
    h.zero(32 * KiB, MiB + 8 * KiB, nbd.CMD_FLAG_FAST_ZERO)
    expect_data(h, blob[: 8 * KiB], MiB, "before the fast-zeroed range")
    expect_zero(h, 32 * KiB, MiB + 8 * KiB, "fast-zeroed range")
    expect_data(h, blob[40 * KiB :], MiB + 40 * KiB, "after the fast-zeroed range")
    # Partial pages need a read-modify-write: not fast, refused at once.
    expect_error(
        errno.ENOTSUP,
        "unaligned fast zero",
        h.zero,
        100,
        MiB + 50 * KiB + 3,
        nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE,
    )
    expect_data(h, blob[50 * KiB : 50 * KiB + 200], MiB + 50 * KiB, "unchanged after ENOTSUP")
    h.zero(100, MiB + 50 * KiB + 3, nbd.CMD_FLAG_NO_HOLE)
    expect_zero(h, 100, MiB + 50 * KiB + 3, "unaligned zero")
    expect_data(h, blob[50 * KiB : 50 * KiB + 3], MiB + 50 * KiB, "bytes before unaligned zero")
    expect_data(h, blob[50 * KiB + 103 :], MiB + 50 * KiB + 103, "bytes after unaligned zero")
