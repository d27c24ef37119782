#!/usr/bin/env python3
"""Run the nbdcache benchmark suite side by side with its peers.

    python bench/run.py [--quick] [--reps N] [--out DIR]

Every job runs against every server in the same run: nbdcache (the volatile
RAM tier, larger than the working set, no backing image; plus a variant with a
small tier and a backing image when the server supports it, to show the cost
of writeback), ``nbdkit memory`` (C, uncompressed) and ``nbdkit memory
allocator=zstd`` (C, compressed). All servers of a repetition are up at once;
for each job the servers take turns, in an order that rotates with the job and
the repetition, so slow drift of the machine does not favour one of them.

Phases of one repetition:

1. main: start every server with a device the size of the working area, fill
   it (sequential 1 MiB writes), then run each fio job (``bench/fio/``)
   against each server in turn. fio's ``nbd`` engine talks NBD over TCP on
   loopback; a job with ``numjobs=N`` opens N connections (multi-conn).
2. page sets: for each page set of ``bench/pagemix.py`` (real files, swap
   mix), a fresh server the size of the set; ``nbdcopy`` writes the set
   (timed), reads it back (timed, then verified), and fio reads it at random.
   Compared with bare ``lz4.block`` on the same pages in this process.

After the repetitions, a metadata probe starts nbdcache with a 1 GiB and a
64 GiB device and reports resident bytes per device page.

For each fio run the server's CPU time (utime+stime from /proc/PID/stat,
including any child processes) is read before and after, giving CPU seconds
per GiB moved; peak RSS is VmHWM. For nbdcache the RSS is broken down into
the arena (the resident part of its anonymous arena mapping, found in
/proc/PID/smaps, or the arena metric), the page table (metric) and the rest,
when the server exposes Prometheus metrics (``--metrics HOST:PORT``).

Results go to DIR (default ``bench/results/<timestamp>/``): ``results.json``
(every sample and the summary), ``chart.png``, ``table.txt``, raw fio JSON
and server logs. ``bench/report.py`` rebuilds the table and the chart from a
``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import report

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FIO_DIR = BENCH / "fio"
HOST = "127.0.0.1"
PAGE = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
ZERO_PAGE = bytes(PAGE)
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


# --------------------------------------------------------------------------- sizes


def parse_size(text: str) -> int:
    """'256M' -> 268435456; plain numbers are bytes; K/M/G/T are powers of 1024."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def human_size(n: int) -> str:
    """The shortest exact form with a K/M/G suffix, as servers accept it."""
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One fio measurement: a job file, a number of connections, what it does."""

    name: str
    file: str
    kind: str  # "read", "write" or "mixed"
    bs: int
    conns: int = 1
    timed: bool = True
    targeted: bool = True  # the performance targets apply to it
    quick: bool = True  # part of --quick

    @property
    def unit(self) -> str:
        return "iops" if self.bs <= 4 * KiB else "bytes/s"


FILL = Job("fill-1m", "fill-1m.fio", "write", MiB, timed=False, targeted=False)
JOBS = [
    Job("randread-4k", "randread-4k.fio", "read", 4 * KiB),
    Job("randwrite-4k", "randwrite-4k.fio", "write", 4 * KiB),
    Job("randrw70-4k", "randrw70-4k.fio", "mixed", 4 * KiB),
    Job("seqread-128k", "seqread-128k.fio", "read", 128 * KiB),
    Job("seqwrite-128k", "seqwrite-128k.fio", "write", 128 * KiB),
    Job("randread-4k-2c", "randread-4k.fio", "read", 4 * KiB, conns=2, quick=False),
    Job("randread-4k-4c", "randread-4k.fio", "read", 4 * KiB, conns=4),
    Job("randwrite-4k-2c", "randwrite-4k.fio", "write", 4 * KiB, conns=2, quick=False),
    Job("randwrite-4k-4c", "randwrite-4k.fio", "write", 4 * KiB, conns=4),
]
# The fio job run over each page set after nbdcopy wrote it.
PAGESET_READ = Job("randread-4k", "randread-4k.fio", "read", 4 * KiB)


# --------------------------------------------------------------------------- processes


def launch(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a server in its own session, logging to `log_path`; it dies with us."""
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,
            cwd=ROOT,
        )


