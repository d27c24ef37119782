"""asyncio glue: listeners, one `asyncio.BufferedProtocol` per connection,
flow control and shutdown.

The hot path follows the brief: each read parses every complete request in
the buffer, answers them synchronously from the store and sends all replies
with one `writelines`; there is no Task or future per request.  The socket
is read into one receive buffer the whole server shares (`NBDServer.rbuf`),
and requests are parsed and served where they lie: a write's payload goes
from there straight to the store.  Only what a read leaves unparsed (a
partial request, or requests past the batch's budget) is copied, into the
connection's own buffer.
Replies to a batch are bounded (`max_inflight_bytes`): when the transport's
buffer passes its high-water mark the connection stops reading until the
client drains it.  A misbehaving client only ever loses its own connection.

Connection setup is guarded by `nbdcache.limits` (connection counts,
handshake and idle timeouts, keepalive) and, when TLS is on, upgraded after
NBD_OPT_STARTTLS with `loop.start_tls`; each export's `nbdcache.tls`
access list is asked at option time and again on `reload`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from nbdcache import protocol as p
from nbdcache import tls
from nbdcache.device import Device, Outcome
from nbdcache.limits import Admission, Limits, set_keepalive
from nbdcache.tier import PAGE_SHIFT, PAGE_SIZE, StoreError

log = logging.getLogger("nbdcache.server")

_PAGE_MASK = PAGE_SIZE - 1
_CMD_WRITE = p.CMD_WRITE
#: Reply bytes queued in the transport before the connection stops reading.
WRITE_HIGH_WATER = 4 << 20
#: The most bytes one read takes from a socket (the receive buffer's size).
READ_SIZE = 256 << 10
#: Seconds shutdown waits past the grace for requests still in flight.
INFLIGHT_SHUTDOWN_LIMIT = 60.0


class NotFast(StoreError):
    """WRITE_ZEROES with FAST_ZERO that would not be fast (NBD_ENOTSUP)."""

    errno = p.ENOTSUP


@dataclass
class Export:
    """A served export: what the handshake shows and the device behind it."""

    info: p.ExportInfo
    device: Device


class NBDServer:
    """Owns the listeners and the live connections of one process."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        max_inflight_bytes: int = 16 << 20,
        shutdown_grace: float = 2.0,
        limits: Limits | None = None,
        tls_mode: str = p.TLS_OFF,
        ssl_context: ssl.SSLContext | None = None,
        access: Mapping[str, tls.AccessList] | None = None,
    ) -> None:
        if tls_mode not in p.TLS_MODES or (tls_mode != p.TLS_OFF and ssl_context is None):
            raise ValueError("TLS needs a mode from protocol.TLS_MODES and a context")
        self.exports = list(exports)
        self.by_name = {e.info.name: e for e in self.exports}
        self.limits = limits = limits or Limits()
        self.admission = Admission(limits)
        self.max_inflight_requests = limits.max_inflight_requests
        self.tls_mode = tls_mode
        self.ssl_context = ssl_context
        self.access: dict[str, tls.AccessList] = {}
        self.export_infos: list[p.ExportInfo] = []
        self._set_access(access or {})
        self.max_inflight_bytes = max_inflight_bytes
        self.shutdown_grace = shutdown_grace
        self.shutting_down = False
        self.connections: set[Connection] = set()
        self.connections_total = 0
        self.connections_dropped = 0  # for breaking the protocol or by us
        self._listeners: list[asyncio.base_events.Server] = []
        # Every connection reads into this, one at a time: a transport fills
        # it and hands it back (`get_buffer`, `buffer_updated`) within one
        # callback, and a connection keeps no view of it past that.
        self.rbuf = memoryview(bytearray(READ_SIZE))
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    async def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True, backlog=512
        )
        self._listeners.append(srv)
        return [s.getsockname()[:2] for s in srv.sockets]

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(lambda: Connection(self), path, backlog=512)
        self._listeners.append(srv)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on a socket already bound and listening (socket activation)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        else:
            srv = await loop.create_server(lambda: Connection(self), sock=sock)
        self._listeners.append(srv)

    def _set_access(self, access: Mapping[str, tls.AccessList]) -> None:
        # (A reload always names every export: see cli._reload.)
        self.access = {name: access.get(name, tls.ALLOW_ALL) for name in self.by_name}
        # An export that names certificates is TLS-only (SELECTIVETLS).
        self.export_infos = [
            dataclasses.replace(e.info, tls_only=self.access[e.info.name].needs_certificate)
            for e in self.exports
        ]

    def reload(
        self, ssl_context: ssl.SSLContext | None, access: Mapping[str, tls.AccessList]
    ) -> None:
        """New certificates and access lists; connections no longer allowed are closed.

        Connections already past STARTTLS keep their session (TLS cannot
        be renegotiated under them); the new context serves new upgrades.
        """
        if self.tls_mode != p.TLS_OFF and ssl_context is not None:
            self.ssl_context = ssl_context
        self._set_access(access)
        for conn in list(self.connections):
            conn.recheck_access()

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self.connections),
            "connections_total": self.connections_total,
            "connections_dropped_total": self.connections_dropped,
        }

    def _register(self, conn: Connection) -> None:
        self.connections_total += 1
        self.connections.add(conn)
        self._all_closed.clear()

    def _unregister(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if conn.admitted:
            conn.admitted = False
            self.admission.release(conn.client)
        if not self.connections:
            self._all_closed.set()

    async def shutdown(self) -> None:
        """Stop accepting, let connections finish, drop the rest after the grace."""
        self.shutting_down = True
        for srv in self._listeners:
            srv.close()
        for conn in list(self.connections):
            conn.begin_shutdown()
        try:
            await asyncio.wait_for(self._all_closed.wait(), self.shutdown_grace)
        except TimeoutError:
            # Idle clients are dropped now; requests still in flight are
            # answered first (the spec: wait for them before disconnecting).
            for conn in list(self.connections):
                conn.abort_when_idle("shutdown grace expired")
            try:
                await asyncio.wait_for(self._all_closed.wait(), INFLIGHT_SHUTDOWN_LIMIT)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.abort("requests still in flight at shutdown")
        for srv in self._listeners:
            await srv.wait_closed()


class Connection(asyncio.BufferedProtocol):
    """One client: the handshake, then the transmission phase."""

    def __init__(self, server: NBDServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.client = "unix"  # the address connection limits count by
        self.identity = tls.Peer(None)
        self.admitted = False
        self.timer: asyncio.TimerHandle | None = None
        self.tls_task: asyncio.Task[None] | None = None
        self.tls_early = bytearray()
        self.seen = False  # data arrived since the last idle check
        self.handshake: p.Handshake | None = None
        self.neg: p.Negotiated | None = None
        self.device: Device | None = None
        self.page_writes = 0  # whole-page writes below this offset take the short path
        self.buf = bytearray()  # input not served yet, when there is any
        self.parser = p.RequestParser()
        self.write_paused = False
        self.closing = False
        self.draining = False  # NBD_CMD_DISC seen: no more requests
        self.inflight = 0  # requests waiting for the store
        self.inflight_bytes = 0  # and the data they read or write
        self.store_paused = False  # reading paused until those drain
        self.idle_abort = ""  # at shutdown: drop once nothing is in flight
        self.replies: list[bytes | memoryview] = []  # finished later, not sent yet

    # --- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        server = self.server
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if server.limits.keepalive:
                set_keepalive(sock)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if isinstance(peer, tuple):
            self.client = str(peer[0])
            self.identity = tls.Peer(tls.parse_address(peer[0]))
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        server._register(self)
        if server.shutting_down:
            transport.abort()
            return
        refusal = server.admission.refusal(self.client)
        if refusal is not None:
            log.warning("%s: refusing connection: %s", self.peer, refusal)
            self.closing = True
            transport.close()
            return
        server.admission.admit(self.client)
        self.admitted = True
        self.handshake = p.Handshake(
            server.export_infos, tls=server.tls_mode, access=self._access_refusal
        )
        transport.write(self.handshake.greeting())
        if server.limits.handshake_timeout:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(server.limits.handshake_timeout, self._handshake_expired)
        log.debug("%s: connected", self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        self.buf = bytearray()
        self.server._unregister(self)
        log.debug("%s: disconnected (%s)", self.peer, exc or "closed")

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if (
            self.transport is not None
            and not self.closing
            and not self.store_paused
            and not self.draining  # no more requests are read
        ):
            self.transport.resume_reading()
            self._process()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.rbuf

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.rbuf[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closing:
            return
        self.seen = True
        if self.tls_task is not None:
            # Decrypted bytes that arrive before the upgrade is recorded are
            # the first TLS-era options: they wait for `tls_started`.
            self.tls_early += data
            return
        if self.neg is None:
            try:
                self._handshake(bytes(data))
            except Exception as exc:
                self._drop_for(exc)
            return
        if self.buf:  # behind a partial request, or paused
            self.buf += data
            self._process()
        else:
            self._process(data)

    def _drop_for(self, exc: Exception) -> None:
        """The client broke the protocol, or we have a bug: drop this connection."""
        if isinstance(exc, p.RemoteProtocolError):
            self.abort(f"protocol error: {exc}")
        else:
            log.error("%s: internal error, dropping the connection", self.peer, exc_info=exc)
            self.abort("internal error")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # --- shutdown -------------------------------------------------------------

    def begin_shutdown(self) -> None:
        if self.handshake is not None:
            self.handshake.shutting_down = True

    def abort_when_idle(self, reason: str) -> None:
        if self.inflight:
            self.idle_abort = reason
        else:
            self.abort(reason)

    def abort(self, reason: str) -> None:
        if not self.closing:
            log.info("%s: dropping connection: %s", self.peer, reason)
            self.server.connections_dropped += 1
            self._send_replies()  # requests already done are answered, as they finished
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
        if self.tls_task is not None:
            self.tls_task.cancel()  # a TLS handshake in progress ends too

    # --- handshake ------------------------------------------------------------

    def _access_refusal(self, export: p.ExportInfo) -> str | None:
        return self.server.access[export.name].refusal(self.identity)

    def _handshake_expired(self) -> None:
        self.timer = None
        if self.neg is None:
            self.abort(f"handshake not finished in {self.server.limits.handshake_timeout:g}s")

    def _handshake(self, data: bytes) -> None:
        hs = self.handshake
        assert hs is not None and self.transport is not None
        out = hs.receive_data(data)
        if out:
            self.transport.write(out)
        for refusal in hs.refusals:
            log.warning("%s: refused %s (%s)", self.peer, refusal, self.identity.describe())
        hs.refusals.clear()
        if hs.closed:
            log.info("%s: handshake ended: %s", self.peer, hs.close_reason)
            self.closing = True
            self.transport.close()
            return
        if hs.starttls:
            # The ACK is written; the TLS handshake follows on the same socket,
            # and no byte of it may reach the plain-text handshake meanwhile.
            self.transport.pause_reading()
            self.tls_task = asyncio.get_running_loop().create_task(self._start_tls(hs))
            return
        if hs.result is not None:
            self.neg = hs.result
            self.device = self.server.by_name[hs.result.export.name].device
            if not self.neg.flags & p.FLAG_READ_ONLY:
                self.page_writes = self.neg.export.size
            self.handshake = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.server.limits.idle_timeout:
                self._schedule_idle_check()
            log.info(
                "%s: attached export %r (structured replies: %s)",
                self.peer,
                self.neg.export.name,
                self.neg.structured_replies,
            )
            if hs.leftover:
                self.buf += hs.leftover
                self._process()

    async def _start_tls(self, hs: p.Handshake) -> None:
        old = self.transport
        ctx = self.server.ssl_context
        assert old is not None and ctx is not None
        loop = asyncio.get_running_loop()
        timeout = self.server.limits.handshake_timeout or None
        try:
            new = await loop.start_tls(
                old, self, ctx, server_side=True, ssl_handshake_timeout=timeout
            )
        except (OSError, TimeoutError, asyncio.CancelledError) as exc:
            self.abort(f"TLS handshake failed: {exc or type(exc).__name__}")
            old.abort()
            # The TLS layer does not always report the loss of a connection it
            # never finished setting up: unregister here (it is idempotent).
            self.connection_lost(None)
            return
        finally:
            self.tls_task = None
        if new is None or self.closing:
            old.abort()
            return
        self.transport = new
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.identity = tls.Peer.from_cert(self.identity.address, new.get_extra_info("peercert"))
        hs.tls_started()
        log.info("%s: TLS started (%s)", self.peer, self.identity.describe())
        if self.tls_early:
            early, self.tls_early = bytes(self.tls_early), bytearray()
            self.data_received(early)

    def recheck_access(self) -> None:
        """After a reload: close this connection if its export now refuses it."""
        if self.neg is None or self.closing:
            return
        refusal = self._access_refusal(self.neg.export)
        if refusal is not None:
            log.warning(
                "%s: access to export %r revoked: %s (%s)",
                self.peer,
                self.neg.export.name,
                refusal,
                self.identity.describe(),
            )
            # No further request is read; those in flight are answered.
            self.draining = True
            if self.transport is not None:
                self.transport.pause_reading()
            self.abort_when_idle("access revoked")

    def _schedule_idle_check(self) -> None:
        self.seen = False
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.server.limits.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self.timer = None
        if self.closing:
            return
        if self.seen or self.inflight or self.replies:
            self._schedule_idle_check()
        else:
            self.abort(f"idle for {self.server.limits.idle_timeout:g}s")

    # --- transmission ---------------------------------------------------------

    def _process(self, data: bytes | memoryview | None = None) -> None:
        """Answer every complete request in the buffer, within the budget.

        `data`, given while `buf` is empty, is new input (a view of the
        receive buffer): it is served where it lies, and what is left of it
        is copied to `buf` before this returns.
        """
        transport = self.transport
        device = self.device
        if device is None:  # negotiating (`resume_writing`): no requests yet
            return
        assert transport is not None
        src = self.buf if data is None else data
        pos = 0  # of `data`, consumed
        try:
            while not (self.write_paused or self.closing or self.draining):
                if (
                    self.inflight_bytes >= self.server.max_inflight_bytes
                    or self.inflight >= self.server.max_inflight_requests
                ):
                    self.store_paused = True
                    transport.pause_reading()
                    return
                budget = self.server.max_inflight_bytes - self.inflight_bytes
                requests, consumed = self.parser.parse(
                    src[pos:] if pos else src,
                    budget,
                    self.server.max_inflight_requests - self.inflight,
                )
                if not consumed:
                    return
                disconnect = self._batch(requests, device)
                if data is None:
                    del self.buf[:consumed]
                else:
                    pos += consumed
                if disconnect:
                    # NBD_CMD_DISC: finish what is in flight, then close.
                    self.draining = True
                    transport.pause_reading()
                    if not self.inflight:
                        self._finish_disconnect()
                    return
        except Exception as exc:
            self._drop_for(exc)
        finally:
            if data is not None and pos < len(data):
                self.buf += data[pos:]

    def _batch(self, requests: list[p.Request], device: Device) -> bool:
        """Answer one parsed batch with one `writelines`; True at NBD_CMD_DISC."""
        out: list[bytes | memoryview] = []
        disconnect = False
        # A whole-page write without flags, in bounds, to a writable
        # export while not shutting down passes `check_request`: it goes
        # straight to the device (swap and 4 KiB random writes).
        page_writes = 0 if self.server.shutting_down else self.page_writes
        write_page = device.write_page
        reply = p.simple_reply
        for req in requests:
            flags, type_, cookie, offset, length, payload = req
            if (
                type_ == _CMD_WRITE
                and length == PAGE_SIZE
                and not flags
                and not offset & _PAGE_MASK
                and offset < page_writes
            ):
                assert payload is not None
                try:
                    result = write_page(offset >> PAGE_SHIFT, payload)
                except Exception as exc:
                    self._failed(req, exc, out)
                    continue
                if result is None:
                    out.append(reply(cookie))
                else:
                    self._wait(req, result)
                continue
            if type_ == p.CMD_DISC:
                disconnect = True
                break
            self._execute(req, out)
        # No view of the input outlives the batch: the input changes next.
        for req in requests:
            if req.payload is not None:
                req.payload.release()
        if out:
            assert self.transport is not None
            self.transport.writelines(out)
        return disconnect

    def _finish_disconnect(self) -> None:
        log.debug("%s: client disconnected", self.peer)
        self._send_replies()
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _execute(self, req: p.Request, out: list[bytes | memoryview]) -> None:
        neg = self.neg
        device = self.device
        assert neg is not None and device is not None
        error = p.check_request(req, neg)
        if not error and self.server.shutting_down:
            error = p.ESHUTDOWN
        if error:
            self._error(req, error, out)
            return
        try:
            result = self._run(req, device)
        except Exception as exc:
            self._failed(req, exc, out)
            return
        if isinstance(result, asyncio.Future):
            self._wait(req, result)
            return
        self._reply(req, result, out)

    def _wait(self, req: p.Request, result: asyncio.Future[Any]) -> None:
        """The store needs the disk (or room): reply when it is done."""
        self.inflight += 1
        self.inflight_bytes += req.length
        pending = req._replace(payload=None)
        result.add_done_callback(lambda fut: self._complete(pending, fut))

    def _run(self, req: p.Request, device: Device) -> Outcome:
        type_ = req.type
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        if type_ == p.CMD_READ:
            return device.read(req.offset, req.length)
        if type_ == p.CMD_WRITE:
            assert req.payload is not None
            return device.write(req.offset, req.payload, fua)
        if type_ == p.CMD_TRIM:
            return device.trim(req.offset, req.length, fua)
        if type_ == p.CMD_WRITE_ZEROES:
            if req.flags & p.CMD_FLAG_FAST_ZERO and (req.offset | req.length) & 4095:
                # Whole pages are zeroed in metadata alone; edges need a
                # read-modify-write that may wait: not fast, so say so at once.
                raise NotFast("FAST_ZERO: only whole 4 KiB pages are zeroed fast")
            return device.write_zeroes(
                req.offset, req.length, bool(req.flags & p.CMD_FLAG_NO_HOLE), fua
            )
        if type_ == p.CMD_BLOCK_STATUS:
            return device.block_status(
                req.offset, req.length, req_one=bool(req.flags & p.CMD_FLAG_REQ_ONE)
            )
        if type_ == p.CMD_FLUSH:
            return device.flush()
        return device.cache(req.offset, req.length)

    def _reply(self, req: p.Request, result: object, out: list[bytes | memoryview]) -> None:
        neg = self.neg
        assert neg is not None
        if req.type == p.CMD_READ:
            assert isinstance(result, list)
            if not neg.structured_replies:
                out.append(p.simple_reply(req.cookie))
            elif req.length:
                out.append(p.read_chunk_header(req.cookie, req.offset, req.length))
            else:
                out.append(p.structured_done(req.cookie))
            out.extend(result)
        elif req.type == p.CMD_BLOCK_STATUS:
            assert isinstance(result, list)
            out.append(p.block_status_reply(req.cookie, neg.meta_context, result))
        else:
            out.append(p.simple_reply(req.cookie))

    def _failed(self, req: p.Request, exc: BaseException, out: list[bytes | memoryview]) -> None:
        if isinstance(exc, StoreError):
            log.warning(
                "%s: request %d at %d+%d failed: %s",
                self.peer,
                req.type,
                req.offset,
                req.length,
                exc,
            )
            self._error(req, exc.errno, out, str(exc))
        elif isinstance(exc, OSError):
            # The image failed under a read: an I/O error for the client, not a bug.
            log.warning(
                "%s: request %d at %d+%d failed: image I/O error: %s",
                self.peer,
                req.type,
                req.offset,
                req.length,
                exc.strerror or exc,
            )
            self._error(req, p.ENOSPC if exc.errno == p.ENOSPC else p.EIO, out, "I/O error")
        else:
            log.error("%s: internal error on request type %d", self.peer, req.type, exc_info=exc)
            self._error(req, p.EIO, out, "internal server error")

    def _complete(self, req: p.Request, fut: asyncio.Future[object]) -> None:
        """Reply to a request the store finished later (out of order)."""
        self.inflight -= 1
        self.inflight_bytes -= req.length
        # Retrieved even when nobody is left to tell: else asyncio logs it.
        exc = StoreError("request cancelled") if fut.cancelled() else fut.exception()
        if self.closing or self.transport is None:
            return
        out: list[bytes | memoryview] = []
        try:
            if exc is not None:
                self._failed(req, exc, out)
            else:
                self._reply(req, fut.result(), out)
        except Exception:
            # No reply can be built: the client must not wait for one forever.
            log.exception("%s: internal error answering request type %d", self.peer, req.type)
            self.abort("internal error")
            return
        if not self.replies:
            asyncio.get_running_loop().call_soon(self._send_replies)
        self.replies += out
        if self.idle_abort and not self.inflight:
            log.info("%s: closing: %s", self.peer, self.idle_abort)
            self._finish_disconnect()  # close() sends the replies written above
        elif self.draining and not self.inflight:
            self._finish_disconnect()
        elif (
            self.store_paused
            and self.inflight_bytes < self.server.max_inflight_bytes
            and self.inflight < self.server.max_inflight_requests
        ):
            self.store_paused = False
            if not (self.write_paused or self.draining):
                self.transport.resume_reading()
                self._process()

    def _send_replies(self) -> None:
        """Write the replies `_complete` built since the last call, at once.

        Requests the store finishes later finish in bunches (a batch of
        encoded runs, a batch written back); one write for the bunch saves
        a system call, and a wake-up of the client, per reply.
        """
        replies, self.replies = self.replies, []
        if replies and not self.closing and self.transport is not None:
            self.transport.writelines(replies)

    def _error(
        self, req: p.Request, error: int, out: list[bytes | memoryview], message: str = ""
    ) -> None:
        neg = self.neg
        assert neg is not None
        if neg.structured_replies:
            out.append(p.structured_error(req.cookie, error, message))
        else:
            out.append(p.simple_reply(req.cookie, error))
