"""Kernel plumbing for regions: sealed memfds, mappings, eventfd doorbells, SCM_RIGHTS, SO_PEERCRED.

Why the seals (docs/design.md section 2, ../shared/DESIGN.md section 2): a memfd sealed
``F_SEAL_SHRINK | F_SEAL_GROW`` can never be truncated under a mapping (no SIGBUS), and
``F_SEAL_FUTURE_WRITE``, added once the owner holds its writable mapping, makes the kernel refuse
every *new* writable shared mapping and every write(2), whatever fd is used, including an O_RDWR
re-open of ``/proc/self/fd/N``. ``F_SEAL_SEAL`` stops anyone from changing that afterwards.
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import socket
import stat
import struct
import sys
from collections.abc import Iterable

from .errors import DeviceProtocolError

F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)

#: Seals a region carries from creation (the owner can still map it writable).
SIZE_SEALS = F_SEAL_SHRINK | F_SEAL_GROW
#: Seals an attacher requires before mapping: fixed size, nobody can map it writable any more.
ATTACH_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL

PAGE_SIZE = mmap.PAGESIZE
# Python < 3.13 mmap objects keep a private dup() of the fd: one more fd per mapping.
_MMAP_KW = {"trackfd": False} if sys.version_info >= (3, 13) else {}
FDS_PER_MAPPING = 0 if _MMAP_KW else 1
MAX_FDS_PER_MESSAGE = 4
_ZERO_CHUNK = bytes(1 << 18)


def page_round(size: int) -> int:
    """``size`` rounded up to whole pages (what a region really costs)."""
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def create_memory(size: int, name: str = "smcish-region") -> int:
    """A new zeroed memfd of ``page_round(size)`` bytes sealed against shrink and grow.

    Returns:
        The fd (O_RDWR, close-on-exec). The caller maps it, then calls ``seal_written``.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, page_round(size))
        fcntl.fcntl(fd, F_ADD_SEALS, SIZE_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def get_seals(fd: int) -> int:
    """F_GET_SEALS; raises DeviceProtocolError for an fd that is not a sealable memfd."""
    try:
        return fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as exc:
        raise DeviceProtocolError(f"region fd is not a sealable memfd ({exc.strerror}): "
                                  "the device or peer is broken or hostile") from None


def _check_size(fd: int, size: int, offset: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise DeviceProtocolError("region fd is not a memory file: the device or peer is broken")
    if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
        raise DeviceProtocolError(f"bad region geometry size={size} offset={offset}")
    if st.st_size < offset + size:
        raise DeviceProtocolError(
            f"region is {st.st_size} bytes but {offset}+{size} were announced: refusing to map "
            "(a short region would SIGBUS us); the peer is broken or hostile")


def map_owner(fd: int, size: int, offset: int = 0) -> mmap.mmap:
    """Map a region writable for its owner, then seal it so nobody else ever can.

    Raises:
        DeviceProtocolError: the fd lacks the size seals, is already write-sealed, or is short.
    """
    _check_size(fd, size, offset)
    seals = get_seals(fd)
    if seals & SIZE_SEALS != SIZE_SEALS or seals & (F_SEAL_FUTURE_WRITE | F_SEAL_WRITE):
        raise DeviceProtocolError(f"new region has seals {seals:#x}, expected exactly shrink+grow: "
                                  "the device is broken")
    mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=offset, **_MMAP_KW)
    try:
        seal_written(fd)
    except BaseException:
        mem.close()
        raise
    return mem


def seal_written(fd: int) -> None:
    """Add F_SEAL_FUTURE_WRITE | F_SEAL_SEAL (after the owner's writable mapping exists)."""
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL)


def check_attachable(fd: int, size: int, offset: int = 0) -> None:
    """Verify a received region fd before mapping it: all four seals present, not short.

    Raises:
        DeviceProtocolError: seals missing (the owner could still write-map or truncate it) or
            the memory is smaller than announced.
    """
    seals = get_seals(fd)
    if seals & ATTACH_SEALS != ATTACH_SEALS:
        raise DeviceProtocolError(
            f"region seals are {seals:#x}, need {ATTACH_SEALS:#x} (shrink, grow, future-write, "
            "seal): the owner did not seal it; refusing to map")
    _check_size(fd, size, offset)


