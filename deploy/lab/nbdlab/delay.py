"""A TCP proxy that adds latency: what `netem delay` would do, without netem.

The kernel here has no `netem` qdisc, and `nbdkit --filter=delay` (the other
tool on the path) takes whole milliseconds only in the nbdkit this lab runs
on (1.32: `delay-read=0.5ms` is read as 0). So the lab puts this proxy
between qemu and each server: every byte is held for half the delay in each
direction, so each NBD request's round trip takes `delay` longer. Requests
stay pipelined (a held chunk does not hold up the chunks behind it beyond
their own deadline), and order is kept per direction.

Threads, not an event loop: an event loop's timers wait in epoll, whose
timeout is whole milliseconds, so a 0.25 ms hold would become 1 ms. Here
each direction of each connection has a reader (stamps each chunk with its
deadline) and a writer (sleeps until the deadline with nanosleep, sends).

Runs as its own process: `python -m nbdlab.delay LISTEN_PORT HOST PORT
DELAY_MS` listens on 127.0.0.1:LISTEN_PORT.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import sys
import threading
import time
from types import FrameType


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _pipe(src: socket.socket, dst: socket.socket, hold: float, done: threading.Barrier) -> None:
    """Forward src -> dst, each chunk `hold` seconds after it arrived."""
    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def reader() -> None:
        try:
            while data := src.recv(262144):
                chunks.put((time.monotonic() + hold, data))
        except OSError:
            pass
        chunks.put((0.0, b""))

    def writer() -> None:
        try:
            while True:
                deadline, data = chunks.get()
                if not data:
                    break
                wait = deadline - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            # The other side is gone: stop reading too.
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        done.wait()

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


class DelayProxy:
    """127.0.0.1:listen_port -> host:port, each round trip `delay_ms` longer."""

    def __init__(self, listen_port: int, host: str, port: int, delay_ms: float) -> None:
        self.upstream = (host, port)
        self.hold = delay_ms / 2000.0
        self.listener = socket.create_server(("127.0.0.1", listen_port), backlog=64)
        self.port = int(self.listener.getsockname()[1])

    def _connection(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        for s in (client, server):
            _nodelay(s)

        def close() -> None:
            client.close()
            server.close()

        done = threading.Barrier(2, action=close)
        _pipe(client, server, self.hold, done)
        _pipe(server, client, self.hold, done)

    def serve_forever(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._connection(client)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.listener.close()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m nbdlab.delay LISTEN_PORT HOST PORT DELAY_MS", file=sys.stderr)
        return 2
    proxy = DelayProxy(int(argv[0]), argv[1], int(argv[2]), float(argv[3]))

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
