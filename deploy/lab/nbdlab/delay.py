"""A TCP proxy that adds latency: what `netem delay` would do, without netem.

The guest's kernel here has no `netem` qdisc, and `nbdkit --filter=delay`
(the other tool on the path) takes whole milliseconds only in the nbdkit
this lab runs on (1.32: `delay-read=0.5ms` is read as 0). So the lab puts
this proxy between qemu and each server: every byte is held for half the
delay in each direction, so each NBD request's round trip takes `delay`
longer. Requests stay pipelined (a held chunk does not hold up the chunks
behind it beyond their own deadline), and order is kept per direction.

Runs as its own process: `python -m nbdlab.delay LISTEN_PORT HOST PORT
DELAY_MS` listens on 127.0.0.1:LISTEN_PORT.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys


class _Pipe(asyncio.Protocol):
    """One direction's sender: data written to it goes out `hold` seconds later."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False
        self.early: list[bytes] = []  # received before the other side was connected

    def connect(self, peer: _Pipe) -> None:
        self.peer = peer
        for data in self.early:
            peer.send_later(data)
        self.early.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(6, 1, 1)  # TCP_NODELAY

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.send_later(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.peer is not None:
            self.peer.close_later()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.close_later()

    def send_later(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self.hold <= 0 and not self.queue:
            if self.transport is not None:
                self.transport.write(data)
            return
        self.queue.append((loop.time() + self.hold, data))
        if self.timer is None:
            self.timer = loop.call_at(self.queue[0][0], self._pump)

    def close_later(self) -> None:
        self.closing = True
        if not self.queue and self.transport is not None:
            self.transport.close()

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = None
        now = loop.time()
        chunks = []
        while self.queue and self.queue[0][0] <= now:
            chunks.append(self.queue.popleft()[1])
        if chunks and self.transport is not None:
            self.transport.writelines(chunks)
        if self.queue:
            self.timer = loop.call_at(self.queue[0][0], self._pump)
        elif self.closing and self.transport is not None:
            self.transport.close()


async def serve(listen_port: int, host: str, port: int, delay_ms: float) -> None:
    hold = delay_ms / 2000.0
    loop = asyncio.get_running_loop()

    async def on_client(client: _Pipe) -> None:
        try:
            _, upstream = await loop.create_connection(lambda: _Pipe(hold), host, port)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        client.connect(upstream)
        upstream.connect(client)

    tasks: set[asyncio.Task[None]] = set()

    def factory() -> _Pipe:
        pipe = _Pipe(hold)
        task = loop.create_task(on_client(pipe))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return pipe

    server = await loop.create_server(factory, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m nbdlab.delay LISTEN_PORT HOST PORT DELAY_MS", file=sys.stderr)
        return 2
    listen_port, host, port, delay_ms = int(argv[0]), argv[1], int(argv[2]), float(argv[3])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listen_port, host, port, delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
