"""Buddy allocator for ring blocks inside a link group's extents (docs/design.md section 2.5).

Blocks are powers of two from 4 KiB up, and a block of size s sits at an offset that is a
multiple of s within its extent: the peer can then check a block it is told about with two
comparisons, and a ring of capacity s never straddles anything. The allocator only does
arithmetic; it never touches memory. It is used from one thread (the hub's loop).
"""

from __future__ import annotations

from typing import NamedTuple

MIN_ORDER = 12            # 4 KiB
MAX_ORDER = 30            # 1 GiB


class Block(NamedTuple):
    """A block of ``size`` bytes at ``off`` in extent ``ext``."""

    ext: int
    off: int
    size: int


def _aligned_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """The largest aligned power-of-two blocks (order >= MIN_ORDER) covering [start, end)."""
    out = []
    pos = start
    while pos < end:
        order = MAX_ORDER
        while order > MIN_ORDER and (pos % (1 << order) or pos + (1 << order) > end):
            order -= 1
        size = 1 << order
        if pos % size or pos + size > end:
            break                      # what is left is smaller than the minimum block
        out.append((order, pos))
        pos += size
    return out


class BuddyAllocator:
    """Power-of-two blocks over extents added with ``add_extent(index, start, end)``.

    ``start`` lets extent 0 keep its control area and slot headers out of the heap.
    """

    def __init__(self) -> None:
        self._free: dict[int, set[tuple[int, int]]] = {o: set() for o in range(MIN_ORDER, MAX_ORDER + 1)}
        self._extents: dict[int, tuple[int, int]] = {}       # index -> (start, end)
        self._used: dict[int, int] = {}                      # index -> bytes allocated
        self._high: dict[int, int] = {}                      # index -> highest end ever allocated
        self._blocks = 0

    # ------------------------------------------------------------------ extents
    def add_extent(self, index: int, start: int, end: int) -> None:
        if index in self._extents:
            raise ValueError(f"extent {index} already added")
        self._extents[index] = (start, end)
        self._used[index] = 0
        self._high[index] = start
        for order, off in _aligned_blocks(start, end):
            self._free[order].add((index, off))

    def remove_extent(self, index: int) -> None:
        """Forget an extent that holds no block (raises ValueError otherwise)."""
        if self._used.get(index):
            raise ValueError(f"extent {index} still holds {self._used[index]} bytes")
        del self._extents[index], self._used[index], self._high[index]
        for order in self._free:
            self._free[order] = {b for b in self._free[order] if b[0] != index}

    @property
    def extents(self) -> list[int]:
        return sorted(self._extents)

    def used(self, index: int) -> int:
        return self._used.get(index, 0)

    def high_water(self, index: int) -> int:
        """Highest offset ever handed out in extent ``index`` (the pool zeroes only below it)."""
        return self._high.get(index, 0)

    def largest_free(self) -> int:
        for order in range(MAX_ORDER, MIN_ORDER - 1, -1):
            if self._free[order]:
                return 1 << order
        return 0

    @property
    def blocks(self) -> int:
        return self._blocks

    # ------------------------------------------------------------------ blocks
    def alloc(self, size: int) -> Block | None:
        """A block of exactly ``size`` bytes (a power of two >= 4 KiB), or None if none fits."""
        order = size.bit_length() - 1
        if size != 1 << order or not MIN_ORDER <= order <= MAX_ORDER:
            raise ValueError(f"block size {size} is not a power of two in [4 KiB, 1 GiB]")
        found = order
        while found <= MAX_ORDER and not self._free[found]:
            found += 1
        if found > MAX_ORDER:
            return None
        # Lowest address first: keeps extents compact, so idle ones empty out and can be returned.
        ext, off = min(self._free[found])
        self._free[found].discard((ext, off))
        while found > order:                    # split, keep the lower half
            found -= 1
            self._free[found].add((ext, off + (1 << found)))
        self._used[ext] += size
        self._high[ext] = max(self._high[ext], off + size)
        self._blocks += 1
        return Block(ext, off, size)

    def free(self, block: Block) -> None:
        ext, off, size = block
        if ext not in self._extents:
            raise ValueError(f"block in unknown extent {ext}")
        order = size.bit_length() - 1
        self._used[ext] -= size
        self._blocks -= 1
        while order < MAX_ORDER:
            buddy = (ext, off ^ (1 << order))
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)
            off = min(off, buddy[1])
            order += 1
        self._free[order].add((ext, off))
