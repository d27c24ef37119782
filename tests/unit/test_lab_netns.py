"""The lab's server hosts (deploy/lab): namespaces, veth links, processes, and their removal.

These create real network namespaces and veth pairs (root and iproute2
needed: skipped otherwise) and check with `ip netns list`, `ip link` and
the process table that nothing is left behind: after a normal exit, after
an exception half way through the setup, after SIGINT and SIGTERM, and
(via `nbdlab cleanup`) after SIGKILL. Addresses are only 10.123.K.0/30
links between the root namespace and the lab's own namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "deploy" / "lab"
sys.path.insert(0, str(LAB))

from nbdlab import netns  # noqa: E402
from nbdlab.procs import Processes, server_argv, wait_listening  # noqa: E402

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) not installed"),
]


def mine(tag: str) -> tuple[list[str], list[str]]:
    """This run's namespaces and root-side links, as the system lists them."""
    return (
        [n for n in netns.lab_namespaces() if n.startswith(f"nbdlab-{tag}-")],
        [link for link in netns.lab_links() if link.startswith(f"nbl{tag}")],
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_hosts_are_set_up_reachable_and_removed(tmp_path: Path) -> None:
    lab = netns.Namespaces(2)
    with lab:
        names, links = mine(lab.tag)
        assert names == [f"nbdlab-{lab.tag}-1", f"nbdlab-{lab.tag}-2"]
        assert links == [f"nbl{lab.tag}1h", f"nbl{lab.tag}2h"]
        first, second = lab.hosts
        assert first.address != second.address
        for host in lab.hosts:
            # The namespace has its end of the link, with its address, and loopback.
            out = subprocess.run(
                ["ip", "-n", host.netns, "-br", "addr"], capture_output=True, text=True
            ).stdout
            assert f"{host.address}/30" in out
            assert "lo " in out
        # A server started in a namespace is reached from the root namespace.
        with Processes(tmp_path) as procs:
            argv = server_argv("nbdkit", first.address, 10809, "1M", "-", tmp_path / "x")
            proc = procs.spawn("server", first.exec_argv(argv))
            wait_listening(first.address, 10809, proc, 30)
            assert netns.pids_in(first.netns) == [proc.pid]
            pid = proc.pid
        assert not alive(pid)
    assert mine(lab.tag) == ([], [])
    assert lab.hosts == []


def test_an_exception_inside_removes_everything(tmp_path: Path) -> None:
    lab = netns.Namespaces(3)
    pid = -1
    with pytest.raises(ZeroDivisionError), lab:
        assert len(mine(lab.tag)[0]) == 3
        procs = Processes(tmp_path)
        with procs:
            host = lab.hosts[2]
            argv = server_argv("nbdkit", host.address, 10809, "1M", "-", tmp_path / "x")
            proc = procs.spawn("server", host.exec_argv(argv))
            wait_listening(host.address, 10809, proc, 30)
            pid = proc.pid
            _ = 1 / 0
    assert mine(lab.tag) == ([], [])
    assert pid > 0 and not alive(pid)


def test_a_failure_half_way_through_setup_removes_what_was_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_ip = netns.ip
    lab = netns.Namespaces(3)

    def failing_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # The second host's namespace side address fails: the first host is
        # complete, the second has its namespace and veth pair.
        if args[:2] == ("-n", f"nbdlab-{lab.tag}-2") and "addr" in args:
            raise RuntimeError("injected failure")
        return real_ip(*args, check=check)

    monkeypatch.setattr(netns, "ip", failing_ip)
    with pytest.raises(RuntimeError, match="injected"), lab:
        pass
    monkeypatch.undo()
    assert mine(lab.tag) == ([], [])


def serve_lab(tmp_path: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """`python -m nbdlab serve --servers 2`, up and listening; its server URLs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdlab", "serve", "--servers", "2", "--kind", "nbdkit",
         "--size", "8M", "--workdir", str(tmp_path)],
        cwd=LAB,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    urls = []
    for line in proc.stdout:
        if line.strip() == "ready":
            break
        urls.append(line.strip())
    else:
        proc.wait()
        raise AssertionError(f"the lab did not come up: {proc.stderr and proc.stderr.read()}")
    return proc, urls


def lab_children(proc: subprocess.Popen[str]) -> list[int]:
    """Process ids of the servers the lab started (their parent is the lab)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_lab_and_removes_everything(tmp_path: Path, signum: int) -> None:
    before = set(netns.lab_namespaces())
    proc, urls = serve_lab(tmp_path)
    try:
        assert len(urls) == 2
        new = sorted(set(netns.lab_namespaces()) - before)
        assert len(new) == 2
        tag = new[0].split("-")[1]
        servers = lab_children(proc)
        assert len(servers) == 2
        for url in urls:
            host, port = url.split("//")[1].split("/")[0].split(":")
            with socket.create_connection((host, int(port)), timeout=10):
                pass
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert mine(tag) == ([], [])
    assert not any(alive(pid) for pid in servers)


def test_cleanup_removes_what_a_killed_lab_left(tmp_path: Path) -> None:
    before = set(netns.lab_namespaces())
    proc, _ = serve_lab(tmp_path)
    new = sorted(set(netns.lab_namespaces()) - before)
    tag = new[0].split("-")[1]
    servers = lab_children(proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    names, links = mine(tag)
    assert len(names) == 2 and len(links) == 2  # left behind
    removed = netns.remove_leftovers(tag)
    assert sorted(removed) == sorted([f"netns {n}" for n in names] + [f"link {x}" for x in links])
    assert mine(tag) == ([], [])
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in servers)
