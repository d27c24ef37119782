"""Connection limits: how many clients, how long a handshake, how long idle.

A server on a network must bound what one client (or many) can take: the
number of connections in total and per client address (extra connections
are closed at once, before the greeting), the time a client has to finish
the handshake (TLS included), and optionally the time a connection may sit
idle.  Idle clients are normal for swap (a swap device may go untouched for
hours), so the idle timeout is off by default; TCP keepalive is on instead,
so a client that vanished without a FIN is found out.  In-flight requests
and bytes per connection are bounded by the transmission phase's flow
control (`max_inflight_requests`, `max_inflight_bytes`).
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass

#: Keepalive probing: first probe after this many idle seconds, then every
#: KEEPALIVE_INTERVAL; the connection is dropped after KEEPALIVE_COUNT misses.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6


@dataclass(frozen=True)
class Limits:
    max_connections: int = 256
    max_connections_per_client: int = 64
    handshake_timeout: float = 30.0  # seconds; 0: none
    idle_timeout: float = 0.0  # seconds; 0: none
    keepalive: bool = True
    max_inflight_requests: int = 1024


class Admission:
    """Counts live connections, in total and per client address."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.per_client: Counter[str] = Counter()

    def refusal(self, client: str) -> str | None:
        """Why one more connection from `client` is refused, or None."""
        if self.total >= self.limits.max_connections:
            return f"too many connections ({self.total}, max_connections)"
        if self.per_client[client] >= self.limits.max_connections_per_client:
            return (
                f"too many connections from {client} "
                f"({self.per_client[client]}, max_connections_per_client)"
            )
        return None

    def admit(self, client: str) -> None:
        self.total += 1
        self.per_client[client] += 1

    def release(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


def set_keepalive(sock: socket.socket) -> None:
    """SO_KEEPALIVE with probing tuned from hours down to minutes (Linux)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
