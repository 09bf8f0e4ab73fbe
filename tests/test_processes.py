"""Real two-process connections: both ends in shared memory; a peer SIGKILLed mid-transfer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import pytest

import ism_backend
import smcish

from conftest import PYTHON, new_loop, python_env

HOST = "127.0.0.1"

# A child peer: `serve` streams or echoes; `client` connects, reports, and checksums.
PEER = r'''
import asyncio, json, os, sys, zlib
import smcish

role, loop_kind, action = sys.argv[1], sys.argv[2], sys.argv[3]
port = int(sys.argv[4]) if len(sys.argv) > 4 else 0

def new_loop():
    if loop_kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()

async def serve():
    done = asyncio.Event()
    async def handle(reader, writer):
        mode = writer.get_extra_info("smcish").mode
        if action == "checksum":               # read until EOF, answer mode + crc + count
            crc = n = 0
            while data := await reader.read(1 << 20):
                crc = zlib.crc32(data, crc); n += len(data)
            writer.write(json.dumps({"mode": mode, "crc": crc, "n": n}).encode() + b"\n")
            await writer.drain()
            writer.close()
            done.set()
        elif action == "stream":               # send forever (until killed)
            chunk = b"s" * 65536
            print(json.dumps({"event": "streaming", "mode": mode}), flush=True)
            while True:
                writer.write(chunk)
                await writer.drain()
        elif action == "stall":                # never read (until killed)
            print(json.dumps({"event": "stalling", "mode": mode}), flush=True)
            await asyncio.sleep(3600)
        elif action == "sink":                 # read forever (until killed)
            print(json.dumps({"event": "sinking", "mode": mode}), flush=True)
            while await reader.read(1 << 20):
                pass
    server = await smcish.start_server(handle, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await done.wait()

async def client():
    reader, writer = await smcish.open_connection("127.0.0.1", port)
    mode = writer.get_extra_info("smcish").mode
    if action == "checksum":
        crc = n = 0
        block = os.urandom(1 << 20)
        for i in range(64):
            chunk = block[i * 997:]
            crc = zlib.crc32(chunk, crc); n += len(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        reply = json.loads(await reader.readline())
        print(json.dumps({"mode": mode, "crc": crc, "n": n, "server": reply}), flush=True)
        writer.close()
        await writer.wait_closed()
    elif action == "stream":
        print(json.dumps({"event": "streaming", "mode": mode}), flush=True)
        chunk = b"c" * 65536
        while True:
            writer.write(chunk)
            await writer.drain()

loop = new_loop()
loop.run_until_complete(serve() if role == "serve" else client())
'''


def run_on(loop_kind: str, coro, timeout: float = 30.0):
    loop = new_loop(loop_kind)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


def spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", PEER, *args], stdout=subprocess.PIPE, text=True,
                            env=python_env())


def read_json(proc, timeout=20.0) -> dict:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise AssertionError("child said nothing in time")
    line = proc.stdout.readline()
    assert line, f"child exited with {proc.wait()}"
    return json.loads(line)


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
        port = read_json(server)["port"]
        client = spawn("client", client_loop, "checksum", str(port))
        result = read_json(client, timeout=60)
        assert client.wait(30) == 0
        assert result["mode"] == "ism" and result["server"]["mode"] == "ism", result
        assert result["server"]["crc"] == result["crc"] and result["server"]["n"] == result["n"]
        assert server.wait(30) == 0
    finally:
        server.kill()
        server.wait()


def test_server_killed_mid_transfer_client_gets_reset(loop_kind):
    server = spawn("serve", "asyncio", "stream")
    try:
        port = read_json(server)["port"]

        async def main():
            baseline = leak_baseline()
            reader, writer = await smcish.open_connection(HOST, port)
            assert writer.get_extra_info("smcish").mode == "ism"
            assert read_json(server)["mode"] == "ism"
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
        server.kill()
        server.wait()


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
            except ConnectionResetError as exc:
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
                msg = await asyncio.get_running_loop().run_in_executor(None, read_json, client)
                assert msg["mode"] == "ism"
                await asyncio.sleep(0.3)
                killed = time.monotonic()
                os.kill(client.pid, signal.SIGKILL)
                result = await asyncio.wait_for(outcome, 5)
                assert result[0] == "reset", result
                assert result[2] - killed < 1.0
            finally:
                client.kill()
                client.wait()
                client.stdout.close()
            await assert_no_leaks(baseline)

    run_on(loop_kind, main())


def test_peer_killed_while_close_drains(loop_kind):
    """close() waits for pending data; if the peer dies meanwhile, close must not hang."""
    server = spawn("serve", "asyncio", "stall")
    try:
        port = read_json(server)["port"]

        async def main():
            reader, writer = await smcish.open_connection(HOST, port, ring_size=1 << 16)
            assert writer.get_extra_info("smcish").mode == "ism"
            assert read_json(server)["event"] == "stalling"
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
        server.kill()
        server.wait()
