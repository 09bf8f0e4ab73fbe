"""Real two-process connections: both ends in shared memory; a peer SIGKILLed mid-transfer."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

import ism_backend
import smcish
from benchmarks.children import Child, spawn_python
from conftest import new_loop, program, python_env

HOST = "127.0.0.1"

def run_on(loop_kind: str, coro, timeout: float = 30.0):
    loop = new_loop(loop_kind)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


def spawn(*args) -> Child:
    """tests/programs/stream_peer.py with ``args`` (role, loop, action[, port])."""
    return spawn_python(script=program("stream_peer.py"), args=args, env=python_env(), stdin=None)


def open_fds() -> int:
    """Our open fds, except /dev/null: uvloop opens one the first time it aborts a socket and keeps
    it for the process's life (checked: it does not grow per connection)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "/dev/null":
                count += 1
        except OSError:
            pass                        # the listing's own fd, already closed
    return count


_COUNTS = ("regions", "draining", "attached", "zombies", "peers")


def leak_baseline():
    """The device's counts and our fd count, device already open: what a test returns to."""
    device = ism_backend.get_device()
    return open_fds(), device.status()


async def warm_up() -> None:
    """What a process opens once and keeps (this loop's hub, the device's endpoint): opened before
    a baseline, so that a test run alone measures what its connections leave, not that."""
    server = await smcish.start_server(lambda r, w: w.close(), HOST, 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await smcish.open_connection(HOST, port)
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.1)


async def assert_no_leaks(baseline, settle: float = 2.0) -> None:
    """Regions, attachments, peer connections back to the baseline; fds too, except those of
    regions the reuse pool newly keeps (device.status()["pooled_fds"])."""
    fds_before, st_before = baseline
    device = ism_backend.get_device()
    deadline = time.monotonic() + settle
    while True:
        st = device.status()
        busy = {k: st[k] - st_before[k] for k in _COUNTS if st[k] > st_before[k]}
        extra = open_fds() - fds_before - max(0, st["pooled_fds"] - st_before["pooled_fds"])
        if not busy and extra <= 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leak: device still holds {busy}, {extra} extra fds")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("server_loop,client_loop", [("asyncio", "uvloop"), ("uvloop", "asyncio")])
def test_two_processes_both_ism_checksum(server_loop, client_loop):
    server = spawn("serve", server_loop, "checksum")
    try:
        port = server.read_json()["port"]
        with spawn("client", client_loop, "checksum", str(port)) as client:
            result = client.read_json(60)
            assert client.wait(30) == 0
        assert result["mode"] == "ism" and result["server"]["mode"] == "ism", result
        assert result["server"]["crc"] == result["crc"] and result["server"]["n"] == result["n"]
        assert server.wait(30) == 0
    finally:
        server.stop()


def test_server_killed_mid_transfer_client_gets_reset(loop_kind):
    server = spawn("serve", "asyncio", "stream")
    try:
        port = server.read_json()["port"]

        async def main():
            await warm_up()
            baseline = leak_baseline()
            reader, writer = await smcish.open_connection(HOST, port)
            assert writer.get_extra_info("smcish").mode == "ism"
            assert server.read_json()["mode"] == "ism"
            got = 0
            while got < (8 << 20):
                got += len(await reader.read(1 << 20))
            os.kill(server.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(ConnectionResetError):
                while True:
                    data = await asyncio.wait_for(reader.read(1 << 20), 5)
                    if not data:
                        raise AssertionError("clean EOF from a killed peer")
            assert time.monotonic() - t0 < 1.0
            writer.close()
            await assert_no_leaks(baseline)

        run_on(loop_kind, main())
    finally:
        server.stop()


def test_client_killed_mid_transfer_server_sees_reset(loop_kind):
    async def main():
        outcome = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            assert writer.get_extra_info("smcish").mode == "ism"
            total = 0
            try:
                while True:
                    data = await reader.read(1 << 20)
                    if not data:
                        outcome.set_result(("eof", total))
                        return
                    total += len(data)
            except ConnectionResetError:
                outcome.set_result(("reset", total, time.monotonic()))
            finally:
                writer.close()

        server = await smcish.start_server(handle, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            baseline = leak_baseline()
            client = await asyncio.get_running_loop().run_in_executor(
                None, lambda: spawn("client", "asyncio", "stream", str(port)))
            try:
                msg = await asyncio.get_running_loop().run_in_executor(None, client.read_json)
                assert msg["mode"] == "ism"
                await asyncio.sleep(0.3)
                killed = time.monotonic()
                os.kill(client.pid, signal.SIGKILL)
                result = await asyncio.wait_for(outcome, 5)
                assert result[0] == "reset", result
                assert result[2] - killed < 1.0
            finally:
                client.stop()
            await assert_no_leaks(baseline)

    run_on(loop_kind, main())


def test_peer_killed_while_close_drains(loop_kind):
    """close() waits for pending data; if the peer dies meanwhile, close must not hang."""
    server = spawn("serve", "asyncio", "stall")
    try:
        port = server.read_json()["port"]

        async def main():
            _reader, writer = await smcish.open_connection(HOST, port, ring_size=1 << 16)
            assert writer.get_extra_info("smcish").mode == "ism"
            assert server.read_json()["event"] == "stalling"
            writer.write(b"z" * (1 << 20))       # far more than the ring holds: most stays pending
            assert writer.transport.get_write_buffer_size() > 0
            writer.close()
            os.kill(server.pid, signal.SIGKILL)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except ConnectionResetError:
                pass
            assert time.monotonic() - t0 < 1.0

        run_on(loop_kind, main())
    finally:
        server.stop()