def _set_pdeathsig() -> None:
    """Child side: get SIGTERM if the benchmark dies, so no server outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()  # fields from 3 (state) on


def process_cpu_seconds(pid: int) -> float:
    """utime+stime of pid and every live descendant, plus reaped children's."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f:
                children.setdefault(int(f[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        f = _stat_fields(p)
        if f:
            # utime, stime, cutime, cstime are fields 14..17 (index 11..14 here)
            total += sum(int(x) for x in f[11:15])
        todo.extend(children.get(p, []))
    return total / CLK_TCK


def process_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile in bytes (missing keys omitted)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads"):
                num = int(rest.split()[0])
                out[key] = num if key == "Threads" else num * KiB
    except OSError:
        pass
    return out


def anon_mapping_rss(pid: int, size: int) -> int | None:
    """Resident bytes of the anonymous mapping exactly ``size`` bytes long (the arena).

    None when there is no such mapping; the kernel merges adjacent anonymous
    mappings, so an arena that borders other anonymous memory is not found.
    """
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    found, current = None, False
    for line in text.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            anon = path == "" or path.startswith("[anon") or path.startswith("/dev/zero")
            current = anon and hi - lo == size
        elif current and line.startswith("Rss:"):
            found = (found or 0) + int(line.split()[1]) * KiB
            current = False
    return found


def brief(stderr: str, keep: int = 2) -> str:
    """A tool's stderr in a line or two: the first distinct lines and a count."""
    lines = list(dict.fromkeys(ln.strip() for ln in stderr.splitlines() if ln.strip()))
    more = f" (+{len(lines) - keep} more lines)" if len(lines) > keep else ""
    return " | ".join(ln[:300] for ln in lines[:keep]) + more


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*(?:\{.*\})?)\s+(\S+)", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


# --------------------------------------------------------------------------- servers


@dataclass
class Launch:
    """Everything a server command line may need."""

    port: int
    size: int
    ram: int | None
    metrics_port: int | None
    backing: Path | None


@dataclass
class ServerSpec:
    """How to start one server under test."""

    name: str
    family: str  # "nbdcache" or "peer"
    describe: str
    build: Callable[[Launch], list[str]]
    ram: Callable[[int], int | None] = lambda size: None  # device size -> tier RAM
    metrics: bool = False
    backing: bool = False
    targets: bool = False  # the performance targets apply to it

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "describe": self.describe,
            "targets": self.targets,
            "example_cmd": shlex.join(
                self.build(
                    Launch(
                        10809,
                        GiB,
                        self.ram(GiB),
                        9100 if self.metrics else None,
                        Path("/tmp/backing.img") if self.backing else None,
                    )
                )
            ),
        }


class Server:
    """A running server process and its measurements."""

    def __init__(
        self, spec: ServerSpec, size: int, logdir: Path, tag: str, tmp: Path, ram: int | None = None
    ) -> None:
        self.spec, self.size = spec, size
        self.port = free_port()
        self.metrics_port = free_port() if spec.metrics else None
        self.ram = ram if ram is not None else spec.ram(size)
        self.backing = tmp / f"{spec.name}-{tag}.img" if spec.backing else None
        self.argv = spec.build(Launch(self.port, size, self.ram, self.metrics_port, self.backing))
        self.log = logdir / f"{spec.name}-{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def uri(self) -> str:
        return f"nbd://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.proc = launch(self.argv, self.log)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Ready when the port accepts connections and nbdinfo sees the export size."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.spec.name} exited with {self.proc.returncode} "
                    f"before listening; see {self.log}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.spec.name} not listening after {timeout:.0f}s; see {self.log}"
                )
            time.sleep(0.05)
        out = subprocess.run(
            ["nbdinfo", "--size", self.uri], capture_output=True, text=True, timeout=30
        )
        if out.returncode != 0 or int(out.stdout.strip() or -1) != self.size:
            raise RuntimeError(
                f"{self.spec.name}: nbdinfo --size gave {out.stdout.strip()!r} "
                f"{out.stderr.strip()!r}, expected {self.size}"
            )

    def info(self) -> dict[str, Any]:
        out = subprocess.run(
            ["nbdinfo", "--json", self.uri], capture_output=True, text=True, timeout=30
        )
        try:
            data = json.loads(out.stdout)
        except ValueError:
            return {}
        exp = (data.get("exports") or [{}])[0]
        return {k: v for k, v in exp.items() if k.startswith(("can_", "is_", "block_size"))}

    def cpu(self) -> float:
        return process_cpu_seconds(self.pid)

    def status(self) -> dict[str, int]:
        return process_status(self.pid)

    def metrics(self) -> dict[str, float] | None:
        if self.metrics_port is None:
            return None
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return parse_prometheus(resp.read().decode())
        except (OSError, ValueError):
            return None

    def memory(self, pagetable_re: str, arena_re: str) -> dict[str, Any]:
        """VmHWM/VmRSS and, for nbdcache, RSS = arena + page table + rest."""
        st = self.status()
        mem: dict[str, Any] = {
            "vmhwm": st.get("VmHWM"),
            "vmrss": st.get("VmRSS"),
            "rss_anon": st.get("RssAnon"),
            "threads": st.get("Threads"),
        }
        if self.spec.family != "nbdcache":
            return mem
        metrics = self.metrics()
        if metrics is not None:
            mem["metrics"] = {
                k: v for k, v in metrics.items() if not k.startswith(("python_", "process_"))
            }
        # The server's own arena figure first; else the arena's mapping in smaps.
        arena = _first_metric(metrics, arena_re) if metrics else None
        arena_src = "metric" if arena is not None else None
        if arena is None and self.ram:
            arena = anon_mapping_rss(self.pid, self.ram)
            arena_src = "smaps" if arena is not None else None
        pagetable = _first_metric(metrics, pagetable_re) if metrics else None
        if arena is not None or pagetable is not None:
            rss = mem["vmrss"] or 0
            mem["breakdown"] = {
                "arena": arena,
                "pagetable": pagetable,
                "rest": rss - (arena or 0) - (pagetable or 0),
                "arena_source": arena_src,
                "pagetable_source": "metric" if pagetable else None,
            }
        return mem

    def stop(self) -> int | None:
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The server leads its own process group (start_new_session):
                # this kills it and anything it started, nothing else.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.exit_code = self.proc.returncode
        if self.backing is not None:
            with contextlib.suppress(OSError):
                self.backing.unlink()
        return self.exit_code


