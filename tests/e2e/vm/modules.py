"""Kernel modules for the guest: read `.modinfo`, resolve `depends=`, decompress.

Debian's kernel package ships no `modules.dep`, and the dependency order of
the modules the guest needs differs between kernel builds, so the order is
computed here from the `depends=` field stored in each module's `.modinfo`
ELF section (what `modinfo -F depends` prints), without kmod on the host.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: Path | str) -> str:
    """The kernel's name for a module file: basename without suffix, '-' -> '_'."""
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def decompress(path: Path) -> bytes:
    """Return the plain ELF bytes of a module file, whatever its compression."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return zlib.decompress(data, wbits=31)
    if name.endswith(".ko.zst"):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            zstd = shutil.which("zstd")
            if zstd is None:
                raise RuntimeError(
                    f"{path}: zstd-compressed module needs the zstd tool or the zstandard module"
                ) from None
            return subprocess.run(
                [zstd, "-d", "-c", str(path)], check=True, capture_output=True
            ).stdout
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    raise ValueError(f"not a kernel module: {path}")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Parse the `.modinfo` section of a 64-bit little-endian ELF module.

    The section is a run of NUL-terminated `key=value` strings; a key may
    repeat (alias=, parm=), so every key maps to a list of values.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, base)
        return name, offset, size

    _, strtab_off, strtab_size = section(shstrndx)
    strtab = elf[strtab_off : strtab_off + strtab_size]
    for index in range(shnum):
        name_off, offset, size = section(index)
        end = strtab.index(b"\0", name_off)
        if strtab[name_off:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for entry in elf[offset : offset + size].split(b"\0"):
                if b"=" in entry:
                    key, _, value = entry.decode("utf-8", "replace").partition("=")
                    info.setdefault(key, []).append(value)
            return info
    raise ValueError("no .modinfo section")


def depends(info: dict[str, list[str]]) -> list[str]:
    """The module names listed in `depends=` (may be empty)."""
    out: list[str] = []
    for value in info.get("depends", []):
        out.extend(name.replace("-", "_") for name in value.split(",") if name)
    return out


@dataclass(frozen=True)
class Module:
    name: str
    path: Path  # the file in the unpacked kernel package (maybe compressed)
    relpath: str  # path below lib/modules/<release>/, without compression suffix
    depends: tuple[str, ...]
    elf: bytes  # decompressed


class ModuleTree:
    """The modules of one unpacked kernel: `<root>/lib/modules/<release>/`."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.release = moddir.name
        self._paths: dict[str, Path] = {}
        for path in sorted((moddir / "kernel").rglob("*.ko*")):
            if path.name.endswith(_SUFFIXES):
                self._paths[module_name(path)] = path
        builtin = moddir / "modules.builtin"
        self.builtin: set[str] = set()
        if builtin.exists():
            self.builtin = {module_name(line) for line in builtin.read_text().split()}

    def __contains__(self, name: str) -> bool:
        return name.replace("-", "_") in self._paths

    def load(self, name: str) -> Module:
        name = name.replace("-", "_")
        path = self._paths[name]
        elf = decompress(path)
        rel = path.relative_to(self.moddir).as_posix()
        for suffix in (".xz", ".zst", ".gz"):
            if rel.endswith(".ko" + suffix):
                rel = rel[: -len(suffix)]
        return Module(name, path, rel, tuple(depends(modinfo(elf))), elf)

    def closure(self, roots: Iterable[str]) -> list[Module]:
        """Every module needed for `roots`, each after all of its dependencies.

        Built-in modules need no loading and are skipped. A missing module or
        a dependency cycle is an error: the guest would not come up.
        """
        order: list[Module] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = name.replace("-", "_")
            if name in done or name in self.builtin:
                return
            if name in visiting:
                raise RuntimeError(f"module dependency cycle: {' -> '.join((*chain, name))}")
            if name not in self._paths:
                raise RuntimeError(
                    f"module {name!r} (needed by {' -> '.join(chain) or 'the guest'}) "
                    f"is not in {self.moddir}"
                )
            visiting.add(name)
            module = self.load(name)
            for dep in module.depends:
                visit(dep, (*chain, name))
            visiting.discard(name)
            done.add(name)
            order.append(module)

        for root in roots:
            visit(root, ())
        return order


def modules_dep(modules: Iterable[Module]) -> str:
    """A `modules.dep` for the given modules, so busybox `modprobe` works in the guest.

    Format: `relpath: dep-relpath dep-relpath ...`; `modprobe` loads the
    listed dependencies from the last to the first.
    """
    by_name = {m.name: m for m in modules}
    lines = []
    for module in by_name.values():
        # Dependencies in load order (each after its own), then reversed:
        # modprobe loads the last-listed dependency first.
        order: list[str] = []

        def add(name: str, order: list[str] = order) -> None:
            for dep in by_name[name].depends:
                if dep in by_name and by_name[dep].relpath not in order:
                    add(dep)
                    if by_name[dep].relpath not in order:
                        order.append(by_name[dep].relpath)

        add(module.name)
        lines.append(f"{module.relpath}: {' '.join(reversed(order))}".rstrip())
    return "\n".join(lines) + "\n"
