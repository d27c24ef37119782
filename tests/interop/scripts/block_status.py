"""base:allocation block status, TRIM and WRITE_ZEROES as a client sees them.

``h`` (nbdsh --base-allocation) is connected to a fresh writable export.
Semantics checked: never-written and trimmed pages are hole+zero; written
pages are data (0); pages zeroed with NO_HOLE are zero but not a hole; TRIM
frees the whole 4 KiB pages it covers and leaves partial pages alone.
"""

import nbd
from common import (
    HOLE,
    ZERO,
    KiB,
    MiB,
    data,
    describe,
    expect_data,
    expect_status,
    expect_zero,
    extents,
    status,
    status_map,
)


def check_context(h):
    assert h.can_meta_context("base:allocation"), "base:allocation not negotiated"


def check_fresh_export_is_hole(h):
    size = h.get_size()
    expect_status(h, size, 0, HOLE | ZERO, "never-written export")


def check_writes_are_data(h):
    h.pwrite(data(1, 4096), MiB)
    h.pwrite(data(2, 3 * 4096), 2 * MiB)
    h.pwrite(b"\x01", 3 * MiB + 4096 + 100)  # one byte allocates its page
    expect_status(h, 4096, MiB, 0, "written page")
    expect_status(h, 3 * 4096, 2 * MiB, 0, "written pages")
    expect_status(h, 4096, 3 * MiB + 4096, 0, "page with one written byte")
    expect_status(h, MiB, 0, HOLE | ZERO, "never-written pages before")
    expect_status(h, MiB - 4096, MiB + 4096, HOLE | ZERO, "never-written pages between")
    expect_status(h, 4096, 3 * MiB, HOLE | ZERO, "page before the one-byte write")
    got = status_map(h, 4 * MiB, 0)
    assert [(o, n) for o, n, f in got if f == 0] == [
        (MiB, 4096),
        (2 * MiB, 3 * 4096),
        (3 * MiB + 4096, 4096),
    ], got


def check_written_zeroes_are_data(h):
    """A WRITE of zero bytes stores zeroes; the page may report zero, never hole."""
    h.pwrite(bytes(8192), 5 * MiB)
    got = status(h, 8192, 5 * MiB)
    assert not got & HOLE, f"written zero pages reported as a hole ({got})"
    expect_zero(h, 8192, 5 * MiB, "written zeroes")


def check_trim(h):
    base = 8 * MiB
    blob = data(3, 64 * KiB)
    h.pwrite(blob, base)
    h.trim(16 * KiB, base + 16 * KiB)
    expect_status(h, 16 * KiB, base + 16 * KiB, HOLE | ZERO, "trimmed pages")
    expect_zero(h, 16 * KiB, base + 16 * KiB, "trimmed pages")
    expect_status(h, 16 * KiB, base, 0, "pages before the trim")
    expect_status(h, 32 * KiB, base + 32 * KiB, 0, "pages after the trim")
    expect_data(h, blob[: 16 * KiB], base, "data before the trim")
    expect_data(h, blob[32 * KiB :], base + 32 * KiB, "data after the trim")


def check_trim_partial_pages(h):
    """An unaligned TRIM frees only the pages it covers wholly."""
    base = 12 * MiB
    blob = data(4, 4 * 4096)
    h.pwrite(blob, base)
    # covers the end of page 0, all of pages 1 and 2, the start of page 3
    h.trim(3 * 4096, base + 100)
    expect_status(h, 4096, base, 0, "partly trimmed first page")
    expect_status(h, 2 * 4096, base + 4096, HOLE | ZERO, "wholly trimmed pages")
    expect_status(h, 4096, base + 3 * 4096, 0, "partly trimmed last page")
    expect_data(h, blob[:4096], base, "partly trimmed first page keeps its data")
    expect_data(h, blob[3 * 4096 :], base + 3 * 4096, "partly trimmed last page keeps its data")
    # a trim inside one page changes nothing
    h.trim(1000, base + 3 * 4096 + 50)
    expect_status(h, 4096, base + 3 * 4096, 0, "page with a trim inside it")
    expect_data(h, blob[3 * 4096 :], base + 3 * 4096, "page with a trim inside it")


def check_write_zeroes_makes_hole(h):
    base = 16 * MiB
    h.pwrite(data(5, 32 * KiB), base)
    h.zero(16 * KiB, base + 8 * KiB)
    expect_zero(h, 16 * KiB, base + 8 * KiB, "write-zeroes")
    expect_status(h, 16 * KiB, base + 8 * KiB, HOLE | ZERO, "write-zeroes without NO_HOLE")
    expect_status(h, 8 * KiB, base, 0, "pages before write-zeroes")
    expect_status(h, 8 * KiB, base + 24 * KiB, 0, "pages after write-zeroes")