def _first_metric(metrics: dict[str, float], patterns: str) -> int | None:
    """Sum over label sets of the first metric matching the comma-separated regexes.

    The regexes are tried in order, so the first one is preferred.
    """
    names = sorted({k.split("{", 1)[0] for k in metrics})
    for pattern in patterns.split(","):
        for name in names:
            if re.search(pattern, name):
                return int(sum(v for k, v in metrics.items() if k.split("{", 1)[0] == name))
    return None


def nbdcache_command(exe: str | None) -> list[str]:
    """The nbdcache console script next to this Python, or `python -m nbdcache`."""
    if exe:
        return shlex.split(exe)
    script = Path(sys.executable).parent / "nbdcache"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nbdcache"]


def probe_nbdcache(base: list[str]) -> tuple[set[str], str]:
    """Flags accepted by `nbdcache serve` (from --help) and the version string."""
    try:
        out = subprocess.run(
            [*base, "serve", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        ver = subprocess.run(
            [*base, "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {shlex.join(base)}: {exc}") from exc
    if out.returncode != 0:
        raise RuntimeError(
            f"`{shlex.join(base)} serve --help` failed: {(out.stderr or out.stdout).strip()[-400:]}"
        )
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))
    return flags, (ver.stdout or ver.stderr).strip()


def build_specs(args: argparse.Namespace) -> tuple[list[ServerSpec], dict[str, Any]]:
    """The servers under test, and what was learnt about nbdcache."""
    specs: list[ServerSpec] = []
    info: dict[str, Any] = {}
    wanted = set(args.servers.split(",")) if args.servers else None

    def want(name: str) -> bool:
        return (
            wanted is None
            or name in wanted
            or (name.startswith("nbdcache") and "nbdcache*" in wanted)
        )

    def main_ram(size: int) -> int:
        return args.ram or 2 * size

    def wb_ram(size: int) -> int:
        return max(4 * MiB, (size // args.wb_ram_fraction) // PAGE * PAGE)

    extra = [a for arg in args.nbdcache_arg for a in shlex.split(arg)]
    variants = []
    for v in args.variant:
        name, sep, vargs = v.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant wants NAME=ARGS, got {v!r}")
        variants.append((f"nbdcache[{name}]", shlex.split(vargs)))

    if any(want(n) for n in ["nbdcache", "nbdcache-wb", *(n for n, _ in variants)]):
        if args.nbdcache_cmd:
            template = shlex.split(args.nbdcache_cmd)
            uses_metrics = any("{metrics}" in t for t in template)
            info["command_template"] = args.nbdcache_cmd

            def from_template(launch: Launch, more: list[str], template=template) -> list[str]:
                fields = {
                    "host": HOST,
                    "port": launch.port,
                    "size": human_size(launch.size),
                    "size_bytes": launch.size,
                    "ram": human_size(launch.ram) if launch.ram else "",
                    "metrics": f"{HOST}:{launch.metrics_port}",
                    "backing": str(launch.backing or ""),
                }
                return [t.format(**fields) for t in template] + extra + more

            for name, more in [("nbdcache", []), *variants]:
                if want(name):
                    specs.append(
                        ServerSpec(
                            name,
                            "nbdcache",
                            f"{args.nbdcache_cmd} {shlex.join(more)}".strip(),
                            lambda launch, more=more: from_template(launch, more),
                            ram=main_ram,
                            metrics=uses_metrics,
                            targets=name == "nbdcache",
                        )
                    )
        else:
            base = nbdcache_command(args.nbdcache_exe)
            flags, version = probe_nbdcache(base)
            info.update(command=shlex.join(base), version=version, flags=sorted(flags))
            has_ram, has_backing = "--ram" in flags, "--backing" in flags
            has_metrics = "--metrics" in flags and not args.no_metrics

            def cmd(launch: Launch, more: list[str]) -> list[str]:
                argv = [
                    *base,
                    "serve",
                    "--listen",
                    f"{HOST}:{launch.port}",
                    "--size",
                    human_size(launch.size),
                ]
                if has_ram and launch.ram:
                    argv += ["--ram", human_size(launch.ram)]
                if has_metrics and launch.metrics_port:
                    argv += ["--metrics", f"{HOST}:{launch.metrics_port}"]
                if launch.backing is not None:
                    argv += ["--backing", str(launch.backing)]
                elif has_backing:
                    argv += ["--backing", "none"]  # RAM only: no image at all
                return argv + extra + more

            if want("nbdcache"):
                specs.append(
                    ServerSpec(
                        "nbdcache",
                        "nbdcache",
                        "nbdcache, volatile RAM tier larger than the working set, no backing image",
                        lambda launch: cmd(launch, []),
                        ram=main_ram,
                        metrics=has_metrics,
                        targets=True,
                    )
                )
            for name, more in variants:
                if want(name):
                    specs.append(
                        ServerSpec(
                            name,
                            "nbdcache",
                            f"nbdcache {shlex.join(more)}",
                            lambda launch, more=more: cmd(launch, more),
                            ram=main_ram,
                            metrics=has_metrics,
                        )
                    )
            if want("nbdcache-wb") and not args.no_writeback:
                if has_ram and has_backing:
                    specs.append(
                        ServerSpec(
                            "nbdcache-wb",
                            "nbdcache",
                            f"nbdcache, tier 1/{args.wb_ram_fraction} of the device, full, "
                            "writing back to a backing image",
                            lambda launch: cmd(launch, []),
                            ram=wb_ram,
                            metrics=has_metrics,
                            backing=True,
                        )
                    )
                else:
                    info["writeback"] = "skipped: `nbdcache serve` has no --ram/--backing yet"
                    print(
                        "note: writeback run skipped (nbdcache serve has no --ram/--backing yet)",
                        file=sys.stderr,
                    )
            if not has_metrics:
                info["metrics"] = (
                    "skipped: --no-metrics"
                    if args.no_metrics
                    else "skipped: `nbdcache serve` has no --metrics yet"
                )

    nbdkit = shutil.which("nbdkit") or "nbdkit"

    def kit(launch: Launch, alloc: list[str]) -> list[str]:
        return [
            nbdkit,
            "-f",
            "--exit-with-parent",
            "-i",
            HOST,
            "-p",
            str(launch.port),
            "memory",
            human_size(launch.size),
            *alloc,
        ]

    if want("nbdkit-memory"):
        specs.append(
            ServerSpec(
                "nbdkit-memory",
                "peer",
                "nbdkit memory (sparse, uncompressed)",
                lambda launch: kit(launch, []),
            )
        )
    if want("nbdkit-zstd"):
        specs.append(
            ServerSpec(
                "nbdkit-zstd",
                "peer",
                "nbdkit memory allocator=zstd",
                lambda launch: kit(launch, ["allocator=zstd"]),
            )
        )
    if not specs:
        raise SystemExit(f"no servers selected (--servers {args.servers})")
    return specs, info


def rotate(seq: list[Any], k: int) -> list[Any]:
    k %= len(seq)
    return seq[k:] + seq[:k]


# --------------------------------------------------------------------------- fio


def run_fio(job: Job, server: Server, area: int, runtime: int, out_json: Path) -> dict[str, Any]:
    """Run one fio job against one server; throughput, latency and server CPU."""
    env = dict(
        os.environ, NBD_URI=server.uri, AREA=str(area), RUNTIME=str(runtime), NUMJOBS=str(job.conns)
    )
    cmd = ["fio", "--output-format=json", f"--output={out_json}", str(FIO_DIR / job.file)]
    timeout = (runtime if job.timed else 0) + 120 + area / (20 * MiB)
    cpu0, t0 = server.cpu(), time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    cpu = server.cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(
            f"fio {job.name} against {server.spec.name} failed "
            f"({proc.returncode}): {brief(proc.stderr)}"
        )
    data = json.loads(out_json.read_text())
    j = data["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio {job.name} against {server.spec.name}: error {j['error']}")
    r, w = j["read"], j["write"]
    io_bytes = r["io_bytes"] + w["io_bytes"]
    res = {
        "iops": r["iops"] + w["iops"],
        "bw_bytes": r["bw_bytes"] + w["bw_bytes"],
        "io_bytes": io_bytes,
        "runtime_s": max(r["runtime"], w["runtime"]) / 1000,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_s_per_gib": cpu / (io_bytes / GiB) if io_bytes else None,
        "fio_usr_pct": j.get("usr_cpu"),
        "fio_sys_pct": j.get("sys_cpu"),
    }
    for side, d in (("read", r), ("write", w)):
        pct = (d.get("clat_ns") or {}).get("percentile") or {}
        if d["io_bytes"]:
            res[f"{side}_clat_p50_us"] = pct.get("50.000000", 0) / 1000
            res[f"{side}_clat_p99_us"] = pct.get("99.000000", 0) / 1000
    return res


def fmt_rate(job: Job, res: dict[str, Any]) -> str:
    rate = (
        f"{res['iops'] / 1000:7.1f}k IOPS"
        if job.unit == "iops"
        else f"{res['bw_bytes'] / MiB:7.0f} MiB/s"
    )
    cpu = res["cpu_s_per_gib"]
    return f"{rate}  cpu {cpu:5.2f} s/GiB" if cpu is not None else rate


# --------------------------------------------------------------------------- page sets


@dataclass
class PageSet:
    name: str
    path: Path
    nbytes: int
    sha256: str
    lz4: dict[str, float] = field(default_factory=dict)


def load_pagemix() -> Any:
    """bench/pagemix.py, or None (with the reason on stderr)."""
    try:
        return importlib.import_module("pagemix")
    except ImportError as exc:
        print(
            f"note: page-set jobs skipped: cannot import bench/pagemix.py ({exc})", file=sys.stderr
        )
        return None


def lz4_limits(data: bytes, rounds: int) -> dict[str, float]:
    """Bare lz4.block page by page in this process: the server's ceiling."""
    import lz4.block

    view = memoryview(data)
    pages = [view[i : i + PAGE] for i in range(0, len(view) - PAGE + 1, PAGE)]
    compress, decompress = lz4.block.compress, lz4.block.decompress
    comp_times, dec_times = [], []
    packed: list[bytes] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        packed = [compress(p, store_size=False) for p in pages]
        comp_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for c in packed:
            decompress(c, uncompressed_size=PAGE)
        dec_times.append(time.perf_counter() - t0)
    nbytes = len(pages) * PAGE
    stored = sum(len(c) for c in packed)
    return {
        "compress_bps": nbytes / statistics.median(comp_times),
        "decompress_bps": nbytes / statistics.median(dec_times),
        "ratio": stored / nbytes,
        "incompressible_pages": sum(len(c) > PAGE * 7 // 8 for c in packed),
        "zero_pages": sum(1 for p in pages if p == ZERO_PAGE),
        "pages": len(pages),
    }


def prepare_pagesets(args: argparse.Namespace, tmp: Path) -> list[PageSet]:
    if args.no_pagesets:
        return []
    mod = load_pagemix()
    if mod is None:
        return []
    sets: list[PageSet] = []
    for name, fn in (("real-files", "real_files"), ("swap-mix", "swap_mix")):
        func = getattr(mod, fn, None)
        if func is None:
            print(f"note: page set {name} skipped: pagemix has no {fn}()", file=sys.stderr)
            continue
        t0 = time.monotonic()
        try:
            data = bytes(func(args.pageset_pages))
        except Exception as exc:
            print(f"note: page set {name} skipped: {fn}() failed: {exc!r}", file=sys.stderr)
            continue
        if not data or len(data) % PAGE:
            print(
                f"note: page set {name} skipped: {fn}() gave {len(data)} bytes, "
                "not a positive multiple of 4096",
                file=sys.stderr,
            )
            continue
        path = tmp / f"{name}.img"
        path.write_bytes(data)
        ps = PageSet(name, path, len(data), hashlib.sha256(data).hexdigest())
        ps.lz4 = lz4_limits(data, args.lz4_rounds)
        print(
            f"page set {name}: {len(data) // PAGE} pages made in "
            f"{time.monotonic() - t0:.1f}s; lz4 {ps.lz4['ratio']:.2f} of size, compress "
            f"{ps.lz4['compress_bps'] / MiB:.0f} MiB/s, decompress "
            f"{ps.lz4['decompress_bps'] / MiB:.0f} MiB/s"
        )
        sets.append(ps)
    return sets


def timed_nbdcopy(src: str, dst: str, server: Server) -> tuple[float, float]:
    """Run nbdcopy with its defaults; (wall seconds, server CPU seconds)."""
    cpu0, t0 = server.cpu(), time.monotonic()
    proc = subprocess.run(["nbdcopy", src, dst], capture_output=True, text=True, timeout=600)
    wall, cpu = time.monotonic() - t0, server.cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"nbdcopy {src} {dst} failed: {brief(proc.stderr)}")
    return wall, cpu


def device_sha256(server: Server) -> str:
    h = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", server.uri, "-"], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        for chunk in iter(lambda: p.stdout.read(MiB), b""):
            h.update(chunk)
    if p.returncode != 0:
        raise RuntimeError(f"nbdcopy {server.uri} - failed ({p.returncode})")
    return h.hexdigest()


def run_pageset(
    ps: PageSet, server: Server, runtime: int, fio_out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    rss0 = server.status().get("VmRSS", 0)
    write_s, write_cpu = timed_nbdcopy(str(ps.path), server.uri, server)
    mem = server.memory(args.metric_pagetable, args.metric_arena)
    read_s, read_cpu = timed_nbdcopy(server.uri, "null:", server)
    verified = device_sha256(server) == ps.sha256
    fio = run_fio(PAGESET_READ, server, ps.nbytes, runtime, fio_out)
    return {
        "bytes": ps.nbytes,
        "write_s": write_s,
        "write_bps": ps.nbytes / write_s,
        "write_cpu_s_per_gib": write_cpu / (ps.nbytes / GiB),
        "read_s": read_s,
        "read_bps": ps.nbytes / read_s,
        "read_cpu_s_per_gib": read_cpu / (ps.nbytes / GiB),
        "verified": verified,
        "rss_before": rss0,
        "rss_after_write": mem.get("vmrss"),
        "rss_delta": (mem.get("vmrss") or 0) - rss0,
        "breakdown": mem.get("breakdown"),
        "randread_4k": fio,
    }


# --------------------------------------------------------------------------- metadata


def metadata_probe(
    spec: ServerSpec, logdir: Path, tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Resident bytes per device page: nbdcache at 1 GiB and 64 GiB, just started."""
    out: dict[str, Any] = {"sizes": {}}
    for size in (GiB, 64 * GiB):
        srv = Server(spec, size, logdir, f"metadata-{human_size(size)}", tmp, ram=256 * MiB)
        try:
            srv.start()
            srv.wait_ready(timeout=180)
            time.sleep(0.5)
            mem = srv.memory(args.metric_pagetable, args.metric_arena)
            out["sizes"][human_size(size)] = {
                "vmrss": mem.get("vmrss"),
                "vmhwm": mem.get("vmhwm"),
                "pagetable": (mem.get("breakdown") or {}).get("pagetable"),
            }
        finally:
            srv.stop()
    small, big = out["sizes"]["1G"], out["sizes"]["64G"]
    pages = (64 * GiB - GiB) // PAGE
    if small["vmrss"] and big["vmrss"]:
        out["rss_bytes_per_page"] = (big["vmrss"] - small["vmrss"]) / pages
    if big.get("pagetable"):
        out["pagetable_bytes_per_page"] = big["pagetable"] / (64 * GiB // PAGE)
    return out


# --------------------------------------------------------------------------- main


def tool_version(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def tree_revision() -> str:
    rev = tool_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    if not re.fullmatch(r"[0-9a-f]{4,40}", rev):
        rev = "no commit"
    return f"{rev}{' (modified tree)' if dirty else ''}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark nbdcache against nbdkit memory (plain and zstd) with fio.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short run, about 3 minutes: 2 s per job, 2 repetitions (page sets once), "
        "1 and 4 connections only, 256 MiB area",
    )
    p.add_argument("--reps", type=int, help="repetitions (default 5, quick 2)")
    p.add_argument("--runtime", type=int, help="seconds per fio job (default 10, quick 2)")
    p.add_argument(
        "--area",
        type=parse_size,
        help="device size = working area of the fio jobs (default 1G, quick 256M)",
    )
    p.add_argument(
        "--ram",
        type=parse_size,
        help="nbdcache tier RAM for the main runs (default twice the area)",
    )
    p.add_argument(
        "--wb-ram-fraction",
        type=int,
        default=8,
        help="writeback run: tier RAM is the device size divided by this (default %(default)s)",
    )
    p.add_argument(
        "--pageset-pages", type=int, help="pages in each page set (default 65536, quick 16384)"
    )
    p.add_argument(
        "--lz4-rounds", type=int, default=3, help="timing rounds of bare lz4 (default %(default)s)"
    )
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<time>)")
    p.add_argument(
        "--servers",
        help="comma list among nbdcache, nbdcache-wb, nbdcache[NAME], "
        "nbdkit-memory, nbdkit-zstd (default: all available)",
    )
    p.add_argument("--jobs", help="comma list of job names to run (default: all)")
    p.add_argument(
        "--nbdcache-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra arguments for every nbdcache server, e.g. "
        "--nbdcache-arg='--allocator zsmalloc' (repeatable)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also run nbdcache with extra ARGS as server nbdcache[NAME], e.g. "
        "--variant 'zbud=--allocator zbud' (repeatable)",
    )
    p.add_argument(
        "--nbdcache-exe",
        metavar="CMD",
        help="nbdcache executable (default: the one installed next to this Python)",
    )
    p.add_argument(
        "--nbdcache-cmd",
        metavar="TEMPLATE",
        help="command line for the server in the nbdcache slot instead of "
        "`nbdcache serve ...`; fields {host} {port} {size} {size_bytes} {ram} "
        "{metrics} {backing}",
    )
    p.add_argument("--no-writeback", action="store_true", help="skip the writeback server")
    p.add_argument("--no-metrics", action="store_true", help="do not start nbdcache metrics")
    p.add_argument("--no-pagesets", action="store_true", help="skip the page-set phase")
    p.add_argument("--no-metadata", action="store_true", help="skip the metadata probe")
    p.add_argument(
        "--metric-pagetable",
        default=r"page_?table.*bytes,metadata_bytes",
        help="regexes (comma-separated, tried in order) naming the page-table bytes metric "
        "(default %(default)s)",
    )
    p.add_argument(
        "--metric-arena",
        default=r"arena.*resident.*bytes,arena.*bytes,mem_used_total",
        help="regexes naming the arena bytes metric; without one, the resident size of the "
        "anonymous mapping of exactly --ram bytes is used (default %(default)s)",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.reps = args.reps or (2 if q else 5)
    args.runtime = args.runtime or (2 if q else 10)
    args.area = args.area or (256 * MiB if q else GiB)
    args.pageset_pages = args.pageset_pages or (16384 if q else 65536)
    if args.area % PAGE:
        p.error("--area must be a multiple of 4096")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class Bench:
    """One run: the phases, with a failing server costing only its own samples."""

    def __init__(
        self,
        args: argparse.Namespace,
        specs: list[ServerSpec],
        jobs: list[Job],
        out: Path,
        tmp: Path,
        results: dict[str, Any],
    ) -> None:
        self.args, self.specs, self.jobs = args, specs, jobs
        self.out, self.tmp, self.results = out, tmp, results
        self.running: list[Server] = []

    def server(self, spec: ServerSpec, size: int, tag: str) -> Server:
        srv = Server(spec, size, self.out / "logs", tag, self.tmp)
        self.running.append(srv)
        return srv

    def stop(self, srv: Server) -> int | None:
        code = srv.stop()
        if srv in self.running:
            self.running.remove(srv)
        return code

    def stop_all(self) -> None:
        for srv in list(self.running):
            self.stop(srv)

    def fail(self, srv: Server, what: str, exc: BaseException) -> None:
        """Record a failure of one server and drop it for the rest of the phase."""
        died = srv.proc is not None and srv.proc.poll() is not None
        code = self.stop(srv)
        msg = f"{srv.spec.name}: {what}: {exc}"
        if died:
            msg += f" (server exited with {code}; see {srv.log})"
        self.results["errors"].append(msg)
        print(f"  error: {msg}", file=sys.stderr)

    def fio(self, rep: int, job: Job, srv: Server, pos: int | None = None) -> bool:
        try:
            res = run_fio(
                job,
                srv,
                self.args.area,
                self.args.runtime,
                self.out / "fio" / f"rep{rep}-{job.name}-{srv.spec.name}.json",
            )
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
            self.fail(srv, f"fio {job.name} (rep {rep})", exc)
            return False
        extra = {} if pos is None else {"position": pos}
        self.results["runs"].append(
            {"rep": rep, "job": job.name, "server": srv.spec.name, **extra, **res}
        )
        print(f"  {job.name:16} {srv.spec.name:16} {fmt_rate(job, res)}")
        return True

    def main_phase(self, rep: int) -> None:
        args = self.args
        order = rotate(self.specs, rep)
        print(
            f"--- repetition {rep + 1}/{args.reps}: main phase, fill order "
            f"{', '.join(s.name for s in order)}"
        )
        servers = {s.name: self.server(s, args.area, f"rep{rep}") for s in order}
        for srv in servers.values():
            srv.start()
        for name, srv in list(servers.items()):
            try:
                srv.wait_ready()
                self.results["meta"]["server_info"].setdefault(name, srv.info())
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                self.fail(srv, f"start (rep {rep})", exc)
                del servers[name]
        for name, srv in list(servers.items()):
            if not self.fio(rep, FILL, srv):
                del servers[name]
        for ji, job in enumerate(self.jobs):
            for pos, spec in enumerate(rotate(order, ji)):
                srv = servers.get(spec.name)
                if srv is not None and not self.fio(rep, job, srv, pos):
                    del servers[spec.name]
        for name, srv in servers.items():
            mem = srv.memory(args.metric_pagetable, args.metric_arena)
            code = self.stop(srv)
            self.results["memory"].append({"rep": rep, "server": name, "exit_code": code, **mem})
            if code not in (0, None) and srv.spec.family == "nbdcache":
                msg = f"{name} exited with {code} on SIGTERM (rep {rep}); see {srv.log}"
                self.results["errors"].append(msg)
                print(f"  warning: {msg}", file=sys.stderr)

    def pageset_phase(self, rep: int, pagesets: list[PageSet]) -> None:
        order = rotate(self.specs, rep)
        for si, ps in enumerate(pagesets):
            print(
                f"--- repetition {rep + 1}/{self.args.reps}: page set {ps.name} "
                f"({human_size(ps.nbytes)})"
            )
            for spec in rotate(order, si):
                srv = self.server(spec, ps.nbytes, f"rep{rep}-{ps.name}")
                try:
                    srv.start()
                    srv.wait_ready()
                    res = run_pageset(
                        ps,
                        srv,
                        self.args.runtime,
                        self.out / "fio" / f"rep{rep}-{ps.name}-{spec.name}.json",
                        self.args,
                    )
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                    self.fail(srv, f"page set {ps.name} (rep {rep})", exc)
                    continue
                self.stop(srv)
                self.results["pagesets"].append(
                    {"rep": rep, "set": ps.name, "server": spec.name, **res}
                )
                flag = "" if res["verified"] else "  CONTENT MISMATCH"
                print(
                    f"  {ps.name:12} {spec.name:16} write {res['write_bps'] / MiB:6.0f} "
                    f"MiB/s  read {res['read_bps'] / MiB:6.0f} MiB/s  randread "
                    f"{res['randread_4k']['iops'] / 1000:6.1f}k IOPS  "
                    f"+RSS {res['rss_delta'] / MiB:5.0f} MiB{flag}"
                )
                if not res["verified"]:
                    self.results["errors"].append(
                        f"{spec.name}: page set {ps.name} read back differs from what was written"
                    )


def _use_project_venv() -> None:
    """Re-run under the project's venv when this Python lacks nbdcache or lz4."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    missing = [m for m in ("nbdcache", "lz4") if importlib.util.find_spec(m) is None]
    if missing and venv_python.exists() and Path(sys.executable) != venv_python:
        os.execv(venv_python, [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _use_project_venv()
    args = parse_args(argv)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every server is stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    for tool in ("fio", "nbdkit", "nbdcopy", "nbdinfo"):
        if not shutil.which(tool):
            print(f"error: {tool} not found on PATH", file=sys.stderr)
            return 2
    try:
        specs, nbdcache_info = build_specs(args)
    except RuntimeError as exc:
        print(
            f"error: {exc}\n(run without nbdcache: --servers nbdkit-memory,nbdkit-zstd)",
            file=sys.stderr,
        )
        return 2
    jobs = [j for j in JOBS if j.quick or not args.quick]
    if args.jobs:
        names = args.jobs.split(",")
        unknown = set(names) - {j.name for j in JOBS}
        if unknown:
            print(
                f"error: unknown jobs {sorted(unknown)}; known: {[j.name for j in JOBS]}",
                file=sys.stderr,
            )
            return 2
        jobs = [j for j in JOBS if j.name in names]

    out = args.out or BENCH / "results" / time.strftime("%Y%m%d-%H%M%S")
    (out / "fio").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="nbdcache-bench-"))
    pageset_reps = 1 if args.quick else args.reps

    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
            "quick": args.quick,
            "reps": args.reps,
            "pageset_reps": pageset_reps,
            "runtime_s": args.runtime,
            "area_bytes": args.area,
            "pageset_pages": args.pageset_pages,
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "fio": tool_version(["fio", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "nbdcopy": tool_version(["nbdcopy", "--version"]),
            "lz4": tool_version([sys.executable, "-c", "import lz4; print(lz4.__version__)"]),
            "tree": tree_revision(),
            "nbdcache": nbdcache_info,
            "servers": [s.public() for s in specs],
            "server_info": {},
        },
        "jobs": [{**asdict(j), "unit": j.unit} for j in [FILL, *jobs]],
        "runs": [],
        "memory": [],
        "pagesets": [],
        "lz4": {},
        "metadata": None,
        "errors": [],
    }

    def save() -> None:
        results["summary"] = report.summarize(results)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    est = args.reps * len(specs) * ((len(jobs) + 1) * (args.runtime + 0.5) + 1)
    print(
        f"servers: {', '.join(s.name for s in specs)}; {len(jobs)} jobs x {args.reps} reps x "
        f"{args.runtime}s, area {human_size(args.area)}; about {est / 60:.0f} min "
        f"+ page sets; results in {out}"
    )
    started = time.monotonic()
    bench = Bench(args, specs, jobs, out, tmp, results)
    status = 0
    try:
        pagesets = prepare_pagesets(args, tmp)
        results["lz4"] = {ps.name: ps.lz4 for ps in pagesets}
        for rep in range(args.reps):
            bench.main_phase(rep)
            if rep < pageset_reps:
                bench.pageset_phase(rep, pagesets)
            save()
        nb = [s for s in specs if s.name == "nbdcache"]
        if nb and not args.no_metadata and not args.nbdcache_cmd:
            print("--- metadata probe (nbdcache at 1 GiB and 64 GiB, just started)")
            try:
                results["metadata"] = metadata_probe(nb[0], out / "logs", tmp, args)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                results["errors"].append(f"metadata probe: {exc}")
                print(f"  error: metadata probe: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; writing what was measured", file=sys.stderr)
        results["errors"].append("interrupted")
        status = 130
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        results["meta"]["elapsed_s"] = time.monotonic() - started
        save()
    if results["errors"] and not status:
        status = 1

    summary = results["summary"]
    table = report.format_table(results, summary)
    (out / "table.txt").write_text(table + "\n")
    if summary["jobs"] or summary["pagesets"]:
        report.plot(results, summary, out / "chart.png")
    print()
    print(table)
    print(
        f"\nresults: {out / 'results.json'}\nchart:   {out / 'chart.png'}"
        f"\nelapsed: {results['meta']['elapsed_s'] / 60:.1f} min"
    )
    latest = out.parent / "latest"
    if out.parent == BENCH / "results":
        with contextlib.suppress(OSError):
            if latest.is_symlink():
                latest.unlink()
            latest.symlink_to(out.name)
    return status


if __name__ == "__main__":
    sys.exit(main())
