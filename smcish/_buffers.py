"""Buffer helpers for the receive path: fill bytes and bytearrays without zeroing them first.

CPython zero-fills ``bytearray(n)`` and ``bytes(n)``; on the hot receive path that is a pass over the
data as costly as the copy itself. These helpers use the C API (through ctypes) to make objects of
the right size whose contents the ring then overwrites completely.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

_api = ctypes.pythonapi
_PyBytes_FromStringAndSize = _api.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_PyBytes_FromStringAndSize.restype = ctypes.py_object
# The same function, typed: restype py_object hands back the new bytes object itself.
_bytes_new: Callable[[bytes | None, int], bytes] = _PyBytes_FromStringAndSize
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
