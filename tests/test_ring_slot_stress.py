"""Two processes, one link group, one slot ring with random grow/shrink switches.

A producer child (client role) streams to this (consumer, server role) process through slot
SLOT of a link group: each side owns a sealed memfd extent 0 and a heap extent and maps the
other's PROT_READ; the group doorbells are eventfds passed to the child. Chunk sizes, write
styles, read sizes and ring switches (capacities 4 KiB .. 4 MiB, at random points) are random.
CRC32 and byte counts of both sides must agree, EOF must arrive at exactly the end, every switch
must be followed, and a wait not woken within WAKE_TIMEOUT fails the test (a lost wake-up).

Run directly, this file is the producer: python test_ring_slot_stress.py producer ARGS...
"""

import itertools
import math
import mmap
import os
import random
import select
import sys
import time
import zlib

import pytest

from benchmarks.children import spawn_python
from slot_helpers import sealed_memfd

WAKE_TIMEOUT = 3.0  # seconds: far above any honest wake-up, far below the test's bound
STRESS_BYTES = int(os.environ.get("SMCISH_RING_SLOT_STRESS_BYTES", 256 << 20))
SLOTS = 128
SLOT = 77
HALF = 8 << 20  # the producer's heap extent: two halves, the current block in one, the next in the other
CONS_HEAP = 1 << 16


def chunk_size(rnd, largest):
    """Log-uniform in [1, largest]: many tiny writes and many large ones."""
    return max(1, int(math.exp(rnd.uniform(0, math.log(largest)))))


def wait_doorbell(fd, what):
    from smcish.ring import drain_doorbell

    ready, _, _ = select.select([fd], [], [], WAKE_TIMEOUT)
    if not ready:
        raise TimeoutError(f"lost wake-up: no doorbell within {WAKE_TIMEOUT} s while waiting for {what}")
    drain_doorbell(fd)


class Endpoint:
    """One side: its group over (own extent 0, peer extent 0), the peer's heap extent attached."""

    def __init__(self, fds, sizes, role, peer_efd):
        from smcish.ring import Extent, Group

        my0, my1, peer0, peer1 = fds
        self.maps = [mmap.mmap(my0, sizes[0]), mmap.mmap(my1, sizes[1]),
                     mmap.mmap(peer0, sizes[2], prot=mmap.PROT_READ),
                     mmap.mmap(peer1, sizes[3], prot=mmap.PROT_READ)]
        self.exts = [Extent(self.maps[0], True), Extent(self.maps[1], True),
                     Extent(self.maps[2], False), Extent(self.maps[3], False)]
        self.group = Group(self.exts[0], self.exts[2], peer_efd, role, SLOTS)
        self.group.add_peer_extent(1, self.exts[3])
        self.heap = self.exts[1]
        self.group_prepares = self.sleeps = 0

    def sleep(self, my_efd, r, what):
        """Arm the group (the ring is armed already), sleep unless something is pending."""
        self.group_prepares += 1
        if not self.group.prepare_sleep():
            self.sleeps += 1
            wait_doorbell(my_efd, what)
            self.group.clear_wake()
        self.group.take()  # one slot only: the entries themselves carry nothing new
        r.clear_wants()

    def close(self, r):
        r.close()
        self.group.close()
        for ext in self.exts:
            ext.release()
        for m in self.maps:
            m.close()


# -------------------------------------------------------------------------------- the producer

def producer(p0, p1, c0, c1, my_efd, peer_efd, total, seed, caps_log2_max, switch_every, spin_us):
    from smcish.ring import ROLE_CLIENT, ST_ABORT, ST_CLOSED, Ring, heap0

    ep = Endpoint((p0, p1, c0, c1), (heap0(SLOTS), 2 * HALF, heap0(SLOTS), CONS_HEAP),
                  ROLE_CLIENT, peer_efd)
    r = Ring.in_slot(ep.group, SLOT, ep.heap, 0, 1 << 16, 1, 0, 12)
    rnd = random.Random(seed)
    caps = [1 << k for k in range(12, caps_log2_max + 1)]
    half = 0  # which half holds the current block
    pool = memoryview(rnd.randbytes(4 << 20))
    crc = sent = switches = refused = 0
    next_switch = rnd.randrange(switch_every)
    while sent < total:
        size = min(chunk_size(rnd, 1 << 20), total - sent)
        start = rnd.randrange(len(pool) - size + 1)
        style = rnd.random()
        if style < 0.5:
            pending = [pool[start:start + size]]
        elif style < 0.8:  # gather, pieces of random sizes
            cuts = sorted(rnd.randrange(size + 1) for _ in range(rnd.randrange(1, 8)))
            bounds = [0, *cuts, size]
            pending = [pool[start + a:start + b] for a, b in itertools.pairwise(bounds) if b > a]
        else:  # a burst of small bytes messages (the per-message fast path)
            pending = [bytes(pool[start + i:start + min(i + 64, size)]) for i in range(0, size, 64)]
        for part in pending:
            crc = zlib.crc32(part, crc)
        i = 0
        while i < len(pending):
            if sent >= next_switch:
                # The next block goes into the other half: if the switch is allowed, the block
                # before the current one (in that half) is no longer read.
                cap = rnd.choice(caps)
                if r.switch_tx(ep.heap, (1 - half) * HALF, cap, 1):
                    half = 1 - half
                    switches += 1
                else:
                    refused += 1
                next_switch = sent + rnd.randrange(switch_every)
            window = pending[i:i + 256]
            n = r.writev(window) if len(window) > 1 else r.write(window[0])
            sent += n
            while n:  # drop what was written
                head = pending[i]
                if n >= len(head):
                    n -= len(head)
                    i += 1
                else:
                    pending[i] = memoryview(head)[n:]
                    n = 0
            if i < len(pending) and r.tx_space() == 0:
                if spin_us and r.spin_tx(spin_us):
                    continue
                bits = r.prepare_sleep_tx()
                if bits == 0:
                    ep.sleep(my_efd, r, "space")
                elif bits & (ST_CLOSED | ST_ABORT):
                    raise RuntimeError("consumer went away")
    r.set_eof()
    print(sent, crc, switches, refused, ep.sleeps, ep.group_prepares, ep.group.doorbells,
          r.tx_switches, flush=True)
    ep.close(r)


