"""The sans-I/O protocol core, driven with bytes only."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcache import protocol as p

#: Examples per fuzz test; raise for long runs (see tests/interop/test_fuzz.py).
FUZZ_EXAMPLES = int(os.environ.get("NBDCACHE_FUZZ_EXAMPLES", "300"))

EXPORTS = [
    p.ExportInfo("first", 1 << 20, p.FLAG_HAS_FLAGS | p.FLAG_SEND_TRIM, "the first"),
    p.ExportInfo("ro", 8192, p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY),
]


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload)."""
    out = []
    while data:
        magic, option, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == p.REPLY_MAGIC
        out.append((option, rtype, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def started(flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES) -> p.Handshake:
    hs = p.Handshake(EXPORTS)
    assert hs.receive_data(struct.pack(">I", flags)) == b""
    return hs


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    magic, opt_magic, flags = struct.unpack(">QQH", p.Handshake(EXPORTS).greeting())
    assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
    assert flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES


def test_unknown_client_flags_drop_the_connection() -> None:
    with pytest.raises(p.RemoteProtocolError):
        p.Handshake(EXPORTS).receive_data(struct.pack(">I", 4))


def test_bad_option_magic_is_a_remote_error() -> None:
    hs = started()
    with pytest.raises(p.RemoteProtocolError):
        hs.receive_data(struct.pack(">QII", 0x1234, p.OPT_GO, 0))


def test_list_names_every_export_with_description() -> None:
    out = replies(started().receive_data(opt(p.OPT_LIST)))
    assert [r[1] for r in out] == [p.REP_SERVER, p.REP_SERVER, p.REP_ACK]
    (n,) = struct.unpack_from(">I", out[0][2])
    assert out[0][2][4 : 4 + n] == b"first"
    assert out[0][2][4 + n :] == b"the first"
    assert out[1][2][4:] == b"ro"


def test_list_with_data_is_invalid() -> None:
    out = replies(started().receive_data(opt(p.OPT_LIST, b"x")))
    assert out[0][1] == p.REP_ERR_INVALID


def test_unknown_option_is_unsupported_and_haggling_goes_on() -> None:
    hs = started()
    out = replies(hs.receive_data(opt(99, b"abc") + opt(p.OPT_STRUCTURED_REPLY)))
    assert [r[1] for r in out] == [p.REP_ERR_UNSUP, p.REP_ACK]
    assert not hs.closed


def test_starttls_is_refused_by_policy() -> None:
    out = replies(started().receive_data(opt(p.OPT_STARTTLS)))
    assert out[0][1] == p.REP_ERR_POLICY


def test_go_with_empty_name_selects_the_first_export() -> None:
    hs = started()
    out = replies(hs.receive_data(opt(p.OPT_GO, go_data("", p.INFO_BLOCK_SIZE)) + b"rest"))
    infos = {struct.unpack_from(">H", r[2])[0]: r[2] for r in out if r[1] == p.REP_INFO}
    _, size, flags = struct.unpack(">HQH", infos[p.INFO_EXPORT])
    assert size == 1 << 20 and flags & p.FLAG_SEND_TRIM and flags & p.FLAG_HAS_FLAGS
    assert struct.unpack(">HIII", infos[p.INFO_BLOCK_SIZE])[1:] == (1, 4096, 32 << 20)
    assert out[-1][1] == p.REP_ACK
    assert hs.result is not None and hs.result.export.name == "first"
    assert hs.leftover == b"rest"


def test_info_does_not_end_the_handshake_and_unknown_export_errors() -> None:
    hs = started()
    out = replies(hs.receive_data(opt(p.OPT_INFO, go_data("ro", p.INFO_NAME))))
    assert out[-1][1] == p.REP_ACK and not hs.done
    assert (p.REP_INFO, b"\x00\x01ro") in [(r[1], r[2]) for r in out]
    out = replies(hs.receive_data(opt(p.OPT_GO, go_data("nope"))))
    assert [r[1] for r in out] == [p.REP_ERR_UNKNOWN] and not hs.done


@pytest.mark.parametrize(
    "data", [b"", b"\x00\x00\x00\x09ab\x00\x00", go_data("first") + b"x", b"\xff" * 7]
)
def test_malformed_go_is_invalid(data: bytes) -> None:
    out = replies(started().receive_data(opt(p.OPT_GO, data)))
    assert out[-1][1] == p.REP_ERR_INVALID


def test_export_name_with_and_without_zeroes() -> None:
    out = started().receive_data(opt(p.OPT_EXPORT_NAME, b"ro"))
    size, flags = struct.unpack(">QH", out)
    assert size == 8192 and flags & p.FLAG_READ_ONLY
    out = started(p.FLAG_C_FIXED_NEWSTYLE).receive_data(opt(p.OPT_EXPORT_NAME, b""))
    assert len(out) == 10 + 124 and out[10:] == bytes(124)


def test_export_name_of_unknown_export_closes() -> None:
    hs = started()
    assert hs.receive_data(opt(p.OPT_EXPORT_NAME, b"nope")) == b""
    assert hs.closed and not hs.done


def test_meta_context_needs_structured_replies() -> None:
    out = replies(
        started().receive_data(opt(p.OPT_SET_META_CONTEXT, meta_data("", "base:allocation")))
    )
    assert out[0][1] == p.REP_ERR_INVALID


def test_meta_context_selects_base_allocation_for_the_same_export() -> None:
    hs = started()
    hs.receive_data(opt(p.OPT_STRUCTURED_REPLY))
    out = replies(hs.receive_data(opt(p.OPT_LIST_META_CONTEXT, meta_data("first"))))
    assert [r[1] for r in out] == [p.REP_META_CONTEXT, p.REP_ACK]
    assert out[0][2][4:] == b"base:allocation"
    out = replies(
        hs.receive_data(
            opt(p.OPT_SET_META_CONTEXT, meta_data("first", "x-other:1", "base:allocation"))
        )
    )
    assert [r[1] for r in out] == [p.REP_META_CONTEXT, p.REP_ACK]
    hs.receive_data(opt(p.OPT_GO, go_data("")))
    assert hs.result is not None
    assert hs.result.meta_context == p.META_BASE_ALLOCATION_ID
    assert hs.result.flags & p.FLAG_SEND_DF


def test_meta_context_for_another_export_is_not_active() -> None:
    hs = started()
    hs.receive_data(opt(p.OPT_STRUCTURED_REPLY))
    hs.receive_data(opt(p.OPT_SET_META_CONTEXT, meta_data("ro", "base:allocation")))
    hs.receive_data(opt(p.OPT_GO, go_data("first")))
    assert hs.result is not None and hs.result.meta_context == 0


def test_oversized_option_is_skipped_unread() -> None:
    hs = started()
    header = struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 10 << 20)
    assert hs.receive_data(header + bytes(1 << 20)) == b""
    out = hs.receive_data(bytes(9 << 20) + opt(p.OPT_LIST))
    assert [r[1] for r in replies(out)] == [
        p.REP_ERR_TOO_BIG,
        p.REP_SERVER,
        p.REP_SERVER,
        p.REP_ACK,
    ]
    assert len(hs._buf) == 0


def test_shutdown_refuses_options_but_acks_abort() -> None:
    hs = started()
    hs.shutting_down = True
    out = replies(hs.receive_data(opt(p.OPT_GO, go_data(""))))
    assert out[0][1] == p.REP_ERR_SHUTDOWN and not hs.done
    out = replies(hs.receive_data(opt(p.OPT_ABORT)))
    assert out[0][1] == p.REP_ACK and hs.closed


def test_options_split_across_reads() -> None:
    hs = started()
    data = opt(p.OPT_STRUCTURED_REPLY) + opt(p.OPT_GO, go_data("first"))
    out = b"".join(hs.receive_data(data[i : i + 3]) for i in range(0, len(data), 3))
    assert [r[1] for r in replies(out)][-1] == p.REP_ACK
    assert hs.result is not None and hs.result.structured_replies


def request(type_: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, type_, cookie, offset, length)


def test_parser_returns_complete_requests_and_keeps_partial_ones() -> None:
    buf = bytearray(request(p.CMD_READ, 0, 512) + request(p.CMD_WRITE, 0, 4) + b"ab")
    reqs, used = p.RequestParser().parse(buf)
    assert [r.type for r in reqs] == [p.CMD_READ] and used == 28
    buf += b"cd"
    reqs, used = p.RequestParser().parse(buf[28:])
    assert reqs[0].payload is not None and bytes(reqs[0].payload) == b"abcd"
    assert used == 32


def test_parser_stops_at_the_request_budget() -> None:
    # Requests without data cost no bytes: the count alone bounds a batch.
    buf = bytearray(request(p.CMD_FLUSH) * 100)
    reqs, used = p.RequestParser().parse(buf, max_requests=4)
    assert len(reqs) == 4 and used == 4 * 28


def test_parser_skips_oversized_write_payload_without_buffering() -> None:
    parser = p.RequestParser()
    buf = bytearray(request(p.CMD_WRITE, 0, p.MAX_PAYLOAD + 1) + bytes(1000))
    reqs, used = parser.parse(buf)
    assert reqs[0].payload is None and used == len(buf)
    tail = bytearray(bytes(p.MAX_PAYLOAD + 1 - 1000) + request(p.CMD_READ))
    reqs, used = parser.parse(tail)
    assert [r.type for r in reqs] == [p.CMD_READ] and used == len(tail)


def test_parser_rejects_bad_magic() -> None:
    with pytest.raises(p.RemoteProtocolError):
        p.RequestParser().parse(bytearray(bytes(28)))


def test_parser_budget_bounds_a_batch() -> None:
    buf = bytearray(request(p.CMD_READ, 0, 1 << 20) * 4)
    reqs, used = p.RequestParser().parse(buf, budget=2 << 20)
    assert len(reqs) == 2 and used == 56


NEG = p.Negotiated(
    export=p.ExportInfo("x", 1 << 20, 0),
    flags=p.FLAG_HAS_FLAGS | p.FLAG_SEND_DF | p.FLAG_SEND_FAST_ZERO,
    structured_replies=True,
    meta_context=p.META_BASE_ALLOCATION_ID,
    block_size_requested=True,
)
RO = p.Negotiated(
    export=p.ExportInfo("x", 1 << 20, 0),
    flags=p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY | p.FLAG_SEND_FUA,
    structured_replies=False,
    meta_context=0,
    block_size_requested=False,
)


def req(type_: int, offset: int = 0, length: int = 0, flags: int = 0) -> p.Request:
    payload = memoryview(bytes(length)) if type_ == p.CMD_WRITE else None
    return p.Request(flags, type_, 1, offset, length, payload)


@pytest.mark.parametrize(
    ("neg", "request_", "error"),
    [
        (NEG, req(p.CMD_READ, 0, 4096), 0),
        (NEG, req(p.CMD_READ, (1 << 20) - 1, 2), p.EINVAL),
        (NEG, req(p.CMD_WRITE, (1 << 20) - 1, 2), p.ENOSPC),
        (NEG, req(p.CMD_WRITE_ZEROES, 1 << 20, 1), p.ENOSPC),
        (NEG, req(p.CMD_TRIM, 1 << 20, 1), p.EINVAL),
        (NEG, req(p.CMD_CACHE, 1 << 20, 1), p.EINVAL),
        (NEG, req(p.CMD_BLOCK_STATUS, 1 << 20, 1), p.EINVAL),
        (NEG, req(p.CMD_TRIM, 0, 1 << 20), 0),
        (NEG, req(99), p.EINVAL),
        (NEG, req(p.CMD_READ, 0, 1, flags=p.CMD_FLAG_FUA), p.EINVAL),
        (NEG, req(p.CMD_READ, 0, 1, flags=p.CMD_FLAG_DF), 0),
        (NEG, req(p.CMD_READ, 0, 1, flags=1 << 9), p.EINVAL),
        (NEG, req(p.CMD_WRITE_ZEROES, 0, 1, flags=p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE), 0),
        (NEG, req(p.CMD_FLUSH), p.EINVAL),
        (RO, req(p.CMD_FLUSH, flags=p.CMD_FLAG_FUA), p.EINVAL),
        (RO, req(p.CMD_READ, 0, 1, flags=p.CMD_FLAG_FUA), 0),
        (RO, req(p.CMD_READ, 0, 1, flags=p.CMD_FLAG_DF), p.EINVAL),
        (RO, req(p.CMD_WRITE, 0, 1), p.EPERM),
        (RO, req(p.CMD_TRIM, 0, 1), p.EPERM),
        (RO, req(p.CMD_WRITE_ZEROES, 0, 1), p.EPERM),
        (RO, req(p.CMD_WRITE_ZEROES, 0, 1, flags=p.CMD_FLAG_FAST_ZERO), p.EINVAL),
        (RO, req(p.CMD_BLOCK_STATUS, 0, 1), p.EINVAL),
        (NEG, req(p.CMD_BLOCK_STATUS, 0, 0), p.EINVAL),
        (NEG, req(p.CMD_READ, 0, 0), 0),
    ],
)
def test_check_request(neg: p.Negotiated, request_: p.Request, error: int) -> None:
    assert p.check_request(request_, neg) == error


def test_reply_encodings() -> None:
    assert p.simple_reply(9, p.EIO) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 5, 9)
    hdr = p.read_chunk_header(3, 4096, 512)
    assert struct.unpack(">IHHQIQ", hdr) == (
        p.STRUCTURED_REPLY_MAGIC,
        p.REPLY_FLAG_DONE,
        p.REPLY_TYPE_OFFSET_DATA,
        3,
        520,
        4096,
    )
    err = p.structured_error(3, p.EINVAL, "bad")
    assert struct.unpack_from(">IHHQIIH", err)[2:] == (p.REPLY_TYPE_ERROR, 3, 9, p.EINVAL, 3)
    assert err.endswith(b"bad")
    bs = p.block_status_reply(3, 1, [(4096, 3), (8192, 0)])
    assert struct.unpack(">IHHQIIIIII", bs)[4:] == (20, 1, 4096, 3, 8192, 0)
    with pytest.raises(p.LocalProtocolError):
        p.structured_error(3, 0)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.lists(st.binary(max_size=64), max_size=20),
    st.booleans(),
    st.sampled_from(p.TLS_MODES),
    st.booleans(),
)
def test_fuzz_server_side_only_raises_remote_errors(
    chunks: list[bytes], prefix: bool, mode: str, starttls: bool
) -> None:
    """Garbage fed to the handshake (in every TLS mode) and then the
    transmission parser only ever raises RemoteProtocolError."""
    hs = p.Handshake(EXPORTS, tls=mode, access=lambda e: "no" if e.name == "ro" else None)
    feed = [struct.pack(">I", 3)] if prefix else []
    if prefix and starttls:
        feed.append(opt(p.OPT_STARTTLS))
    if prefix:
        feed.append(opt(p.OPT_STRUCTURED_REPLY))
    try:
        for chunk in feed + chunks:
            if hs.starttls:
                hs.tls_started()
            hs.receive_data(chunk)
            if hs.done or hs.closed:
                break
    except p.RemoteProtocolError:
        return
    if not hs.done:
        return
    parser = p.RequestParser()
    buf = bytearray(hs.leftover)
    try:
        for chunk in [*chunks, b""]:
            buf += chunk
            reqs, used = parser.parse(buf)
            assert hs.result is not None
            for r in reqs:
                p.check_request(r, hs.result)
                if r.payload is not None:
                    r.payload.release()
            del buf[:used]
    except p.RemoteProtocolError:
        pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.binary(max_size=40)),
        max_size=12,
    ),
    st.sampled_from(p.TLS_MODES),
)
def test_fuzz_well_framed_options_never_crash(options: list[tuple[int, bytes]], mode: str) -> None:
    """Well-framed options with arbitrary payloads get replies, never exceptions."""
    hs = negotiating(mode)
    for option, data in options:
        if hs.starttls:
            hs.tls_started()
        out = hs.receive_data(opt(option, data))
        if hs.done or hs.closed:
            break
        for _, rtype, _ in replies(out):
            assert rtype in (p.REP_ACK, p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT) or rtype & (
                1 << 31
            )


