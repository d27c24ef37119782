"""Boot the guest under qemu (TCG) against NBD exports and parse its console.

The guest's /init prints `E2E ...` lines and the hog prints `HOG ...` lines
on the serial console; each is stamped with the host's monotonic clock as it
arrives, which gives the boot and run times without trusting the guest clock.

With several targets the guest gets one virtio disk per server and swaps on
them striped (equal priorities) or mirrored (md RAID1 over two); qemu's
monitor (HMP on a unix socket) lets a test hotplug one more disk while the
guest runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .initramfs import GuestImage
from .profiles import mib

DISCARD_MODES = ("none", "pages", "once", "both")
PAUSE_POINTS = ("swapon", "hog-exit", "readd")
DISKS = ("virtio", "nbd", "attach")
LAYOUTS = ("single", "stripe", "mirror")


@dataclass(frozen=True)
class NbdTarget:
    """Where the guest's disk is: an NBD server on the host's loopback."""

    host: str = "127.0.0.1"
    port: int = 10809
    export: str = ""

    def qemu_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"

    def drive(self) -> str:
        """qemu's -drive options for this export as a guest disk.

        discard=unmap: qemu drops the guest's discards without it.
        werror/rerror=report: an I/O error reaches the guest kernel (and
        its console) instead of qemu pausing the guest (its default on
        ENOSPC). qemu's NBD client does not reconnect (reconnect-delay 0):
        when the server dies, requests fail with EIO at once, which is what
        lets md fail a mirror member.
        """
        return (
            f"file={self.qemu_url()},format=raw,cache=none,discard=unmap,"
            "werror=report,rerror=report"
        )


@dataclass(frozen=True)
class GuestConfig:
    memory: str = "160M"  # qemu -m
    hog_mib: int = 480
    passes: int = 1  # hog verify passes (>1 rewrites pages between passes)
    seed: int = 1
    discard: str = "none"  # swapon discard policy: none, pages, once, both
    # virtio: qemu's NBD client + virtio-blk; nbd: the guest's nbd.ko attached
    # with nbd-client; attach: deploy/attach-swap.sh in the guest (the image
    # must hold it, see initramfs.build_guest's extra_files)
    disk: str = "virtio"
    nbd_block_size: int = 4096  # nbd-client -b, for disk="nbd"
    attach_args: tuple[str, ...] = ()  # for disk="attach", before HOST:PORT/EXPORT
    # disk="virtio" with several targets: "stripe" (one swap area per disk,
    # equal priority) or "mirror" (md RAID1 over two disks, swap on md0).
    layout: str = "single"
    # mirror: after the hog, pause at "readd" while the host hotplugs a fresh
    # disk (GuestResult.hotplug), which the guest adds to the mirror.
    readd: bool = False
    # Points where the guest waits while the host looks at the server (see
    # run_guest's on_pause): "swapon" (before the hog), "hog-exit" (swap still on).
    pause_at: tuple[str, ...] = ()
    script: str | None = None  # run this guest file instead of the swap scenario
    append: tuple[str, ...] = ()  # more kernel command line
    timeout: float = 900.0  # seconds from qemu start to its exit
    extra_qemu_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.discard not in DISCARD_MODES:
            raise ValueError(f"discard must be one of {DISCARD_MODES}")
        if self.disk not in DISKS:
            raise ValueError(f"disk must be one of {DISKS}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}")
        if self.readd and self.layout != "mirror":
            raise ValueError("readd needs layout='mirror'")
        for point in self.pause_at:
            if point not in PAUSE_POINTS:
                raise ValueError(f"pause points are {PAUSE_POINTS}")

    @property
    def memory_mib(self) -> int:
        return mib(self.memory)


@dataclass
class ConsoleLine:
    t: float  # seconds since qemu started (host clock)
    text: str


def _kv(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", text))


@dataclass
class GuestResult:
    config: GuestConfig
    target: NbdTarget  # the first of targets
    lines: list[ConsoleLine]
    returncode: int | None
    timed_out: bool
    wall_s: float  # qemu start to exit
    console_log: Path | None = None
    qemu_cmd: list[str] = field(default_factory=list)
    targets: tuple[NbdTarget, ...] = ()
    monitor: Path | None = None  # qemu's HMP socket while it runs
    _hotplugged: int = 0

    # -- the running guest ---------------------------------------------------

    def hmp(self, command: str, timeout: float = 30.0) -> str:
        """Run one command on qemu's human monitor and return its output."""
        if self.monitor is None:
            raise RuntimeError("qemu is not running")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.monitor))
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("qemu closed its monitor")
                buf += chunk
            s.sendall(command.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        out = buf.decode(errors="replace").replace("\r", "")
        # The monitor echoes the command (with terminal escapes), then answers.
        lines = out.splitlines()[1:]
        return "\n".join(line for line in lines if not line.startswith("(qemu)")).strip()

    def hotplug(self, target: NbdTarget) -> str:
        """Add a virtio disk on `target` to the running guest (PCI hotplug)."""
        n = self._hotplugged
        self._hotplugged += 1
        out = self.hmp(f"drive_add 0 if=none,id=hot{n},{target.drive()}")
        if "OK" not in out:
            raise RuntimeError(f"drive_add failed: {out}")
        out2 = self.hmp(f"device_add virtio-blk-pci,drive=hot{n},id=hotdisk{n}")
        if out2:
            raise RuntimeError(f"device_add failed: {out2}")
        return out

    # -- parsed views -------------------------------------------------------

    def events(self, kind: str) -> list[tuple[float, dict[str, str]]]:
        """`E2E <kind> k=v ...` lines as (host time, fields)."""
        out = []
        for line in self.lines:
            parts = line.text.split(None, 2)
            if len(parts) >= 2 and parts[0] == "E2E" and parts[1] == kind:
                out.append((line.t, _kv(parts[2] if len(parts) > 2 else "")))
        return out

    def event(self, kind: str) -> tuple[float, dict[str, str]] | None:
        found = self.events(kind)
        return found[-1] if found else None

    def _time(self, kind: str) -> float | None:
        ev = self.event(kind)
        return ev[0] if ev else None

    @property
    def status(self) -> str:
        """ok, hog-N (hog exit status), error, script, timeout, or crashed."""
        done = self.event("done")
        if done:
            return done[1].get("status", "?")
        return "timeout" if self.timed_out else "crashed"

    @property
    def boot_s(self) -> float | None:
        """Host seconds from qemu start to the guest's /init running."""
        return self._time("init")

    @property
    def swapon_s(self) -> float | None:
        """Host seconds from qemu start to swap being enabled."""
        return self._time("swapon")

    @property
    def hog_s(self) -> float | None:
        """Host seconds the memory hog ran (fill + verify under swap)."""
        start, end = self._time("hog-start"), self._time("hog-exit")
        return end - start if start is not None and end is not None else None

    @property
    def swapoff_s(self) -> float | None:
        """Host seconds swapoff took (reading back what was still swapped out)."""
        start, end = self._time("hog-exit"), self._time("swapoff")
        for t, fields in self.events("resumed"):
            if fields.get("at") == "hog-exit":
                start = t
        return end - start if start is not None and end is not None else None

    @property
    def hog(self) -> dict[str, str]:
        """The hog's `HOG result=...` fields (empty when it never finished)."""
        for line in reversed(self.lines):
            if line.text.startswith("HOG result="):
                return _kv(line.text)
        return {}

    @property
    def hog_phases(self) -> list[dict[str, str]]:
        return [_kv(line.text) for line in self.lines if line.text.startswith("HOG phase=")]

    @property
    def mismatches(self) -> list[dict[str, str]]:
        return [_kv(line.text) for line in self.lines if line.text.startswith("HOG mismatch")]

    def vmstat(self, label: str) -> dict[str, int]:
        for _, fields in self.events("vmstat"):
            if fields.get("label") == label:
                return {k: int(v) for k, v in fields.items() if v.isdigit()}
        return {}

    def swap_traffic(self, until: str = "after-swapoff") -> dict[str, int]:
        """pswpin/pswpout (pages) from swapon to `until` (after-hog or after-swapoff)."""
        before, after = self.vmstat("before"), self.vmstat(until)
        return {
            key: after.get(key, 0) - before.get(key, 0)
            for key in ("pswpin", "pswpout", "pgmajfault", "swap_ra", "swap_ra_hit", "oom_kill")
        }

    @property
    def disk(self) -> dict[str, str]:
        ev = self.event("disk")
        return ev[1] if ev else {}

    def md(self, label: str) -> dict[str, str]:
        """The guest's `E2E md label=...` report (md0's state and its members')."""
        for _, fields in self.events("md"):
            if fields.get("label") == label:
                return fields
        return {}

    @property
    def mdstat(self) -> list[str]:
        """The md0 lines of /proc/mdstat the guest printed, in order."""
        return [
            line.text[len("E2E mdstat ") :]
            for line in self.lines
            if line.text.startswith("E2E mdstat ")
        ]

    def summary(self) -> dict[str, object]:
        traffic = self.swap_traffic()
        swapon = self.event("swapon")
        return {
            "status": self.status,
            "memory": self.config.memory,
            "hog_mib": self.config.hog_mib,
            "passes": self.config.passes,
            "discard": swapon[1].get("discard") if swapon else self.config.discard,
            "disk": self.config.disk,
            "boot_s": _round(self.boot_s),
            "swapon_s": _round(self.swapon_s),
            "hog_s": _round(self.hog_s),
            "swapoff_s": _round(self.swapoff_s),
            "wall_s": _round(self.wall_s),
            "pswpin": traffic["pswpin"],
            "pswpout": traffic["pswpout"],
            "swap_in_mib": round(traffic["pswpin"] * 4096 / 2**20, 1),
            "swap_out_mib": round(traffic["pswpout"] * 4096 / 2**20, 1),
            "hog_errors": self.hog.get("errors"),
        }

    def tail(self, n: int = 60) -> str:
        return "\n".join(line.text for line in self.lines[-n:])

    def describe_failure(self) -> str:
        """Everything a reader needs when an assertion on this run fails."""
        parts = [
            f"guest status={self.status} returncode={self.returncode} "
            f"timed_out={self.timed_out} wall={self.wall_s:.1f}s",
            f"qemu: {shlex.join(self.qemu_cmd)}",
        ]
        if self.console_log:
            parts.append(f"console log: {self.console_log}")
        if self.mismatches:
            parts.append(f"{len(self.mismatches)} reported mismatches; first: {self.mismatches[0]}")
        parts.append("console tail:\n" + self.tail())
        return "\n".join(parts)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise RuntimeError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    return path


def kernel_append(config: GuestConfig, targets: Sequence[NbdTarget]) -> str:
    target = targets[0]
    disks = len(targets) if config.disk == "virtio" else 1
    args = [
        "console=ttyS0",
        "panic=-1",  # with -no-reboot: a panic ends qemu at once
        "quiet",
        "loglevel=4",
        "zswap.enabled=0",  # every swapped page reaches the block device
        "e2e.disk=" + config.disk,
        "e2e.discard=" + config.discard,
        f"e2e.hog_mib={config.hog_mib}",
        f"e2e.passes={config.passes}",
        f"e2e.seed={config.seed}",
        "e2e.layout=" + config.layout,
        f"e2e.disks={disks}",
    ]
    if config.readd:
        args.append("e2e.readd=1")
    if config.disk in ("nbd", "attach"):
        args += [
            # qemu's user-mode network maps the gateway to the host's loopback.
            "e2e.nbd_host=10.0.2.2",
            f"e2e.nbd_port={target.port}",
            f"e2e.nbd_bs={config.nbd_block_size}",
        ]
        if target.export:
            args.append("e2e.nbd_export=" + target.export)
        if config.attach_args:
            args.append("e2e.attach_args=" + ",".join(config.attach_args))
        if len(targets) > 1:
            args.append(
                "e2e.attach_targets="
                + ",".join(f"10.0.2.2:{t.port}/{t.export}".rstrip("/") for t in targets)
            )
    pause = (*config.pause_at, *(("readd",) if config.readd else ()))
    if pause:
        args.append("e2e.pause=" + ",".join(pause))
    if config.script:
        args.append("e2e.script=" + config.script)
    args += list(config.append)
    for arg in args:
        if any(c.isspace() for c in arg):
            raise ValueError(f"kernel argument with whitespace: {arg!r}")
    return " ".join(args)


def qemu_command(
    image: GuestImage,
    config: GuestConfig,
    target: NbdTarget | Sequence[NbdTarget],
    monitor: Path | None = None,
) -> list[str]:
    targets = _targets(target)
    if config.layout == "mirror" and len(targets) != 2:
        raise ValueError("a mirror is made of 2 targets")
    if config.layout == "single" and len(targets) != 1 and config.disk != "attach":
        raise ValueError("several targets need layout='stripe' or 'mirror'")
    cmd = [
        qemu_binary(),
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-m",
        config.memory,
        "-kernel",
        str(image.kernel.vmlinuz),
        "-initrd",
        str(image.initrd),
        "-append",
        kernel_append(config, targets),
        "-serial",
        "stdio",
    ]
    if monitor is not None:
        cmd += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    if config.disk == "virtio":
        for t in targets:
            if not allowed_host(t.host):
                raise ValueError(f"the guest's disk must be on the host's loopback, not {t.host}")
            cmd += ["-drive", f"{t.drive()},if=virtio"]
    else:
        if any(t.host not in ("127.0.0.1", "localhost") for t in targets):
            raise ValueError("user-mode networking reaches the server on 127.0.0.1 only")
        cmd += [
            # The guest reaches 10.0.2.2:PORT, which qemu connects to
            # 127.0.0.1:PORT; the guest has no default route.
            "-netdev",
            "user,id=net0,ipv6=off",
            "-device",
            "virtio-net-pci,netdev=net0,romfile=",
        ]
    cmd += list(config.extra_qemu_args)
    return cmd


#: Hosts a guest disk may be on: the loopback, and the addresses of network
#: namespaces the lab runner creates (deploy/lab registers them here).
ALLOWED_NETWORKS: list[str] = ["127.0.0.0/8", "::1/128"]


def allowed_host(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net) for net in ALLOWED_NETWORKS)


