"""Structured replies to NBD_CMD_READ and unaligned I/O, seen through libnbd.

``h`` is connected to a fresh writable export.
"""

import random

import nbd
from common import KiB, MiB, data


def read_chunks(handle, length, offset, flags=0):
    """pread_structured: returns (buffer, [(offset, length, status)])."""
    chunks = []

    def callback(subbuf, chunk_offset, chunk_status, err):
        chunks.append((chunk_offset, len(subbuf), chunk_status, bytes(subbuf)))
        return 0

    buf = handle.pread_structured(length, offset, callback, flags)
    chunks.sort()
    pos = offset
    for chunk_offset, chunk_len, chunk_status, content in chunks:
        assert chunk_status in (nbd.READ_DATA, nbd.READ_HOLE), f"chunk status {chunk_status}"
        assert chunk_offset == pos, f"chunks not contiguous at {pos}: {chunks[:8]}"
        assert chunk_len > 0
        if chunk_status == nbd.READ_HOLE:
            assert content == bytes(chunk_len), "hole chunk does not read as zeroes"
        pos += chunk_len
    assert pos == offset + length, f"chunks cover {offset}..{pos}, asked {offset}+{length}"
    return buf, [(o, n, s) for o, n, s, _ in chunks]


def check_negotiated(h):
    assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
    assert h.can_df(), "SEND_DF not advertised"


def check_structured_read(h):
    """Data and never-written holes read back correctly through chunks."""
    layout = [
        (64 * KiB, data(1, 8 * KiB)),
        (200 * KiB + 3, data(2, 5000)),
        (1 * MiB - 1, data(3, 2)),
    ]
    expected = bytearray(2 * MiB)
    for off, blob in layout:
        h.pwrite(blob, off)
        expected[off : off + len(blob)] = blob
    buf, _ = read_chunks(h, len(expected), 0)
    assert buf == expected, "structured read returned wrong data"
    # a read entirely inside a never-written region
    buf, _ = read_chunks(h, 256 * KiB, MiB + 64 * KiB)
    assert buf == bytes(256 * KiB)
    # unaligned reads across the data and its edges
    for off, length in [
        (64 * KiB - 1, 3),
        (64 * KiB + 4095, 2),
        (200 * KiB, 5010),
        (1 * MiB - 2, 4),
    ]:
        buf, _ = read_chunks(h, length, off)
        assert buf == expected[off : off + length], f"read {off}+{length}"


def check_df_read(h):
    """With DF the reply has exactly one content chunk."""
    h.pwrite(data(4, 4096), 8 * KiB)
    for off, length in [(0, 64 * KiB), (8 * KiB, 4096), (10 * KiB, 100), (MiB, 8 * KiB)]:
        buf, chunks = read_chunks(h, length, off, nbd.CMD_FLAG_DF)
        assert len(chunks) == 1, f"DF read {off}+{length} came in {len(chunks)} chunks"
        expected = bytearray(length)
        lo, hi = max(off, 8 * KiB), min(off + length, 12 * KiB)
        if lo < hi:
            expected[lo - off : hi - off] = data(4, 4096)[lo - 8 * KiB : hi - 8 * KiB]
        assert buf == expected


def check_unaligned_io(h):
    """Writes at odd offsets and lengths are read-modify-write: neighbours survive."""
    base = 4 * MiB
    background = data(5, 64 * KiB)
    h.pwrite(background, base)
    expected = bytearray(background)
    writes = [(1, 1), (4095, 2), (4097, 8190), (12345, 777), (512, 512), (20000, 44000), (65535, 1)]
    for i, (off, length) in enumerate(writes):
        blob = data(100 + i, length)
        h.pwrite(blob, base + off)
        expected[off : off + length] = blob
    assert h.pread(len(expected), base) == expected, "unaligned writes corrupted neighbours"
    for off, length in [(0, 3), (4094, 5), (12344, 779), (65534, 2)]:
        assert h.pread(length, base + off) == expected[off : off + length]


def check_pipelined_reads(h):
    """Many reads in flight on one connection; every reply matches its request."""
    base = 8 * MiB
    blob = data(6, 256 * KiB)
    h.pwrite(blob, base)
    bufs = []
    for i in range(64):
        off = (i * 4099) % (len(blob) - 8192)
        length = 4096 + (i * 37) % 4096
        buf = nbd.Buffer(length)
        cookie = h.aio_pread(buf, base + off)
        bufs.append((cookie, off, length, buf))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, off, length, buf in bufs:
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == blob[off : off + length], f"read {off}+{length} wrong"


def check_concurrent_subpage_writes(h):
    """Writes in flight together that share pages but not bytes all land.

    Each 4 KiB page receives about 40 small writes, all sent before any reply
    is read, in shuffled order; every one must survive (no lost update from a
    read-modify-write racing another).
    """
    base, pieces, step = 16 * MiB, 2048, 100
    expected = bytearray(pieces * step)
    for i in range(pieces):
        expected[i * step : (i + 1) * step] = bytes([1 + i % 255]) * step
    order = list(range(pieces))
    random.Random(7).shuffle(order)
    cookies = []
    for i in order:
        blob = bytearray(expected[i * step : (i + 1) * step])
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(blob), base + i * step))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)
    got = h.pread(len(expected), base)
    lost = [
        i
        for i in range(pieces)
        if got[i * step : (i + 1) * step] != expected[i * step : (i + 1) * step]
    ]
    assert not lost, (
        f"{len(lost)} of {pieces} acknowledged {step}-byte writes were lost; "
        f"first at offset {base + lost[0] * step}"
    )
