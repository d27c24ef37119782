"""SIGHUP reloads certificates and access lists: connections still allowed
keep working, connections no longer allowed are closed, new connections
meet the new rules.
"""

from __future__ import annotations

import shutil
import signal
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CMD_READ, READY_TIMEOUT, RawNBD, Server, StartServer
from pki import CA, PKI
from test_tls import OPT_GO, OPT_STARTTLS, REP_ACK, nbds, option_reply, raw_start, send_option

Run = Callable[..., Any]
REP_INFO = 3


def attach(server: Server, creds: Path, export: str) -> RawNBD:
    """A raw client over TLS in the transmission phase (simple replies)."""
    sock = raw_start(server)
    send_option(sock, OPT_STARTTLS)
    assert option_reply(sock) == (OPT_STARTTLS, REP_ACK)
    ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
    ctx.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
    tls_sock = ctx.wrap_socket(sock, server_hostname="localhost")
    name = export.encode()
    send_option(tls_sock, OPT_GO, struct.pack(">I", len(name)) + name + b"\0\0")
    while True:
        option, rtype = option_reply(tls_sock)
        assert option == OPT_GO and rtype in (REP_INFO, REP_ACK), hex(rtype)
        if rtype == REP_ACK:
            return RawNBD(tls_sock)  # type: ignore[arg-type]


def reads(client: RawNBD) -> bool:
    client.request(CMD_READ, 0, 4096, cookie=7)
    error, cookie, data = client.simple_reply(4096)
    return error == 0 and cookie == 7 and len(data) == 4096


def wait_for_log(server: Server, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.05)


def test_sighup_reloads_access_lists_and_certificates(
    start_server: StartServer, run: Run, tmp_path: Path
) -> None:
    pki = PKI.create(tmp_path / "pki")
    ca_file = tmp_path / "clients-ca.pem"
    shutil.copy(pki.ca.cert, ca_file)
    names = ["alice.clients.test", "bob.clients.test"]
    server = start_server(
        exports=[{"name": "shared", "size": "8M", "allowed_names": names}],
        extra_args=[*pki.server_args("require", ca=False), "--tls-ca", str(ca_file)],
    )
    config_file = Path(server.argv[server.argv.index("--config") + 1])
    alice = attach(server, pki.client("alice"), "shared")
    bob = attach(server, pki.client("bob"), "shared")
    assert reads(alice) and reads(bob)

    # Bob loses access; client certificates now come from another CA.
    new_ca = CA.create(tmp_path / "new-ca", "new client CA")
    shutil.copy(new_ca.cert, ca_file)
    config_file.write_text(config_file.read_text().replace(', "bob.clients.test"', ""))
    assert '"bob' not in config_file.read_text()
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, "reloaded certificates and access lists")

    assert bob.closed_by_peer()
    assert reads(alice)  # still allowed: the connection is kept
    assert "access to export 'shared' revoked" in server.log()
    # New connections meet the new CA...
    old_alice = pki.client("alice")
    assert run(["nbdinfo", nbds(server, old_alice, "shared")], check=False).returncode != 0
    new_alice = new_ca.client_dir(tmp_path / "new-alice", "alice", trust=pki.ca)
    assert "with TLS" in run(["nbdinfo", nbds(server, new_alice, "shared")]).stdout
    # ...and the new names.
    new_bob = new_ca.client_dir(tmp_path / "new-bob", "bob", trust=pki.ca)
    assert run(["nbdinfo", nbds(server, new_bob, "shared")], check=False).returncode != 0
    alice.close()
    bob.close()


def test_a_bad_file_on_sighup_keeps_the_running_settings(
    start_server: StartServer, run: Run
) -> None:
    server = start_server(exports=[{"name": "e", "size": "8M"}])
    config_file = Path(server.argv[server.argv.index("--config") + 1])
    config_file.write_text("[server\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, "reload failed, keeping the running settings")
    run(["nbdinfo", server.uri("e")])
    if not server.alive():
        pytest.fail("server exited after a bad reload")


def test_a_reload_that_drops_an_export_is_refused_whole(
    start_server: StartServer, run: Run
) -> None:
    # Were it applied, the dropped export would lose its access list (and
    # be open to every address) until a restart.
    server = start_server(
        exports=[
            {"name": "open", "size": "8M"},
            {"name": "guarded", "size": "8M", "allowed_networks": ["192.0.2.0/24"]},
        ]
    )
    config_file = Path(server.argv[server.argv.index("--config") + 1])
    text = config_file.read_text()
    config_file.write_text(text[: text.index('name = "guarded"')].rsplit("[[exports]]", 1)[0])
    assert "guarded" not in config_file.read_text()
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, "reload refused, keeping the running settings")
    refused = run(["nbdinfo", server.uri("guarded")], check=False)
    assert refused.returncode != 0  # still guarded: 127.0.0.1 is not allowed
    run(["nbdinfo", server.uri("open")])
