"""Sans-I/O NBD, server side: constants, the fixed-newstyle handshake,
transmission request parsing and reply encoding.

Bytes go in, bytes and plain values come out; nothing here touches a socket
or a clock, so the whole protocol can be driven (and fuzzed) from tests.  The
peer's mistakes raise `RemoteProtocolError` (the connection is dropped, the
server goes on); our own misuse of this module raises `LocalProtocolError`.

Every constant, reply and error code follows the NBD protocol specification
(`doc/proto.md` of the NBD project).  TLS follows its "TLS support" section:
the handshake answers `OPT_STARTTLS` and then reports `starttls`; the caller
upgrades the socket and calls `Handshake.tls_started`, after which option
haggling starts afresh over TLS.  Who may use which export (certificate
names, client addresses) is the caller's decision, asked through `access`.

Extended headers are not negotiated yet: `OPT_EXTENDED_HEADERS` gets
`REP_ERR_UNSUP`, and `RequestParser` keeps the header layout in one place so
the 32-byte extended request can be added beside the compact one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# --- magic numbers -----------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags ----------------------------------------------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# --- transmission flags -------------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --- options ------------------------------------------------------------------

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission -------------------------------------------------------------

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

META_BASE_ALLOCATION = "base:allocation"
#: The id we hand out for `base:allocation` (transient, opaque to clients).
META_BASE_ALLOCATION_ID = 1

# --- size constraints ---------------------------------------------------------

MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 * 1024 * 1024
MAX_STRING = 4096  # the spec's limit on names and queries
#: Largest option payload we buffer; longer options are skipped unread
#: and answered with REP_ERR_TOO_BIG.
MAX_OPTION_LENGTH = 64 * 1024
MAX_EXTENTS = 1 << 20

# --- wire structures ----------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
#: A whole OFFSET_DATA chunk header including the 64-bit offset.
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")
_ERROR_PAYLOAD = struct.Struct(">IH")
_EXTENT = struct.Struct(">II")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class ProtocolError(Exception):
    """Base of the protocol's typed errors."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection must be dropped."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol core (a bug in the caller)."""


# --- handshake ----------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know of an export."""

    name: str
    size: int
    flags: int  # transmission flags, without SEND_DF (that depends on the client)
    description: str = ""
    #: Only clients that started TLS may use it (SELECTIVETLS, TLS_ON mode).
    tls_only: bool = False


@dataclass(frozen=True)
class Negotiated:
    """The outcome of a successful handshake."""

    export: ExportInfo
    flags: int  # the transmission flags sent to the client
    structured_replies: bool
    meta_context: int  # 0, or META_BASE_ALLOCATION_ID when base:allocation is active
    block_size_requested: bool


