"""Socket activation: listening sockets handed over by systemd (or any launcher).

The `sd_listen_fds` protocol, without a systemd library: the launcher binds
the sockets, passes them as file descriptors 3, 4, ... and sets
``LISTEN_FDS`` to their number and ``LISTEN_PID`` to the server's pid (so a
child the server starts does not take them too).  ``LISTEN_FDNAMES`` is not
needed: every socket serves every export.  The variables are removed from
the environment once read, as `sd_listen_fds(1)` does.

When sockets are handed over, they are the server's only listeners: the
configured ``listen`` and ``unix`` addresses are the socket unit's business
then (see deploy/nbdcache.socket).
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


class ActivationError(Exception):
    """The environment announces sockets that are not usable listening sockets."""


def listen_sockets() -> list[socket.socket]:
    """The sockets passed to this process, in order; empty when none were."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={count!r} is not a number")
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"file descriptor {fd} is not a socket: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
            socket.AF_UNIX,
        ):
            raise ActivationError(
                f"file descriptor {fd} is not a stream socket (use ListenStream= in the unit)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"file descriptor {fd} is not listening (Accept=no is needed)")
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def describe(sock: socket.socket) -> str:
    """`127.0.0.1 port 10809` or `unix socket /run/nbdcache.sock`."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix socket {name or '(unnamed)'}"
    return f"{name[0]} port {name[1]}"