def _targets(target: NbdTarget | Sequence[NbdTarget]) -> tuple[NbdTarget, ...]:
    targets = (target,) if isinstance(target, NbdTarget) else tuple(target)
    if not targets:
        raise ValueError("no target")
    return targets


def _die_with_parent() -> None:
    """In qemu before exec: SIGKILL when its parent dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def run_guest(
    image: GuestImage,
    target: NbdTarget | Sequence[NbdTarget],
    config: GuestConfig,
    console_log: Path | None = None,
    on_pause: Callable[[str, GuestResult], None] | None = None,
    echo: IO[str] | None = None,
    on_line: Callable[[ConsoleLine, GuestResult], None] | None = None,
) -> GuestResult:
    """Boot the guest, wait for it to power off, and return what it printed.

    target: one export, or one per disk (config.layout stripe or mirror).
    on_pause: called with (point, result so far) at each of config.pause_at
    while the guest waits; the guest goes on when it returns.
    on_line: called with each console line as it arrives (and the result so
    far), from the thread that reads the console: keep it short.
    echo: a stream to copy console lines to as they arrive (progress).
    """
    targets = _targets(target)
    mondir = tempfile.mkdtemp(prefix="nbdcache-qemu-")
    monitor = Path(mondir) / "monitor.sock"
    cmd = qemu_command(image, config, targets, monitor)
    lines: list[ConsoleLine] = []
    log = open(console_log, "w") if console_log else None  # noqa: SIM115
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        env={**os.environ, "LC_ALL": "C"},
        preexec_fn=_die_with_parent,
    )
    result = GuestResult(
        config, targets[0], lines, None, False, 0.0, console_log, cmd, targets, monitor
    )
    paused: list[str] = []  # pause points reached and not yet answered

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.rstrip("\r\n").replace("\r", "")
            line = ConsoleLine(time.monotonic() - start, text)
            lines.append(line)
            if log:
                log.write(f"{line.t:9.3f} {text}\n")
                log.flush()
            if echo:
                echo.write(f"[{line.t:7.1f}] {text}\n")
                echo.flush()
            if text.startswith("E2E paused"):
                paused.append(_kv(text).get("at", "?"))
            if on_line is not None:
                on_line(line, result)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = start + config.timeout
    try:
        while proc.poll() is None:
            if paused:
                point = paused.pop(0)
                if on_pause is not None:
                    on_pause(point, result)
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            if time.monotonic() > deadline:
                result.timed_out = True
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        thread.join(timeout=10)
        if proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if log:
            log.close()
        result.monitor = None
        shutil.rmtree(mondir, ignore_errors=True)
    result.returncode = proc.returncode
    result.wall_s = time.monotonic() - start
    return result
