"""Page-mix data sets for the tier benchmarks: what a swap device is fed.

Two sets, both a `bytes` of whole 4 KiB pages:

`swap_mix(n_pages, seed)`
    A synthetic, fully deterministic set resembling swapped-out anonymous
    memory, generated here with `random.Random(seed)` (no downloads, same
    bytes on every machine and Python version that keeps `random`'s
    documented reproducibility): 15 % zero pages, 5 % same-filled pages, 25 %
    text (prose from a Zipf-distributed vocabulary, and log / JSON lines),
    20 % x86-64 machine code (function bodies built from common instruction
    encodings), 25 % pointer-rich heap pages (malloc chunks holding
    pointers clustered near the page, small integers, vtable pointers,
    zero padding and short strings), 10 % random bytes (already compressed
    or encrypted data).  The kinds are shuffled together.

`real_files(n_pages)`
    Pages cut from files on this machine, one third each from ELF
    executables in /usr/bin, ELF shared libraries under
    /usr/lib/x86_64-linux-gnu, and documentation under /usr/share/doc
    (gzip-compressed documents are expanded first: the text is the data, not
    its compressed form).  Pages are taken at an even stride over the
    concatenation of each category's files in sorted order, so every large
    file contributes and the choice is reproducible on a given machine.
    Partial last pages of files are skipped.

Run as a script to write a set to a file::

    python bench/pagemix.py --set swap --pages 16384 --out /tmp/swap.img
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import struct
import sys
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path

PAGE_SIZE = 4096

#: Kind -> share of the swap-like set.
SWAP_MIX = {
    "zero": 0.15,
    "same": 0.05,
    "text": 0.25,
    "code": 0.20,
    "heap": 0.25,
    "random": 0.10,
}

REAL_SOURCES = {
    "bin": (Path("/usr/bin"), "elf"),
    "lib": (Path("/usr/lib/x86_64-linux-gnu"), "elf"),
    "doc": (Path("/usr/share/doc"), "doc"),
}


# -- the swap-like set --------------------------------------------------------


def _counts(n_pages: int, shares: dict[str, float]) -> dict[str, int]:
    """Split `n_pages` by `shares`, largest remainders first, summing exactly."""
    raw = {kind: n_pages * share for kind, share in shares.items()}
    counts = {kind: int(v) for kind, v in raw.items()}
    short = n_pages - sum(counts.values())
    for kind in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[:short]:
        counts[kind] += 1
    return counts


_SYLLABLES = (
    "ka ro ti na me lo su ve an er in on ar le de ra se te ma ri co pa ul st th ch or es al"
)


class _Text:
    """Prose from a Zipf vocabulary of made-up words, and log/JSON lines."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        syllables = _SYLLABLES.split()
        words: set[str] = set()
        while len(words) < 4000:
            words.add("".join(rng.choices(syllables, k=rng.choice((1, 2, 2, 3, 3, 4)))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        self.cum = []
        total = 0.0
        for rank in range(1, len(self.words) + 1):
            total += 1.0 / rank
            self.cum.append(total)
        self.sentences = [self._sentence() for _ in range(6000)]
        self.paths = ["/api/v1/items", "/api/v1/users", "/static/app.js", "/health", "/login"]
        self.levels = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]

    def _sentence(self) -> str:
        rng = self.rng
        words = rng.choices(self.words, cum_weights=self.cum, k=rng.randint(5, 24))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), f"{rng.randint(0, 9999)}")
        text = " ".join(words)
        end = rng.choice((". ", ". ", ". ", ", ", "; ", "? ", ".\n", ".\n\n"))
        return text[0].upper() + text[1:] + end

    def prose(self) -> bytes:
        rng = self.rng
        parts = []
        size = 0
        while size < PAGE_SIZE + 200:
            s = rng.choice(self.sentences)
            parts.append(s)
            size += len(s)
        text = "".join(parts).encode()
        cut = rng.randrange(100)
        return text[cut : cut + PAGE_SIZE]

    def log(self) -> bytes:
        rng = self.rng
        lines = []
        size = 0
        t = rng.randrange(1_700_000_000, 1_800_000_000)
        json = rng.random() < 0.5
        while size < PAGE_SIZE + 200:
            t += rng.randrange(0, 3)
            ms = rng.randrange(1000)
            hh, mm, ss = (t // 3600) % 24, (t // 60) % 60, t % 60
            path = f"{rng.choice(self.paths)}/{rng.randrange(100000)}"
            rid = f"{rng.getrandbits(48):012x}"
            status = rng.choice((200, 200, 200, 200, 201, 304, 404, 500))
            dur = rng.randrange(1, 900)
            if json:
                line = (
                    f'{{"ts":"2024-05-{t % 28 + 1:02d}T{hh:02d}:{mm:02d}:{ss:02d}.{ms:03d}Z",'
                    f'"level":"{rng.choice(self.levels)}","req":"{rid}","path":"{path}",'
                    f'"status":{status},"ms":{dur}}}\n'
                )
            else:
                line = (
                    f"2024-05-{t % 28 + 1:02d} {hh:02d}:{mm:02d}:{ss:02d}.{ms:03d} "
                    f"{rng.choice(self.levels):5} [worker-{rng.randrange(8)}] "
                    f"request id={rid} path={path} status={status} dur={dur}ms\n"
                )
            lines.append(line)
            size += len(line)
        text = "".join(lines).encode()
        cut = rng.randrange(80)
        return text[cut : cut + PAGE_SIZE]

    def page(self) -> bytes:
        return self.prose() if self.rng.random() < 0.6 else self.log()


class _Code:
    """x86-64 function bodies from common instruction encodings.

    Compiled code repeats itself: the same few registers, stack slots and
    idioms ("load a local, move it to the first argument, call") recur, and
    what varies is mostly call and branch displacements.  Functions are
    therefore strung from a Zipf-weighted pool of idioms (two to five
    instructions with fixed operands), with fresh displacements for calls
    and jumps at every use.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        r = rng
        b = r.randrange

        def rel32() -> bytes:
            return struct.pack("<i", r.randint(-(1 << 20), 1 << 20))

        # Compilers use few registers and stack slots far more than the rest.
        regs = (0, 7, 6, 3, 2, 1, 5, 4)
        reg_weights = (30, 22, 14, 12, 8, 6, 4, 4)

        def reg() -> int:
            return r.choices(regs, reg_weights)[0]

        def disp8() -> bytes:
            return bytes((r.choice((8, 16, 24, 0xF8, 0xF0, 0xE8, 0xE0, 0xD8, 0x10, 0x18)),))

        def modrm() -> bytes:
            return bytes((0xC0 | reg() << 3 | reg(),))

        # (weight, generator) pairs; weights follow rough instruction counts
        # in compiled C code.
        self.body: list[tuple[int, Callable[[], bytes]]] = [
            (14, lambda: b"\x48\x89" + modrm()),  # mov r64, r64
            (12, lambda: b"\x48\x8b" + bytes((0x45 | reg() << 3,)) + disp8()),  # mov r,[rbp+d]
            (8, lambda: b"\x48\x89" + bytes((0x45 | reg() << 3,)) + disp8()),  # mov [rbp+d],r
            (8, lambda: b"\xe8" + rel32()),  # call rel32
            (6, lambda: b"\x48\x8d" + bytes((0x05 | reg() << 3,)) + rel32()),  # lea r,[rip+x]
            (6, lambda: bytes((0x74 + b(2),)) + bytes((b(1, 80),))),  # je/jne short
            (4, lambda: b"\x0f" + bytes((0x84 + b(2),)) + rel32()),  # je/jne near
            (5, lambda: b"\x85" + modrm()),  # test
            (5, lambda: b"\x83" + bytes((0xF8 | reg(),)) + bytes((b(16),))),  # cmp r32, imm8
            (4, lambda: b"\x31\xc0"),  # xor eax, eax
            (4, lambda: b"\xc7\x45" + disp8() + struct.pack("<I", b(256))),  # mov [rbp+d], imm
            (4, lambda: b"\x8b" + bytes((0x40 | reg() << 3 | reg(),)) + disp8()),  # mov r32,[r+d]
            (3, lambda: b"\xeb" + bytes((b(1, 120),))),  # jmp short
            (3, lambda: b"\x48\x83\xc4" + bytes((b(1, 16) * 8,))),  # add rsp, imm8
            (3, lambda: b"\x0f\xb6" + modrm()),  # movzx
            (2, lambda: b"\x48\x63" + modrm()),  # movsxd
            (2, lambda: b"\xbf" + struct.pack("<I", b(4096))),  # mov edi, imm32
            (2, lambda: b"\xff\x15" + rel32()),  # call [rip+x]
        ]
        weights = [w for w, _ in self.body]
        makers = [g for _, g in self.body]
        # An idiom is a list of instruction encodings, or of makers for the
        # instructions whose displacement is drawn again at every use.
        fresh = {makers[i] for i in (3, 4, 6, 17)}
        self.idioms: list[list[bytes | Callable[[], bytes]]] = []
        for _ in range(600):
            chosen = r.choices(makers, weights=weights, k=r.randint(2, 5))
            self.idioms.append([make if make in fresh else make() for make in chosen])
        self.idiom_cum = list(accumulate(1.0 / rank for rank in range(1, len(self.idioms) + 1)))
        self.functions = [self._function() for _ in range(3000)]

    def _function(self) -> bytes:
        r = self.rng
        out = [b"\xf3\x0f\x1e\xfa"] if r.random() < 0.5 else []  # endbr64
        out.append(b"\x55\x48\x89\xe5")  # push rbp; mov rbp, rsp
        saved = r.randrange(4)
        out.extend(bytes((0x41, 0x54 + i)) for i in range(saved))  # push r12..
        out.append(b"\x48\x83\xec" + bytes((r.randrange(1, 16) * 8,)))  # sub rsp, n
        for idiom in r.choices(self.idioms, cum_weights=self.idiom_cum, k=r.randint(3, 30)):
            out.extend(insn if isinstance(insn, bytes) else insn() for insn in idiom)
        out.append(b"\x48\x83\xc4" + bytes((r.randrange(1, 16) * 8,)))
        out.extend(bytes((0x41, 0x5C + i)) for i in reversed(range(saved)))
        out.append(b"\x5d\xc3")  # pop rbp; ret
        code = b"".join(out)
        pad = -len(code) % 16
        return code + (b"\xcc" if r.random() < 0.5 else b"\x90") * pad

    def page(self) -> bytes:
        r = self.rng
        parts = []
        size = 0
        while size < PAGE_SIZE * 2:
            f = r.choice(self.functions)
            parts.append(f)
            size += len(f)
        code = b"".join(parts)
        cut = r.randrange(len(parts[0]))
        return code[cut : cut + PAGE_SIZE]


class _Heap:
    """malloc arenas: runs of same-type objects full of pointers.

    A heap page mostly holds a few object types allocated together (same
    chunk size, same vtable, same layout); their fields are pointers into a
    small set of hot objects near the page, pointers into a library, small
    integers, zeroes, short strings and the odd hash.
    """

    FIELD_KINDS = ("ptr", "ptr", "ptr", "lib", "int", "int", "zero", "zero", "str", "hash")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        # A few processes, each with a heap base and a library base.
        self.heaps = [0x0000_5500_0000_0000 | rng.getrandbits(36) << 4 for _ in range(4)]
        self.libs = [0x0000_7F00_0000_0000 | rng.getrandbits(28) << 12 for _ in range(4)]
        self.strings = [
            s.encode().ljust(8, b"\0")[:8]
            for s in ("name", "value", "id", "user", "en_US", "true", "GET", "utf-8", "/tmp")
        ]

    def _type(self, lib: int) -> tuple[int, int, list[str]]:
        """An object type: chunk words, vtable (0: none) and field kinds."""
        r = self.rng
        words = r.choice((2, 3, 4, 4, 6, 8, 8, 12, 16))
        vtable = lib + r.getrandbits(20) * 8 if r.random() < 0.5 else 0
        fields = r.choices(self.FIELD_KINDS, k=words - (1 if vtable else 0))
        return words, vtable, fields

    def page(self) -> bytes:
        r = self.rng
        proc = r.randrange(len(self.heaps))
        here = self.heaps[proc] + (r.getrandbits(20) << 12)
        lib = self.libs[proc]
        types = [self._type(lib) for _ in range(r.randint(1, 4))]
        hot = [here + (r.getrandbits(16) - 32768) * 16 for _ in range(r.randint(4, 32))]
        words: list[int] = []
        rand = r.random
        bits = r.getrandbits
        while len(words) < 512:
            n, vtable, fields = r.choice(types)
            words.append((n + 1) * 8 | 1)  # malloc chunk size | PREV_INUSE
            if rand() < 0.12:
                words.extend([0] * n)  # a freed or freshly calloc'ed chunk
                continue
            if vtable:
                words.append(vtable)
            for kind in fields:
                if kind == "ptr":
                    x = rand()
                    if x < 0.6:
                        words.append(r.choice(hot))
                    elif x < 0.85:
                        words.append(here + (bits(16) - 32768) * 16)
                    else:
                        words.append(0)  # NULL
                elif kind == "lib":
                    words.append(lib + bits(16) * 8)
                elif kind == "int":
                    words.append(bits(r.choice((1, 4, 8, 8, 12, 16, 32))))
                elif kind == "zero":
                    words.append(0)
                elif kind == "str":
                    words.append(int.from_bytes(r.choice(self.strings), "little"))
                else:
                    words.append(bits(64))
        return struct.pack("<512Q", *words[:512])


def swap_mix(n_pages: int, seed: int = 0) -> bytes:
    """`n_pages` pages resembling swapped-out memory (see the module docstring)."""
    rng = random.Random(seed)
    counts = _counts(n_pages, SWAP_MIX)
    kinds = [kind for kind, count in counts.items() for _ in range(count)]
    rng.shuffle(kinds)
    text, code, heap = _Text(rng), _Code(rng), _Heap(rng)
    same_words = [b"\xff" * 8, b"\x01" * 8, b"\x00\x00\x00\x00\xff\xff\xff\xff", b"\x20" * 8]
    out = bytearray()
    for kind in kinds:
        if kind == "zero":
            out += bytes(PAGE_SIZE)
        elif kind == "same":
            word = rng.choice(same_words) if rng.random() < 0.7 else rng.randbytes(8)
            out += word * (PAGE_SIZE // 8)
        elif kind == "text":
            out += text.page()
        elif kind == "code":
            out += code.page()
        elif kind == "heap":
            out += heap.page()
        else:
            out += rng.randbytes(PAGE_SIZE)
    return bytes(out)


# -- the real-file set ------------------------------------------------------


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _gzip_size(path: Path) -> int:
    """Uncompressed size from a gzip trailer (modulo 2**32, fine for docs)."""
    with path.open("rb") as f:
        f.seek(-4, os.SEEK_END)
        size: int = struct.unpack("<I", f.read(4))[0]
    return size


def _files(root: Path, kind: str) -> Iterator[tuple[Path, int]]:
    """(path, byte size) of the category's regular files, sorted, no duplicates."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:
                continue
            if not path.is_file() or (st.st_dev, st.st_ino) in seen or st.st_size < PAGE_SIZE:
                continue
            seen.add((st.st_dev, st.st_ino))
            if kind == "elf":
                if _is_elf(path):
                    yield path, st.st_size
            elif name.endswith(".gz"):
                try:
                    yield path, _gzip_size(path)
                except OSError:
                    continue
            else:
                yield path, st.st_size


def _read(path: Path, offsets: list[int]) -> list[bytes]:
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError):
            return []
        return [data[o : o + PAGE_SIZE] for o in offsets if o + PAGE_SIZE <= len(data)]
    with path.open("rb") as f:
        return [os.pread(f.fileno(), PAGE_SIZE, o) for o in offsets]


