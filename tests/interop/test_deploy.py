"""What the deploy/ files rely on: socket activation, `--mlock` and the
`nbdcache probe` health check, against real clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, _start, free_port, nbdcache_command

Fixture = Callable[..., Any]


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def kib(value: str) -> int:
    number, unit = value.split()
    assert unit == "kB"
    return int(number)


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*nbdcache_command(), "probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def activated(tmp_path: Path, short_tmp: Path) -> Iterator[Callable[..., Server]]:
    """Start ``nbdcache serve`` under systemd-socket-activate (sockets passed
    as fds 3.., LISTEN_FDS/LISTEN_PID set); it must exit 0 on SIGTERM."""
    servers: list[Server] = []

    def start(*serve_args: str) -> Server:
        port = free_port()
        sock = str(short_tmp / "activated.sock")
        argv = [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "-l",
            sock,
            *nbdcache_command(),
            "serve",
            *serve_args,
        ]
        server = _start(argv, {"host": "127.0.0.1", "port": port, "unix": sock}, tmp_path)
        servers.append(server)
        return server

    yield start
    for server in servers:
        status = server.stop()
        print(server.log()[-8000:])
        assert not server.hung and status == 0, "server did not exit cleanly on SIGTERM"


def test_socket_activation_serves_on_the_passed_sockets_only(
    activated: Fixture, run: Fixture, tool: Fixture
) -> None:
    tool("systemd-socket-activate")
    tool("nbdinfo")
    own_port = free_port()
    server = activated("--size", "16M", "--export", "swap", "--listen", f"127.0.0.1:{own_port}")
    for uri in (server.uri(), server.unix_uri()):
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
        assert [e["export-name"] for e in info["exports"]] == ["swap"]
        assert info["exports"][0]["export-size"] == 16 << 20
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 4096 65536", server.uri()])
    out = run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 4096 65536", server.unix_uri()])
    assert "Pattern verification failed" not in out.stdout + out.stderr
    # The configured address is the socket unit's business now: not opened.
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", own_port)):
        pass
    assert "socket activation" in server.log()


#: A launcher that passes fd argv[1] as fd 3 with LISTEN_FDS=1 and
#: LISTEN_PID=argv[2] (empty: its own pid, which the exec'd server keeps).
LAUNCHER = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = sys.argv[2] or str(os.getpid())
os.execv(sys.argv[3], sys.argv[3:])
"""


def test_sockets_passed_to_another_pid_are_left_alone(tmp_path: Path, run: Fixture) -> None:
    # LISTEN_PID names another process: the server opens its own listener.
    with socket.create_server(("127.0.0.1", 0)) as passed:
        own = free_port()
        argv = [sys.executable, "-c", LAUNCHER, str(passed.fileno()), "1"]
        argv += [*nbdcache_command(), "serve", "--listen", f"127.0.0.1:{own}", "--size", "4M"]
        server = _start_with_fds(argv, own, tmp_path, passed.fileno())
        try:
            info = json.loads(run(["nbdinfo", "--json", server.uri()]).stdout)
            assert info["exports"][0]["export-size"] == 4 << 20
            assert "socket activation" not in server.log()
        finally:
            assert server.stop() == 0


def _start_with_fds(argv: list[str], port: int, log_dir: Path, fd: int) -> Server:
    """Like conftest._start, with `fd` inherited by the launcher."""
    log_path = log_dir / "launched.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=[fd]
        )
    server = Server(proc=proc, argv=argv, log_path=log_path, host="127.0.0.1", port=port)
    probe_argv = ["--connect", f"127.0.0.1:{port}"]
    for _ in range(600):
        if probe(*probe_argv).returncode == 0:
            return server
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{server.log()}")
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"server not ready:\n{server.log()}")


def test_probe_completes_a_handshake(start_server: Fixture) -> None:
    server = start_server(size="8M", export="swap", unix=True)
    ok = probe("--connect", f"127.0.0.1:{server.port}")
    assert ok.returncode == 0, ok.stderr
    assert "8388608 bytes" in ok.stdout
    ok = probe("--unix", str(server.unix), "--export", "swap")
    assert ok.returncode == 0, ok.stderr
    missing = probe("--connect", f"127.0.0.1:{server.port}", "--export", "other")
    assert missing.returncode == 1
    assert "other" in missing.stderr


def test_probe_fails_without_an_nbd_server() -> None:
    port = free_port()
    assert probe("--connect", f"127.0.0.1:{port}").returncode == 1
    with socket.create_server(("127.0.0.1", 0)) as listener:
        # Accepts and says nothing: a port that is open is not enough.
        port = listener.getsockname()[1]
        refused = probe("--connect", f"127.0.0.1:{port}", "--timeout", "1")
    assert refused.returncode == 1
    assert "timed out" in refused.stderr


def test_mlock_locks_the_server_and_trim_still_works(
    start_server: Fixture, run: Fixture, tool: Fixture
) -> None:
    tool("qemu-io")
    server = start_server(size="64M", extra_args=["--ram", "8M", "--mlock"])
    status = proc_status(server.proc.pid)
    # The 8 MiB arena and everything else of the process is locked.
    assert kib(status["VmLck"]) >= 8 << 10
    # Filling the tier, trimming it (frames freed: the kernel refuses to drop
    # locked pages) and filling it again keeps every byte.
    argv = ["qemu-io", "-f", "raw"]
    for cmd in (
        "write -P 0x5a 0 32M",
        "discard 0 32M",
        "write -P 0x33 0 24M",
        "read -P 0x33 0 24M",
        "read -P 0 24M 8M",
    ):
        argv += ["-c", cmd]
    out = run([*argv, server.uri()])
    assert "failed" not in (out.stdout + out.stderr).lower()
    assert kib(proc_status(server.proc.pid)["VmLck"]) >= 8 << 10
    assert "memory locked" in server.log()


def test_systemd_units_are_valid(tmp_path: Path, run: Fixture, tool: Fixture) -> None:
    # systemd-analyze checks every directive; the unit's ExecStart must exist,
    # so it points at this installation's nbdcache.
    tool("systemd-analyze")
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    service = (deploy / "nbdcache.service").read_text()
    assert "/opt/nbdcache/bin/nbdcache serve" in service
    (tmp_path / "nbdcache.service").write_text(
        service.replace("/opt/nbdcache/bin/nbdcache", nbdcache_command()[0])
    )
    (tmp_path / "nbdcache.socket").write_text((deploy / "nbdcache.socket").read_text())
    out = run(["systemd-analyze", "verify", "nbdcache.service", "nbdcache.socket"], cwd=tmp_path)
    assert "nbdcache" not in out.stdout + out.stderr


def test_mlock_refused_by_rlimit_memlock_is_one_clear_line(tool: Fixture) -> None:
    # Without CAP_IPC_LOCK (dropped from the bounding set) a finite limit is
    # refused: one line, naming the limit.
    limit = 65536
    tool("setpriv")
    tool("prlimit")
    argv = ["setpriv", "--bounding-set=-ipc_lock", "prlimit", f"--memlock={limit}:{limit}"]
    argv += [*nbdcache_command(), "serve", "--mlock", "--listen", "127.0.0.1:0", "--size", "16M"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nbdcache:")]
    assert len(errors) == 1, proc.stderr
    assert f"the limit is {limit} bytes" in errors[0]
