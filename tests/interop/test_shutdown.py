"""SIGTERM: requests after it get ESHUTDOWN, negotiating clients get
REP_ERR_SHUTDOWN, the process exits 0 once its clients are gone."""

from __future__ import annotations

import signal
import struct
import time
from collections.abc import Callable
from typing import Any

RawFactory = Callable[[Any], Any]

OPT_LIST = 3
REP_ERR_SHUTDOWN = (1 << 31) + 7
IHAVEOPT = 0x49484156454F5054
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
ESHUTDOWN = 108


def test_sigterm_answers_eshutdown_and_rep_err_shutdown(
    start_server: Callable[..., Any], raw_nbd: RawFactory
) -> None:
    server = start_server(size="1M", extra_args=["--log-level", "debug"])
    attached = raw_nbd(server)
    attached.handshake()
    attached.request(CMD_WRITE, 0, 4096, cookie=1, payload=b"\x5a" * 4096)
    assert attached.simple_reply() == (0, 1, b"")

    negotiating = raw_nbd(server)
    negotiating.greeting()
    negotiating.sock.sendall(struct.pack(">I", 3))

    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # let the signal land; the grace period is 2 s

    attached.request(CMD_READ, 0, 4096, cookie=2)
    assert attached.simple_reply(4096)[:2] == (ESHUTDOWN, 2)
    attached.request(CMD_WRITE, 4096, 4096, cookie=3, payload=b"\xa5" * 4096)
    assert attached.simple_reply()[:2] == (ESHUTDOWN, 3)

    negotiating.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
    magic, option, reply, length = struct.unpack(">QIII", negotiating.recv_exact(20))
    assert (magic, option, reply) == (0x3E889045565A9, OPT_LIST, REP_ERR_SHUTDOWN)
    negotiating.recv_exact(length)

    attached.request(CMD_DISC, 0, 0)
    assert attached.closed_by_peer()
    negotiating.close()
    assert server.stop() == 0


def test_sigterm_drops_idle_clients_after_the_grace(
    start_server: Callable[..., Any], raw_nbd: RawFactory
) -> None:
    server = start_server(size="1M")
    idle = raw_nbd(server)
    idle.handshake()
    started = time.monotonic()
    assert server.stop() == 0
    assert idle.closed_by_peer()
    assert time.monotonic() - started < 30  # bounded, not a speed assertion
