"""The deterministic byte stream the hardening agents send and check, and tests/hardening/conftest.py
with them: period 1,000,003 (a prime, so misplaced bytes show), from a fixed seed."""

import random

PATTERN_SEED = 1234
PATTERN_PERIOD = 1_000_003
PATTERN2 = random.Random(PATTERN_SEED).randbytes(PATTERN_PERIOD) * 2


def pattern_at(offset: int, n: int) -> bytes:
    """``n`` bytes of the stream from ``offset``."""
    out = bytearray()
    while n:
        start = offset % PATTERN_PERIOD
        take = min(n, PATTERN_PERIOD)
        out += PATTERN2[start:start + take]
        offset += take
        n -= take
    return bytes(out)
