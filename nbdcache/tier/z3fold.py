"""z3fold: up to three compressed pages per frame (first, middle, last).

After mm/z3fold.c.  Like zbud, the *first* object starts at the beginning
of the frame and the *last* ends at its end; a third, *middle* object sits
right after the first.  Space is counted in 64-byte chunks.

The frame is kept compact, as the kernel's in-page compaction does: a middle
object exists only behind a first one, so the free space of a frame is always
one run (between the middle, or first, object and the last).  When the first
object is freed while a middle one exists, the middle object is moved to the
start of the frame and becomes the first; its page-table handle is rewritten
through the reverse map.  Frames with fewer than three objects and some free
space sit on the unbuddied list indexed by their free chunks; allocation is
best fit over those lists, then a fresh frame.  An overwrite stays in its
slot when it fits.  The LRU and eviction are per frame, as in zbud.

Chunk counts, list links and the owner of each slot (the reverse map) live
in side arrays, not in the frame (`frame_metadata_bytes`: 28 bytes per
frame, plus the LRU queue, at most 16 bytes per frame in use).
"""

from __future__ import annotations

from array import array
from typing import Final

from nbdcache.tier import PAGE_SHIFT, PAGE_SIZE
from nbdcache.tier.arena import (
    HANDLE_LENGTH_MASK,
    HANDLE_SHIFT,
    NIL,
    Arena,
    ArenaFull,
    FrameEviction,
    FrameLists,
    ObjectInfo,
    StampLRU,
)
from nbdcache.tier.pagetable import PageTable

CHUNK_SHIFT: Final = 6
CHUNK_SIZE: Final = 1 << CHUNK_SHIFT
NCHUNKS: Final = PAGE_SIZE >> CHUNK_SHIFT
_CHUNK_ROUND: Final = CHUNK_SIZE - 1
_OFFSET_MASK: Final = PAGE_SIZE - 1


