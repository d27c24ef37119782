"""Debian packages for the guest, fetched with `apt-get download` into a cache.

Nothing here installs a package on the host: packages are unpacked with
`dpkg-deb -x` into the cache directory. The cache directory is
`$NBDCACHE_E2E_CACHE`, else `$XDG_CACHE_HOME/nbdcache-e2e`, else
`~/.cache/nbdcache-e2e`.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("NBDCACHE_E2E_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "nbdcache-e2e"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise builds of one cache entry across processes (pytest-xdist, two shells)."""
    lockdir = cache_dir() / "locks"
    lockdir.mkdir(exist_ok=True)
    with open(lockdir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_apt_updated = False


def _apt_update_once() -> None:
    """Fetch the package lists, once per process, where a fresh machine has none."""
    global _apt_updated
    if _apt_updated or os.geteuid() != 0:
        return
    _apt_updated = True
    subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)


def _candidate_version(package: str) -> str | None:
    out = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
    if match is None or match.group(1) == "(none)":
        return None
    return match.group(1)


def candidate_version(package: str) -> str:
    """The version `apt-get download PACKAGE` would fetch."""
    version = _candidate_version(package)
    if version is None:
        _apt_update_once()
        version = _candidate_version(package)
    if version is None:
        raise RuntimeError(f"apt knows no candidate for {package!r} (run apt-get update?)")
    return version


def current_kernel_package() -> str:
    """The image package `linux-image-amd64` depends on now, e.g. linux-image-6.1.0-56-amd64.

    `NBDCACHE_E2E_KERNEL_PACKAGE` overrides it (to pin a kernel build).
    """
    pinned = os.environ.get("NBDCACHE_E2E_KERNEL_PACKAGE")
    if pinned:
        return pinned

    def lookup() -> str | None:
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        names = re.findall(r"Depends:\s*(linux-image-\S+-amd64)\b", out)
        return names[0] if names else None

    name = lookup()
    if name is None:
        _apt_update_once()
        name = lookup()
    if name is None:
        raise RuntimeError("cannot resolve linux-image-amd64 (run apt-get update?)")
    return name


def download(package: str, version: str) -> Path:
    """The .deb of PACKAGE=VERSION in the cache, downloading it if needed."""
    debs = cache_dir() / "debs"
    debs.mkdir(exist_ok=True)
    # apt-get download names files PACKAGE_VERSION_ARCH.deb with ':' escaped.
    escaped = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{package}_{escaped}_*.deb"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write there
        result = subprocess.run(
            ["apt-get", "download", "-q", f"{package}={version}"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            _apt_update_once()
            result = subprocess.run(
                ["apt-get", "download", "-q", f"{package}={version}"],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package}={version} failed:\n{result.stderr}")
        (deb,) = Path(tmp).glob("*.deb")
        target = debs / deb.name
        os.replace(deb, target)
        return target


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files into dest (`dpkg-deb -x`: no maintainer scripts, no install)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


def package_tree(package: str) -> Path:
    """The files of PACKAGE (candidate version) unpacked in the cache."""
    version = candidate_version(package)
    dest = cache_dir() / "pkgs" / f"{package}_{version.replace(':', '%3a')}"
    with locked(f"pkg-{package}"):
        if not (dest / ".complete").exists():
            shutil.rmtree(dest, ignore_errors=True)
            extract(download(package, version), dest)
            (dest / ".complete").write_text(version + "\n")
    return dest


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )
