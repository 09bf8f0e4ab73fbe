"""``python store_into_readonly_map.py FD SIZE``: map the inherited fd FD read-only and shared (what
an attacher of a region has), print ``mapped``, then store a byte: it must die with SIGSEGV (it
prints ``WROTE`` if the store went through). For tests/hardening/test_permissions.py.
"""

import ctypes
import sys

fd, size = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
addr = libc.mmap(None, size, 1, 1, fd, 0)        # PROT_READ, MAP_SHARED: what an attacher has
print("mapped", flush=True)
ctypes.memset(addr, 0x41, 1)                     # must die with SIGSEGV
print("WROTE", flush=True)
