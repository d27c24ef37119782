"""An offline stand-in for the `python:3.11-slim` base image.

No container registry is reachable from the test machines, but Debian's
package mirror is: the base is Debian bookworm from `debootstrap
--variant=minbase` with python3, python3-venv, python3-pip and
ca-certificates (bookworm's python3 is 3.11).  The debootstrap tree is
cached as a tarball in the e2e cache directory (`vm.debian.cache_dir`), the
slow step (a few minutes); `podman import` and a small build on top of it
take seconds.  The build adds the host's CA certificates from
/usr/local/share/ca-certificates/, so pip inside the image trusts what the
host trusts (a TLS-inspecting proxy's CA, for example), and tags the result
as `python:3.11-slim`.  An image of that name already in podman's storage
(this one from an earlier run, or the real one) is used as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vm.debian import cache_dir, locked

from container.podman import podman

BASE_TAG = "docker.io/library/python:3.11-slim"
SUITE = "bookworm"
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def mirror() -> str:
    return os.environ.get("NBDCACHE_E2E_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def rootfs_tarball() -> Path:
    """The debootstrap tree as a gzip'ed tarball, built once and cached."""
    path = cache_dir() / "container" / f"debian-{SUITE}-minbase-python3.tar.gz"
    if path.exists():
        return path
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (Debian package debootstrap)")
    with locked("container-rootfs"):
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            root = Path(tmp) / "root"
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={PACKAGES}",
                    SUITE,
                    str(root),
                    mirror(),
                ],
                check=True,
                capture_output=True,
                timeout=1800,
            )
            subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True)
            for lists in (root / "var/lib/apt/lists").glob("*_*"):
                lists.unlink()
            partial = Path(tmp) / "rootfs.tar.gz"
            subprocess.run(
                ["tar", "-C", str(root), "--numeric-owner", "-czf", str(partial), "."],
                check=True,
            )
            partial.rename(path)
    return path


def ensure_base_image() -> str:
    """Make `python:3.11-slim` available to podman builds; returns its name."""
    if podman("image", "exists", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    with locked("container-base-image"):
        if podman("image", "exists", BASE_TAG, check=False).returncode == 0:
            return BASE_TAG
        rootfs = "localhost/nbdcache-e2e-rootfs:" + SUITE
        podman("import", str(rootfs_tarball()), rootfs)
        with tempfile.TemporaryDirectory() as tmp:
            lines = [f"FROM {rootfs}"]
            certs = sorted(HOST_CA_DIR.glob("*.crt")) if HOST_CA_DIR.is_dir() else []
            if certs:
                (Path(tmp) / "ca").mkdir()
                for cert in certs:
                    shutil.copy(cert, Path(tmp) / "ca" / cert.name)
                lines += [
                    "COPY ca/ /usr/local/share/ca-certificates/",
                    "RUN update-ca-certificates",
                ]
            lines += [
                "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                'CMD ["python3"]',
            ]
            (Path(tmp) / "Containerfile").write_text("\n".join(lines) + "\n")
            podman("build", "--pull=never", "--network=host", "-t", BASE_TAG, tmp)
    return BASE_TAG
