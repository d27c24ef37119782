"""One lab run: N memory servers, the test VM swapping on them, one row of results.

`Lab` puts the pieces together for one configuration: the server hosts
(namespaces made here, or real servers given by address), a delay proxy in
front of each server when a delay is asked for, and the VM of the end-to-end
tests (tests/e2e/vm) with one virtio disk per server, swapping striped over
them (or mirrored over two) while the page-verifying memory hog runs. Its
context ends every process it started and removes every namespace and link.

The figures are from the guest's console: the hog's run time (host clock)
and the swap traffic in that time (pswpin + pswpout from /proc/vmstat).
"""

from __future__ import annotations

import ipaddress
import signal
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from vm import runner
from vm.initramfs import GuestImage, build_guest
from vm.runner import GuestConfig, GuestResult, NbdTarget, run_guest

from .netns import LAB_NETWORK, Namespaces
from .procs import NBD_PORT, Processes, free_port, proxy_argv, server_argv, wait_listening

PAGE = 4096
MiB = 1 << 20


@dataclass(frozen=True)
class Remote:
    """A memory server somebody else runs: HOST:PORT[/EXPORT]."""

    host: str
    port: int
    export: str = ""

    @classmethod
    def parse(cls, text: str) -> Remote:
        hostport, _, export = text.partition("/")
        if hostport.startswith("["):
            host, _, port = hostport[1:].partition("]:")
        else:
            host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{text!r}: expected HOST:PORT[/EXPORT]")
        ipaddress.ip_address(host)  # an address, so the guest's disk is where it says
        return cls(host, int(port), export)


@dataclass(frozen=True)
class RunSpec:
    kind: str = "nbdcache"  # nbdcache or nbdkit (ignored with remotes)
    servers: int = 1
    tier: str = "32M"  # nbdcache --ram per server
    delay_ms: float = 0.0  # added to each request's round trip by the proxy
    layout: str = "stripe"  # stripe, or mirror (2 servers)
    size: str = "384M"  # export size per server
    memory: str = "128M"  # guest RAM
    hog_mib: int = 192
    passes: int = 1
    proxy: bool = False  # put the proxy in front even with no delay
    timeout: float = 1200.0


class Lab:
    """Servers and proxies for one RunSpec; use as a context manager."""

    def __init__(
        self,
        spec: RunSpec,
        workdir: Path,
        remotes: Sequence[Remote] = (),
        echo: IO[str] | None = None,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.remotes = list(remotes)
        self.echo = echo
        self.targets: list[NbdTarget] = []
        self._stack = ExitStack()
        self.processes = Processes(workdir / "logs")
        self.namespaces: Namespaces | None = None

    def _say(self, text: str) -> None:
        if self.echo is not None:
            print(f"lab: {text}", file=self.echo, flush=True)

    def __enter__(self) -> Lab:
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """Remove everything; a second Ctrl-C must not cut the removal short."""
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, signal.SIG_IGN) for s in stops}
        try:
            self._stack.close()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _start(self) -> None:
        spec = self.spec
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Registered first: processes end before their namespaces go.
        if not self.remotes:
            self.namespaces = Namespaces(spec.servers)
            self._stack.enter_context(self.namespaces)
        self._stack.enter_context(self.processes)
        upstream: list[NbdTarget] = []
        if self.remotes:
            for remote in self.remotes:
                upstream.append(NbdTarget(remote.host, remote.port, remote.export))
                self._allow(f"{remote.host}/{128 if ':' in remote.host else 32}")
        else:
            assert self.namespaces is not None
            self._allow(str(LAB_NETWORK))
            for host in self.namespaces.hosts:
                image = self.workdir / f"server{host.index}.img"
                argv = server_argv(spec.kind, host.address, NBD_PORT, spec.size, spec.tier, image)
                proc = self.processes.spawn(f"server{host.index}", host.exec_argv(argv))
                wait_listening(host.address, NBD_PORT, proc, 60)
                self._say(f"{spec.kind} in {host.netns} on {host.address}:{NBD_PORT}")
                upstream.append(NbdTarget(host.address, NBD_PORT, "swap"))
        for i, target in enumerate(upstream, 1):
            if spec.delay_ms > 0 or spec.proxy:
                port = free_port()
                proc = self.processes.spawn(
                    f"proxy{i}", proxy_argv(port, target.host, target.port, spec.delay_ms)
                )
                wait_listening("127.0.0.1", port, proc, 30)
                self._say(
                    f"proxy 127.0.0.1:{port} -> {target.host}:{target.port} +{spec.delay_ms} ms"
                )
                target = NbdTarget("127.0.0.1", port, target.export)
            self.targets.append(target)

    def _allow(self, network: str) -> None:
        """Let the VM harness put the guest's disks on these addresses, for this run."""
        if network not in runner.ALLOWED_NETWORKS:
            runner.ALLOWED_NETWORKS.append(network)
            self._stack.callback(runner.ALLOWED_NETWORKS.remove, network)

    def layout(self) -> str:
        if self.spec.layout == "mirror":
            return "mirror"
        return "single" if len(self.targets) == 1 else "stripe"

    def run(self, image: GuestImage | None = None) -> tuple[GuestResult, dict[str, Any]]:
        """Boot the VM on the servers, run the hog, and return its result and a row."""
        spec = self.spec
        config = GuestConfig(
            memory=spec.memory,
            hog_mib=spec.hog_mib,
            passes=spec.passes,
            layout=self.layout(),
            timeout=spec.timeout,
        )
        image = image or build_guest()
        started = time.time()
        result = run_guest(
            image,
            self.targets,
            config,
            console_log=self.workdir / "console.log",
            echo=self.echo,
        )
        return result, row(spec, result, started, remote=bool(self.remotes))


def row(spec: RunSpec, result: GuestResult, started: float, remote: bool) -> dict[str, Any]:
    """The CSV row of one run."""
    traffic = result.swap_traffic("after-hog")
    hog_s = result.hog_s
    moved = (traffic["pswpin"] + traffic["pswpout"]) * PAGE / MiB
    return {
        **{k: v for k, v in asdict(spec).items() if k != "timeout"},
        "kind": "remote" if remote else spec.kind,
        "status": result.status,
        "hog_errors": result.hog.get("errors"),
        "boot_s": _r(result.boot_s),
        "hog_s": _r(hog_s),
        "swap_out_mib": round(traffic["pswpout"] * PAGE / MiB, 1),
        "swap_in_mib": round(traffic["pswpin"] * PAGE / MiB, 1),
        "swap_mib_s": round(moved / hog_s, 2) if hog_s else None,
        "wall_s": _r(result.wall_s),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
