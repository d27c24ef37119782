"""`nbdcache probe`: is a server answering NBD?  A health check for containers.

Opens a connection (TCP or Unix socket), completes the fixed newstyle
handshake, asks `NBD_OPT_INFO` about one export and leaves with
`NBD_OPT_ABORT`: the server must be accepting, speaking NBD, and serving that
export, which a bare TCP connect does not show.  Blocking sockets with one
timeout for the whole exchange; nothing else of the protocol is needed, so
nothing else is here.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from nbdcache import protocol as p


class ProbeError(Exception):
    """The server did not complete the handshake; the message says where."""


@dataclass(frozen=True)
class ProbeResult:
    export: str
    size: int
    flags: int


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeError("timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProbeError("connection closed by the server")
        data += chunk
    return bytes(data)


def _connect(address: str | tuple[str, int], timeout: float) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection(address, timeout=timeout)


def probe(address: str | tuple[str, int], export: str = "", timeout: float = 5.0) -> ProbeResult:
    """Handshake with the server at `address` ((host, port) or a Unix socket path).

    Raises ProbeError (or OSError when it cannot connect).
    """
    deadline = time.monotonic() + timeout
    with _connect(address, timeout) as sock:
        magic, opt_magic, flags = struct.unpack(">QQH", _recv_exact(sock, 18, deadline))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise ProbeError("not a fixed newstyle NBD server")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise ProbeError("the server does not speak fixed newstyle")
        client_flags = p.FLAG_C_FIXED_NEWSTYLE
        if flags & p.FLAG_NO_ZEROES:
            client_flags |= p.FLAG_C_NO_ZEROES
        name = export.encode()
        info = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        sock.sendall(
            struct.pack(">I", client_flags) + struct.pack(">QII", p.IHAVEOPT, p.OPT_INFO, len(info))
        )
        sock.sendall(info)
        size = tflags = -1
        while True:
            rmagic, option, reply, length = struct.unpack(">QIII", _recv_exact(sock, 20, deadline))
            if rmagic != p.REPLY_MAGIC or option != p.OPT_INFO:
                raise ProbeError("malformed option reply")
            if length > 1 << 16:
                raise ProbeError("option reply too long")
            data = _recv_exact(sock, length, deadline)
            if reply == p.REP_ACK:
                break
            if reply == p.REP_ERR_TLS_REQD:
                # Alive, and wants TLS first: the handshake got as far as a
                # plain-text probe can take it.
                sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_ABORT, 0))
                return ProbeResult(export, -1, 0)
            if reply & (1 << 31):
                message = data.decode(errors="replace") or f"error {reply & 0x7FFFFFFF}"
                raise ProbeError(f"NBD_OPT_INFO for export {export!r} refused: {message}")
            if reply == p.REP_INFO and len(data) >= 12:
                (kind,) = struct.unpack_from(">H", data)
                if kind == p.INFO_EXPORT:
                    size, tflags = struct.unpack_from(">QH", data, 2)
        if size < 0:
            raise ProbeError("the server acknowledged NBD_OPT_INFO without NBD_INFO_EXPORT")
        sock.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_ABORT, 0))
    return ProbeResult(export, size, tflags)
