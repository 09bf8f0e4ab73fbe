"""The buddy allocator of ring blocks (smcish/alloc.py): alignment, no overlap, full merge, bounds."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from smcish.alloc import MIN_ORDER, BuddyAllocator, _aligned_blocks

MiB = 1 << 20


def test_aligned_blocks_cover_the_heap_exactly():
    start, end = 256 * 1024 + 8 * MiB, 16 * MiB
    blocks = _aligned_blocks(start, end)
    pos = start
    for order, off in blocks:
        assert off == pos and off % (1 << order) == 0
        pos += 1 << order
    assert pos == end


def test_block_never_leaves_its_extent_and_is_aligned():
    a = BuddyAllocator()
    a.add_extent(0, 8 * MiB + 256 * 1024, 16 * MiB)
    got = []
    while True:
        b = a.alloc(64 * 1024)
        if b is None:
            break
        assert b.off % b.size == 0
        assert 8 * MiB + 256 * 1024 <= b.off and b.off + b.size <= 16 * MiB
        got.append(b)
    assert len(got) == (16 * MiB - 8 * MiB - 256 * 1024) // (64 * 1024)
    assert a.alloc(4096) is None
    for b in got:
        a.free(b)
    assert a.used(0) == 0 and a.blocks == 0
    assert a.largest_free() == 4 * MiB          # fully merged back


def test_extents_can_be_added_and_removed_when_empty():
    a = BuddyAllocator()
    a.add_extent(0, 4096, 64 * 1024)
    a.add_extent(1, 0, 16 * MiB)
    big = a.alloc(4 * MiB)
    assert big is not None and big.ext == 1
    try:
        a.remove_extent(1)
    except ValueError:
        pass
    else:
        raise AssertionError("removed an extent holding a block")
    a.free(big)
    assert a.high_water(1) == 4 * MiB
    a.remove_extent(1)
    assert a.extents == [0]
    assert a.alloc(1 * MiB) is None


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(MIN_ORDER, 22), st.integers(0, 1000)),
                    max_size=120))
def test_random_alloc_free_keeps_blocks_disjoint(ops):
    a = BuddyAllocator()
    a.add_extent(0, 8 * MiB + 256 * 1024, 16 * MiB)
    a.add_extent(3, 0, 16 * MiB)
    live = []
    for is_alloc, order, pick in ops:
        if is_alloc or not live:
            b = a.alloc(1 << order)
            if b is not None:
                live.append(b)
        else:
            a.free(live.pop(pick % len(live)))
        spans = sorted((b.ext, b.off, b.off + b.size) for b in live)
        for (e1, _s1, t1), (e2, s2, _t2) in itertools.pairwise(spans):
            assert e1 != e2 or t1 <= s2, "overlapping blocks"
        for b in live:
            assert b.off % b.size == 0
        assert sum(b.size for b in live if b.ext == 0) == a.used(0)
    for b in live:
        a.free(b)
    assert a.used(0) == a.used(3) == 0
    assert a.alloc(16 * MiB) is not None        # extent 3 merged back whole
