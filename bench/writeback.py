#!/usr/bin/env python3
"""Sustained writes through a full RAM tier, next to the raw file system.

    python bench/writeback.py [--quick] [--out DIR]

An nbdcache device 8x larger than its RAM tier, with its backing image in a
temporary directory, is measured with fio's ``nbd`` engine once the tier is
full; in the same run, the same fio jobs write a plain file of the device's
size in the same directory (so on the same file system). Data is 60 %
compressible and freshly generated for every write on both sides.

Phases:

1. tier full: start ``nbdcache serve`` (volatile, ``--backing`` in the temp
   directory, ``--metrics``); write the whole device sequentially (1 MiB
   blocks, iodepth 8), which takes the tier far past its high watermark and
   leaves every page allocated; the plain file gets the same fill. Then each
   job runs against nbdcache and against the file, alternating which goes
   first:

   - ``seqwrite-4k``: sequential 4 KiB writes, iodepth 32;
   - ``seqwrite-128k``: sequential 128 KiB writes, iodepth 8;
   - ``randwrite-4k``: random 4 KiB writes over the whole device, iodepth 32.

2. peer: ``nbdkit file`` (C) on a sparse image of the device's size in the
   same directory, filled the same way, then the same jobs through fio's
   ``nbd`` engine, its image fsynced after each job and that time counted.
   It is not judged: it shows what the same client reaches through an NBD
   server that only writes to the file system (on a small machine, fio's
   own CPU per request bounds every NBD server's 4 KiB rate).

3. tier not full: a fresh server of the same size and tier; a working set of
   half the tier is written once, then the same jobs run over that working set
   only. Nothing is written back, so the latencies show what the writeback path
   adds when the tier is full.

Fairness: the plain file is written buffered (``direct=0``, the same block size
and iodepth, with ``io_uring`` when it works, else ``psync``) and fio fsyncs it
at the end of the job (``end_fsync=1``; fio counts the fsync in the job's
runtime). nbdcache in volatile mode never syncs its image, so after each of its
jobs the benchmark waits for writeback to go quiet and fsyncs the image, and
that time is added to the job's: both figures are "bytes written by the client
per second until the file system has them on disk". fio's own rate for
nbdcache (without the settle and fsync) is kept in the JSON too.

Pages written back per second come from the server's Prometheus counter
``nbdcache_pages_written_back_total``, scraped right before and right after
each job; a sampler scrapes every half second during nbdcache jobs, which
shows writeback stalls (writes waiting for room while nothing is written
back). The server's CPU share during each job comes from ``/proc``.

Results go to DIR (default ``bench/results/writeback-<time>/``):
``results.json`` (settings, every measurement, the sampler's timelines),
``table.txt``, ``fio/*.json`` and the server logs in ``logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Helpers shared with the main benchmark (this script's folder is on sys.path).
from run import (
    _interrupt,
    free_port,
    human_size,
    launch,
    parse_size,
    port_open,
    tool_version,
)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOST = "127.0.0.1"
PAGE = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.5  # seconds between metric scrapes during a job
SETTLE_LIMIT = 30.0  # seconds to wait for writeback to go quiet after a job
SEQ_TARGET = 0.5  # sequential writes: nbdcache / raw file


@dataclass(frozen=True)
class Job:
    """One measured fio job."""

    name: str
    rw: str
    bs: int
    iodepth: int
    target: float | None = None  # minimum nbdcache / raw file ratio

    def fio_args(self) -> list[str]:
        return [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}"]


JOBS = [
    Job("seqwrite-4k", "write", 4 * KiB, 32, SEQ_TARGET),
    Job("seqwrite-128k", "write", 128 * KiB, 8, SEQ_TARGET),
    Job("randwrite-4k", "randwrite", 4 * KiB, 32),
]
FILL = Job("fill-1m", "write", MiB, 8)

# Shared by every fio run, nbdcache and plain file alike.
DATA_ARGS = ["--buffer_compress_percentage=60", "--refill_buffers"]
RANDOM_ARGS = ["--norandommap", "--randrepeat=0"]


# --------------------------------------------------------------------------- helpers


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (threads included) and its reaped children."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rfind(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def fsync_path(path: Path) -> float:
    """fsync a file (dirty page cache to disk); seconds taken."""
    t0 = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t0


def fetch_metrics(url: str) -> dict[str, float]:
    """The export's counters, {name: value} (names without the nbdcache_ prefix)."""
    from nbdcache.metrics import fetch

    table = fetch(url)
    exports = [v for k, v in table.items() if k != "server"]
    if not exports:
        raise RuntimeError(f"no export counters at {url}")
    out: dict[str, float] = {}
    for counters in exports:  # one export here; sum if ever several
        for key, value in counters.items():
            out[key] = out.get(key, 0.0) + value
    return out


