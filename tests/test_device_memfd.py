"""Kernel plumbing: seals make read-only real, receivers verify seals and size, doorbells work."""

import asyncio
import mmap
import os
import socket
import tempfile

import pytest

import device_helpers  # noqa: F401 - puts the repo on sys.path
from ism_backend import DeviceProtocolError, memfd

SIZE = 512 + 8192


def owner_region():
    fd = memfd.create_memory(SIZE)
    mem = memfd.map_owner(fd, SIZE)
    return fd, mem


def test_sealed_region_refuses_every_write_route_but_the_owners_mapping():
    fd, mem = owner_region()
    try:
        assert memfd.get_seals(fd) & memfd.ATTACH_SEALS == memfd.ATTACH_SEALS
        ro = memfd.reopen_readonly(fd)
        with pytest.raises(PermissionError):  # writable shared mapping of the handed-out fd
            mmap.mmap(ro, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # An O_RDONLY fd can be upgraded through /proc: the seal still refuses the mapping.
        rw = os.open(f"/proc/self/fd/{ro}", os.O_RDWR)
        with pytest.raises(PermissionError):
            mmap.mmap(rw, SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.pwrite(rw, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(rw, 0)
        with pytest.raises(PermissionError):  # F_SEAL_SEAL: nobody can change the seals
            import fcntl
            fcntl.fcntl(rw, memfd.F_ADD_SEALS, memfd.F_SEAL_WRITE)
        peer = memfd.map_readonly(ro, SIZE)
        mem[0:4] = b"abcd"  # the owner's mapping, made before the seal, still writes
        assert peer[0:4] == b"abcd"
        with pytest.raises(TypeError):
            peer[0] = 1
        peer.close()
        memfd.close_fds((ro, rw))
    finally:
        mem.close()
        os.close(fd)


def test_receiver_refuses_unsealed_short_or_foreign_fds():
    fd = memfd.create_memory(SIZE)  # size seals only: the owner could still map it writable
    try:
        with pytest.raises(DeviceProtocolError, match="seals"):
            memfd.map_readonly(fd, SIZE)
    finally:
        os.close(fd)
    fd, mem = owner_region()
    try:
        with pytest.raises(DeviceProtocolError, match="announced"):
            memfd.map_readonly(fd, memfd.page_round(SIZE) + 1)
        with pytest.raises(DeviceProtocolError):
            memfd.map_readonly(fd, SIZE, offset=100)  # unaligned offset
    finally:
        mem.close()
        os.close(fd)
    with tempfile.TemporaryFile() as fh:  # a plain file can be truncated under us: refused
        fh.truncate(SIZE)
        with pytest.raises(DeviceProtocolError, match="memfd"):
            memfd.map_readonly(fh.fileno(), SIZE)


def test_owner_mapping_refuses_a_pre_sealed_fd():
    fd, mem = owner_region()
    try:
        with pytest.raises(DeviceProtocolError):
            memfd.map_owner(fd, SIZE)
    finally:
        mem.close()
        os.close(fd)


def test_fds_travel_with_their_record():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd, mem = owner_region()
    try:
        mem[:3] = b"xyz"
        memfd.send_msg(a, b"first", [fd])
        memfd.send_msg(a, b"second")
        data, fds, truncated = memfd.recv_msg(b, 100)
        assert (data, len(fds), truncated) == (b"first", 1, False)
        assert memfd.map_readonly(fds[0], SIZE)[:3] == b"xyz"
        assert memfd.recv_msg(b, 100) == (b"second", [], False)
        memfd.send_msg(a, b"x" * 200)
        assert memfd.recv_msg(b, 100)[2] is True  # oversized record is flagged
        memfd.close_fds(fds)
    finally:
        mem.close()
        os.close(fd)
        a.close()
        b.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_doorbell_wakes_an_event_loop(loop_kind):
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    bell = memfd.new_doorbell()
    try:
        async def wait_for_ring():
            rung = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().add_reader(bell, lambda: rung.done() or rung.set_result(
                memfd.drain(bell)))
            asyncio.get_running_loop().call_later(0.01, memfd.ring, bell)
            try:
                return await asyncio.wait_for(rung, 5)
            finally:
                asyncio.get_running_loop().remove_reader(bell)

        assert loop.run_until_complete(wait_for_ring()) == 1
        assert memfd.drain(bell) == 0
    finally:
        loop.close()
        os.close(bell)