# -------------------------------------------------------------------------------- the consumer

@pytest.mark.parametrize("total, caps_log2_max, switch_every, spin_us", [
    (STRESS_BYTES, 22, 4 << 20, 50),              # 4 KiB .. 4 MiB rings, spin then sleep
    (min(STRESS_BYTES, 16 << 20), 16, 256 << 10, 0),  # small rings, no spinning: many sleeps
])
def test_two_process_slot_stream_with_switches(total, caps_log2_max, switch_every, spin_us):
    from smcish.ring import ROLE_SERVER, ST_ABORT, ST_DATA, ST_EOF, Ring, heap0

    sizes = {"p0": heap0(SLOTS), "p1": 2 * HALF, "c0": heap0(SLOTS), "c1": CONS_HEAP}
    fds = {name: sealed_memfd(size, "smcish-slot-stress") for name, size in sizes.items()}
    prod_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the producer's hub sleeps on it
    cons_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # ours
    seed = random.randrange(1 << 30)
    args = [fds["p0"], fds["p1"], fds["c0"], fds["c1"], prod_efd, cons_efd, total, seed,
            caps_log2_max, switch_every, spin_us]
    child = spawn_python(script=os.path.abspath(__file__), args=["producer", *args],
                         pass_fds=[*fds.values(), prod_efd, cons_efd], stdin=None, name="producer")
    ep = Endpoint((fds["c0"], fds["c1"], fds["p0"], fds["p1"]),
                  (sizes["c0"], sizes["c1"], sizes["p0"], sizes["p1"]), ROLE_SERVER, prod_efd)
    r = Ring.in_slot(ep.group, SLOT, ep.heap, 0, 4096, 1, 0, 16)  # the producer's ring0: 64 KiB at (1, 0)
    rnd = random.Random(seed ^ 0x5A5A)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    crc = received = 0
    deadline = time.monotonic() + 120
    try:
        while True:
            n = r.read_into(view[:chunk_size(rnd, len(buf))])
            if n:
                crc = zlib.crc32(view[:n], crc)
                received += n
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream too slow: {received} of {total} bytes")
            bits = r.spin(spin_us) if spin_us else 0
            if not bits:
                bits = r.prepare_sleep_rx()
                if bits == 0:
                    ep.sleep(cons_efd, r, "data")
                    continue
            assert not bits & ST_ABORT
            if bits & ST_EOF and not bits & ST_DATA:
                break
        returncode, out = child.output(30)
        assert returncode == 0
        (sent, sent_crc, switches, refused, producer_sleeps, producer_prepares, producer_doorbells,
         tx_switches) = map(int, out.split())
        assert received == sent == total
        assert crc == sent_crc
        assert r.read_into(view) == 0 and r.status() & ST_EOF
        # every switch was followed, and there were some of each kind of attempt
        assert r.rx_switches == tx_switches == switches > 0
        # doorbells stayed suppressed: at most one per announced sleep epoch (+1 for EOF)
        assert producer_doorbells <= ep.group_prepares + 1
        assert ep.group.doorbells <= producer_prepares + 1
        if not spin_us:
            assert ep.sleeps + producer_sleeps > 0
        print(f"\n{total} B, {switches} switches ({refused} refused): consumer sleeps "
              f"{ep.sleeps}/{ep.group_prepares}, producer sleeps {producer_sleeps}/{producer_prepares}, "
              f"group doorbells {producer_doorbells} + {ep.group.doorbells}")
    finally:
        child.stop()
        ep.close(r)
        for fd in (*fds.values(), prod_efd, cons_efd):
            os.close(fd)


if __name__ == "__main__" and len(sys.argv) == 13 and sys.argv[1] == "producer":
    producer(*map(int, sys.argv[2:]))