# --------------------------------------------------------------------------- fio


def run_fio(argv: list[str], out_json: Path, timeout: float) -> dict[str, Any]:
    """Run fio with JSON output; the write side's throughput and latency."""
    cmd = ["fio", "--output-format=json", f"--output={out_json}", *argv]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise RuntimeError(f"fio failed ({proc.returncode}): {' | '.join(lines[-3:])}")
    data = json.loads(out_json.read_text())
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio reported error {job['error']}")
    w = job["write"]
    clat = w.get("clat_ns") or {}
    pct = clat.get("percentile") or {}
    return {
        "io_bytes": w["io_bytes"],
        "runtime_s": w["runtime"] / 1000,
        "bw_bytes": w["bw_bytes"],
        "iops": w["iops"],
        "clat_p50_us": pct.get("50.000000", 0) / 1000,
        "clat_p99_us": pct.get("99.000000", 0) / 1000,
        "clat_p999_us": pct.get("99.900000", 0) / 1000,
        "clat_max_us": clat.get("max", 0) / 1000,
        "clat_mean_us": clat.get("mean", 0) / 1000,
        "fio_usr_pct": job.get("usr_cpu"),
        "fio_sys_pct": job.get("sys_cpu"),
        "wall_s": wall,
    }


def timed_args(job: Job, size: int, runtime: int) -> list[str]:
    extra = RANDOM_ARGS if job.rw.startswith("rand") else []
    return [
        f"--name={job.name}",
        *job.fio_args(),
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        *DATA_ARGS,
        *extra,
    ]


def fill_args(size: int) -> list[str]:
    return [f"--name={FILL.name}", *FILL.fio_args(), f"--size={size}", *DATA_ARGS]


def nbd_args(port: int) -> list[str]:
    return ["--ioengine=nbd", f"--uri=nbd://{HOST}:{port}/"]


def file_args(path: Path, engine: str) -> list[str]:
    return [f"--ioengine={engine}", f"--filename={path}", "--direct=0", "--end_fsync=1"]


