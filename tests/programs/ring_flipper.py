"""A hostile peer for tests/test_ring_hostile.py: flips a ring header's fields from another process.

    python ring_flipper.py FD SPAN OFFSET MILLIS

Maps the inherited memfd FD (SPAN bytes) read-write, prints ``go``, then for MILLIS ms writes
plausible and garbage values into the header at OFFSET (cursors, flags, capacity) and the payload.
"""

import mmap
import os
import random
import struct
import sys
import time

fd, span, offset, seconds = (int(x) for x in sys.argv[1:5])
m = mmap.mmap(fd, span)
rnd = random.Random(2)
end = time.monotonic() + seconds / 1000
offs = [(0, "<Q"), (128, "<Q"), (256, "<I"), (260, "<I"), (264, "<I"), (272, "<Q")]
i = 0
os.write(1, b"go\n")
while time.monotonic() < end:
    for off, fmt in offs:
        i += 1
        if rnd.random() < 0.1:  # garbage
            v = rnd.getrandbits(64 if fmt == "<Q" else 32)
        elif off == 256:
            v = rnd.getrandbits(3)
        else:  # plausible for a fresh 4 KiB ring
            v = rnd.randrange(4097)
        struct.pack_into(fmt, m, offset + off, v)
    # and the payload, which is never trusted for anything
    m[offset + 512 + (i % 4096)] = i & 0xFF
