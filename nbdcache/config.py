"""Configuration: pydantic models for the TOML file and the command line.

The file and the flags describe the same models; `load` merges them (a flag
wins over the file) and validates everything before any socket is opened.
A bad value becomes one `ConfigError` line that names the field, e.g.
``exports[0].size: must be a multiple of 4096``.  The rest of the program
takes the validated, frozen models and plain values from them.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    field_validator,
    model_validator,
)

PAGE_SIZE = 4096
DEFAULT_PORT = 10809
DEFAULT_EXPORT = "default"
DEFAULT_SIZE = 4 << 30
DEFAULT_RAM = 1 << 30
MIN_RAM = 1 << 20

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """A configuration problem, phrased for the operator in one line."""


def parse_size(value: object) -> int:
    """`512M`, `4G`, `4GiB`, `1048576` -> bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M or 4G")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise ValueError(f"expected a size such as 512M or 4G, got {value!r}")


Size = Annotated[int, BeforeValidator(parse_size)]


def parse_address(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `HOST` or `:PORT` -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", value)
    if m:
        host, port = m.group(1), m.group(2)
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" in value:
        raise ValueError(f"write IPv6 addresses in brackets, e.g. [::1]:{DEFAULT_PORT}")
    else:
        host, port = value, None
    number = int(port) if port and port.isdigit() else -1 if port else DEFAULT_PORT
    if not 0 <= number <= 65535:
        raise ValueError(f"bad port in {value!r}")
    host = host or "127.0.0.1"
    if re.fullmatch(r"[\d.]+|.*:.*", host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"bad IP address in {value!r}") from None
    return host, number


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportConfig(_Model):
    """One export: its name, size, RAM tier, backing image and modes."""

    name: str = DEFAULT_EXPORT
    size: Size = DEFAULT_SIZE
    description: str = ""
    read_only: bool = False
    #: Arena for compressed pages (default: the export's size, at most 1 GiB).
    ram: Size | None = None
    allocator: Literal["zsmalloc", "z3fold", "zbud"] = "zsmalloc"
    compressor: Literal["lz4", "none"] = "lz4"
    #: Path of the backing image; "none" for a RAM-only export.  Unset: a
    #: scratch image in the data directory (volatile exports only).
    backing: str | None = None
    durability: Literal["volatile", "durable"] = "volatile"
    exclusive_gets: Literal["off", "lazy", "eager"] = "off"
    writeback_high: float = 0.90
    writeback_low: float = 0.80
    writeback_inflight: int = 256
    preallocate: bool = False
    #: Seconds a write may wait for writeback to make room before it fails.
    writeback_wait: float = 30.0
    #: With the arena past writeback_low, multi-page writes of a sequential
    #: stream that has reached this go straight to the image (0: never).
    sequential_cutoff: Size = 4 << 20
    #: Client certificate names allowed to use the export (the subject's CN,
    #: a DNS subjectAltName, or the whole subject as "CN=..,O=.."); empty:
    #: anyone.  Naming any makes the export TLS-only; needs server.tls_ca.
    allowed_names: list[str] = []
    #: Client address networks allowed to use the export, e.g. "10.0.0.0/8"
    #: or "::1"; empty: any address.  Unix-socket clients are not affected.
    allowed_networks: list[str] = []

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"not an address or network: {item!r}") from None
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v.encode("utf-8")) > 4096:
            raise ValueError("export names are at most 4096 bytes")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: int) -> int:
        if v <= 0 or v % PAGE_SIZE:
            raise ValueError("must be a positive multiple of 4096")
        return v

    @field_validator("ram")
    @classmethod
    def _ram(cls, v: int | None) -> int | None:
        if v is not None and (v < MIN_RAM or v % PAGE_SIZE):
            raise ValueError("must be a multiple of 4096 and at least 1M")
        return v

    @field_validator("writeback_high", "writeback_low")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("must be a fraction between 0 and 1")
        return v

    @field_validator("writeback_inflight")
    @classmethod
    def _inflight(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("sequential_cutoff")
    @classmethod
    def _cutoff(cls, v: int) -> int:
        if v < 0 or v % 4096:
            raise ValueError("must be a whole number of 4096-byte pages, or 0")
        return v

    @field_validator("writeback_wait")
    @classmethod
    def _wait(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _modes(self) -> ExportConfig:
        if self.writeback_low >= self.writeback_high:
            raise ValueError("writeback_low must be below writeback_high")
        if self.backing == "none":
            if self.durability == "durable":
                raise ValueError("durability = durable needs a backing image")
            if self.exclusive_gets == "eager":
                raise ValueError("exclusive_gets = eager needs a backing image")
        elif self.backing is None and self.durability == "durable":
            raise ValueError("durability = durable needs a backing image path (backing)")
        return self

    @property
    def ram_bytes(self) -> int:
        return self.ram if self.ram is not None else min(self.size, DEFAULT_RAM)

    @property
    def has_backing(self) -> bool:
        return self.backing != "none"


class ServerConfig(_Model):
    """Listeners and process-wide settings."""

    listen: list[str] = [f"127.0.0.1:{DEFAULT_PORT}"]
    unix: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Seconds connections get to finish after SIGTERM/SIGINT.
    shutdown_grace: float = 2.0
    #: Data of requests per connection in flight before it stops reading.
    max_inflight_bytes: Size = 16 << 20
    #: Where scratch images of volatile exports live.
    data_dir: str = "/var/tmp/nbdcache"
    #: Threads doing image I/O, per export.
    io_threads: int = 4
    #: HOST:PORT for the Prometheus endpoint; unset: none.
    metrics: str | None = None
    #: Lock the process's memory (mlockall) and mark it an I/O flusher
    #: (PR_SET_IO_FLUSHER): for a server that serves swap to its own host.
    mlock: bool = False
    #: off: no TLS; on: at the client's choice (exports naming certificates
    #: require it); require: every client must STARTTLS first.
    tls: Literal["off", "on", "require"] = "off"
    #: PEM files: our certificate (chain) and key; the CA that signs client
    #: certificates (set: clients must present one it verifies).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    #: Connections at once, in total and from one client address.
    max_connections: int = 256
    max_connections_per_client: int = 64
    #: Seconds a client has to finish the handshake (TLS included); 0: forever.
    handshake_timeout: float = 30.0
    #: Seconds a connection may stay idle before it is dropped; 0: forever.
    idle_timeout: float = 0.0
    #: TCP keepalive on client connections.
    keepalive: bool = True
    #: Requests per connection waiting for the store before it stops reading.
    max_inflight_requests: int = 1024

    @field_validator("max_connections", "max_connections_per_client", "max_inflight_requests")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("handshake_timeout", "idle_timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must not be negative (0: no timeout)")
        return v

    @model_validator(mode="after")
    def _tls(self) -> ServerConfig:
        if self.tls != "off" and not (self.tls_cert and self.tls_key):
            raise ValueError("tls = on or require needs tls_cert and tls_key")
        if self.tls == "off" and (self.tls_cert or self.tls_key or self.tls_ca):
            raise ValueError("tls_cert, tls_key and tls_ca need tls = on or require")
        return self

    @field_validator("io_threads")
    @classmethod
    def _threads(cls, v: int) -> int:
        if not 1 <= v <= 256:
            raise ValueError("must be between 1 and 256")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: str | None) -> str | None:
        if v is not None:
            parse_address(v)
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_address(item)
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("shutdown_grace")
    @classmethod
    def _grace(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must not be negative")
        return v


class Config(_Model):
    server: ServerConfig = ServerConfig()
    exports: list[ExportConfig] = [ExportConfig()]

    @field_validator("exports")
    @classmethod
    def _exports(cls, v: list[ExportConfig]) -> list[ExportConfig]:
        if not v:
            raise ValueError("at least one export is needed")
        names = [e.name for e in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"export name {name!r} is used twice")
        return v

    @model_validator(mode="after")
    def _certificates(self) -> Config:
        for i, e in enumerate(self.exports):
            if e.allowed_names and not self.server.tls_ca:
                raise ConfigError(
                    f"exports[{i}].allowed_names: needs server.tls_ca to verify certificates"
                )
        return self


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown setting"
    return f"{where or 'config'}: {msg}"


def load(path: str | Path | None, server: dict[str, Any], export: dict[str, Any]) -> Config:
    """Read the TOML file (if any) and apply the command-line overrides.

    `server` and `export` hold only the flags the user gave; the export
    flags apply to the first export (the command line describes one).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if server:
        data["server"] = {**data.get("server", {}), **server}
    if export:
        exports = list(data.get("exports", [{}]))
        exports[0] = {**exports[0], **export}
        data["exports"] = exports
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