def probe_file_engine(tmp: Path) -> str:
    """io_uring when fio can use it here (queue depth with buffered I/O), else psync."""
    probe = tmp / "engine-probe"
    try:
        for engine, depth in (("io_uring", 4), ("psync", 1)):
            proc = subprocess.run(
                [
                    "fio",
                    "--name=probe",
                    f"--ioengine={engine}",
                    f"--filename={probe}",
                    "--rw=write",
                    "--bs=4k",
                    f"--iodepth={depth}",
                    "--size=1M",
                    "--direct=0",
                    "--output-format=json",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if proc.returncode == 0:
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    if json.loads(proc.stdout)["jobs"][0]["error"] == 0:
                        return engine
        raise RuntimeError("fio cannot write a plain file with io_uring or psync")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# --------------------------------------------------------------------------- server


class Server:
    """One `nbdcache serve` process with a backing image and metrics."""

    def __init__(
        self, exe: list[str], size: int, ram: int, image: Path, log: Path, extra: list[str]
    ) -> None:
        self.size, self.ram, self.image, self.log = size, ram, image, log
        self.port, self.mport = free_port(), free_port()
        self.argv = [
            *exe,
            "serve",
            "--listen",
            f"{HOST}:{self.port}",
            "--size",
            human_size(size),
            "--ram",
            human_size(ram),
            "--backing",
            str(image),
            "--metrics",
            f"{HOST}:{self.mport}",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.mport}/metrics"

    def start(self, timeout: float = 60.0) -> None:
        self.proc = launch(self.argv, self.log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdcache exited with {self.proc.returncode}; see {self.log}")
            pages = None
            if port_open(self.port):
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    pages = self.metrics().get("page_count", -1)
            if pages is not None:
                if pages >= 0 and int(pages) * PAGE != self.size:
                    raise RuntimeError(f"nbdcache reports {int(pages)} pages, not {self.size}")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdcache not ready after {timeout:.0f}s; see {self.log}")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        return fetch_metrics(self.url)

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def stop(self) -> int | None:
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                # The server leads its own process group (start_new_session).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_problems(self, keep: int = 20) -> list[str]:
        """Warnings, errors and tracebacks from the server's log."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        bad = [
            ln for ln in lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception", ln)
        ]
        return bad[:keep] + ([f"(+{len(bad) - keep} more)"] if len(bad) > keep else [])


class Sampler(threading.Thread):
    """Scrapes the server's counters every SAMPLE_EVERY seconds during a job."""

    KEYS = (
        "pages_written_back_total",
        "writes_waiting",
        "writeback_inflight",
        "frames_used",
        "dirty_pages",
        "writes_waited_total",
    )

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.samples: list[dict[str, float]] = []
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_EVERY):
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                m = self.server.metrics()
                row = {"t": round(time.monotonic() - self.t0, 3)}
                row.update({k: m[k] for k in self.KEYS if k in m})
                self.samples.append(row)

    def stop(self) -> list[dict[str, float]]:
        self.done.set()
        self.join(10)
        return self.samples


def timeline_summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    """Writeback rate per interval and stalls: writes waiting, nothing written back."""
    rates: list[float] = []
    stalls: list[float] = []
    run = 0.0
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        if dt <= 0 or "pages_written_back_total" not in a or "pages_written_back_total" not in b:
            continue
        moved = b["pages_written_back_total"] - a["pages_written_back_total"]
        rates.append(moved / dt)
        waiting = a.get("writes_waiting", 0) > 0 and b.get("writes_waiting", 0) > 0
        if moved == 0 and waiting:
            run += dt
        elif run:
            stalls.append(run)
            run = 0.0
    if run:
        stalls.append(run)
    return {
        "intervals": len(rates),
        "wb_pages_per_s_min": min(rates) if rates else None,
        "wb_pages_per_s_median": statistics.median(rates) if rates else None,
        "wb_pages_per_s_max": max(rates) if rates else None,
        "stalls": len(stalls),
        "stall_longest_s": max(stalls) if stalls else 0.0,
        "stall_total_s": sum(stalls),
        "max_writes_waiting": max((s.get("writes_waiting", 0) for s in samples), default=0),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Growth of the counters (mem_used_total and frames_total are gauges)."""
    gauges = {"mem_used_total", "frames_total"}
    return {
        k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_total") and k not in gauges
    }


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace, out: Path, tmp: Path) -> None:
        self.args, self.out, self.tmp = args, out, tmp
        self.exe = shlex.split(args.nbdcache_exe) if args.nbdcache_exe else default_exe()
        self.extra = [a for s in args.nbdcache_arg for a in shlex.split(s)]
        self.image = tmp / "nbdcache.img"
        self.raw = tmp / "raw.file"
        self.engine = "psync"
        self.servers: list[Server] = []
        self.peer = tmp / "nbdkit-file.img"
        self.results: dict[str, Any] = {
            "full": {},
            "not_full": {},
            "raw": {},
            "peer": {},
            "errors": [],
        }

    def fio_timeout(self, nbytes: int = 0) -> float:
        return self.args.runtime + 120 + nbytes / (2 * MiB)

    # ---- servers

    def server(self, tag: str) -> Server:
        srv = Server(
            self.exe,
            self.args.size,
            self.args.ram,
            self.image,
            self.out / "logs" / f"nbdcache-{tag}.log",
            self.extra,
        )
        self.servers.append(srv)
        srv.start()
        return srv

    def finish(self, srv: Server, tag: str) -> None:
        code = srv.stop()
        if srv in self.servers:
            self.servers.remove(srv)
        problems = srv.log_problems()
        self.results[f"server_{tag}"] = {
            "argv": srv.argv,
            "exit_code": code,
            "log": str(srv.log.relative_to(self.out)),
            "log_problems": problems,
        }
        if code != 0:
            self.error(f"nbdcache ({tag}) exited with {code} on SIGTERM; see {srv.log}")
        if problems:
            self.error(f"nbdcache ({tag}) logged {len(problems)} problem lines; see {srv.log}")
        for line in problems:
            print(f"  server log ({tag}): {line}", file=sys.stderr)
        with contextlib.suppress(OSError):
            self.image.unlink()

    def stop_all(self) -> None:
        for srv in list(self.servers):
            with contextlib.suppress(Exception):
                srv.stop()
        self.servers.clear()

    def error(self, msg: str) -> None:
        self.results["errors"].append(msg)
        print(f"  error: {msg}", file=sys.stderr)

    # ---- measurements

    def settle(self, srv: Server) -> float:
        """Wait until writeback is quiet: nothing in flight, the counter steady."""
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < SETTLE_LIMIT:
            m = srv.metrics()
            now = (m.get("pages_written_back_total"), m.get("writeback_inflight"))
            if now == last and not now[1]:
                break
            last = now
            time.sleep(0.1)
        return time.monotonic() - t0

    def nbd_job(self, srv: Server, job: Job, size: int, tag: str, sync: bool) -> dict[str, Any]:
        out_json = self.out / "fio" / f"{tag}-{job.name}-nbdcache.json"
        argv = [*nbd_args(srv.port), *timed_args(job, size, self.args.runtime)]
        m0 = srv.metrics()
        cpu0, t0 = srv.cpu(), time.monotonic()
        sampler = Sampler(srv)
        sampler.start()
        try:
            res = run_fio(argv, out_json, self.fio_timeout())
        finally:
            samples = sampler.stop()
        t1 = time.monotonic()
        cpu1 = srv.cpu()
        m1 = srv.metrics()
        d = delta(m1, m0)
        wall = t1 - t0
        res.update(
            {
                "window_s": wall,
                "server_cpu_pct": 100 * (cpu1 - cpu0) / wall,
                "pages_written_back": d.get("pages_written_back_total", 0),
                "wb_pages_per_s": d.get("pages_written_back_total", 0) / wall,
                "counters_delta": d,
                "frames_used_fraction": [
                    m0.get("frames_used", 0) / max(m0.get("frames_total", 1), 1),
                    m1.get("frames_used", 0) / max(m1.get("frames_total", 1), 1),
                ],
                "timeline": samples,
                "timeline_summary": timeline_summary(samples),
            }
        )
        waited = d.get("writes_waited_total", 0)
        res["avg_wait_ms"] = d.get("write_wait_ms_total", 0) / waited if waited else 0.0
        if sync:
            settle = self.settle(srv)
            fs = fsync_path(self.image)
            res["settle_s"], res["image_fsync_s"] = settle, fs
            res["synced_bw_bytes"] = res["io_bytes"] / (res["runtime_s"] + settle + fs)
        return res

    def raw_job(self, job: Job, size: int) -> dict[str, Any]:
        out_json = self.out / "fio" / f"full-{job.name}-raw.json"
        argv = [*file_args(self.raw, self.engine), *timed_args(job, size, self.args.runtime)]
        return run_fio(argv, out_json, self.fio_timeout())

    def fill_nbd(self, srv: Server, size: int, tag: str) -> dict[str, Any]:
        m0 = srv.metrics()
        t0 = time.monotonic()
        res = run_fio(
            [*nbd_args(srv.port), *fill_args(size)],
            self.out / "fio" / f"{tag}-{FILL.name}-nbdcache.json",
            self.fio_timeout(size),
        )
        wall = time.monotonic() - t0
        m1 = srv.metrics()
        d = delta(m1, m0)
        res.update(
            {
                "window_s": wall,
                "pages_written_back": d.get("pages_written_back_total", 0),
                "wb_pages_per_s": d.get("pages_written_back_total", 0) / wall,
                "counters_delta": d,
                "frames_used_fraction": m1.get("frames_used", 0)
                / max(m1.get("frames_total", 1), 1),
            }
        )
        return res

    # ---- phases

    def phase_full(self) -> None:
        a = self.args
        print(
            f"--- tier full: device {human_size(a.size)}, tier {human_size(a.ram)}, "
            f"whole device written first"
        )
        srv = self.server("full")
        try:
            fill = self.fill_nbd(srv, a.size, "full")
            settle = self.settle(srv)
            fill["settle_s"], fill["image_fsync_s"] = settle, fsync_path(self.image)
            fill["synced_bw_bytes"] = fill["io_bytes"] / (
                fill["runtime_s"] + settle + fill["image_fsync_s"]
            )
            self.results["full"][FILL.name] = fill
            raw_fill = run_fio(
                [*file_args(self.raw, self.engine), *fill_args(a.size)],
                self.out / "fio" / f"full-{FILL.name}-raw.json",
                self.fio_timeout(a.size),
            )
            self.results["raw"][FILL.name] = raw_fill
            print(
                f"  {FILL.name:16} nbdcache {fill['synced_bw_bytes'] / MiB:7.1f} MiB/s   "
                f"raw file {raw_fill['bw_bytes'] / MiB:7.1f} MiB/s   tier "
                f"{100 * fill['frames_used_fraction']:.0f} % of frames, "
                f"{int(fill['pages_written_back'])} pages written back"
            )
            if not fill["pages_written_back"]:
                self.error("the fill wrote nothing back: the tier is not full")
            for i, job in enumerate(JOBS):
                order = ("nbdcache", "raw") if i % 2 == 0 else ("raw", "nbdcache")
                for side in order:
                    if side == "nbdcache":
                        res = self.nbd_job(srv, job, a.size, "full", sync=True)
                        self.results["full"][job.name] = res
                        ts = res["timeline_summary"]
                        print(
                            f"  {job.name:16} nbdcache {res['synced_bw_bytes'] / MiB:7.1f} MiB/s "
                            f"(fio {res['bw_bytes'] / MiB:.1f}, settle {res['settle_s']:.1f} s, "
                            f"fsync {res['image_fsync_s']:.2f} s)  "
                            f"{res['wb_pages_per_s']:.0f} pages/s written back, "
                            f"p99 {res['clat_p99_us'] / 1000:.1f} ms, "
                            f"server CPU {res['server_cpu_pct']:.0f} %, "
                            f"stalls {ts['stalls']}"
                        )
                    else:
                        res = self.raw_job(job, a.size)
                        self.results["raw"][job.name] = res
                        print(
                            f"  {job.name:16} raw file {res['bw_bytes'] / MiB:7.1f} MiB/s "
                            f"(incl. end fsync), p99 {res['clat_p99_us'] / 1000:.2f} ms"
                        )
        finally:
            self.finish(srv, "full")
            with contextlib.suppress(OSError):
                self.raw.unlink()

    def phase_peer(self) -> None:
        """The same fill and jobs through ``nbdkit file`` on an image in the
        same directory: a C NBD server writing straight to the file system,
        with the same client (fio's nbd engine).  Its image is fsynced after
        each job and that time counted, as for nbdcache."""
        nbdkit = shutil.which("nbdkit")
        if nbdkit is None:
            print("--- nbdkit not found: no nbdkit file row")
            return
        a = self.args
        print("--- peer: nbdkit file, image in the same directory, the same fill and jobs")
        with open(self.peer, "wb") as f:
            f.truncate(a.size)
        port = free_port()
        argv = [nbdkit, "-f", "-p", str(port), "-i", HOST, "file", str(self.peer)]
        proc = launch(argv, self.out / "logs" / "nbdkit-file.log")
        try:
            deadline = time.monotonic() + 30
            while not port_open(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nbdkit file did not start: {shlex.join(argv)}")
                time.sleep(0.1)
            run_fio(
                [*nbd_args(port), *fill_args(a.size)],
                self.out / "fio" / f"peer-{FILL.name}.json",
                self.fio_timeout(a.size),
            )
            fsync_path(self.peer)
            for job in JOBS:
                res = run_fio(
                    [*nbd_args(port), *timed_args(job, a.size, a.runtime)],
                    self.out / "fio" / f"peer-{job.name}.json",
                    self.fio_timeout(),
                )
                res["image_fsync_s"] = fsync_path(self.peer)
                res["synced_bw_bytes"] = res["io_bytes"] / (res["runtime_s"] + res["image_fsync_s"])
                self.results["peer"][job.name] = res
                print(
                    f"  {job.name:16} nbdkit file {res['synced_bw_bytes'] / MiB:7.1f} MiB/s "
                    f"(fio {res['bw_bytes'] / MiB:.1f}, fsync {res['image_fsync_s']:.2f} s), "
                    f"fio CPU {res['fio_usr_pct'] + res['fio_sys_pct']:.0f} %"
                )
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):
                self.peer.unlink()

    def phase_not_full(self) -> None:
        a = self.args
        area = a.ram // 2
        print(
            f"--- tier not full: fresh server, working set {human_size(area)} "
            f"(half the tier), written once first"
        )
        srv = self.server("not-full")
        try:
            fill = self.fill_nbd(srv, area, "not-full")
            self.results["not_full"][FILL.name] = fill
            for job in JOBS:
                res = self.nbd_job(srv, job, area, "not-full", sync=False)
                self.results["not_full"][job.name] = res
                print(
                    f"  {job.name:16} nbdcache {res['bw_bytes'] / MiB:7.1f} MiB/s  "
                    f"p50 {res['clat_p50_us'] / 1000:.2f} ms  p99 {res['clat_p99_us'] / 1000:.2f}"
                    f" ms  tier {100 * res['frames_used_fraction'][1]:.0f} % of frames, "
                    f"{int(res['pages_written_back'])} pages written back"
                )
                if res["pages_written_back"]:
                    self.error(f"{job.name}: pages were written back with the tier not full")
        finally:
            self.finish(srv, "not-full")


def default_exe() -> list[str]:
    for script in (Path(sys.executable).parent / "nbdcache", ROOT / ".venv" / "bin" / "nbdcache"):
        if script.exists():
            return [str(script)]
    return [sys.executable, "-m", "nbdcache"]


# --------------------------------------------------------------------------- report


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    ms = us / 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for job in [FILL, *JOBS]:
        full = results["full"].get(job.name)
        raw = results["raw"].get(job.name)
        peer = results["peer"].get(job.name)
        nf = results["not_full"].get(job.name) if job is not FILL else None
        nb_bw = full.get("synced_bw_bytes") if full else None
        raw_bw = raw["bw_bytes"] if raw else None
        ratio = nb_bw / raw_bw if nb_bw and raw_bw else None
        row: dict[str, Any] = {
            "job": job.name,
            "nbdcache_mib_s": nb_bw / MiB if nb_bw else None,
            "nbdcache_fio_mib_s": full["bw_bytes"] / MiB if full else None,
            "raw_mib_s": raw_bw / MiB if raw_bw else None,
            "ratio": ratio,
            "nbdkit_file_mib_s": peer["synced_bw_bytes"] / MiB if peer else None,
            "nbdkit_file_ratio": nb_bw / peer["synced_bw_bytes"] if nb_bw and peer else None,
            "target": job.target,
            "ok": None if job.target is None or ratio is None else ratio >= job.target,
            "wb_pages_per_s": full["wb_pages_per_s"] if full else None,
            "server_cpu_pct": full.get("server_cpu_pct") if full else None,
            "not_full_mib_s": nf["bw_bytes"] / MiB if nf else None,
            "clat_p50_us": [
                nf["clat_p50_us"] if nf else None,
                full["clat_p50_us"] if full else None,
            ],
            "clat_p99_us": [
                nf["clat_p99_us"] if nf else None,
                full["clat_p99_us"] if full else None,
            ],
            "clat_max_us_full": full["clat_max_us"] if full else None,
            "stalls_full": full["timeline_summary"]["stalls"] if full and job is not FILL else None,
            "stall_longest_s": (
                full["timeline_summary"]["stall_longest_s"] if full and job is not FILL else None
            ),
        }
        rows.append(row)
    return rows


def format_table(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    meta = results["meta"]
    head = (
        f"nbdcache writeback: device {human_size(meta['size'])}, tier {human_size(meta['ram'])} "
        f"({meta['size'] // meta['ram']}x), {meta['runtime_s']} s per job, 60 % compressible "
        f"data\nraw file: fio {meta['raw_engine']} direct=0 end_fsync=1 on {meta['fs']} "
        f"({meta['tmpdir']}); nbdcache MiB/s includes writeback settling + fsync of its image"
    )
    cols = (
        f"{'job':15} {'nbdcache':>9} {'raw file':>9} {'ratio':>6}  {'target':11} "
        f"{'nbdkit':>7} {'ratio':>6}  "
        f"{'wb pages/s':>10}  {'clat p50/p99 ms':>16}  {'clat p50/p99 ms':>16}  {'p99':>6}"
        f"\n{'':15} {'MiB/s':>9} {'MiB/s':>9} {'':>6}  {'':11} {'file':>7} {'':>6}  {'':>10}  "
        f"{'tier not full':>16}  {'tier full':>16}  {'rise':>6}"
    )
    lines = [head, "", cols]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        target = "" if r["target"] is None else f">={r['target']}x"
        if r["ok"] is not None:
            target += " ok" if r["ok"] else " MISS"
        p50, p99 = r["clat_p50_us"], r["clat_p99_us"]
        nf = f"{_ms(p50[0])}/{_ms(p99[0])}" if p50[0] is not None else "-"
        fu = f"{_ms(p50[1])}/{_ms(p99[1])}" if p50[1] is not None else "-"
        rise = f"x{p99[1] / p99[0]:.1f}" if p99[0] and p99[1] else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        peer = r.get("nbdkit_file_ratio")
        peer_ratio = f"{peer:.2f}x" if peer is not None else "-"
        lines.append(
            f"{r['job']:15} {fmt(r['nbdcache_mib_s'], '9.1f')} {fmt(r['raw_mib_s'], '9.1f')} "
            f"{ratio:>6}  {target:11} {fmt(r.get('nbdkit_file_mib_s'), '7.1f')} "
            f"{peer_ratio:>6}  {fmt(r['wb_pages_per_s'], '10.0f')}  {nf:>16}  "
            f"{fu:>16}  {rise:>6}"
        )
    lines.append("")
    lines.append(
        "fill-1m: the whole device, 1 MiB blocks, iodepth 8, before the jobs (not judged)."
    )
    lines.append(
        "nbdkit file: the same client and jobs through a C server writing straight to an "
        "image in the same directory (fsync counted): what fio's nbd engine reaches here."
    )
    for r in rows:
        if r["job"] == FILL.name or r["nbdcache_mib_s"] is None:
            continue
        lines.append(
            f"{r['job']}: fio alone {fmt(r['nbdcache_fio_mib_s'], '.1f')} MiB/s, "
            f"tier not full {fmt(r['not_full_mib_s'], '.1f')} MiB/s, server CPU "
            f"{fmt(r['server_cpu_pct'], '.0f')} %, longest write {_ms(r['clat_max_us_full'])} ms, "
            f"writeback stalls {r['stalls_full']} (longest {fmt(r['stall_longest_s'], '.1f')} s)"
        )
    for e in results["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sustained writes to nbdcache with a full RAM tier, next to the raw "
        "file system (fio on a plain file)."
    )
    p.add_argument(
        "--quick", action="store_true", help="tier 64M, device 512M, 10 s jobs (about 2-3 minutes)"
    )
    p.add_argument("--ram", type=parse_size, help="RAM tier (default 256M, quick 64M)")
    p.add_argument("--size", type=parse_size, help="device size (default 8x the tier)")
    p.add_argument("--runtime", type=int, help="seconds per job (default 30, quick 10)")
    p.add_argument(
        "--out", type=Path, help="results directory (default bench/results/writeback-<time>)"
    )
    p.add_argument(
        "--tmpdir",
        type=Path,
        default=Path("/var/tmp"),
        help="parent of the temp directory holding the image and the plain file, so the "
        "file system under test (default %(default)s)",
    )
    p.add_argument("--nbdcache-exe", metavar="CMD", help="nbdcache executable")
    p.add_argument(
        "--nbdcache-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra arguments for nbdcache serve, e.g. --nbdcache-arg='--allocator zbud'",
    )
    args = p.parse_args(argv)
    args.ram = args.ram or (64 * MiB if args.quick else 256 * MiB)
    args.size = args.size or 8 * args.ram
    args.runtime = args.runtime or (10 if args.quick else 30)
    if args.ram % PAGE or args.size % PAGE:
        p.error("--ram and --size must be multiples of 4096")
    return args


def _use_project_venv() -> None:
    """Re-run under the project's venv when this Python lacks nbdcache."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    missing = importlib.util.find_spec("nbdcache") is None
    if missing and venv_python.exists() and Path(sys.executable) != venv_python:
        os.execv(venv_python, [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])


def fs_type(path: Path) -> str:
    """The type of the file system holding path (ext4, xfs, tmpfs...)."""
    for cmd in (
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)],
        ["stat", "-f", "-c", "%T", str(path)],
    ):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if proc.returncode == 0 and proc.stdout.strip():
                return proc.stdout.strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _use_project_venv()
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    if not shutil.which("fio"):
        print("error: fio not found on PATH", file=sys.stderr)
        return 2
    need = 2 * args.size + 256 * MiB
    free = shutil.disk_usage(args.tmpdir).free
    if free < need:
        print(
            f"error: {args.tmpdir} has {free / GiB:.1f} GiB free, {need / GiB:.1f} needed",
            file=sys.stderr,
        )
        return 2

    out = args.out or BENCH / "results" / time.strftime("writeback-%Y%m%d-%H%M%S")
    (out / "fio").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="nbdcache-wb-", dir=args.tmpdir))
    bench = Bench(args, out, tmp)
    results = bench.results
    results["meta"] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "quick": args.quick,
        "size": args.size,
        "ram": args.ram,
        "runtime_s": args.runtime,
        "tmpdir": str(args.tmpdir),
        "fs": fs_type(tmp),
        "jobs": [asdict(j) for j in [FILL, *JOBS]],
        "data_args": DATA_ARGS,
        "random_args": RANDOM_ARGS,
        "nbdcache_extra_args": bench.extra,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": tool_version(["fio", "--version"]),
        "nbdcache": tool_version([*bench.exe, "--version"]),
    }
    # fills at roughly 40, 200 and 200 MiB/s; per job three timed runs and a short one
    est = args.size / (40 * MiB) + args.size / (100 * MiB) + len(JOBS) * (4 * args.runtime + 4) + 15
    print(
        f"nbdcache writeback benchmark: device {human_size(args.size)}, tier "
        f"{human_size(args.ram)}, {args.runtime} s jobs, temp dir {tmp} "
        f"({results['meta']['fs']}); about {est / 60:.0f} min; results in {out}"
    )
    started = time.monotonic()
    status = 0
    try:
        bench.engine = probe_file_engine(tmp)
        results["meta"]["raw_engine"] = bench.engine
        try:
            bench.phase_full()
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, OSError) as exc:
            bench.error(f"tier-full phase: {exc}")
        try:
            bench.phase_peer()
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, OSError) as exc:
            bench.error(f"peer phase: {exc}")
        try:
            bench.phase_not_full()
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, OSError) as exc:
            bench.error(f"tier-not-full phase: {exc}")
    except KeyboardInterrupt:
        print("interrupted; writing what was measured", file=sys.stderr)
        results["errors"].append("interrupted")
        status = 130
    except RuntimeError as exc:
        bench.error(str(exc))
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        results["meta"]["elapsed_s"] = time.monotonic() - started
        results.setdefault("meta", {}).setdefault("raw_engine", bench.engine)
        results["summary"] = summarize(results)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = format_table(results, results["summary"])
    (out / "table.txt").write_text(table + "\n")
    print()
    print(table)
    print(
        f"\nresults: {out / 'results.json'}\nelapsed: {results['meta']['elapsed_s'] / 60:.1f} min"
    )
    if results["errors"] and not status:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
