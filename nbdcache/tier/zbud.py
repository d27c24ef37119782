"""zbud: at most two compressed pages ("buddies") per frame.

After mm/zbud.c.  The *first* buddy starts at the beginning of the frame and
the *last* buddy ends at its end, so the free space between them is always
one run and either buddy can grow into it (an overwrite stays in place when
it fits).  Space is counted in 64-byte chunks.  A frame holding one buddy
sits on the unbuddied list indexed by its free chunks; allocation takes the
frame with the fewest free chunks that still fit (best fit), or a fresh
frame.  Every allocation makes its frame the most recent in the LRU (a
`StampLRU` of frames); eviction takes whole frames from the cold end, which
makes writeback predictable: evicting one frame always frees one frame.

The frame header of the kernel (chunk counts, list links, the owner of each
buddy: the reverse map eviction needs) is kept in side arrays, not in the
frame, so all 64 chunks of a frame hold data; those arrays are this
allocator's fixed overhead (`frame_metadata_bytes`: 23 bytes per frame, plus
the LRU queue, at most 16 bytes per frame in use).
"""

from __future__ import annotations

from array import array
from typing import Final

from nbdcache.tier import PAGE_SHIFT, PAGE_SIZE
from nbdcache.tier.arena import (
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


class Zbud(FrameEviction):
    """Two buddies per frame; see the module docstring."""

    name = "zbud"

    def __init__(self, arena: Arena, table: PageTable) -> None:
        frames = arena.frame_count
        self.arena = arena
        self.handles = table.handle
        self.first = bytearray(frames)  # chunks of the first buddy (0: none)
        self.last = bytearray(frames)  # chunks of the last buddy (0: none)
        self.first_pgno = array("I", bytes(4 * frames))  # reverse map
        self.last_pgno = array("I", bytes(4 * frames))
        # unbuddied[i]: frames with one buddy and i free chunks.
        self.unbuddied = FrameLists(frames, NCHUNKS + 1)
        self.lru = StampLRU(frames, self._frame_live, lambda: arena.frames_used)
        self.buddied = 0

    # -- allocation --------------------------------------------------------

    def alloc(self, size: int, pgno: int, reserve: bool) -> int:
        chunks = (size + _CHUNK_ROUND) >> CHUNK_SHIFT
        lists = self.unbuddied
        fits = lists.nonempty >> chunks
        if fits:
            frame = lists.head[chunks + (fits & -fits).bit_length() - 1]
            lists.remove(frame)
            self.buddied += 1
            if self.first[frame] == 0:
                self.first[frame] = chunks
                self.first_pgno[frame] = pgno
                addr = frame << PAGE_SHIFT
            else:
                self.last[frame] = chunks
                self.last_pgno[frame] = pgno
                addr = ((frame + 1) << PAGE_SHIFT) - (chunks << CHUNK_SHIFT)
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
        if addr & _OFFSET_MASK == 0:
            other = self.last[frame]
            if chunks + other > NCHUNKS:
                return NIL
            if self.first[frame] != chunks:
                self.first[frame] = chunks
                if other == 0:
                    self._relist(frame, chunks)
        else:
            other = self.first[frame]
            # A last buddy never reaches offset 0, where it would read as first.
            if chunks + other > NCHUNKS or chunks == NCHUNKS:
                return NIL
            if self.last[frame] != chunks:
                self.last[frame] = chunks
                addr = ((frame + 1) << PAGE_SHIFT) - (chunks << CHUNK_SHIFT)
                if other == 0:
                    self._relist(frame, chunks)
        self.lru.push(frame)
        return addr << HANDLE_SHIFT | size

    def _relist(self, frame: int, chunks: int) -> None:
        """Refile a one-buddy frame whose buddy now has `chunks` chunks."""
        self.unbuddied.remove(frame)
        if chunks < NCHUNKS:
            self.unbuddied.push(NCHUNKS - chunks, frame)

    def free(self, handle: int) -> None:
        addr = handle >> HANDLE_SHIFT
        frame = addr >> PAGE_SHIFT
        if addr & _OFFSET_MASK == 0:
            self.first[frame] = 0
            other = self.last[frame]
        else:
            self.last[frame] = 0
            other = self.first[frame]
        if other:
            # It had two buddies: it now has room.
            self.buddied -= 1
            self.unbuddied.push(NCHUNKS - other, frame)
        else:
            self.unbuddied.remove(frame)
            self.arena.free_frame(frame)

    def write_span(self, addr: int, data: bytes | memoryview) -> None:
        raise AssertionError("zbud objects never straddle frames")

    def read_span(self, addr: int, size: int) -> bytes:
        raise AssertionError("zbud objects never straddle frames")

    # -- LRU ---------------------------------------------------------------

    def _frame_live(self, frame: int) -> bool:
        return bool(self.first[frame] or self.last[frame])

    def used_frames(self) -> list[int]:
        """Frames holding at least one object, in frame order."""
        return [f for f in range(self.arena.frame_count) if self.first[f] or self.last[f]]

    def frame_pages(self, frame: int) -> list[int]:
        """The pages living in `frame` (what evicting it would write back)."""
        pages = []
        if self.first[frame]:
            pages.append(self.first_pgno[frame])
        if self.last[frame]:
            pages.append(self.last_pgno[frame])
        return pages

    def compact(self) -> int:
        """zbud frames are never sparse enough to be worth compacting."""
        return 0

    # -- inspection --------------------------------------------------------

    def objects(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        for frame in self.used_frames():
            base = frame << PAGE_SHIFT
            first = self.first[frame]
            if first:
                out.append((self.first_pgno[frame], base, ((base, base + (first << CHUNK_SHIFT)),)))
            last = self.last[frame]
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
        buddied = 0
        for frame in range(self.arena.frame_count):
            first, last = self.first[frame], self.last[frame]
            lst = self.unbuddied.list_of[frame]
            if frame in free:
                assert first == 0 and last == 0 and lst == NIL, f"free frame {frame} holds data"
                continue
            assert first or last, f"frame {frame} is used but empty"
            assert first + last <= NCHUNKS, f"buddies overlap in frame {frame}"
            if first and last:
                buddied += 1
                assert lst == NIL, f"buddied frame {frame} is on an unbuddied list"
            elif first + last < NCHUNKS:
                assert lst == NCHUNKS - first - last, f"frame {frame} on the wrong list"
            else:
                assert lst == NIL, f"full frame {frame} is on an unbuddied list"
        assert buddied == self.buddied, "buddied count is off"
        for i in range(NCHUNKS + 1):
            frames = self.unbuddied.walk(i)
            assert all(self.unbuddied.list_of[f] == i for f in frames), f"unbuddied[{i}] is off"
            assert bool(frames) == bool(self.unbuddied.nonempty >> i & 1), "nonempty mask is off"

    def stats(self) -> dict[str, int]:
        unbuddied = self.unbuddied.count()
        return {
            "buddied_frames": self.buddied,
            "unbuddied_frames": unbuddied,
            "full_frames": self.arena.frames_used - self.buddied - unbuddied,
        }

    @property
    def frame_metadata_bytes(self) -> int:
        return (
            len(self.first)
            + len(self.last)
            + self.first_pgno.itemsize * (len(self.first_pgno) + len(self.last_pgno))
            + self.unbuddied.nbytes
            + self.lru.nbytes
            + self.lru.stamp.nbytes
        )

    @property
    def page_metadata_bytes(self) -> int:
        return 0
