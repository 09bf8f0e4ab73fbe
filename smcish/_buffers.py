"""Buffer helpers for the receive path: fill bytes and bytearrays without zeroing them first.

CPython zero-fills ``bytearray(n)`` and ``bytes(n)``; on the hot receive path that is a pass over the
data as costly as the copy itself. These helpers use the C API (through ctypes) to make objects of
the right size whose contents the ring then overwrites completely.
"""

from __future__ import annotations

import ctypes

_api = ctypes.pythonapi
_bytes_new = _api.PyBytes_FromStringAndSize
_bytes_new.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_bytes_new.restype = ctypes.py_object
_bytearray_resize = _api.PyByteArray_Resize
_bytearray_resize.argtypes = (ctypes.py_object, ctypes.c_ssize_t)
_bytearray_resize.restype = ctypes.c_int


def new_bytes(n: int) -> bytes:
    """A new, not shared, uninitialised bytes object of length ``n >= 1`` for C code to fill.

    Only the caller holds it and its hash is not computed yet, so filling it in place before
    anyone else sees it is safe (n == 0 would be the shared empty-bytes singleton: refused).
    """
    if n < 1:
        raise ValueError("new_bytes() needs n >= 1")
    return _bytes_new(None, n)


def grow(buf: bytearray, n: int) -> None:
    """Resize ``buf`` to ``len(buf) + n`` without initialising the new tail (caller overwrites it).

    Raises:
        BufferError: ``buf`` has live exports (a memoryview on it), as any resize would.
    """
    if _bytearray_resize(buf, len(buf) + n) != 0:  # pragma: no cover - ctypes raises first
        raise MemoryError