def check_write_zeroes_no_hole(h):
    base = 20 * MiB
    h.pwrite(data(6, 32 * KiB), base)
    h.zero(16 * KiB, base + 8 * KiB, nbd.CMD_FLAG_NO_HOLE)
    expect_zero(h, 16 * KiB, base + 8 * KiB, "write-zeroes NO_HOLE")
    expect_status(h, 16 * KiB, base + 8 * KiB, ZERO, "write-zeroes with NO_HOLE")
    # NO_HOLE on never-written pages allocates them as zero
    h.zero(8 * KiB, base + MiB, nbd.CMD_FLAG_NO_HOLE)
    expect_status(h, 8 * KiB, base + MiB, ZERO, "write-zeroes NO_HOLE on never-written pages")
    # a later trim makes them holes again
    h.trim(16 * KiB, base + 8 * KiB)
    expect_status(h, 16 * KiB, base + 8 * KiB, HOLE | ZERO, "trim after write-zeroes NO_HOLE")


def check_write_zeroes_partial_pages(h):
    """Unaligned WRITE_ZEROES zeroes exactly its bytes; partial pages keep the rest."""
    base = 24 * MiB
    blob = data(7, 3 * 4096)
    h.pwrite(blob, base)
    h.zero(2 * 4096, base + 2048)
    expect_data(h, blob[:2048], base, "bytes before unaligned write-zeroes")
    expect_zero(h, 2 * 4096, base + 2048, "unaligned write-zeroes")
    expect_data(h, blob[2048 + 8192 :], base + 2048 + 8192, "bytes after unaligned write-zeroes")
    assert not status(h, 4096, base) & HOLE, "partly zeroed page reported as a hole"
    assert status(h, 4096, base + 4096) & ZERO, "wholly zeroed page not reported as zero"


def check_rewrite_after_trim(h):
    base = 28 * MiB
    h.pwrite(data(8, 8192), base)
    h.trim(8192, base)
    blob = data(9, 8192)
    h.pwrite(blob, base)
    expect_status(h, 8192, base, 0, "pages written after a trim")
    expect_data(h, blob, base, "pages written after a trim")


def check_req_one(h):
    base = 32 * MiB
    h.pwrite(data(10, 8192), base + 8192)
    for off, length, want_flags, max_len in [
        (base, 64 * KiB, HOLE | ZERO, 8192),
        (base + 8192, 64 * KiB, 0, 8192),
        (base + 8192 + 100, 10, 0, 10),
        (base + 16 * KiB, 4096, HOLE | ZERO, 4096),
    ]:
        got = extents(h, length, off, nbd.CMD_FLAG_REQ_ONE)
        assert len(got) == 1, f"REQ_ONE at {off}+{length} returned {len(got)} extents"
        _start, ext_len, flags = got[0]
        assert ext_len <= length, f"REQ_ONE extent {ext_len} longer than the request {length}"
        assert ext_len <= max_len, f"REQ_ONE extent at {off} runs past a status change"
        assert flags == want_flags, f"REQ_ONE at {off}: {describe(flags)}"


def check_unaligned_query(h):
    base = 36 * MiB
    h.pwrite(data(11, 4096), base)
    got = extents(h, 10, base + 100)
    assert got[0][0] == base + 100 and got[0][2] == 0, got
    got = extents(h, 5000, base - 100)
    assert got[0][2] == HOLE | ZERO and got[0][1] == 100, got
    assert got[1][2] == 0, got


def check_whole_device_map(h):
    """A block status over the whole device (longer than 32 MiB) is served."""
    size = h.get_size()
    spots = [0, 17 * MiB, size - 4096]
    for i, off in enumerate(spots):
        h.pwrite(data(12 + i, 4096), off)
    got = status_map(h, size, 0)
    data_extents = [(o, n) for o, n, f in got if f == 0]
    assert data_extents == [(o, 4096) for o in spots], got
    assert sum(n for _, n, _ in got) == size


def check_many_extents(h):
    """Alternating data and hole pages come back as that many extents, exactly."""
    base, pages = 40 * MiB, 1024
    for i in range(0, pages, 2):
        h.pwrite(b"\x01", base + i * 4096 + (i % 4096))
    got = status_map(h, pages * 4096, base)
    want = [(base + i * 4096, 4096, 0 if i % 2 == 0 else HOLE | ZERO) for i in range(pages)]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        raise AssertionError(f"{len(got)} extents, want {len(want)}; first difference at #{first}")
