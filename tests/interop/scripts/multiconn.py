"""CAN_MULTI_CONN: one store serves every connection.

A command completed on one connection is visible to commands issued
afterwards on any other. ``h`` (nbdsh --base-allocation) is connected to a
fresh writable export.
"""

import nbd
from common import (
    HOLE,
    ZERO,
    KiB,
    MiB,
    data,
    expect_data,
    expect_status,
    expect_zero,
    second_handle,
)


def check_advertised(h):
    assert h.can_multi_conn(), "CAN_MULTI_CONN not advertised"


def check_write_here_read_there(h):
    other = second_handle(h, base_allocation=True)
    try:
        blob = data(1, 64 * KiB)
        h.pwrite(blob, MiB)
        expect_data(other, blob, MiB, "write on one connection, read on another")
        odd = data(2, 333)
        other.pwrite(odd, MiB + 1000)
        expected = bytearray(blob)
        expected[1000:1333] = odd
        expect_data(h, bytes(expected), MiB, "unaligned write on the other connection")
        other.trim(32 * KiB, MiB + 16 * KiB)
        expect_zero(h, 32 * KiB, MiB + 16 * KiB, "trim on the other connection")
        expect_status(h, 32 * KiB, MiB + 16 * KiB, HOLE | ZERO, "trim on the other connection")
        h.zero(8 * KiB, MiB, nbd.CMD_FLAG_NO_HOLE)
        expect_zero(other, 8 * KiB, MiB, "write-zeroes on the first connection")
        expect_status(other, 8 * KiB, MiB, ZERO, "write-zeroes NO_HOLE seen by the other")
    finally:
        other.shutdown()


def check_pipelined_writes_across_connections(h):
    """Many writes in flight on several connections; each reads back on another."""
    n_conn, per_conn, length = 4, 32, 8 * KiB
    handles = [h] + [second_handle(h) for _ in range(n_conn - 1)]
    try:
        expected = {}
        cookies = []
        for c, handle in enumerate(handles):
            for i in range(per_conn):
                off = 2 * MiB + (i * n_conn + c) * length
                blob = data(1000 + c * per_conn + i, length)
                expected[off] = blob
                cookie = handle.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(blob)), off)
                cookies.append((handle, cookie))
        for handle in handles:
            while handle.aio_in_flight() > 0:
                handle.poll(-1)
        for handle, cookie in cookies:
            assert handle.aio_command_completed(cookie), "write still in flight"
        for c in range(n_conn):
            reader = handles[(c + 1) % n_conn]
            for i in range(per_conn):
                off = 2 * MiB + (i * n_conn + c) * length
                expect_data(reader, expected[off], off, f"write from connection {c}")
    finally:
        for other in handles[1:]:
            other.shutdown()


def check_data_survives_reconnect(h):
    blob = data(3, 12345)
    h.pwrite(blob, 3 * MiB + 7)
    uri = h.get_uri()
    h.shutdown()
    again = nbd.NBD()
    again.connect_uri(uri)
    expect_data(again, blob, 3 * MiB + 7, "data written before a reconnect")
    again.shutdown()


def check_concurrent_subpage_writes_across_connections(h):
    """Four connections write interleaved 100-byte pieces of the same pages at once."""
    n_conn, pieces, step = 4, 1024, 100
    base = 6 * MiB
    handles = [h] + [second_handle(h) for _ in range(n_conn - 1)]
    try:
        expected = bytearray(pieces * step)
        cookies = []
        for i in range(pieces):
            blob = bytearray([1 + i % 251]) * step
            expected[i * step : (i + 1) * step] = blob
            handle = handles[i % n_conn]
            cookie = handle.aio_pwrite(nbd.Buffer.from_bytearray(blob), base + i * step)
            cookies.append((handle, cookie))
        for handle in handles:
            while handle.aio_in_flight() > 0:
                handle.poll(-1)
        for handle, cookie in cookies:
            assert handle.aio_command_completed(cookie)
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
    finally:
        for other in handles[1:]:
            other.shutdown()
