"""A pooled region is zeroed before reuse: all of it, or the leading bytes the owner says it wrote."""

from __future__ import annotations

import ism_backend

SIZE = 512 + 65536


def _reuse(device, write_at, written):
    region = device.alloc(SIZE)
    mem = region.mem
    for offset in write_at:
        mem[offset] = 0xAB
    device.free(region, written)
    again = device.alloc(SIZE)           # nobody attached it: straight back from the pool
    try:
        return bytes(again.mem)
    finally:
        device.free(again)


def test_reuse_zeroes_everything_without_a_hint(tmp_path):
    with ism_backend.open_device("embedded") as device:
        data = _reuse(device, [0, 5000, SIZE - 1], None)
        assert data == bytes(SIZE)


def test_reuse_zeroes_the_written_extent(tmp_path):
    with ism_backend.open_device("embedded") as device:
        data = _reuse(device, [0, 511, 512, 4999], 5000)
        assert data == bytes(SIZE)


def test_hint_bounds_the_zeroing(tmp_path):
    """The hint is trusted (it comes from our own ring): bytes past it are not touched, which is
    what makes short connections cheap to recycle. The transport passes header + bytes sent."""
    with ism_backend.open_device("embedded") as device:
        data = _reuse(device, [100, 6000], 5000)
        assert data[100] == 0 and data[6000] == 0xAB
