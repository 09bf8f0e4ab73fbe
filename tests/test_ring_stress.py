"""Two processes, one ring: a producer child streams >= 1 GiB to this (consumer) process.

Each side owns a sealed memfd (F_SEAL_SHRINK | F_SEAL_GROW) and maps the other's PROT_READ;
doorbells are eventfds passed to the child. Chunk sizes, write styles and read sizes are random;
CRC32 and byte counts of both sides must agree, EOF must arrive at exactly the end, and a wait
that is not woken within WAKE_TIMEOUT fails the test (a lost wake-up).

Run directly, this file is the producer: python test_ring_stress.py producer ARGS...
"""

import fcntl
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

WAKE_TIMEOUT = 3.0  # seconds: far above any honest wake-up, far below the test's bound
STRESS_BYTES = int(os.environ.get("SMCISH_RING_STRESS_BYTES", 1 << 30))


def make_region(capacity):
    from smcish.ring import region_size

    fd = os.memfd_create("smcish-stress", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, region_size(capacity))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def wait_doorbell(fd, what):
    from smcish.ring import drain_doorbell

    ready, _, _ = select.select([fd], [], [], WAKE_TIMEOUT)
    if not ready:
        raise TimeoutError(f"lost wake-up: no doorbell within {WAKE_TIMEOUT} s while waiting for {what}")
    drain_doorbell(fd)


def chunk_size(rnd, largest):
    """Log-uniform in [1, largest]: many tiny writes and many large ones."""
    return max(1, int(math.exp(rnd.uniform(0, math.log(largest)))))


# -------------------------------------------------------------------------------- the producer

def producer(my_fd, peer_fd, my_cap, peer_cap, my_efd, peer_efd, total, seed):
    from smcish.ring import ST_ABORT, ST_CLOSED, Ring, region_size

    mine = mmap.mmap(my_fd, region_size(my_cap))
    peer = mmap.mmap(peer_fd, region_size(peer_cap), prot=mmap.PROT_READ)
    r = Ring(mine, peer, my_cap, peer_cap, peer_efd)
    rnd = random.Random(seed)
    pool = memoryview(rnd.randbytes(4 << 20))
    crc = sent = sleeps = prepares = 0
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
                prepares += 1
                bits = r.prepare_sleep_tx()
                if bits == 0:
                    sleeps += 1
                    wait_doorbell(my_efd, "space")
                    r.clear_wants()
                elif bits & (ST_CLOSED | ST_ABORT):
                    raise RuntimeError("consumer went away")
    r.set_eof()
    print(sent, crc, sleeps, prepares, r.doorbells, flush=True)
    r.close()


# -------------------------------------------------------------------------------- the consumer

@pytest.mark.parametrize("ring_cap, total, spin_us", [
    (256 << 10, STRESS_BYTES, 50),       # big transfer, spin then sleep
    (4096, min(STRESS_BYTES, 24 << 20), 0),  # tiny ring, no spinning: thousands of sleeps
])
def test_two_process_stream(ring_cap, total, spin_us):
    from smcish.ring import ST_ABORT, ST_DATA, ST_EOF, Ring, region_size

    back_cap = 4096
    prod_fd, cons_fd = make_region(ring_cap), make_region(back_cap)
    prod_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the producer sleeps on it
    cons_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # we sleep on it
    seed = random.randrange(1 << 30)
    child = spawn_python(script=os.path.abspath(__file__),
                         args=["producer", prod_fd, cons_fd, ring_cap, back_cap, prod_efd, cons_efd,
                               total, seed],
                         pass_fds=[prod_fd, cons_fd, prod_efd, cons_efd], stdin=None, name="producer")
    mine = mmap.mmap(cons_fd, region_size(back_cap))
    peer = mmap.mmap(prod_fd, region_size(ring_cap), prot=mmap.PROT_READ)
    r = Ring(mine, peer, back_cap, ring_cap, prod_efd)
    rnd = random.Random(seed ^ 0x5A5A)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    crc = received = sleeps = prepares = 0
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
                prepares += 1
                bits = r.prepare_sleep_rx()
                if bits == 0:
                    sleeps += 1
                    wait_doorbell(cons_efd, "data")
                    r.clear_wants()
                    continue
            assert not bits & ST_ABORT
            if bits & ST_EOF and not bits & ST_DATA:
                break
        returncode, out = child.output(30)
        assert returncode == 0
        sent, sent_crc, producer_sleeps, producer_prepares, producer_doorbells = map(int, out.split())
        assert received == sent == total
        assert crc == sent_crc
        assert r.read_into(view) == 0 and r.status() & ST_EOF
        # the sleep protocol was exercised, and doorbells stayed suppressed: at most one per
        # announced sleep epoch (+1 for EOF)
        assert sleeps + producer_sleeps > 0
        assert producer_doorbells <= prepares + 1 and r.doorbells <= producer_prepares
        print(f"\n{total} B over a {ring_cap} B ring: consumer sleeps {sleeps}/{prepares}, "
              f"producer sleeps {producer_sleeps}/{producer_prepares}, doorbells "
              f"{producer_doorbells} + {r.doorbells}")
    finally:
        child.stop()
        r.close()
        mine.close()
        peer.close()
        for fd in (prod_fd, cons_fd, prod_efd, cons_efd):
            os.close(fd)


if __name__ == "__main__" and len(sys.argv) == 10 and sys.argv[1] == "producer":
    producer(*map(int, sys.argv[2:]))
