"""Helpers shared by the nbdsh check scripts in this directory.

The tests run ``nbdsh -u URI``, put this directory on ``sys.path``, import a
check module and call one of its ``check_*`` functions with nbdsh's connected
handle ``h``. A check returns silently or raises; nbdsh then exits non-zero
and prints the traceback.
"""

import errno
import random

import nbd

KiB = 1024
MiB = 1024 * KiB
PAGE = 4096
MAX_PAYLOAD = 32 * MiB
HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO


def data(seed, length):
    """Deterministic, incompressible bytes."""
    return random.Random(seed).randbytes(length)


def loose(handle):
    """Let invalid requests reach the server instead of being refused by libnbd."""
    handle.set_strict_mode(0)


def errname(code):
    return errno.errorcode.get(code, str(code)) if code else "no errno"


def expect_error(expected, what, fn, *args):
    """``fn(*args)`` must fail with the server's reply ``expected`` (an errno)."""
    try:
        fn(*args)
    except nbd.Error as e:
        assert "command failed" in (e.string or ""), (
            f"{what}: refused by libnbd, not answered by the server: {e.string}"
        )
        assert e.errnum == expected, (
            f"{what}: expected {errname(expected)}, server replied {errname(e.errnum)}"
        )
        return
    raise AssertionError(f"{what}: succeeded, expected {errname(expected)}")


def assert_alive(handle, what=""):
    """The connection is still up and serving requests."""
    assert not handle.aio_is_dead(), f"connection dropped {what}"
    assert not handle.aio_is_closed(), f"connection closed {what}"
    handle.pread(512, 0)


def extents(handle, length, offset, flags=0):
    """One BLOCK_STATUS request; returns [(offset, length, flags)] checked for contiguity."""
    got = []

    def callback(context, start, entries, err):
        assert context == "base:allocation", context
        assert start == offset, (start, offset)
        got.append(list(entries))
        return 0

    handle.block_status(length, offset, callback, flags)
    assert len(got) == 1, f"expected one base:allocation chunk, got {len(got)}"
    entries = got[0]
    assert entries and len(entries) % 2 == 0, entries
    result = []
    pos = offset
    for i in range(0, len(entries), 2):
        ext_len, ext_flags = entries[i], entries[i + 1]
        assert ext_len > 0, f"zero-length extent in {entries}"
        result.append((pos, ext_len, ext_flags))
        pos += ext_len
    return result


def status_map(handle, length, offset):
    """Extents covering exactly [offset, offset+length), following short replies."""
    result = []
    pos, end = offset, offset + length
    while pos < end:
        got = extents(handle, end - pos, pos)
        for start, ext_len, ext_flags in got:
            if start >= end:
                break
            ext_len = min(ext_len, end - start)
            if result and result[-1][2] == ext_flags and result[-1][0] + result[-1][1] == start:
                result[-1] = (result[-1][0], result[-1][1] + ext_len, ext_flags)
            else:
                result.append((start, ext_len, ext_flags))
        pos = result[-1][0] + result[-1][1]
    return result


def status(handle, length, offset):
    """The single status of a range; fails if the range has mixed status."""
    got = status_map(handle, length, offset)
    assert len(got) == 1, f"range {offset}+{length} has mixed status {got}"
    return got[0][2]


def describe(flags):
    return "+".join(n for n, b in (("hole", HOLE), ("zero", ZERO)) if flags & b) or "data"


def expect_status(handle, length, offset, expected, what):
    got = status(handle, length, offset)
    assert got == expected, (
        f"{what}: block status of {offset}+{length} is {describe(got)} ({got}), "
        f"expected {describe(expected)} ({expected})"
    )


def expect_zero(handle, length, offset, what):
    buf = handle.pread(length, offset)
    assert buf == bytes(length), f"{what}: {offset}+{length} does not read as zeroes"


def expect_data(handle, expected, offset, what):
    buf = handle.pread(len(expected), offset)
    if buf != expected:
        first = next(i for i in range(len(buf)) if buf[i] != expected[i])
        raise AssertionError(
            f"{what}: {offset}+{len(expected)} differs first at byte {offset + first}"
        )


def second_handle(handle, base_allocation=False):
    """Another connection to the same export."""
    other = nbd.NBD()
    if base_allocation:
        other.add_meta_context("base:allocation")
    other.connect_uri(handle.get_uri())
    return other