def _category(root: Path, kind: str, quota: int) -> list[bytes]:
    files = list(_files(root, kind))
    total = sum(size // PAGE_SIZE for _, size in files)
    if total == 0:
        return []
    stride = max(1, total // quota)
    pages: list[bytes] = []
    index = 0  # page index over the concatenation of all files
    for path, size in files:
        count = size // PAGE_SIZE
        first = -index % stride
        offsets = [i * PAGE_SIZE for i in range(first, count, stride)]
        index += count
        if offsets:
            pages.extend(p for p in _read(path, offsets) if len(p) == PAGE_SIZE)
        if len(pages) >= quota:
            break
    return pages[:quota]


def real_files(n_pages: int) -> bytes:
    """`n_pages` pages cut from binaries, libraries and docs on this machine."""
    quotas = _counts(n_pages, {name: 1 / len(REAL_SOURCES) for name in REAL_SOURCES})
    pages: list[bytes] = []
    for name, (root, kind) in REAL_SOURCES.items():
        got = _category(root, kind, quotas[name])
        if len(got) < quotas[name]:
            raise RuntimeError(f"only {len(got)} {name} pages under {root}, {quotas[name]} wanted")
        pages.extend(got)
    # Interleave the categories deterministically, as a swap device would see them.
    random.Random(0).shuffle(pages)
    return b"".join(pages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=("swap", "real"), default="swap")
    parser.add_argument("--pages", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0, help="seed of the swap set")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    data = swap_mix(args.pages, args.seed) if args.set == "swap" else real_files(args.pages)
    args.out.write_bytes(data)
    print(f"wrote {len(data) // PAGE_SIZE} pages ({len(data)} bytes) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