# --- TLS (the spec's "TLS support") -------------------------------------------


def negotiating(mode: str, **kwargs: object) -> p.Handshake:
    hs = p.Handshake(EXPORTS, tls=mode, **kwargs)  # type: ignore[arg-type]
    hs.receive_data(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    return hs


def test_forced_tls_refuses_every_option_but_starttls_and_abort() -> None:
    hs = negotiating(p.TLS_REQUIRE)
    for option, data in [
        (p.OPT_LIST, b""),
        (p.OPT_INFO, go_data("first")),
        (p.OPT_GO, go_data("first")),
        (p.OPT_STRUCTURED_REPLY, b""),
        (99, b"x"),
    ]:
        ((_, rtype, _),) = replies(hs.receive_data(opt(option, data)))
        assert rtype == p.REP_ERR_TLS_REQD
    assert not hs.done and not hs.closed
    assert hs.receive_data(opt(p.OPT_EXPORT_NAME, b"first")) == b""
    assert hs.closed and not hs.done


def test_forced_tls_abort_is_acknowledged() -> None:
    hs = negotiating(p.TLS_REQUIRE)
    assert replies(hs.receive_data(opt(p.OPT_ABORT)))[0][1] == p.REP_ACK
    assert hs.closed


def test_starttls_acks_then_option_state_starts_afresh() -> None:
    hs = negotiating(p.TLS_ON)
    hs.receive_data(opt(p.OPT_STRUCTURED_REPLY))
    out = replies(hs.receive_data(opt(p.OPT_STARTTLS)))
    assert out == [(p.OPT_STARTTLS, p.REP_ACK, b"")]
    assert hs.starttls
    with pytest.raises(p.LocalProtocolError):
        hs.receive_data(opt(p.OPT_LIST))
    hs.tls_started()
    assert hs.tls_active and not hs.starttls
    again = replies(hs.receive_data(opt(p.OPT_STARTTLS)))
    assert again[0][1] == p.REP_ERR_INVALID
    hs.receive_data(opt(p.OPT_GO, go_data("first")))
    assert hs.result is not None and not hs.result.structured_replies


def test_data_pipelined_after_starttls_is_a_remote_error() -> None:
    hs = negotiating(p.TLS_REQUIRE)
    with pytest.raises(p.RemoteProtocolError):
        hs.receive_data(opt(p.OPT_STARTTLS) + b"\x16\x03\x01")


def test_starttls_with_data_is_invalid_and_tls_off_is_policy() -> None:
    hs = negotiating(p.TLS_ON)
    assert replies(hs.receive_data(opt(p.OPT_STARTTLS, b"x")))[0][1] == p.REP_ERR_INVALID
    assert not hs.starttls
    off = negotiating(p.TLS_OFF)
    assert replies(off.receive_data(opt(p.OPT_STARTTLS)))[0][1] == p.REP_ERR_POLICY


def test_tls_only_export_needs_tls_in_selective_mode() -> None:
    exports = [EXPORTS[0], p.ExportInfo("secret", 8192, p.FLAG_HAS_FLAGS, tls_only=True)]
    hs = p.Handshake(exports, tls=p.TLS_ON)
    hs.receive_data(struct.pack(">I", 3))
    listed = replies(hs.receive_data(opt(p.OPT_LIST)))
    assert [r[1] for r in listed] == [p.REP_SERVER, p.REP_ACK]  # secret omitted
    assert replies(hs.receive_data(opt(p.OPT_GO, go_data("secret"))))[0][1] == p.REP_ERR_TLS_REQD
    hs.receive_data(opt(p.OPT_STARTTLS))
    hs.tls_started()
    hs.receive_data(opt(p.OPT_GO, go_data("secret")))
    assert hs.result is not None and hs.result.export.name == "secret"


def test_meta_context_options_never_answer_tls_reqd() -> None:
    # The spec allows NBD_REP_ERR_TLS_REQD only for INFO, GO and EXPORT_NAME.
    exports = [EXPORTS[0], p.ExportInfo("secret", 8192, p.FLAG_HAS_FLAGS, tls_only=True)]
    hs = p.Handshake(exports, tls=p.TLS_ON)
    hs.receive_data(struct.pack(">I", 3))
    hs.receive_data(opt(p.OPT_STRUCTURED_REPLY))
    for option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
        data = meta_data("secret", "base:allocation")
        assert replies(hs.receive_data(opt(option, data)))[0][1] == p.REP_ERR_POLICY


def test_access_refusal_is_policy_and_recorded() -> None:
    def access(export: p.ExportInfo) -> str | None:
        return "not you" if export.name == "ro" else None

    hs = negotiating(p.TLS_OFF, access=access)
    listed = replies(hs.receive_data(opt(p.OPT_LIST)))
    assert len(listed) == 2  # only "first", then ACK
    for option in (p.OPT_INFO, p.OPT_GO):
        ((_, rtype, text),) = replies(hs.receive_data(opt(option, go_data("ro"))))
        assert rtype == p.REP_ERR_POLICY and text == b"not you"
    assert hs.refusals == ["export 'ro': not you"] * 2
    assert hs.receive_data(opt(p.OPT_EXPORT_NAME, b"ro")) == b""
    assert hs.closed and "not you" in hs.close_reason
