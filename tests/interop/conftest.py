"""Fixtures for interop tests: real NBD clients against a real ``nbdcache serve``.

Every server is a child process started on a free loopback port (and, where
asked, a Unix socket in a private temporary directory). A server counts as
ready once it sends the NBD greeting. On teardown it gets SIGTERM and must exit
with status 0; its log (stderr) is printed so that pytest shows it next to a
failing test.

The clients are the real tools installed on the machine: nbdinfo, nbdsh and
nbdcopy (libnbd), qemu-io and qemu-img, fio. A missing tool fails the test
that needs it rather than skipping it, so a CI run cannot pass silently
without having exercised the server.

``NBDCACHE_BIN`` (environment) overrides the server executable; by default
the console script installed next to the running Python is used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "scripts"

KiB = 1024
MiB = 1024 * KiB

# Bounds for waiting on child processes. They guard against hangs; no test
# asserts on elapsed time.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
CLIENT_TIMEOUT = 120.0

# NBD wire constants (nbd-proto.md) used by the raw-socket client.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7


# --------------------------------------------------------------------------
# external tools


def _python_with_libnbd() -> str | None:
    """A Python interpreter that can ``import nbd`` (python3-libnbd)."""
    for candidate in ("/usr/bin/python3", shutil.which("python3"), sys.executable):
        if not candidate or not os.path.exists(candidate):
            continue
        probe = subprocess.run(
            [candidate, "-c", "import nbd"], capture_output=True, check=False, timeout=30
        )
        if probe.returncode == 0:
            return candidate
    return None


NBD_PYTHON = _python_with_libnbd()

TOOL_PACKAGES = {
    "nbdinfo": "libnbd-bin",
    "nbdsh": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "fio": "fio",
    "nbdkit": "nbdkit",
}


def require_tool(name: str) -> str:
    """Path of an installed client tool; fails the test when it is absent."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package {TOOL_PACKAGES.get(name, name)})")
    return path


def client_env() -> dict[str, str]:
    """Environment for client tools.

    nbdsh runs ``python3 -m nbd`` from PATH, so the interpreter that has the
    libnbd bindings must come first (a virtualenv's python3 usually does not).
    """
    env = dict(os.environ)
    if NBD_PYTHON is not None:
        env["PATH"] = f"{Path(NBD_PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    env["LC_ALL"] = "C"
    return env


def run_tool(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = CLIENT_TIMEOUT,
    input: bytes | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client tool to completion; with ``check`` a non-zero exit fails the test."""
    proc = subprocess.run(
        list(cmd),
        cwd=cwd,
        capture_output=True,
        input=input.decode("latin-1") if input is not None else None,
        text=True,
        env=client_env(),
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"command failed with status {proc.returncode}: {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return proc


def run_nbdsh(
    uri: str | None,
    *statements: str,
    script: str | None = None,
    base_allocation: bool = False,
    opt_mode: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run nbdsh connected to ``uri``: optionally import everything from a
    module in scripts/, then run each statement (typically ``check_x(h)``).

    With ``uri=None`` the handle ``h`` is created but not connected; with
    ``opt_mode`` it is connected but left negotiating (nbdsh --opt-mode).
    """
    require_tool("nbdsh")
    if NBD_PYTHON is None:
        pytest.fail("python3-libnbd is not installed (no python3 can import nbd)")
    cmd = ["nbdsh"]
    if base_allocation:
        cmd.append("--base-allocation")
    if opt_mode:
        cmd.append("--opt-mode")
    if uri is not None:
        cmd += ["-u", uri]
    if script is not None:
        module = script.removesuffix(".py")
        cmd += ["-c", f"import sys; sys.path.insert(0, {str(SCRIPTS)!r})"]
        cmd += ["-c", f"from {module} import *"]
    for statement in statements:
        cmd += ["-c", statement]
    return run_tool(cmd, check=check)


@pytest.fixture
def run() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run(cmd, check=True, timeout=..., input=None)``: run a client tool.

    With ``check`` a non-zero exit fails the test, showing its output.
    """
    return run_tool


@pytest.fixture
def nbdsh() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``nbdsh(uri, *statements, script=None, base_allocation=False, opt_mode=False,
    check=True)``: see ``run_nbdsh``."""
    return run_nbdsh


@pytest.fixture
def nbd_python() -> str:
    """A python3 that can ``import nbd``, for running scripts/ directly."""
    if NBD_PYTHON is None:
        pytest.fail("python3-libnbd is not installed (no python3 can import nbd)")
    return NBD_PYTHON


@pytest.fixture
def tool() -> Callable[[str], str]:
    """``tool(name)``: path of a client tool; fails the test when it is not installed."""
    return require_tool


# --------------------------------------------------------------------------
# servers


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nbdcache_command() -> list[str]:
    override = os.environ.get("NBDCACHE_BIN")
    if override:
        return [override]
    script = Path(sys.executable).with_name("nbdcache")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "nbdcache"]


