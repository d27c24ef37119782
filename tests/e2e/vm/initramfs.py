"""The guest's initramfs: busybox, /init, the memory hog, modules, nbd-client, mdadm.

Written as a cpio "newc" archive by this module (so device nodes need no
root and the archive is reproducible), gzip-compressed, and cached under a
hash of everything that goes in.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import debian
from .kernel import Kernel, get_kernel

GUEST_DIR = Path(__file__).parent / "guest"


class Cpio:
    """A minimal writer of the newc format the kernel unpacks."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError(f"duplicate initramfs entry {name}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def has(self, name: str) -> bool:
        return name.lstrip("/") in self._names

    def dir(self, name: str) -> None:
        if not name.strip("/."):
            return
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not self.has(sub):
                self._entry(sub, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.dir(os.path.dirname(name.strip("/")))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def busybox_binary() -> Path:
    """A static busybox: the host's if it is static (busybox-static), else Debian's, unpacked."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and debian.is_static_elf(path):
            return path
    tree = debian.package_tree("busybox-static")
    for candidate in ("bin/busybox", "usr/bin/busybox"):
        if (tree / candidate).exists():
            return tree / candidate
    raise RuntimeError("busybox-static has no busybox binary")


def busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def with_libraries(guest_path: str, binary: Path) -> dict[str, Path]:
    """A dynamic binary and the shared libraries it loads (ldd on the host), by guest path."""
    files = {guest_path: binary}
    if debian.is_static_elf(binary):
        return files
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    missing = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            target = rest.split("(")[0].strip()
            if target == "not found" or not target:
                missing.append(name.strip())
                continue
            files[target] = Path(target)
        elif line.startswith("/"):
            interp = line.split()[0]
            files[interp] = Path(interp)
    if missing:
        raise RuntimeError(f"{binary} needs libraries missing on this host: {', '.join(missing)}")
    return files


def nbd_client_files() -> dict[str, Path]:
    """nbd-client (Debian package nbd-client) and its libraries.

    The host's /usr/sbin/nbd-client when installed, else the package unpacked
    in the cache; its libraries are resolved on the host, so they must be
    installed there (apt-get install nbd-client brings them).
    """
    binary = Path("/usr/sbin/nbd-client")
    if not binary.exists():
        binary = debian.package_tree("nbd-client") / "usr" / "sbin" / "nbd-client"
    return with_libraries("/usr/sbin/nbd-client", binary)


def mdadm_files() -> dict[str, Path]:
    """mdadm (Debian package mdadm, unpacked in the cache, not installed) and its libraries.

    Debian builds it dynamically (libudev, libc); the libraries are taken
    from the host, where they are part of the base system.
    """
    binary = Path("/sbin/mdadm")
    if not binary.exists():
        binary = debian.package_tree("mdadm") / "sbin" / "mdadm"
    return with_libraries("/sbin/mdadm", binary)


#: util-linux's swap tools (Debian's essential packages util-linux and mount):
#: the options users' scripts pass (`swapon --discard=pages -p N`), which
#: busybox's applets lack. In the guest they come first in PATH.
SWAP_TOOLS = ("mkswap", "swapon", "swapoff")


#: Shells from the host (Debian's essential dash and bash): /bin/sh is dash,
#: as on Debian, because busybox's own sh runs its applets in preference to
#: the programs in PATH. Scripts under test may also ask for bash.
SHELLS = {"/bin/sh": "dash", "/bin/bash": "bash"}


def host_tool_files() -> dict[str, Path]:
    """The swap tools and shells copied from the host, with their libraries."""
    files: dict[str, Path] = {}
    wanted = {f"/usr/local/sbin/{tool}": tool for tool in SWAP_TOOLS} | SHELLS
    for guest_path, tool in wanted.items():
        found = shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if found is None:
            raise RuntimeError(f"{tool} not found on the host (util-linux, mount, dash, bash)")
        files.update(with_libraries(guest_path, Path(found)))
    return files


def compile_hog(out: Path) -> None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (apt-get install gcc libc6-dev)")
    subprocess.run(
        [
            gcc,
            "-static",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out),
            str(GUEST_DIR / "hog.c"),
        ],
        check=True,
    )


@dataclass(frozen=True)
class GuestImage:
    kernel: Kernel
    initrd: Path
    contents: tuple[str, ...] = field(default=(), repr=False)


def _digest(parts: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def build_guest(extra_files: dict[str, Path] | None = None) -> GuestImage:
    """Kernel + initramfs, built once and cached (rebuilt when an input changes).

    extra_files: guest path -> host file, added to the image (scripts a
    scenario runs with e2e.script=PATH, for example).
    """
    kernel = get_kernel()
    busybox = busybox_binary()
    host_files = {**nbd_client_files(), **mdadm_files(), **host_tool_files()}
    extra = dict(extra_files or {})

    with tempfile.TemporaryDirectory() as tmp:
        hog = Path(tmp) / "hog"
        compile_hog(hog)
        inputs: list[tuple[str, bytes]] = [
            ("init", (GUEST_DIR / "init.sh").read_bytes()),
            ("hog.c", (GUEST_DIR / "hog.c").read_bytes()),
            ("busybox", busybox.read_bytes()),
            ("kernel", kernel.key().encode()),
            ("builder", Path(__file__).read_bytes()),
        ]
        inputs += [(name, path.read_bytes()) for name, path in sorted(host_files.items())]
        inputs += [(name, path.read_bytes()) for name, path in sorted(extra.items())]
        key = _digest(inputs)
        target = debian.cache_dir() / "initramfs" / f"initramfs-{kernel.release}-{key}.cpio.gz"
        with debian.locked("initramfs"):
            if target.exists():
                target.touch()  # in use: keep it
            else:
                target.parent.mkdir(exist_ok=True)
                # Images nobody built or used for a week are stale.
                for old in target.parent.glob("initramfs-*.cpio.gz"):
                    if time.time() - old.stat().st_mtime > 7 * 86400:
                        old.unlink()
                archive = _archive(kernel, busybox, hog, host_files, extra)
                partial = target.with_suffix(".tmp")
                with open(partial, "wb") as f:
                    f.write(gzip.compress(archive, compresslevel=6, mtime=0))
                partial.rename(target)
    return GuestImage(kernel=kernel, initrd=target, contents=tuple(sorted(extra)))


def _archive(
    kernel: Kernel,
    busybox: Path,
    hog: Path,
    host_files: dict[str, Path],
    extra: dict[str, Path],
) -> bytes:
    cpio = Cpio()
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc",
        "root",
        "var",
    ):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    # Host programs first: their names win over busybox's applets.
    for guest_path, host_path in sorted(host_files.items()):
        cpio.file(guest_path, host_path.read_bytes(), 0o755)
    for guest_path, host_path in sorted(extra.items()):
        cpio.file(guest_path, host_path.read_bytes(), host_path.stat().st_mode & 0o777)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if not cpio.has(applet):
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", (GUEST_DIR / "init.sh").read_bytes(), 0o755)
    cpio.file("bin/hog", hog.read_bytes(), 0o755)
    cpio.file("etc/e2e/modules", ("\n".join(kernel.load_order) + "\n").encode())
    modroot = f"lib/modules/{kernel.release}"
    for path in sorted(kernel.moddir.rglob("*")):
        if path.is_file():
            cpio.file(f"{modroot}/{path.relative_to(kernel.moddir).as_posix()}", path.read_bytes())
    cpio.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )
    cpio.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return cpio.finish()