class _Reader:
    """Cursor over an option payload; running past the end is the peer's fault."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _InvalidOption("option data too short")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise _InvalidOption("string longer than 4096 bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _InvalidOption("string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _InvalidOption("trailing data in option")


class _InvalidOption(Exception):
    """An option we understand but whose payload is malformed (REP_ERR_INVALID)."""


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """Encode one fixed-newstyle option reply."""
    return _OPTION_REPLY.pack(REPLY_MAGIC, option, reply_type, len(data)) + data


def _error_text(message: str) -> bytes:
    return message.encode("utf-8")[:MAX_STRING]


ExportLookup = Callable[[str], "ExportInfo | None"]
#: Why this client may not use an export, or None when it may.
AccessCheck = Callable[["ExportInfo"], "str | None"]

# TLS modes, the spec's names in the comments.
TLS_OFF = "off"  # NOTLS: STARTTLS gets REP_ERR_POLICY
TLS_ON = "on"  # SELECTIVETLS: TLS at the client's choice, required by tls_only exports
TLS_REQUIRE = "require"  # FORCEDTLS: every option but STARTTLS and ABORT needs TLS
TLS_MODES = (TLS_OFF, TLS_ON, TLS_REQUIRE)


@dataclass
class Handshake:
    """The server side of the fixed-newstyle handshake.

    Feed received bytes to `receive_data`; it returns the bytes to send.  When
    `done` is set the client chose an export (`result`) and any bytes that
    followed belong to the transmission phase (`leftover`).  When `closed` is
    set the connection must be dropped after sending what was returned.

    When `starttls` is set, STARTTLS was acknowledged: the caller sends the
    returned bytes, upgrades the connection and calls `tls_started`; until
    then nothing more may be fed.  Each export the client was refused by
    `access` adds a line to `refusals`, for the caller to log with who asked.
    """

    exports: Sequence[ExportInfo]
    shutting_down: bool = False
    tls: str = TLS_OFF
    access: AccessCheck | None = None
    tls_active: bool = False
    starttls: bool = False
    refusals: list[str] = field(default_factory=list)
    result: Negotiated | None = None
    closed: bool = False
    leftover: bytes = b""
    close_reason: str = ""
    _buf: bytearray = field(default_factory=bytearray)
    _have_client_flags: bool = False
    _no_zeroes: bool = False
    _structured: bool = False
    _meta_export: str | None = None  # export the active meta context was set for
    _skip: int = 0  # bytes of an oversized option still to discard
    _skip_option: int = 0

    def greeting(self) -> bytes:
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    @property
    def done(self) -> bool:
        return self.result is not None

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "":
            return self.exports[0] if self.exports else None
        for export in self.exports:
            if export.name == name:
                return export
        return None

    def tls_started(self) -> None:
        """The connection now runs over TLS: option state starts afresh."""
        if not self.starttls:
            raise LocalProtocolError("no STARTTLS was acknowledged")
        self.starttls = False
        self.tls_active = True
        self._structured = False
        self._meta_export = None

    def receive_data(self, data: bytes) -> bytes:
        if self.done or self.closed:
            raise LocalProtocolError("handshake is over")
        if self.starttls:
            raise LocalProtocolError("upgrade to TLS before feeding more data")
        self._buf += data
        out: list[bytes] = []
        while not self.done and not self.closed and not self.starttls:
            if self._skip:
                n = min(self._skip, len(self._buf))
                del self._buf[:n]
                self._skip -= n
                if self._skip:
                    break
                out.append(
                    option_reply(self._skip_option, REP_ERR_TOO_BIG, _error_text("option too long"))
                )
                continue
            if not self._have_client_flags:
                if len(self._buf) < 4:
                    break
                (flags,) = _CLIENT_FLAGS.unpack_from(self._buf)
                del self._buf[:4]
                if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    raise RemoteProtocolError(f"unknown client flags {flags:#x}")
                self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
                self._have_client_flags = True
                continue
            if len(self._buf) < _OPTION_HEADER.size:
                break
            magic, option, length = _OPTION_HEADER.unpack_from(self._buf)
            if magic != IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                del self._buf[: _OPTION_HEADER.size]
                self._skip, self._skip_option = length, option
                continue
            end = _OPTION_HEADER.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[_OPTION_HEADER.size : end])
            del self._buf[:end]
            out.append(self._option(option, payload))
        if self.done:
            self.leftover = bytes(self._buf)
            self._buf.clear()
        elif self.starttls and self._buf:
            # The TLS handshake may only begin once the client read our ACK.
            raise RemoteProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
        return b"".join(out)

    def _option(self, option: int, data: bytes) -> bytes:
        if option == OPT_ABORT:
            self.closed, self.close_reason = True, "client aborted the handshake"
            return option_reply(option, REP_ACK)
        if self.shutting_down:
            if option == OPT_EXPORT_NAME:
                self.closed, self.close_reason = True, "server is shutting down"
                return b""
            return option_reply(option, REP_ERR_SHUTDOWN, _error_text("server shutting down"))
        if option == OPT_STARTTLS:
            return self._starttls(data)
        if self.tls == TLS_REQUIRE and not self.tls_active:
            if option == OPT_EXPORT_NAME:
                # EXPORT_NAME cannot carry an error: the spec says terminate.
                self.closed, self.close_reason = True, "EXPORT_NAME without TLS (TLS required)"
                return b""
            return option_reply(option, REP_ERR_TLS_REQD, _error_text("TLS is required"))
        try:
            if option == OPT_EXPORT_NAME:
                return self._export_name(data)
            if option == OPT_LIST:
                return self._list(data)
            if option in (OPT_INFO, OPT_GO):
                return self._info_go(option, data)
            if option == OPT_STRUCTURED_REPLY:
                if data:
                    raise _InvalidOption("STRUCTURED_REPLY takes no data")
                self._structured = True
                return option_reply(option, REP_ACK)
            if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                return self._meta_context(option, data)
        except _InvalidOption as exc:
            return option_reply(option, REP_ERR_INVALID, _error_text(str(exc)))
        return option_reply(option, REP_ERR_UNSUP, _error_text(f"option {option} unsupported"))

    def _starttls(self, data: bytes) -> bytes:
        if self.tls == TLS_OFF:
            return option_reply(
                OPT_STARTTLS, REP_ERR_POLICY, _error_text("TLS is not enabled on this server")
            )
        if data:
            return option_reply(
                OPT_STARTTLS, REP_ERR_INVALID, _error_text("STARTTLS takes no data")
            )
        if self.tls_active:
            return option_reply(OPT_STARTTLS, REP_ERR_INVALID, _error_text("TLS is already on"))
        self.starttls = True
        return option_reply(OPT_STARTTLS, REP_ACK)

    def _refusal(
        self, export: ExportInfo, *, log: bool = True, tls_reqd: bool = True
    ) -> tuple[int, str] | None:
        """(error reply, reason) when this client may not use `export`.

        `tls_reqd`: whether the option may be answered NBD_REP_ERR_TLS_REQD
        (the spec allows it only for INFO, GO and EXPORT_NAME)."""
        if export.tls_only and not self.tls_active:
            # NOTLS mode never sends TLS_REQD (the spec); then it is policy.
            error = REP_ERR_TLS_REQD if self.tls != TLS_OFF and tls_reqd else REP_ERR_POLICY
            return error, f"export {export.name!r} requires TLS"
        reason = self.access(export) if self.access is not None else None
        if reason is None:
            return None
        if log:
            self.refusals.append(f"export {export.name!r}: {reason}")
        return REP_ERR_POLICY, reason

    def _flags_for(self, export: ExportInfo) -> int:
        flags = export.flags | FLAG_HAS_FLAGS
        if self._structured:
            flags |= FLAG_SEND_DF
        return flags

    def _export_name(self, data: bytes) -> bytes:
        try:
            name = data.decode("utf-8") if len(data) <= MAX_STRING else None
        except UnicodeDecodeError:
            name = None
        export = self.lookup(name) if name is not None else None
        if export is None:
            # EXPORT_NAME cannot carry an error: the spec says terminate.
            self.closed, self.close_reason = True, f"unknown export {data[:64]!r}"
            return b""
        refusal = self._refusal(export)
        if refusal is not None:
            self.closed, self.close_reason = True, f"export {export.name!r}: {refusal[1]}"
            return b""
        flags = self._flags_for(export)
        self._finish(export, flags, block_size_requested=False)
        reply = _EXPORT_NAME_REPLY.pack(export.size, flags)
        return reply if self._no_zeroes else reply + bytes(124)

    def _list(self, data: bytes) -> bytes:
        if data:
            raise _InvalidOption("LIST takes no data")
        out = []
        for export in self.exports:
            if self._refusal(export, log=False) is not None:
                continue  # the spec allows omitting exports the client cannot use
            name = export.name.encode("utf-8")
            desc = export.description.encode("utf-8")
            out.append(option_reply(OPT_LIST, REP_SERVER, _U32.pack(len(name)) + name + desc))
        out.append(option_reply(OPT_LIST, REP_ACK))
        return b"".join(out)

    def _info_go(self, option: int, data: bytes) -> bytes:
        r = _Reader(data)
        name = r.string(r.u32())
        requests = [r.u16() for _ in range(r.u16())]
        r.end()
        export = self.lookup(name)
        if export is None:
            return option_reply(option, REP_ERR_UNKNOWN, _error_text(f"no export named {name!r}"))
        refusal = self._refusal(export)
        if refusal is not None:
            return option_reply(option, refusal[0], _error_text(refusal[1]))
        flags = self._flags_for(export)
        out = [option_reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, export.size, flags))]
        if INFO_NAME in requests:
            out.append(
                option_reply(option, REP_INFO, _U16.pack(INFO_NAME) + export.name.encode("utf-8"))
            )
        if INFO_DESCRIPTION in requests and export.description:
            out.append(
                option_reply(
                    option,
                    REP_INFO,
                    _U16.pack(INFO_DESCRIPTION) + export.description.encode("utf-8"),
                )
            )
        # Always sent: clients that did not ask may ignore it (spec: "MAY send
        # information ... not explicitly requested").
        out.append(
            option_reply(
                option,
                REP_INFO,
                _INFO_BLOCK_SIZE.pack(
                    INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD
                ),
            )
        )
        out.append(option_reply(option, REP_ACK))
        if option == OPT_GO:
            self._finish(export, flags, block_size_requested=INFO_BLOCK_SIZE in requests)
        return b"".join(out)

    def _meta_context(self, option: int, data: bytes) -> bytes:
        if option == OPT_SET_META_CONTEXT:
            self._meta_export = None  # replaced even when this request fails
        if not self._structured:
            raise _InvalidOption("negotiate structured replies first")
        r = _Reader(data)
        name = r.string(r.u32())
        queries = [r.string(r.u32()) for _ in range(r.u32())]
        r.end()
        export = self.lookup(name)
        if export is None:
            return option_reply(option, REP_ERR_UNKNOWN, _error_text(f"no export named {name!r}"))
        refusal = self._refusal(export, tls_reqd=False)
        if refusal is not None:
            return option_reply(option, refusal[0], _error_text(refusal[1]))
        if option == OPT_LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", META_BASE_ALLOCATION) for q in queries)
        else:
            match = META_BASE_ALLOCATION in queries
        out = []
        if match:
            # LIST's context ids are reserved and SHOULD be zero.
            context_id = META_BASE_ALLOCATION_ID if option == OPT_SET_META_CONTEXT else 0
            out.append(
                option_reply(
                    option,
                    REP_META_CONTEXT,
                    _U32.pack(context_id) + META_BASE_ALLOCATION.encode(),
                )
            )
            if option == OPT_SET_META_CONTEXT:
                self._meta_export = export.name
        out.append(option_reply(option, REP_ACK))
        return b"".join(out)

    def _finish(self, export: ExportInfo, flags: int, *, block_size_requested: bool) -> None:
        meta = META_BASE_ALLOCATION_ID if self._meta_export == export.name else 0
        self.result = Negotiated(
            export=export,
            flags=flags,
            structured_replies=self._structured,
            meta_context=meta if self._structured else 0,
            block_size_requested=block_size_requested,
        )


# --- transmission -------------------------------------------------------------


class Request(NamedTuple):
    """One transmission request; `payload` is set for WRITE only."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: memoryview | None


