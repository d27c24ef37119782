"""A misbehaving client is dropped; the server and every other client go on.

The bad client is a raw socket (no real client sends these bytes). The good
client is libnbd (scripts/driver.py): it holds one connection open across the
misbehaviour and must keep reading and writing correctly, and a fresh nbdsh
connection must work afterwards. Requests no real client can send (unknown
commands, oversized payloads) are checked here too, over the raw socket.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

Fixture = Callable[..., Any]

MiB = 1024 * 1024
IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
OPT_LIST = 3
OPT_ABORT = 2
CMD_READ, CMD_WRITE, CMD_DISC, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 4, 6
EINVAL = 22
ANSWER_TIMEOUT = 60.0  # a hang guard, not a speed requirement
DRIVER = Path(__file__).resolve().parent / "scripts" / "driver.py"


class GoodClient:
    """scripts/driver.py: one libnbd connection, commands over a pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT)
        assert ready, "the good client did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the good client exited with status {self.proc.wait()}"
        return line.strip()

    def do(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._line()
        assert answer == "ok", f"good client: {command!r} -> {answer}"


@pytest.fixture
def good_client(nbd_python: str) -> Iterator[Callable[[str], GoodClient]]:
    procs: list[subprocess.Popen[str]] = []

    def factory(uri: str) -> GoodClient:
        proc = subprocess.Popen(
            [nbd_python, str(DRIVER), uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return GoodClient(proc)

    yield factory
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def others_unaffected(server: Any, good: GoodClient, nbdsh: Fixture) -> None:
    """The long-lived client still works, a new connection works, the server lives."""
    good.do("check 0 65536 1")
    good.do("write 100000 5000 2")
    good.do("check 100000 5000 2")
    nbdsh(
        server.uri(),
        "h.pwrite(b'fresh' * 1000, 300000)",
        "assert h.pread(5000, 300000) == b'fresh' * 1000",
    )
    assert server.alive(), "the server died"


@pytest.fixture
def attached(
    server: Any, good_client: Fixture, raw_nbd: Fixture
) -> tuple[Any, GoodClient, Fixture]:
    """The server, a good client that has written 64 KiB at 0, the raw-client factory."""
    good = good_client(server.uri())
    good.do("write 0 65536 1")
    return server, good, raw_nbd


def abort_with_reset(sock: socket.socket) -> None:
    """Vanish: close with an RST instead of an orderly FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_http_request_instead_of_handshake(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 8)
    assert bad.closed_by_peer(), "the server kept a connection that sent garbage"
    others_unaffected(server, good, nbdsh)


def test_garbage_client_flags(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.greeting()
    bad.sock.sendall(b"\xde\xad\xbe\xef" * 1024)
    assert bad.closed_by_peer(), "the server kept a connection with unknown client flags"
    others_unaffected(server, good, nbdsh)


def test_wrong_option_magic(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.greeting()
    bad.sock.sendall(struct.pack(">L", 3))
    bad.sock.sendall(struct.pack(">QLL", 0x1122334455667788, OPT_GO, 0))
    assert bad.closed_by_peer(), "the server kept a connection with a wrong option magic"
    others_unaffected(server, good, nbdsh)


def test_huge_option_length_then_vanish(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.greeting()
    bad.sock.sendall(struct.pack(">L", 3) + struct.pack(">QLL", IHAVEOPT, OPT_GO, 0xFFFFFFFF))
    bad.sock.settimeout(5)
    # the server may drop the connection, or read and discard: either is fine
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
        bad.sock.sendall(b"\x00" * (256 * 1024))
    abort_with_reset(bad.sock)
    others_unaffected(server, good, nbdsh)


def test_options_flood_with_replies_unread(attached: Any, nbdsh: Fixture) -> None:
    """Replies pile up past the write buffer's limit while the client does not
    read, then drain: the handshake just goes on, with nothing in the log."""
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.greeting()
    bad.sock.sendall(struct.pack(">L", 3))
    # Then NBD_OPT_ABORT: the server answers it and closes.
    options = struct.pack(">QLL", IHAVEOPT, OPT_LIST, 0) * 200_000
    flood = threading.Thread(
        target=bad.sock.sendall, args=(options + struct.pack(">QLL", IHAVEOPT, OPT_ABORT, 0),)
    )
    flood.start()
    time.sleep(1)  # the server stops reading once its replies pass 4 MiB
    bad.sock.settimeout(ANSWER_TIMEOUT)  # a hang guard
    received = 0
    while chunk := bad.sock.recv(1 << 20):
        received += len(chunk)
    flood.join(ANSWER_TIMEOUT)
    assert not flood.is_alive()
    assert received > 4 * MiB, "the option replies did not pile up"
    others_unaffected(server, good, nbdsh)
    log = server.log()
    assert "Traceback" not in log and "failed" not in log, log[-4000:]


def test_wrong_request_magic(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.handshake()
    bad.sock.sendall(struct.pack(">LHHQQL", 0xBADC0FFE, 0, CMD_READ, 1, 0, 4096))
    assert bad.closed_by_peer(), "the server kept a connection with a wrong request magic"
    others_unaffected(server, good, nbdsh)


def test_garbage_in_transmission(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.handshake()
    bad.sock.sendall(bytes(range(256)) * 64)
    assert bad.closed_by_peer(), "the server kept a connection that sent garbage requests"
    others_unaffected(server, good, nbdsh)


def test_truncated_request(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.handshake()
    header = bad.request_header(CMD_READ, 0, 4096)
    bad.sock.sendall(header[:11])
    bad.sock.shutdown(socket.SHUT_WR)
    assert bad.closed_by_peer(), "the server kept a connection after a truncated request"
    others_unaffected(server, good, nbdsh)


def test_truncated_handshake(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.greeting()
    bad.sock.sendall(struct.pack(">L", 3) + struct.pack(">QLL", IHAVEOPT, OPT_GO, 100) + b"abc")
    bad.sock.shutdown(socket.SHUT_WR)
    assert bad.closed_by_peer(), "the server kept a connection after a truncated option"
    others_unaffected(server, good, nbdsh)


def test_vanish_mid_write_payload(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.handshake()
    bad.sock.sendall(bad.request_header(CMD_WRITE, 4 * MiB, MiB) + b"\xee" * (100 * 1024))
    abort_with_reset(bad.sock)
    others_unaffected(server, good, nbdsh)
    # an orderly close mid-payload as well
    bad = raw_nbd(server)
    bad.handshake()
    bad.sock.sendall(bad.request_header(CMD_WRITE, 4 * MiB, MiB) + b"\xee" * 777)
    bad.sock.shutdown(socket.SHUT_WR)
    assert bad.closed_by_peer()
    others_unaffected(server, good, nbdsh)
    good.do(f"checkzero {4 * MiB} {MiB}")  # the unfinished writes were not applied


def test_vanish_with_replies_pending(attached: Any, nbdsh: Fixture) -> None:
    """64 reads of 1 MiB requested, none of the replies read, then an RST."""
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.handshake()
    requests = b"".join(
        bad.request_header(CMD_READ, (i % 32) * MiB, MiB, cookie=i) for i in range(64)
    )
    bad.sock.sendall(requests)
    abort_with_reset(bad.sock)
    others_unaffected(server, good, nbdsh)


def test_many_bad_clients_at_once(attached: Any, nbdsh: Fixture) -> None:
    server, good, raw_nbd = attached
    bads = [raw_nbd(server) for _ in range(16)]
    for i, bad in enumerate(bads):
        if i % 4 == 0:
            bad.sock.sendall(b"\xff" * 4096)
        elif i % 4 == 1:
            bad.handshake()
            bad.sock.sendall(b"\x00" * 4096)
        elif i % 4 == 2:
            bad.handshake()
            bad.sock.sendall(bad.request_header(CMD_WRITE, 4 * MiB, MiB) + b"\x01" * 1000)
        # i % 4 == 3: connected and silent
    good.do("check 0 65536 1")
    for bad in bads[:-1]:
        abort_with_reset(bad.sock)
    others_unaffected(server, good, nbdsh)
    good.do(f"checkzero {4 * MiB} {MiB}")  # the unfinished writes were not applied


# ---------------------------------------------------------------------------
# requests no real client sends, over a plain simple-reply connection


def test_unknown_commands_get_einval(server: Any, raw_nbd: Fixture) -> None:
    client = raw_nbd(server)
    client.handshake()
    for cookie, cmd in enumerate((8, 9, 42, 0xFFFF), start=10):
        client.request(cmd, 0, 4096, cookie=cookie)
        assert client.simple_reply() == (EINVAL, cookie, b""), f"command {cmd}"
    # the connection is still in step
    client.request(CMD_WRITE, 4097, 3, cookie=1, payload=b"abc")
    assert client.simple_reply() == (0, 1, b"")
    client.request(CMD_READ, 4096, 5, cookie=2)
    assert client.simple_reply(5) == (0, 2, b"\x00abc\x00")


def test_simple_replies_and_export_name(server: Any, raw_nbd: Fixture) -> None:
    """NBD_OPT_EXPORT_NAME, NO_ZEROES and simple replies (what nbd-client uses)."""
    client = raw_nbd(server)
    size, flags = client.handshake()
    assert size == 64 * MiB
    assert flags & 1, "HAS_FLAGS not set"
    payload = bytes(range(256)) * 32
    client.request(CMD_WRITE, 12345, len(payload), cookie=0xDEADBEEF12345678, payload=payload)
    assert client.simple_reply() == (0, 0xDEADBEEF12345678, b"")
    client.request(CMD_READ, 12345, len(payload), cookie=7)
    assert client.simple_reply(len(payload)) == (0, 7, payload)
    client.request(CMD_READ, 64 * MiB, 512, cookie=8)
    assert client.simple_reply(512)[:2] == (EINVAL, 8)
    client.request(CMD_WRITE, 64 * MiB - 1, 2, cookie=9, payload=b"xy")
    assert client.simple_reply()[:2] == (28, 9)  # ENOSPC
    # Whole pages take a short path in the server: the same checks hold.
    page = b"\x3c" * 4096
    client.request(CMD_WRITE, 64 * MiB, 4096, cookie=11, payload=page)
    assert client.simple_reply()[:2] == (28, 11)  # ENOSPC: past the end
    client.request(CMD_WRITE, 0, 4096, flags=1 << 10, cookie=12, payload=page)
    assert client.simple_reply()[:2] == (EINVAL, 12)  # an unknown flag
    client.request(CMD_WRITE, 64 * MiB - 4096, 4096, cookie=13, payload=page)
    assert client.simple_reply() == (0, 13, b"")
    client.request(CMD_READ, 64 * MiB - 4096, 4096, cookie=14)
    assert client.simple_reply(4096) == (0, 14, page)
    client.request(CMD_READ, 0, 4096, cookie=15)
    assert client.simple_reply(4096) == (0, 15, bytes(4096))  # the refused write left no trace
    client.request(CMD_DISC, 0, 0, cookie=10)
    assert client.closed_by_peer()


def replies_by_cookie(
    client: Any, reads: dict[int, int], others: set[int]
) -> dict[int, tuple[int, bytes]]:
    """Collect one simple reply per cookie, in whatever order they come.

    ``reads`` maps the cookies of READ requests to their lengths (their replies
    carry data); ``others`` are the cookies of requests with bare replies.
    """
    got: dict[int, tuple[int, bytes]] = {}
    expected = set(reads) | others
    while expected - set(got):
        error, cookie, _ = client.simple_reply()
        assert cookie in expected and cookie not in got, f"unexpected or repeated cookie {cookie}"
        body = client.recv_exact(reads[cookie]) if error == 0 and cookie in reads else b""
        got[cookie] = (error, body)
    return got


def test_requests_split_into_small_pieces(server: Any, raw_nbd: Fixture) -> None:
    """Every message arriving a few bytes at a time is parsed the same."""
    client = raw_nbd(server)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.greeting()
    message = struct.pack(">L", 3) + struct.pack(">QLL", IHAVEOPT, 1, 0)
    for i in range(len(message)):
        client.sock.sendall(message[i : i + 1])
    client.recv_exact(10)

    def send_in_pieces(message: bytes, piece: int) -> None:
        for i in range(0, len(message), piece):
            client.sock.sendall(message[i : i + piece])

    payload = b"\x42" * 600
    send_in_pieces(client.request_header(CMD_WRITE, 1000, 600, cookie=3) + payload, 1)
    assert client.simple_reply() == (0, 3, b"")
    # two independent requests, each cut into 7-byte pieces, sent back to back
    other = b"\x24" * 300
    message = client.request_header(CMD_READ, 999, 602, cookie=4)
    message += client.request_header(CMD_WRITE, 8192 + 5, 300, cookie=5) + other
    send_in_pieces(message, 7)
    got = replies_by_cookie(client, {4: 602}, {5})
    assert got == {4: (0, b"\x00" + payload + b"\x00"), 5: (0, b"")}
    client.request(CMD_READ, 8192, 310, cookie=6)
    assert client.simple_reply(310) == (0, 6, bytes(5) + other + bytes(5))


def test_requests_left_unread_while_paused_survive_other_clients(
    server: Any, raw_nbd: Fixture
) -> None:
    """The server stops reading a client whose replies pile up, with some of
    its requests read but not yet served; other clients' traffic meanwhile
    must not change them (reads go through one buffer the server shares)."""
    stalled, other = raw_nbd(server), raw_nbd(server)
    stalled.handshake()
    other.handshake()
    # 20 reads of 1 MiB pass the 16 MiB a batch may read; writes follow them.
    batch = b"".join(
        stalled.request_header(CMD_READ, 0, MiB, cookie=i) for i in range(20)
    ) + b"".join(
        stalled.request_header(CMD_WRITE, (8 + i) * MiB, 4096, cookie=100 + i)
        + bytes([i + 1]) * 4096
        for i in range(48)
    )
    stalled.sock.sendall(batch)
    time.sleep(0.5)  # the server has sent what the socket takes, and waits
    for i in range(64):  # through the shared buffer while `stalled` waits
        other.request(CMD_WRITE, (40 + i % 8) * MiB, 4096, cookie=i, payload=b"\xee" * 4096)
        assert other.simple_reply() == (0, i, b"")
    got = replies_by_cookie(stalled, dict.fromkeys(range(20), MiB), set(range(100, 148)))
    assert all(got[cookie] == (0, b"") for cookie in range(100, 148))
    for i in range(48):
        stalled.request(CMD_READ, (8 + i) * MiB, 4096, cookie=200 + i)
        assert stalled.simple_reply(4096) == (0, 200 + i, bytes([i + 1]) * 4096)


def test_garbage_read_while_paused_drops_the_client_when_it_resumes(
    attached: Any, nbdsh: Fixture
) -> None:
    """Bytes that are no request, read while the server waits for the client
    to take its replies, end that connection once it does, cleanly."""
    server, good, raw_nbd = attached
    bad = raw_nbd(server)
    bad.handshake()
    reads = b"".join(bad.request_header(CMD_READ, 0, MiB, cookie=i) for i in range(20))
    bad.sock.sendall(reads + b"\xff" * 4096)
    time.sleep(0.5)
    with contextlib.suppress(ConnectionResetError):
        while bad.sock.recv(1 << 20):
            pass  # take the replies; the server then reads on and finds the garbage
    others_unaffected(server, good, nbdsh)
    log = server.log()
    assert "protocol error: bad request magic" in log
    assert "Traceback" not in log and "failed" not in log, log[-4000:]


def test_pipelined_requests_in_one_segment(server: Any, raw_nbd: Fixture) -> None:
    """Many requests in one send; replies come in any order, each matching its cookie."""
    client = raw_nbd(server)
    client.handshake()
    blob = b"".join(bytes([i]) * 4096 for i in range(1, 17))
    client.request(CMD_WRITE, 0, len(blob), cookie=100, payload=blob)
    assert client.simple_reply() == (0, 100, b"")
    # independent requests: reads of the acknowledged data, writes, trims and
    # write-zeroes elsewhere (the server may run them in any order)
    batch = b""
    for i in range(16):
        batch += client.request_header(CMD_READ, i * 4096, 4096, cookie=200 + i)
    for i in range(8):
        off = MiB + i * 5000
        batch += client.request_header(CMD_WRITE, off, 5000, cookie=300 + i)
        batch += bytes([0x80 + i]) * 5000
    batch += client.request_header(CMD_TRIM, 2 * MiB, 8192, cookie=400)
    batch += client.request_header(CMD_WRITE_ZEROES, 3 * MiB, 8192, cookie=401)
    client.sock.sendall(batch)
    got = replies_by_cookie(
        client, {200 + i: 4096 for i in range(16)}, {*range(300, 308), 400, 401}
    )
    for cookie, (error, body) in got.items():
        assert error == 0, (cookie, error)
        if 200 <= cookie < 216:
            assert body == bytes([cookie - 199]) * 4096, f"read {cookie} returned wrong data"
    client.request(CMD_READ, MiB, 8 * 5000, cookie=500)
    want = b"".join(bytes([0x80 + i]) * 5000 for i in range(8))
    assert client.simple_reply(8 * 5000) == (0, 500, want)


def test_disconnect_behind_pipelined_large_writes_gets_every_reply_first(
    server: Any, raw_nbd: Fixture
) -> None:
    """Large writes finish later (encoded off the loop), in bunches; a DISC
    sent right behind them still gets every reply before the close, and
    the data is there for the next client."""
    client = raw_nbd(server)
    client.handshake()
    batch = b""
    for i in range(12):
        batch += client.request_header(CMD_WRITE, i * 256 * 1024, 256 * 1024, cookie=600 + i)
        batch += bytes([0x40 + i]) * (256 * 1024)
    batch += client.request_header(CMD_DISC, 0, 0, cookie=699)
    client.sock.sendall(batch)
    got = replies_by_cookie(client, {}, set(range(600, 612)))
    assert all(error == 0 for error, _ in got.values()), got
    assert client.closed_by_peer()
    reader = raw_nbd(server)
    reader.handshake()
    for i in (0, 11):
        reader.request(CMD_READ, i * 256 * 1024 + 4096, 4096, cookie=i)
        assert reader.simple_reply(4096) == (0, i, bytes([0x40 + i]) * 4096)


@pytest.mark.parametrize("claimed", [33 * MiB, 1024 * MiB])
def test_oversized_write_payload_is_not_buffered(
    start_server: Fixture, raw_nbd: Fixture, nbdsh: Fixture, claimed: int
) -> None:
    """A write claiming more than 32 MiB is answered with an error or a disconnect
    after far fewer bytes than it claims: the server does not wait to buffer it."""
    server = start_server(size="2G")
    client = raw_nbd(server)
    client.handshake()
    client.sock.sendall(client.request_header(CMD_WRITE, 0, claimed, cookie=77))
    try:
        client.sock.sendall(b"\x5a" * MiB)
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped: fine
    except TimeoutError:
        pytest.fail("the server stopped reading without an error reply or a disconnect")
    client.sock.settimeout(ANSWER_TIMEOUT)
    try:
        head = client.recv_exact(16)
    except (EOFError, ConnectionResetError):
        head = b""  # disconnected
    except TimeoutError:
        pytest.fail("no error and no disconnect: the server is waiting for the whole payload")
    if head:
        magic, error, cookie = struct.unpack(">LLQ", head)
        assert magic == 0x67446698 and cookie == 77, head
        assert error != 0, "an oversized write was acknowledged"
        if claimed <= 64 * MiB:
            # the connection stays open: the rest of the payload is skipped and
            # the next request is read in step
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(claimed // MiB - 1):
                    client.sock.sendall(b"\x5a" * MiB)
                client.request(CMD_READ, 0, 4096, cookie=78)
            try:
                reply = client.simple_reply(4096)
            except (EOFError, ConnectionResetError):
                reply = None  # dropped after the error: also acceptable
            if reply is not None:
                assert reply == (0, 78, bytes(4096)), "out of step after a refused write"
    client.close()
    nbdsh(
        server.uri(),
        "assert h.pread(4096, 0) == bytes(4096), 'the refused write was applied'",
        "h.pwrite(b'1', 0)",
    )
    assert server.alive()
