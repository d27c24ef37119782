"""Running podman with a configuration that works on a host without systemd.

podman's defaults assume systemd (cgroup manager, the crun runtime, ulimits
taken from the caller); here `containers.conf` sets runtime ``runc``,
cgroup manager ``cgroupfs`` and fixed ulimits, and every podman (and
podman-compose) command of the tests runs with ``CONTAINERS_CONF`` pointing
at it, unless the caller's environment already names one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from vm.debian import cache_dir

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


class PodmanError(Exception):
    pass


def env() -> dict[str, str]:
    """The environment for podman and podman-compose."""
    out = dict(os.environ)
    if "CONTAINERS_CONF" not in out:
        path = cache_dir() / "container" / "containers.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != CONTAINERS_CONF:
            path.write_text(CONTAINERS_CONF)
        out["CONTAINERS_CONF"] = str(path)
    return out


def podman(
    *args: str, check: bool = True, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS``; with `check`, a failure raises PodmanError with its output."""
    if shutil.which("podman") is None:
        raise PodmanError("podman is not installed (Debian packages podman and runc)")
    proc = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise PodmanError(
            f"podman {' '.join(args)}: status {proc.returncode}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def compose_command() -> list[str]:
    """podman-compose from the running venv (dev extras), else from PATH."""
    script = Path(sys.executable).with_name("podman-compose")
    if script.exists():
        return [str(script)]
    found = shutil.which("podman-compose")
    if found is None:
        raise PodmanError("podman-compose is not installed (pip install -e '.[dev]')")
    return [found]


def compose(
    *args: str, extra_env: dict[str, str], timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*compose_command(), *args],
        capture_output=True,
        text=True,
        env={**env(), **extra_env},
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise PodmanError(
            f"podman-compose {' '.join(args)}: status {proc.returncode}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc
