"""A hostile peer for tests/test_ring_group_hostile.py: flips a group's extent-0 fields from
another process.

    python group_flipper.py FD SPAN OFFSET MILLIS HDR0 OFF:FMT,OFF:FMT,...

Maps the inherited memfd FD (SPAN bytes) read-write, prints ``go``, then for MILLIS ms writes
plausible and garbage values into the listed fields (offsets from OFFSET; those of the slot header
at HDR0 get values a ring switch could carry).
"""

import mmap
import random
import struct
import sys
import time

fd, span, offset, millis, hdr0 = (int(x) for x in sys.argv[1:6])
fields = [tuple(f.split(":")) for f in sys.argv[6].split(",")]
fields = [(int(off), fmt) for off, fmt in fields]
m = mmap.mmap(fd, span)
rnd = random.Random(2)
end = time.monotonic() + millis / 1000
sys.stdout.write("go\n")
sys.stdout.flush()
while time.monotonic() < end:
    for off, fmt in fields:
        if rnd.random() < 0.1:
            v = rnd.getrandbits(64 if fmt == "<Q" else 32)
        elif off >= hdr0 and off - hdr0 in (8, 32):  # sw_seq, sw_ext
            v = rnd.randrange(3)
        elif off >= hdr0 and off - hdr0 == 12:  # sw_log2
            v = rnd.choice([12, 13, 16])
        else:
            v = rnd.randrange(4097)
        struct.pack_into(fmt, m, offset + off, v)