def map_readonly(fd: int, size: int, offset: int = 0) -> mmap.mmap:
    """Check then map a peer's region PROT_READ (writes through it raise TypeError)."""
    check_attachable(fd, size, offset)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset,
                     **_MMAP_KW)


def map_device(fd: int, size: int, offset: int, writable: bool) -> mmap.mmap:
    """Map ``[offset, offset + size)`` of a device memory file: a guest's PCI BAR
    (``/sys/bus/pci/devices/*/resource2``, docs/vm.md section 2), which has no seals.

    Nobody can truncate a BAR under a mapping, so the only check is that it is not short; who
    may write is decided by the fd's open mode and by the hypervisor (an attacher's BAR is
    backed read-only), not by seals.

    Raises:
        DeviceProtocolError: bad geometry, or the file is smaller than ``offset + size``.
    """
    if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
        raise DeviceProtocolError(f"bad region geometry size={size} offset={offset}")
    have = os.fstat(fd).st_size
    if have < offset + size:
        raise DeviceProtocolError(
            f"device region is {have} bytes but {offset}+{size} were announced: refusing to map "
            "(a short region would SIGBUS us); the guest agent is broken")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset, **_MMAP_KW)


def reopen_readonly(fd: int) -> int:
    """A new O_RDONLY description of the same memory, for handing to an attacher.

    The seals are what enforce read-only (an O_RDONLY fd can be re-opened O_RDWR through /proc);
    this is defence in depth. Falls back to dup() where /proc is not mounted.
    """
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


def attacher_fds(fd: int, doorbell: int) -> tuple[int, int]:
    """The fds an attacher is sent: a read-only description of region ``fd`` and a dup of its
    ``doorbell`` (both new, owned by the caller; nothing is left open on failure)."""
    ro = reopen_readonly(fd)
    try:
        return ro, os.dup(doorbell)
    except OSError:
        os.close(ro)
        raise


def unmap(mem: mmap.mmap) -> bool:
    """Close a mapping; False while buffer exports (memoryviews, cffi buffers) keep it alive."""
    try:
        mem.close()
        return True
    except BufferError:
        return False


def zero(mem: mmap.mmap, size: int) -> None:
    """Zero ``size`` bytes of a writable mapping (pool reuse)."""
    chunk = len(_ZERO_CHUNK)
    view = memoryview(mem)
    try:
        for start in range(0, size, chunk):
            end = min(size, start + chunk)
            view[start:end] = _ZERO_CHUNK[: end - start]
    finally:
        view.release()


# --- doorbells -----------------------------------------------------------------------------

def new_doorbell() -> int:
    """An eventfd (non-blocking, close-on-exec): readable when rung, for ``loop.add_reader``."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def ring(fd: int) -> None:
    """Ring a doorbell (a saturated counter is already rung)."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def drain(fd: int) -> int:
    """Consume pending rings of a doorbell (non-blocking); returns the count read."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# --- messages with fds ---------------------------------------------------------------------

def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring the already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_msg(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """One SOCK_SEQPACKET record, with ``fds`` attached via SCM_RIGHTS (the fds stay ours)."""
    fds = list(fds)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
    else:
        sent = sock.send(data, socket.MSG_NOSIGNAL)
    if sent != len(data):  # seqpacket sends whole records or fails; be explicit anyway
        raise OSError(errno.EMSGSIZE, "short send on a seqpacket socket")


_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)


def recv_msg(sock: socket.socket, maxlen: int) -> tuple[bytes, list[int], bool]:
    """Receive one record and any fds passed with it (received close-on-exec).

    Returns:
        (data, fds, truncated): ``truncated`` is True if the record or its ancillary data did not
        fit; the caller owns (and must close) ``fds`` in every case. ``data == b""`` is EOF.
    """
    data, ancdata, flags, _ = sock.recvmsg(maxlen + 1, _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) or len(data) > maxlen
    return data, fds, truncated


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED: (pid, uid, gid) of the process at the other end, as of its connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
