"""The guest kernel: Debian's current `linux-image-*-amd64`, unpacked, never installed.

Only what the guest needs is kept in the cache: `vmlinuz` and the modules
for the virtio disk, the nbd driver, the virtio NIC and md RAID1, each
decompressed and in dependency order (from the `depends=` field of each
module).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import debian
from .modules import ModuleTree, modules_dep

#: Modules the guest loads: the PCI transport and block driver for virtio
#: disks, the kernel's NBD client, a virtio NIC for its network, and md with
#: its RAID1 personality (swap mirrored over two servers).
ROOT_MODULES = ("virtio_pci", "virtio_blk", "nbd", "virtio_net", "md_mod", "raid1")


@dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    release: str  # uname -r
    vmlinuz: Path
    moddir: Path  # lib/modules/<release> holding the decompressed modules
    load_order: tuple[str, ...]  # paths below moddir, each after its dependencies

    def key(self) -> str:
        return f"{self.package}_{self.version}"


def _kernel_dir(package: str, version: str) -> Path:
    roots = hashlib.sha256(",".join(ROOT_MODULES).encode()).hexdigest()[:8]
    return debian.cache_dir() / "kernel" / f"{package}_{version.replace(':', '%3a')}_{roots}"


def _load(dest: Path) -> Kernel:
    meta = json.loads((dest / "kernel.json").read_text())
    return Kernel(
        package=meta["package"],
        version=meta["version"],
        release=meta["release"],
        vmlinuz=dest / "vmlinuz",
        moddir=dest / "lib" / "modules" / meta["release"],
        load_order=tuple(meta["load_order"]),
    )


def get_kernel() -> Kernel:
    """Fetch (once) and return the current Debian amd64 kernel with the guest's modules."""
    package = debian.current_kernel_package()
    version = debian.candidate_version(package)
    dest = _kernel_dir(package, version)
    with debian.locked("kernel"):
        if (dest / "kernel.json").exists():
            return _load(dest)
        deb = debian.download(package, version)
        shutil.rmtree(dest, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=debian.cache_dir()) as tmp:
            root = Path(tmp)
            debian.extract(deb, root)
            (vmlinuz,) = sorted((root / "boot").glob("vmlinuz-*"))
            (src_moddir,) = sorted((root / "lib" / "modules").iterdir())
            tree = ModuleTree(src_moddir)
            modules = tree.closure(ROOT_MODULES)
            build = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(build, ignore_errors=True)
            moddir = build / "lib" / "modules" / tree.release
            for module in modules:
                target = moddir / module.relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(module.elf)
            (moddir / "modules.dep").write_text(modules_dep(modules))
            for name in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
                if (src_moddir / name).exists():
                    shutil.copy2(src_moddir / name, moddir / name)
            shutil.copy2(vmlinuz, build / "vmlinuz")
            meta = {
                "package": package,
                "version": version,
                "release": tree.release,
                "load_order": [m.relpath for m in modules],
                "depends": {m.name: list(m.depends) for m in modules},
            }
            (build / "kernel.json").write_text(json.dumps(meta, indent=1) + "\n")
            build.rename(dest)
        # The .deb is 70 MB and fetched again in a second when a new kernel appears.
        for old in (debian.cache_dir() / "debs").glob("linux-image-*.deb"):
            old.unlink()
        return _load(dest)