class Z3fold(FrameEviction):
    """Three objects per frame; see the module docstring."""

    name = "z3fold"

    def __init__(self, arena: Arena, table: PageTable) -> None:
        frames = arena.frame_count
        self.arena = arena
        self.handles = table.handle
        self.first = bytearray(frames)  # chunks per slot (0: empty)
        self.middle = bytearray(frames)
        self.last = bytearray(frames)
        self.first_pgno = array("I", bytes(4 * frames))  # reverse map per slot
        self.middle_pgno = array("I", bytes(4 * frames))
        self.last_pgno = array("I", bytes(4 * frames))
        # unbuddied[i]: frames with one or two objects and i free chunks.
        self.unbuddied = FrameLists(frames, NCHUNKS + 1)
        self.lru = StampLRU(frames, self._frame_live, lambda: arena.frames_used)
        self.middle_moves = 0

    def _refile(self, frame: int) -> None:
        """Put `frame` on the unbuddied list its contents call for (or none)."""
        first, middle, last = self.first[frame], self.middle[frame], self.last[frame]
        free = NCHUNKS - first - middle - last
        lists = self.unbuddied
        lists.remove(frame)
        if free and not (first and middle and last):
            lists.push(free, frame)

    # -- allocation --------------------------------------------------------

    def alloc(self, size: int, pgno: int, reserve: bool) -> int:
        chunks = (size + _CHUNK_ROUND) >> CHUNK_SHIFT
        lists = self.unbuddied
        fits = lists.nonempty >> chunks
        if fits:
            frame = lists.head[chunks + (fits & -fits).bit_length() - 1]
            first = self.first[frame]
            if first == 0:
                self.first[frame] = chunks
                self.first_pgno[frame] = pgno
                addr = frame << PAGE_SHIFT
            elif self.last[frame] == 0:
                self.last[frame] = chunks
                self.last_pgno[frame] = pgno
                addr = ((frame + 1) << PAGE_SHIFT) - (chunks << CHUNK_SHIFT)
            else:
                self.middle[frame] = chunks
                self.middle_pgno[frame] = pgno
                addr = (frame << PAGE_SHIFT) + (first << CHUNK_SHIFT)
            self._refile(frame)
        else:
            frame = self.arena.alloc_frame(reserve)
            if frame == NIL:
                raise ArenaFull
            self.first[frame] = chunks
            self.first_pgno[frame] = pgno
            if chunks < NCHUNKS:
                lists.push(NCHUNKS - chunks, frame)
            addr = frame << PAGE_SHIFT
        self.lru.push(frame)
        return addr << HANDLE_SHIFT | size

    def realloc(self, handle: int, size: int, pgno: int) -> int:
        chunks = (size + _CHUNK_ROUND) >> CHUNK_SHIFT
        addr = handle >> HANDLE_SHIFT
        frame = addr >> PAGE_SHIFT
        off = addr & _OFFSET_MASK
        first, middle, last = self.first[frame], self.middle[frame], self.last[frame]
        if off == 0:
            if chunks != first:
                # The first object can only change size if nothing follows it.
                if middle or chunks + last > NCHUNKS:
                    return NIL
                self.first[frame] = chunks
                self._refile(frame)
        elif middle and off == first << CHUNK_SHIFT:
            if chunks != middle:
                if first + chunks + last > NCHUNKS:
                    return NIL
                self.middle[frame] = chunks
                self._refile(frame)
        elif chunks != last:
            # A last object never reaches offset 0, where it would read as first.
            if first + middle + chunks > NCHUNKS or chunks == NCHUNKS:
                return NIL
            self.last[frame] = chunks
            addr = ((frame + 1) << PAGE_SHIFT) - (chunks << CHUNK_SHIFT)
            self._refile(frame)
        self.lru.push(frame)
        return addr << HANDLE_SHIFT | size

    def free(self, handle: int) -> None:
        addr = handle >> HANDLE_SHIFT
        frame = addr >> PAGE_SHIFT
        off = addr & _OFFSET_MASK
        first = self.first[frame]
        middle = self.middle[frame]
        if off == 0:
            if middle:
                self._middle_to_first(frame, first, middle)
            else:
                self.first[frame] = 0
        elif middle and off == first << CHUNK_SHIFT:
            self.middle[frame] = 0
        else:
            self.last[frame] = 0
        if self.first[frame] or self.last[frame]:
            self._refile(frame)
        else:
            self.unbuddied.remove(frame)
            self.arena.free_frame(frame)

    def _middle_to_first(self, frame: int, first: int, middle: int) -> None:
        """The first object is gone: slide the middle one to the frame start."""
        pgno = self.middle_pgno[frame]
        handles = self.handles
        length = handles[pgno] & HANDLE_LENGTH_MASK
        dst = frame << PAGE_SHIFT
        src = dst + (first << CHUNK_SHIFT)
        self.arena.map[dst : dst + length] = self.arena.map[src : src + length]
        handles[pgno] = dst << HANDLE_SHIFT | length
        self.first[frame] = middle
        self.first_pgno[frame] = pgno
        self.middle[frame] = 0
        self.middle_moves += 1

    def write_span(self, addr: int, data: bytes | memoryview) -> None:
        raise AssertionError("z3fold objects never straddle frames")

    def read_span(self, addr: int, size: int) -> bytes:
        raise AssertionError("z3fold objects never straddle frames")

    # -- LRU ---------------------------------------------------------------

    def _frame_live(self, frame: int) -> bool:
        return bool(self.first[frame] or self.middle[frame] or self.last[frame])

    def used_frames(self) -> list[int]:
        """Frames holding at least one object, in frame order."""
        return [
            f
            for f in range(self.arena.frame_count)
            if self.first[f] or self.middle[f] or self.last[f]
        ]

    def frame_pages(self, frame: int) -> list[int]:
        """The pages living in `frame` (what evicting it would write back)."""
        pages = []
        if self.first[frame]:
            pages.append(self.first_pgno[frame])
        if self.middle[frame]:
            pages.append(self.middle_pgno[frame])
        if self.last[frame]:
            pages.append(self.last_pgno[frame])
        return pages

    def compact(self) -> int:
        """Frames are compacted as objects are freed; nothing to do here."""
        return 0

    # -- inspection --------------------------------------------------------

    def objects(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for frame in self.used_frames():
            base = frame << PAGE_SHIFT
            first, middle, last = self.first[frame], self.middle[frame], self.last[frame]
            if first:
                out.append((self.first_pgno[frame], base, ((base, base + (first << CHUNK_SHIFT)),)))
            if middle:
                start = base + (first << CHUNK_SHIFT)
                end = start + (middle << CHUNK_SHIFT)
                out.append((self.middle_pgno[frame], start, ((start, end),)))
            if last:
                start = base + PAGE_SIZE - (last << CHUNK_SHIFT)
                out.append((self.last_pgno[frame], start, ((start, base + PAGE_SIZE),)))
        return out

    def check(self) -> None:
        used = set(self.used_frames())
        free = set(self.arena.free_frames())
        lru = self.lru.coldest(self.arena.frame_count + 1)
        assert sorted(lru) == sorted(used), "the LRU does not list exactly the frames in use"
        assert not used & free, "a frame is both on the LRU and free"
        assert len(used) + len(free) == self.arena.frame_count, "a frame is lost"
        assert len(used) == self.arena.frames_used, "frames_used disagrees with the LRU"
        for frame in range(self.arena.frame_count):
            first, middle, last = self.first[frame], self.middle[frame], self.last[frame]
            lst = self.unbuddied.list_of[frame]
            if frame in free:
                assert first == middle == last == 0, f"free frame {frame} holds data"
                assert lst == NIL, f"free frame {frame} is on an unbuddied list"
                continue
            assert first or last, f"frame {frame} is used but empty"
            assert first or not middle, f"frame {frame} has a middle object but no first"
            spare = NCHUNKS - first - middle - last
            assert spare >= 0, f"objects overlap in frame {frame}"
            if spare and not (first and middle and last):
                assert lst == spare, f"frame {frame} on the wrong unbuddied list"
            else:
                assert lst == NIL, f"frame {frame} should be on no unbuddied list"
        for i in range(NCHUNKS + 1):
            frames = self.unbuddied.walk(i)
            assert all(self.unbuddied.list_of[f] == i for f in frames), f"unbuddied[{i}] is off"
            assert bool(frames) == bool(self.unbuddied.nonempty >> i & 1), "nonempty mask is off"

    def stats(self) -> dict[str, int]:
        unbuddied = self.unbuddied.count()
        return {
            "buddied_frames": self.arena.frames_used - unbuddied,
            "unbuddied_frames": unbuddied,
            "middle_moves": self.middle_moves,
        }

    @property
    def frame_metadata_bytes(self) -> int:
        return (
            len(self.first) * 3
            + self.first_pgno.itemsize * len(self.first_pgno) * 3
            + self.unbuddied.nbytes
            + self.lru.nbytes
            + self.lru.stamp.nbytes
        )

    @property
    def page_metadata_bytes(self) -> int:
        return 0
