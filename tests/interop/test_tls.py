"""TLS with client certificates and per-export access control, against real
clients: libnbd (nbdinfo, nbdcopy over ``nbds://``) and qemu (qemu-img,
qemu-io with ``tls-creds-x509``).

Certificates come from ``pki.py`` (fresh CAs per test module).  Every refusal
is followed by a good client on the same server: refusing one client must
never stop the server serving the next.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import IHAVEOPT, OPT_EXPORT_NAME, RawNBD, Server, StartServer
from pki import CA, PKI

OPT_LIST = 3
OPT_STARTTLS = 5
OPT_GO = 7
REP_ACK = 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5

Run = Callable[..., Any]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI.create(tmp_path_factory.mktemp("pki"))


def nbds(server: Server, creds: Path, export: str = "") -> str:
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={creds}"


def qemu_args(server: Server, creds: Path, export: str = "") -> list[str]:
    opts = f"driver=nbd,host=127.0.0.1,port={server.port},tls-creds=tls0"
    if export:
        opts += f",export={export}"
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}", "--image-opts", opts]


def refused(run: Run, cmd: list[str]) -> str:
    proc = run(cmd, check=False)
    assert proc.returncode != 0, f"{cmd} was let in:\n{proc.stdout}"
    return str(proc.stderr)


# --- a small raw client for what real clients do not send ---------------------


def send_option(sock: socket.socket | ssl.SSLSocket, option: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def recv_exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def option_reply(sock: socket.socket | ssl.SSLSocket) -> tuple[int, int]:
    """(option, reply type) of one option reply, payload skipped."""
    _magic, option, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    recv_exact(sock, length)
    return option, rtype


def raw_start(server: Server) -> socket.socket:
    raw = RawNBD.connect(server)
    raw.greeting()
    raw.sock.sendall(struct.pack(">I", 3))
    return raw.sock


def client_context(pki: PKI, cn: str) -> ssl.SSLContext:
    creds = pki.client(cn)
    ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
    ctx.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
    return ctx


# --- tests --------------------------------------------------------------------


def test_libnbd_over_tls_with_client_certificate(
    start_server: StartServer, pki: PKI, run: Run, tmp_path: Path
) -> None:
    server = start_server(size="16M", extra_args=pki.server_args("require"))
    alice = pki.client("alice")
    info = run(["nbdinfo", nbds(server, alice)])
    assert "with TLS" in info.stdout
    src = tmp_path / "src.img"
    src.write_bytes(bytes(range(256)) * (16 * 4096))
    run(["nbdcopy", str(src), nbds(server, alice)])
    back = tmp_path / "back.img"
    run(["nbdcopy", nbds(server, alice), str(back)])
    assert back.read_bytes() == src.read_bytes()
    assert "certificate 'O=nbdcache,CN=alice'" in server.log()


def test_qemu_over_tls_with_client_certificate(
    start_server: StartServer, pki: PKI, run: Run
) -> None:
    server = start_server(size="16M", extra_args=pki.server_args("require"))
    alice = pki.client("alice")
    info = run(["qemu-img", "info", *qemu_args(server, alice)])
    assert "16 MiB" in info.stdout
    io = qemu_args(server, alice)
    run(["qemu-io", *io, "-c", "write -P 0x5a 4096 1M"])
    run(["qemu-io", *io, "-c", "read -P 0x5a 4096 1M"])


def test_refused_clients_and_the_server_goes_on(
    start_server: StartServer, pki: PKI, run: Run, tmp_path: Path
) -> None:
    server = start_server(size="16M", extra_args=pki.server_args("require"))
    good = pki.client("alice")
    stranger = CA.create(tmp_path / "other-ca", "someone else")
    wrong_ca = stranger.client_dir(tmp_path / "wrong-ca", "alice", trust=pki.ca)
    cases = {
        "client certificate from another CA": ["nbdinfo", nbds(server, wrong_ca)],
        "no client certificate": ["nbdinfo", nbds(server, pki.anonymous_client())],
        "plain text against require": ["nbdinfo", server.uri()],
        "qemu without a client certificate": [
            "qemu-img",
            "info",
            *qemu_args(server, pki.anonymous_client()),
        ],
        "qemu in plain text": ["qemu-img", "info", server.uri()],
    }
    for what, cmd in cases.items():
        refused(run, cmd)
        assert "with TLS" in run(["nbdinfo", nbds(server, good)]).stdout, what
    log = server.log()
    assert "certificate verify failed" in log
    assert "did not return a certificate" in log or "PEER_DID_NOT_RETURN" in log


def test_forced_tls_option_haggling_on_the_wire(start_server: StartServer, pki: PKI) -> None:
    server = start_server(size="16M", extra_args=pki.server_args("require"))
    with raw_start(server) as sock:
        send_option(sock, OPT_LIST)
        assert option_reply(sock) == (OPT_LIST, REP_ERR_TLS_REQD)
        send_option(sock, OPT_STARTTLS)
        assert option_reply(sock) == (OPT_STARTTLS, REP_ACK)
        tls_sock = client_context(pki, "alice").wrap_socket(sock, server_hostname="localhost")
        send_option(tls_sock, OPT_STARTTLS)
        assert option_reply(tls_sock) == (OPT_STARTTLS, REP_ERR_INVALID)
        send_option(tls_sock, OPT_LIST)
        replies = [option_reply(tls_sock), option_reply(tls_sock)]
        assert replies[-1] == (OPT_LIST, REP_ACK)
        tls_sock.close()
    with raw_start(server) as sock:
        send_option(sock, OPT_EXPORT_NAME, b"")
        assert sock.recv(1) == b""  # no error is possible: disconnected


def test_allowed_names_give_policy_errors_and_a_log_line(
    start_server: StartServer, pki: PKI, run: Run
) -> None:
    server = start_server(
        exports=[
            {"name": "secret", "size": "8M", "allowed_names": ["alice.clients.test"]},
            {"name": "open", "size": "8M"},
        ],
        extra_args=pki.server_args("on"),
    )
    alice, bob = pki.client("alice"), pki.client("bob")
    refused(run, ["nbdinfo", nbds(server, bob, "secret")])
    refused(run, ["qemu-img", "info", *qemu_args(server, bob, "secret")])
    # The export is TLS-only: without TLS it is not even listed.
    refused(run, ["nbdinfo", server.uri("secret")])
    assert "secret" not in run(["nbdinfo", "--list", server.uri()]).stdout
    assert "with TLS" in run(["nbdinfo", nbds(server, bob, "open")]).stdout
    assert "with TLS" in run(["nbdinfo", nbds(server, alice, "secret")]).stdout
    refusals = [line for line in server.log().splitlines() if "refused export 'secret'" in line]
    assert refusals and all("CN=bob" in line and "not allowed" in line for line in refusals)
    with raw_start(server) as sock:
        send_option(sock, OPT_STARTTLS)
        assert option_reply(sock) == (OPT_STARTTLS, REP_ACK)
        tls_sock = client_context(pki, "bob").wrap_socket(sock, server_hostname="localhost")
        name = b"secret"
        send_option(tls_sock, OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
        assert option_reply(tls_sock) == (OPT_GO, REP_ERR_POLICY)
        tls_sock.close()


def test_on_mode_serves_plain_text_and_tls_clients(
    start_server: StartServer, pki: PKI, run: Run
) -> None:
    server = start_server(size="16M", extra_args=pki.server_args("on", ca=False))
    assert "without TLS" in run(["nbdinfo", server.uri()]).stdout
    anonymous = pki.anonymous_client()
    assert "with TLS" in run(["nbdinfo", nbds(server, anonymous)]).stdout
    run(["qemu-io", *qemu_args(server, anonymous), "-c", "write -P 7 0 64k"])
    run(["qemu-io", "-f", "raw", server.uri(), "-c", "read -P 7 0 64k"])


def test_allowed_networks_refuse_other_addresses(start_server: StartServer, run: Run) -> None:
    server = start_server(
        exports=[
            {"name": "lan", "size": "8M", "allowed_networks": ["10.0.0.0/8"]},
            {"name": "local", "size": "8M", "allowed_networks": ["127.0.0.0/8", "::1"]},
        ]
    )
    refused(run, ["nbdinfo", server.uri("lan")])
    run(["nbdinfo", server.uri("local")])
    assert "address 127.0.0.1 is not in the allowed networks" in server.log()


def test_bad_tls_settings_are_one_line_errors(pki: PKI, run: Run, tmp_path: Path) -> None:
    from conftest import nbdcache_command

    missing = tmp_path / "missing.pem"
    for args, field in [
        (["--tls", "on"], "tls_cert and tls_key"),
        (["--tls", "on", "--tls-cert", str(missing), "--tls-key", str(missing)], "tls_cert"),
        ([*pki.server_args("on", ca=False), "--tls-ca", str(missing)], "server.tls_ca"),
    ]:
        proc = run([*nbdcache_command(), "serve", "--size", "1M", *args], check=False)
        assert proc.returncode == 2
        assert field in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