class RequestParser:
    """Splits the client's byte stream into requests.

    `parse` consumes complete requests from the front of `buf` and returns
    them with the number of bytes they took; it stops early once the data the
    requests read or write passes `budget`, so one batch of replies is bounded.
    A WRITE whose payload exceeds `MAX_PAYLOAD` is returned with `payload=None`
    and its payload is skipped as it arrives, never buffered.
    Payload memoryviews point into `buf`: use them before `buf` changes.
    """

    def __init__(self) -> None:
        self._skip = 0

    def parse(
        self,
        buf: bytes | bytearray | memoryview,
        budget: int = MAX_PAYLOAD,
        max_requests: int = 1 << 30,
    ) -> tuple[list[Request], int]:
        requests: list[Request] = []
        pos = 0
        end = len(buf)
        if self._skip:
            pos = min(self._skip, end)
            self._skip -= pos
            if self._skip:
                return requests, pos
        view = memoryview(buf)
        unpack = REQUEST.unpack_from
        hsize = REQUEST.size
        # tuple.__new__ builds the NamedTuple without its Python-level __new__.
        new = tuple.__new__
        while end - pos >= hsize and budget > 0 and max_requests > 0:
            magic, flags, type_, cookie, offset, length = unpack(buf, pos)
            if magic != REQUEST_MAGIC:
                view.release()
                raise RemoteProtocolError(f"bad request magic {magic:#x}")
            max_requests -= 1
            if type_ == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    requests.append(new(Request, (flags, type_, cookie, offset, length, None)))
                    pos += hsize
                    skip = min(length, end - pos)
                    pos += skip
                    self._skip = length - skip
                    break
                start = pos + hsize
                if end - start < length:
                    break
                pos = start + length
                requests.append(
                    new(Request, (flags, type_, cookie, offset, length, view[start:pos]))
                )
                budget -= length
            else:
                requests.append(new(Request, (flags, type_, cookie, offset, length, None)))
                pos += hsize
                if type_ == CMD_READ:
                    budget -= length
        view.release()
        return requests, pos


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def read_chunk_header(cookie: int, offset: int, length: int) -> bytes:
    """Header of a final OFFSET_DATA chunk carrying `length` bytes at `offset`."""
    return DATA_CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset
    )


