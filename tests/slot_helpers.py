"""Test helpers for link groups and slot rings: sealed memfd extents, two honest sides, blocks.

Each side owns its extents (sealed memfds, F_SEAL_SHRINK | F_SEAL_GROW) and maps them read-write;
the other side maps them with PROT_READ, so a store into a peer mapping would kill the test with
SIGSEGV. Doorbells are real eventfds: side X sleeps on X.efd, the peer's Group rings it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` from anywhere, and child processes
    sys.path.insert(0, str(REPO))

from smcish import ring  # noqa: E402
from smcish.ring import Extent, Group, Ring  # noqa: E402

U64 = 1 << 64
MiB = 1 << 20


def sealed_memfd(size: int, name: str = "smcish-slot-test") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Memfd:
    """A sealed memfd with the owner's read-write mapping and the peer's read-only one."""

    def __init__(self, size: int):
        self.size = size
        self.fd = sealed_memfd(size)
        self.rw = mmap.mmap(self.fd, size)
        self.ro = mmap.mmap(self.fd, size, prot=mmap.PROT_READ)

    def put_u64(self, off, value):
        struct.pack_into("<Q", self.rw, off, value % U64)

    def put_u32(self, off, value):
        struct.pack_into("<I", self.rw, off, value % (1 << 32))

    def get_u64(self, off):
        return struct.unpack_from("<Q", self.rw, off)[0]

    def get_u32(self, off):
        return struct.unpack_from("<I", self.rw, off)[0]

    def close(self):
        self.rw.close()
        self.ro.close()
        os.close(self.fd)


def hdr(slot: int) -> int:
    """Offset of slot `slot`'s header in an extent 0."""
    return ring.G_OFF_HDRS + slot * ring.HEADER_SIZE


class Side:
    """One side of a group: extent 0 (control + headers + a small heap), heap extents, a doorbell."""

    def __init__(self, max_slots: int, heap_sizes=(4 * MiB, 4 * MiB), ext0_heap: int = 256 << 10):
        self.mem = {0: Memfd(ring.heap0(max_slots) + ext0_heap)}
        for i, size in enumerate(heap_sizes, start=1):
            self.mem[i] = Memfd(size)
        self.rw = {i: Extent(m.rw, True) for i, m in self.mem.items()}
        self.ro = {i: Extent(m.ro, False) for i, m in self.mem.items()}
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.heap0 = ring.heap0(max_slots)

    @property
    def ext0(self) -> Memfd:
        return self.mem[0]

    def close(self):
        for ext in (*self.rw.values(), *self.ro.values()):
            ext.release()
        for m in self.mem.values():
            m.close()
        os.close(self.efd)


class GroupPair:
    """Two honest sides of one link group in this process: A (client) and B (server).

    ga is A's Group (rings B's doorbell b.efd), gb is B's. Every heap extent of each side is
    attached to the other side's group under the same index.
    """

    def __init__(self, max_slots: int = 128, heap_sizes=(4 * MiB, 4 * MiB)):
        self.max_slots = max_slots
        self.a = Side(max_slots, heap_sizes)
        self.b = Side(max_slots, heap_sizes)
        self.ga = Group(self.a.rw[0], self.b.ro[0], self.b.efd, ring.ROLE_CLIENT, max_slots)
        self.gb = Group(self.b.rw[0], self.a.ro[0], self.a.efd, ring.ROLE_SERVER, max_slots)
        for i in range(1, len(heap_sizes) + 1):
            self.ga.add_peer_extent(i, self.b.ro[i])
            self.gb.add_peer_extent(i, self.a.ro[i])
        self.rings: list[Ring] = []

    def slot_rings(self, slot, cap_a=4096, cap_b=4096, at_a=(1, 0), at_b=(1, 0), start_a=0, start_b=0):
        """Rings of both sides in `slot`: A's tx block at_a = (extent, offset), B's at_b.

        start_a/start_b preset the cursors of A's/B's direction consistently in both headers.
        """
        self.a.ext0.put_u64(hdr(slot) + ring.OFF_PROD, start_a)
        self.b.ext0.put_u64(hdr(slot) + ring.OFF_CONS_PEER, start_a)
        self.b.ext0.put_u64(hdr(slot) + ring.OFF_PROD, start_b)
        self.a.ext0.put_u64(hdr(slot) + ring.OFF_CONS_PEER, start_b)
        ra = Ring.in_slot(self.ga, slot, self.a.rw[at_a[0]], at_a[1], cap_a,
                          at_b[0], at_b[1], cap_b.bit_length() - 1)
        rb = Ring.in_slot(self.gb, slot, self.b.rw[at_b[0]], at_b[1], cap_b,
                          at_a[0], at_a[1], cap_a.bit_length() - 1)
        self.rings += [ra, rb]
        return ra, rb

    def close(self):
        for r in self.rings:
            r.close()
        self.ga.close()
        self.gb.close()
        self.a.close()
        self.b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Blocks:
    """A first-fit placer of ring blocks (capacity-aligned) in one side's extents."""

    def __init__(self, sizes: dict[int, tuple[int, int]]):
        self.sizes = sizes  # extent index -> (first usable offset, end)
        self.live: list[tuple[int, int, int]] = []  # (ext, off, cap)

    def take(self, ext: int, off: int, cap: int) -> None:
        self.live.append((ext, off, cap))

    def alloc(self, cap: int, prefer: int) -> tuple[int, int] | None:
        order = [prefer] + [e for e in self.sizes if e != prefer]
        for ext in order:
            lo, hi = self.sizes[ext]
            off = -(-lo // cap) * cap
            while off + cap <= hi:
                if all(e != ext or off + cap <= o or o + c <= off for e, o, c in self.live):
                    self.live.append((ext, off, cap))
                    return ext, off
                off += cap
        return None

    def free(self, ext: int, off: int, cap: int) -> None:
        self.live.remove((ext, off, cap))


def payload(n: int, seed: int) -> bytes:
    """Deterministic, position-dependent bytes (a wrong offset shows up as a mismatch)."""
    if n == 0:
        return b""
    block = bytes((seed * 131 + i * 7) & 0xFF for i in range(256))
    return (block * (n // 256 + 1))[:n]