def _greeting_ok(sock: socket.socket) -> bool:
    """Read the fixed-newstyle greeting, then leave politely with NBD_OPT_ABORT."""
    data = b""
    while len(data) < 18:
        chunk = sock.recv(18 - len(data))
        if not chunk:
            return False
        data += chunk
    magic, opt_magic, _flags = struct.unpack(">QQH", data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        return False
    with contextlib.suppress(OSError):
        sock.sendall(struct.pack(">L", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        sock.sendall(struct.pack(">QLL", IHAVEOPT, OPT_ABORT, 0))
        sock.recv(20)
    return True


@dataclass
class Server:
    """One running ``nbdcache serve``."""

    proc: subprocess.Popen[bytes]
    argv: list[str]
    log_path: Path
    host: str | None = None
    port: int | None = None
    unix: str | None = None
    extra_tcp: list[tuple[str, int]] = field(default_factory=list)
    stopped: bool = False
    hung: bool = False  # still running STOP_TIMEOUT after SIGTERM, then killed

    def uri(self, export: str = "") -> str:
        """nbd:// URI of an export (TCP, first listen address)."""
        assert self.host is not None and self.port is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"

    def unix_uri(self, export: str = "") -> str:
        assert self.unix is not None
        return f"nbd+unix:///{export}?socket={self.unix}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self) -> socket.socket:
        """A raw TCP connection to the first listen address."""
        assert self.host is not None and self.port is not None
        return socket.create_connection((self.host, self.port), timeout=READY_TIMEOUT)

    def stop(self) -> int:
        """SIGTERM, wait, return the exit status (killing it if it hangs: see ``hung``)."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.hung = True
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ServerStartError(Exception):
    pass


def _probe(server: Server) -> bool:
    targets: list[tuple[int, Any]] = []
    if server.host is not None:
        fam = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        targets.append((fam, (server.host, server.port)))
    for host, port in server.extra_tcp:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        targets.append((fam, (host, port)))
    if server.unix is not None:
        targets.append((socket.AF_UNIX, server.unix))
    for family, address in targets:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(address)
                if not _greeting_ok(s):
                    return False
        except OSError:
            return False
    return True


def _start(argv: list[str], server_kwargs: dict[str, Any], log_dir: Path) -> Server:
    log_path = log_dir / f"nbdcache-{len(list(log_dir.glob('nbdcache-*.log')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(proc=proc, argv=argv, log_path=log_path, **server_kwargs)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            server.stopped = True
            raise ServerStartError(
                f"server exited with status {proc.returncode} before it was ready\n"
                f"argv: {' '.join(argv)}\n{server.log()[-6000:]}"
            )
        if _probe(server):
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise ServerStartError(
                f"server not ready within {READY_TIMEOUT}s\nargv: {' '.join(argv)}\n"
                f"{server.log()[-6000:]}"
            )
        time.sleep(0.05)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_toml(server: dict[str, Any], exports: Sequence[dict[str, Any]]) -> str:
    lines = ["[server]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in server.items()]
    for export in exports:
        lines += ["", "[[exports]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in export.items()]
    return "\n".join(lines) + "\n"


StartServer = Callable[..., Server]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nbdc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(tmp_path: Path, short_tmp: Path) -> Iterator[StartServer]:
    """Factory: ``start_server(size="64M", export=None, read_only=False, unix=False,
    ipv6=False, exports=None, extra_args=())`` starts ``nbdcache serve``.

    With ``exports`` (a list of dicts with name/size/description/read_only) the
    exports and listen addresses are written to a TOML config file and the
    server is started with ``--config`` only. Otherwise the command-line flags
    describe one export. ``unix=True`` adds a Unix socket; ``ipv6=True`` adds
    ``[::1]:PORT`` as a second listen address.
    """
    servers: list[Server] = []

    def factory(
        size: str | None = "64M",
        export: str | None = None,
        read_only: bool = False,
        unix: bool = False,
        ipv6: bool = False,
        exports: Sequence[dict[str, Any]] | None = None,
        extra_args: Sequence[str] = (),
    ) -> Server:
        last_error = ""
        for _attempt in range(3):
            host, port = "127.0.0.1", free_port()
            kwargs: dict[str, Any] = {"host": host, "port": port}
            listen = [f"{host}:{port}"]
            if ipv6:
                port6 = free_port(socket.AF_INET6, "::1")
                listen.append(f"[::1]:{port6}")
                kwargs["extra_tcp"] = [("::1", port6)]
            sock_path = None
            if unix:
                sock_path = str(short_tmp / f"nbd{len(servers)}.sock")
                kwargs["unix"] = sock_path
            argv = [*nbdcache_command(), "serve", "--log-level", "info"]
            if exports is not None:
                server_cfg: dict[str, Any] = {"listen": listen}
                if sock_path:
                    server_cfg["unix"] = sock_path
                cfg = tmp_path / f"nbdcache-{len(servers)}.toml"
                cfg.write_text(config_toml(server_cfg, exports))
                argv += ["--config", str(cfg)]
            else:
                for address in listen:
                    argv += ["--listen", address]
                if sock_path:
                    argv += ["--unix", sock_path]
                if size is not None:
                    argv += ["--size", size]
                if export is not None:
                    argv += ["--export", export]
                if read_only:
                    argv.append("--read-only")
            if os.environ.get("NBDCACHE_ALLOCATOR"):
                # Run the whole suite on another allocator (first export).
                argv += ["--allocator", os.environ["NBDCACHE_ALLOCATOR"]]
            argv += list(extra_args)
            try:
                server = _start(argv, kwargs, tmp_path)
            except ServerStartError as e:
                last_error = str(e)
            else:
                servers.append(server)
                return server
            # Another process may have taken the port between probing and
            # binding; only that case is retried.
            if "in use" not in last_error.lower():
                break
        pytest.fail(last_error, pytrace=False)

    yield factory

    failures = []
    for server in servers:
        status = server.stop()
        log = server.log()
        print(f"--- nbdcache log ({' '.join(server.argv)}) ---\n{log[-12000:]}")
        if server.hung:
            failures.append(f"still running {STOP_TIMEOUT}s after SIGTERM: {' '.join(server.argv)}")
        elif status != 0:
            failures.append(f"exit status {status} after SIGTERM: {' '.join(server.argv)}")
    if failures:
        pytest.fail("server did not shut down cleanly: " + "; ".join(failures), pytrace=False)


@pytest.fixture
def server(start_server: StartServer) -> Server:
    """One writable 64 MiB export on a free loopback port."""
    return start_server(size="64M")


@pytest.fixture
def nbdkit_memory(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Factory: ``nbdkit_memory("64M")`` starts an ``nbdkit memory`` peer; returns its URI."""
    procs: list[subprocess.Popen[bytes]] = []

    def factory(size: str) -> str:
        require_tool("nbdkit")
        port = free_port()
        argv = ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port)]
        with open(tmp_path / f"nbdkit-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                [*argv, "memory", size],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert proc.poll() is None, "nbdkit exited before it was ready"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    if _greeting_ok(s):
                        return f"nbd://127.0.0.1:{port}/"
            except OSError:
                pass
            assert time.monotonic() < deadline, "nbdkit not ready"
            time.sleep(0.05)

    yield factory
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# a raw NBD client, for requests no real client sends


class RawNBD:
    """A minimal blocking NBD client over a plain socket.

    Used only for what libnbd and qemu refuse to send (unknown commands,
    oversized payloads, malformed or truncated messages). Simple replies only:
    it never negotiates structured replies.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(READY_TIMEOUT)

    @classmethod
    def connect(cls, server: Server) -> RawNBD:
        return cls(server.connect())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt_magic == IHAVEOPT, "not a fixed-newstyle greeting"
        assert flags & FLAG_FIXED_NEWSTYLE
        return int(flags)

    def handshake(self, export: str = "") -> tuple[int, int]:
        """Greeting, client flags, NBD_OPT_EXPORT_NAME; returns (size, transmission flags)."""
        server_flags = self.greeting()
        client_flags = FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">L", client_flags))
        name = export.encode()
        self.sock.sendall(struct.pack(">QLL", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
        size, tflags = struct.unpack(">QH", self.recv_exact(10))
        if not client_flags & FLAG_NO_ZEROES:
            self.recv_exact(124)
        return int(size), int(tflags)

    @staticmethod
    def request_header(
        cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1
    ) -> bytes:
        return struct.pack(">LHHQQL", REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        cookie: int = 1,
        payload: bytes = b"",
    ) -> None:
        self.sock.sendall(self.request_header(cmd, offset, length, flags, cookie) + payload)

    def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data); data is read only for a successful READ."""
        magic, error, cookie = struct.unpack(">LLQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return int(error), int(cookie), data

    def closed_by_peer(self) -> bool:
        """Drain until the server closes the connection; True on EOF or reset.

        Returns False if the server sent a reply-shaped byte stream and then
        kept the connection open until the socket timeout.
        """
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


@pytest.fixture
def raw_nbd() -> Iterator[Callable[[Server], RawNBD]]:
    """Factory for raw clients; every one is closed at teardown."""
    clients: list[RawNBD] = []

    def factory(server: Server) -> RawNBD:
        client = RawNBD.connect(server)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()
