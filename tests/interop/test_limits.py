"""Connection limits over real sockets: counts, handshake and idle timeouts,
keepalive.  Waits are bounded by the socket timeout; nothing asserts on time.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

from conftest import IHAVEOPT, READY_TIMEOUT, RawNBD, Server, StartServer

OPT_STARTTLS = 5

Run = Callable[..., Any]


def greeted(server: Server) -> socket.socket | None:
    """A connection that got the greeting, or None if the server closed it."""
    sock = server.connect()
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while len(data) < 18:
            chunk = sock.recv(18 - len(data))
            if not chunk:
                break
            data += chunk
    if len(data) < 18:
        sock.close()
        return None
    return sock


@contextlib.contextmanager
def held(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for s in sockets:
            s.close()


def eventually_greeted(server: Server) -> socket.socket:
    """Closed connections are released asynchronously: retry for a while."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        sock = greeted(server)
        if sock is not None:
            return sock
        assert time.monotonic() < deadline, "the server never took a connection again"
        time.sleep(0.05)


def dropped(sock: socket.socket) -> bool:
    """True once the server closes the connection (within the socket timeout)."""
    return RawNBD(sock).closed_by_peer()


def test_connections_per_client_are_limited(start_server: StartServer, run: Run) -> None:
    server = start_server(size="8M", extra_args=["--max-connections-per-client", "3"])
    with held([s for s in (greeted(server) for _ in range(3)) if s is not None]) as socks:
        assert len(socks) == 3
        assert greeted(server) is None  # the fourth is closed before the greeting
        assert run(["nbdinfo", server.uri()], check=False).returncode != 0
        socks.pop().close()
        socks.append(eventually_greeted(server))
    run(["nbdinfo", server.uri()])
    assert "max_connections_per_client" in server.log()


def test_connections_in_total_are_limited(start_server: StartServer, run: Run) -> None:
    server = start_server(size="8M", ipv6=True, extra_args=["--max-connections", "2"])
    assert server.extra_tcp
    host6, port6 = server.extra_tcp[0]
    with held([s for s in (greeted(server) for _ in range(2)) if s is not None]) as socks:
        assert len(socks) == 2
        # Another client address (::1) is refused too: the limit is global.
        assert run(["nbdinfo", f"nbd://[{host6}]:{port6}/"], check=False).returncode != 0
    eventually_greeted(server).close()
    run(["nbdinfo", f"nbd://[{host6}]:{port6}/"])
    assert "max_connections)" in server.log()


def test_a_client_that_never_finishes_the_handshake_is_dropped(
    start_server: StartServer, run: Run
) -> None:
    server = start_server(size="8M", extra_args=["--handshake-timeout", "1"])
    silent = greeted(server)
    assert silent is not None
    half = greeted(server)
    assert half is not None
    half.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 100)[:10])
    assert dropped(silent) and dropped(half)
    silent.close()
    half.close()
    run(["nbdinfo", server.uri()])
    assert "handshake not finished in 1s" in server.log()


def test_starttls_without_a_tls_handshake_is_dropped(
    start_server: StartServer, run: Run, tmp_path: Any
) -> None:
    from pki import PKI

    pki = PKI.create(tmp_path / "pki")
    server = start_server(
        size="8M", extra_args=[*pki.server_args("require"), "--handshake-timeout", "1"]
    )
    sock = greeted(server)
    assert sock is not None
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
    assert dropped(sock)
    sock.close()
    run(["nbdinfo", f"nbds://127.0.0.1:{server.port}/?tls-certificates={pki.client('a')}"])


def test_idle_timeout_drops_idle_clients_only_when_set(start_server: StartServer) -> None:
    server = start_server(size="8M", extra_args=["--idle-timeout", "1"])
    raw = RawNBD.connect(server)
    raw.handshake()
    assert raw.closed_by_peer()
    raw.close()
    assert "idle for 1s" in server.log()


def test_client_sockets_have_keepalive(start_server: StartServer) -> None:
    server = start_server(size="8M")
    raw = RawNBD.connect(server)
    raw.handshake()
    local_port = raw.sock.getsockname()[1]
    # The server's end of this connection, as the kernel sees it; its timer
    # shows "keepalive" once no data waits for an acknowledgement.
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        ss = subprocess.run(
            ["ss", "-tnoH", "state", "established", f"( sport = :{server.port} )"],
            capture_output=True,
            text=True,
            check=True,
        )
        lines = [line for line in ss.stdout.splitlines() if f":{local_port} " in line + " "]
        if lines and "keepalive" in lines[0]:
            break
        assert time.monotonic() < deadline, ss.stdout
        time.sleep(0.1)
    raw.close()