def structured_done(cookie: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    if not error:
        raise LocalProtocolError("an error chunk needs a nonzero error")
    text = _error_text(message)
    payload = _ERROR_PAYLOAD.pack(error, len(text)) + text
    header = CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)
    )
    return header + payload


def block_status_reply(cookie: int, context_id: int, extents: Sequence[tuple[int, int]]) -> bytes:
    """A final BLOCK_STATUS chunk: `extents` are (length, flags) pairs."""
    if not extents or len(extents) > MAX_EXTENTS:
        raise LocalProtocolError("block status needs 1 to 2**20 extents")
    body = b"".join([_EXTENT.pack(length, flags) for length, flags in extents])
    header = CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + len(body),
    )
    return header + _U32.pack(context_id) + body


# --- request checks -----------------------------------------------------------

_ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: 0,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: 0,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
_WRITES = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)


def check_request(req: Request, neg: Negotiated) -> int:
    """The NBD error a request must get before it is executed, or 0.

    Follows the spec's "Error values": unknown commands and flags EINVAL
    (FUA is accepted on every command once negotiated); writes to a
    read-only export EPERM; writes past the end ENOSPC, everything else past
    the end EINVAL.
    """
    allowed = _ALLOWED_FLAGS.get(req.type)
    if allowed is None:
        return EINVAL
    flags = neg.flags
    if flags & FLAG_SEND_FUA:
        allowed |= CMD_FLAG_FUA
    if not flags & FLAG_SEND_DF:
        allowed &= ~CMD_FLAG_DF
    if not flags & FLAG_SEND_FAST_ZERO:
        allowed &= ~CMD_FLAG_FAST_ZERO
    if req.flags & ~allowed:
        return EINVAL
    type_ = req.type
    if type_ == CMD_FLUSH:
        return 0 if flags & FLAG_SEND_FLUSH else EINVAL
    if type_ == CMD_DISC:
        return 0
    if type_ in _WRITES and flags & FLAG_READ_ONLY:
        return EPERM
    if type_ == CMD_WRITE and req.payload is None:
        return EINVAL  # payload over MAX_PAYLOAD, skipped unread
    if req.offset + req.length > neg.export.size:
        return ENOSPC if type_ in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if type_ == CMD_READ and req.length > MAX_PAYLOAD:
        return EOVERFLOW if neg.structured_replies else EINVAL
    if type_ == CMD_BLOCK_STATUS and (not neg.meta_context or req.length == 0):
        return EINVAL
    return 0
