"""SIGKILL the client, the server and the ismd daemon at several points.

For every case: the surviving side reports the failure (an exception, connection_lost with a
ConnectionResetError, or a released handshake) within 1 s of the kill; every byte the dead side
had published is delivered (a deterministic pattern, checked byte for byte, and at least as many
bytes as the dead side had reported published); a clean close before the kill loses nothing;
and nothing leaks: the survivor's device regions/attachments, fds (net of the device's bounded
caches), runtime-dir files and /dev/shm return to their values before the case. Other
connections of the survivor (the healthy connection) keep working.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest

import ism_backend
import smcish
from ism_backend.embedded import EmbeddedDevice

from .conftest import (
    CLIENT_CHILD, HOST, Child, EchoProto, Hostile, Victim, assert_no_leak,
    child_env, fd_count, pattern_at, run_loop, runtime_files, settle, shm_listing, snapshot,
    start_server_child,
)

REPORT_WITHIN = 1.0
RING = 16384


@pytest.fixture(autouse=True, scope="module")
def _dev_shm_untouched():
    """Regions are memfds: nothing of ours may ever appear in (or stay in) /dev/shm."""
    before = shm_listing()
    yield
    assert shm_listing() == before


class CheckProto(EchoProto):
    """Receives a pattern stream and checks every byte against it (server or client side)."""

    def __init__(self):
        super().__init__(echo=False)
        self.ok = True

    def data_received(self, data):
        if data != pattern_at(self.n, len(data)):
            self.ok = False
        super().data_received(data)


def _reap_stale_files(path: str) -> None:
    """What the next smcish process does when it opens the device: remove dead processes' files."""
    EmbeddedDevice(path).close()


async def _files_settle(before: set, timeout: float = 0.5) -> set:
    deadline = time.monotonic() + timeout
    while True:
        now = runtime_files()
        if now == before or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.05)


async def _check_runtime_dir(before: set) -> dict:
    """Files of the dead process: reaped by the survivor itself, or at the latest by the next
    device open (a new smcish process). Never left for good."""
    after = await _files_settle(before)
    by_survivor = after == before
    if not by_survivor:
        _reap_stale_files(os.environ["SMCISH_RUNTIME_DIR"])
        after = runtime_files()
    assert after == before, f"runtime dir: extra {after - before}, missing {before - after}"
    return {"reaped_by_survivor": by_survivor}


# ------------------------------------------------------------------ the client dies

@pytest.mark.parametrize("stage", ["connected", "proposed", "accepted"])
def test_kill_client_mid_handshake(stage):
    """The client (a hostile helper that stops at `stage`) is SIGKILLed; the server releases
    everything it prepared for that handshake within 1 s and its application never sees it."""
    async def main():
        victim = await Victim(handshake_timeout=5.0).start()      # long: the kill must decide
        dev = victim.device
        try:
            _reap_stale_files(dev.dir)
            before = snapshot(dev)
            files0 = runtime_files()
            shm0 = shm_listing()
            peer = Hostile()
            ports = []
            try:
                args = {"stage": stage, "read_accept": stage == "accepted"}
                peer.send({"cmd": "client", "scenario": "propose_and_wait", "port": victim.port,
                           "args": args})
                while True:
                    ev = await peer.event()
                    if ev.get("event") == "connected":
                        ports.append(ev["port"])
                    if ev.get("event") in ("waiting", "proposed", "accepted"):
                        break
                await asyncio.sleep(0.1)
                if stage != "connected":
                    assert snapshot(dev)["regions"] == before["regions"] + 1  # ours, prepared
                t_kill = time.monotonic()
                peer.kill()
            finally:
                peer.close()
            after = await settle(dev, before, timeout=REPORT_WITHIN)
            elapsed = time.monotonic() - t_kill
            assert_no_leak(before, after, f"kill client at {stage}")
            assert elapsed <= REPORT_WITHIN + 0.1, elapsed
            conn = victim.conn(ports[0])
            if stage == "connected":
                # a claimed client that sent nothing and died: plain TCP with EOF, closed
                assert conn is None or conn.info.mode == "tcp"
            else:
                assert conn is None, "the application saw a half-done handshake"
            await victim.healthy.check(3)
            files = await _check_runtime_dir(files0)
            assert shm_listing() == shm0
            return elapsed, files
        finally:
            await victim.stop()

    (elapsed, files), _ = run_loop(main())
    print(f"released {elapsed * 1000:.0f} ms after the kill; {files}")


@pytest.mark.parametrize("direction", ["client_to_server", "server_to_client"])
def test_kill_client_mid_transfer(direction):
    """A client child streams a pattern to the server in this process (or sinks the server's
    stream); SIGKILL it mid-transfer."""
    async def main():
        loop = asyncio.get_running_loop()
        received = {}
        senders = {}

        class Streamer(EchoProto):
            """Server side for server_to_client: write the pattern until the peer is gone."""

            def connection_made(self, transport):
                super().connection_made(transport)
                self.sent = 0
                self.resume = asyncio.Event()
                self.resume.set()
                senders[transport.get_extra_info("peername")[1]] = self
                self.task = asyncio.ensure_future(self.run())

            async def run(self):
                while self.lost is None:
                    self.transport.write(pattern_at(self.sent, 65536))
                    self.sent += 65536
                    await self.resume.wait()
                    await asyncio.sleep(0)

            def pause_writing(self):
                self.resume.clear()

            def resume_writing(self):
                self.resume.set()

            def connection_lost(self, exc):
                super().connection_lost(exc)
                self.resume.set()

        factory = CheckProto if direction == "client_to_server" else Streamer
        dev = ism_backend.get_device()
        _reap_stale_files(dev.dir)          # earlier tests' dead processes: not ours to judge
        before = snapshot(dev)
        files0 = runtime_files()
        server = await smcish.create_server(factory, HOST, 0, ring_size=RING)
        port = server.sockets[0].getsockname()[1]
        await asyncio.sleep(0.05)
        mode = "stream" if direction == "client_to_server" else "sink"
        child = Child(CLIENT_CHILD, {"mode": mode, "port": port, "ring_size": RING})
        try:
            hello = await child.await_line(lambda ev: ev.get("event") == "connected", 30)
            assert hello["mode"] == "ism", hello
            key = "published" if mode == "stream" else "received"
            last = await child.await_line(lambda ev: ev.get("event") == key
                                          and ev["n"] >= 3 << 20, 30)
            t_kill = child.kill()
            # everything the child reported before the kill, and maybe more, must be there
            for ev in child.events:
                if ev.get("event") == key:
                    last = ev
        finally:
            child.close()
        conn = EchoProto.registry[hello["port"]]
        lost = await asyncio.wait_for(asyncio.shield(conn.done), 5)
        elapsed = conn.lost_at - t_kill
        assert isinstance(lost, ConnectionResetError), lost
        assert elapsed <= REPORT_WITHIN, elapsed
        if mode == "stream":
            assert conn.ok, "a byte differs from what the dead client published"
            assert conn.n >= last["n"], (conn.n, last)
            moved = conn.n
        else:
            assert last["ok"]
            moved = last["n"]
        server.close()
        await server.wait_closed()
        after = await settle(dev, before)
        assert_no_leak(before, after, f"kill client mid-transfer {direction}")
        files = await _check_runtime_dir(files0)
        return elapsed, moved, files, str(lost)

    (elapsed, moved, files, msg), _ = run_loop(main())
    print(f"{direction}: reset {elapsed * 1000:.0f} ms after the kill, {moved} bytes checked, "
          f"{files}, {msg!r}")


@pytest.mark.parametrize("how", ["after_clean_close", "while_close_drains"])
def test_kill_client_during_close(how):
    """after_clean_close: the client sent N bytes and closed; killed after close returned: the
    server gets all N bytes and EOF. while_close_drains: the server is not reading, the client's
    close() waits with bytes pending; killed then: the server gets at least what was published,
    byte-exact, then a reset within 1 s of resuming its reads."""
    async def main():
        dev = ism_backend.get_device()
        _reap_stale_files(dev.dir)          # earlier tests' dead processes: not ours to judge
        before = snapshot(dev)
        files0 = runtime_files()
        class Paused(CheckProto):
            def connection_made(self, transport):
                super().connection_made(transport)
                transport.pause_reading()          # from the start: the client's close drains

        factory = CheckProto if how == "after_clean_close" else Paused
        server = await smcish.create_server(factory, HOST, 0, ring_size=RING)
        port = server.sockets[0].getsockname()[1]
        await asyncio.sleep(0.05)
        total = 10 * RING + 1234
        mode = "close_after" if how == "after_clean_close" else "close_pending"
        child = Child(CLIENT_CHILD, {"mode": mode, "port": port, "ring_size": RING,
                                     "close_after": total})
        try:
            hello = await child.await_line(lambda ev: ev.get("event") == "connected", 30)
            assert hello["mode"] == "ism"
            conn = EchoProto.registry[hello["port"]]
            if how == "while_close_drains":
                closing = await child.await_line(lambda ev: ev.get("event") == "close_called", 10)
                await asyncio.sleep(0.2)
                t_kill = child.kill()
                await asyncio.sleep(0.1)
                t_resume = time.monotonic()
                conn.transport.resume_reading()
            else:
                closing = await child.await_line(lambda ev: ev.get("event") == "closed", 10)
                t_kill = child.kill()
                t_resume = t_kill
        finally:
            child.close()
        lost = await asyncio.wait_for(asyncio.shield(conn.done), 5)
        assert conn.ok, "a byte differs from what the client published"
        if how == "after_clean_close":
            assert conn.n == total and conn.eof and lost == "clean", (conn.n, total, lost)
        else:
            published = closing.get("published", 0)
            for ev in child.events:
                if ev.get("event") == "closing":
                    published = ev["published"]
            assert conn.n >= published, (conn.n, published)
            assert isinstance(lost, ConnectionResetError), (lost, conn.n, published, conn.eof,
                                                            total, child.events[-3:])
            assert conn.lost_at - t_resume <= REPORT_WITHIN
        server.close()
        await server.wait_closed()
        after = await settle(dev, before)
        assert_no_leak(before, after, f"kill client {how}")
        await _check_runtime_dir(files0)
        return conn.n, repr(lost)

    (n, lost), _ = run_loop(main())
    print(f"{how}: {n} bytes delivered, then {lost}")


# ------------------------------------------------------------------ the server dies

@pytest.mark.parametrize("send_accept", [False, True], ids=["before_accept", "after_accept"])
def test_kill_server_mid_handshake(send_accept):
    """The server (a hostile helper that reads the PROPOSAL, maybe answers ACCEPT, then stops) is
    SIGKILLed: the client's create_connection fails (or its established connection resets)
    within 1 s, and it holds nothing afterwards."""
    async def main():
        dev = ism_backend.get_device()
        _reap_stale_files(dev.dir)          # earlier tests' dead processes: not ours to judge
        before = snapshot(dev)
        files0 = runtime_files()
        peer = Hostile()
        try:
            peer.send({"cmd": "server", "scenario": "accept_and_wait",
                       "args": {"send_accept": send_accept}})
            port = (await peer.event())["port"]
            connecting = asyncio.ensure_future(smcish.create_connection(
                CheckProto, HOST, port, ring_size=RING, handshake_timeout=5.0))
            ev = await peer.event()
            assert ev.get("event") == "proposed" and ev["proposal"], ev
            await asyncio.sleep(0.2)
            t_kill = time.monotonic()
            peer.kill()
        finally:
            peer.close()
        try:
            transport, proto = await asyncio.wait_for(connecting, 5)
        except ConnectionResetError as exc:
            elapsed = time.monotonic() - t_kill
            outcome = repr(exc)
        else:
            assert transport.get_extra_info("smcish").mode == "ism"
            lost = await asyncio.wait_for(asyncio.shield(proto.done), 5)
            assert isinstance(lost, ConnectionResetError), lost
            elapsed = proto.lost_at - t_kill
            outcome = repr(lost)
        assert elapsed <= REPORT_WITHIN, elapsed
        after = await settle(dev, before)
        assert_no_leak(before, after, "kill server mid-handshake")
        await _check_runtime_dir(files0)
        return elapsed, outcome

    (elapsed, outcome), _ = run_loop(main())
    print(f"client failed {elapsed * 1000:.0f} ms after the kill: {outcome}")


@pytest.mark.parametrize("direction", ["server_to_client", "client_to_server"])
def test_kill_server_mid_transfer(direction):
    async def main():
        dev = ism_backend.get_device()
        _reap_stale_files(dev.dir)          # earlier tests' dead processes: not ours to judge
        before = snapshot(dev)
        files0 = runtime_files()
        mode = "stream" if direction == "server_to_client" else "check"
        child, port = start_server_child(mode=mode, ring_size=RING)
        try:
            if direction == "server_to_client":
                transport, proto = await smcish.create_connection(CheckProto, HOST, port,
                                                                  ring_size=RING)
                assert transport.get_extra_info("smcish").mode == "ism"
                while proto.n < (3 << 20):
                    await asyncio.sleep(0.005)
                t_kill = child.kill()
                published = max([ev["n"] for ev in child.events + _drain(child)
                                 if ev.get("event") == "published"] or [0])
            else:
                transport, proto = await smcish.create_connection(EchoProto, HOST, port,
                                                                  ring_size=RING)
                writer_task = asyncio.ensure_future(_stream(transport, proto))
                await asyncio.sleep(0.3)
                t_kill = child.kill()
                published = 0
        finally:
            child.close()
        lost = await asyncio.wait_for(asyncio.shield(proto.done), 5)
        elapsed = proto.lost_at - t_kill
        assert isinstance(lost, ConnectionResetError), lost
        assert elapsed <= REPORT_WITHIN, elapsed
        if direction == "server_to_client":
            assert proto.ok and proto.n >= published, (proto.n, published)
            moved = proto.n
        else:
            moved = await asyncio.wait_for(writer_task, 5)
        after = await settle(dev, before)
        assert_no_leak(before, after, f"kill server mid-transfer {direction}")
        await _check_runtime_dir(files0)
        return elapsed, moved, repr(lost)

    (elapsed, moved, lost), _ = run_loop(main())
    print(f"{direction}: {moved} bytes, reset {elapsed * 1000:.0f} ms after the kill: {lost}")


def _drain(child) -> list:
    out = []
    while True:
        try:
            out.append(child.read_line(0.05))
        except (TimeoutError, EOFError):
            return out


async def _stream(transport, proto) -> int:
    sent = 0
    while proto.lost is None:
        transport.write(pattern_at(sent, 65536))
        sent += 65536
        while transport.get_write_buffer_size() > 4 * RING and proto.lost is None:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)
    return sent


def test_kill_server_after_clean_close():
    """The server sent N bytes and closed; killed afterwards: the client has all N and EOF."""
    async def main():
        dev = ism_backend.get_device()
        before = snapshot(dev)
        total = 7 * RING + 99
        child, port = start_server_child(mode="close_after", close_after=total, ring_size=RING)
        try:
            transport, proto = await smcish.create_connection(CheckProto, HOST, port,
                                                              ring_size=RING)
            await child.await_line(lambda ev: ev.get("event") == "closed", 10)
            child.kill()
        finally:
            child.close()
        lost = await asyncio.wait_for(asyncio.shield(proto.done), 5)
        assert proto.ok and proto.n == total and proto.eof, (proto.n, total)
        assert lost == "clean", lost
        after = await settle(dev, before)
        assert_no_leak(before, after, "kill server after clean close")
        return proto.n

    n, _ = run_loop(main())
    print(f"{n} bytes and EOF delivered")


# ------------------------------------------------------------------ ismd dies

def test_kill_ismd():
    """Everything through ismd; SIGKILL the daemon with connections established (one mid
    transfer), one handshake half done, then: established connections keep working and close
    cleanly, the half-done handshake is released, new connections fall back to TCP with a
    reason (NO_DEVICE), nothing leaks; a restarted ismd serves new listeners again."""
    from device_helpers import Ismd

    daemon = Ismd("--total-memory", "256M", "--quota", "128M")
    spec = daemon.spec
    kw = {"device": spec, "ring_size": RING}

    async def main():
        fds0 = fd_count()
        shm0 = shm_listing()
        server = await smcish.create_server(EchoProto, HOST, 0, handshake_timeout=0.5, **kw)
        port = server.sockets[0].getsockname()[1]
        # established connections: one idle, one streaming a checksummed echo
        r1, w1 = await smcish.open_connection(HOST, port, **kw)
        r2, w2 = await smcish.open_connection(HOST, port, **kw)
        assert w1.get_extra_info("smcish").mode == w2.get_extra_info("smcish").mode == "ism"
        stop = asyncio.Event()
        stats = {"sent": 0}

        async def echo_stream():
            while not stop.is_set():
                payload = pattern_at(stats["sent"], 50_000)
                w2.write(payload)
                got = await asyncio.wait_for(r2.readexactly(len(payload)), 5)
                assert got == payload
                stats["sent"] += len(payload)

        streaming = asyncio.ensure_future(echo_stream())
        # a handshake half done: a hostile client through ismd stops after the ACCEPT
        peer = Hostile(env=child_env(SMCISH_DEVICE=spec))
        peer.send({"cmd": "client", "scenario": "propose_and_wait", "port": port,
                   "args": {"read_accept": True}})
        while (await peer.event()).get("event") != "accepted":
            pass
        await asyncio.sleep(0.2)
        sent_before = stats["sent"]
        t_kill = time.monotonic()
        os.kill(daemon.pid, 9)
        daemon.proc.wait(5)
        # existing connections keep working
        await asyncio.sleep(0.5)
        assert not streaming.done(), streaming
        w1.write(b"still here")
        assert await asyncio.wait_for(r1.readexactly(10), 5) == b"still here"
        assert stats["sent"] > sent_before, "the established stream stopped with the daemon"
        # new connections: TCP with a reason, and working
        r3, w3 = await smcish.open_connection(HOST, port, **kw)
        info3 = w3.get_extra_info("smcish")
        assert info3.mode == "tcp" and info3.reason is smcish.DeclineReason.NO_DEVICE, info3
        w3.write(b"x" * 1000)
        assert await asyncio.wait_for(r3.readexactly(1000), 5) == b"x" * 1000
        # the hostile's half-done handshake was released by the server's timer (0.5 s)
        peer.kill()
        peer.close()
        # close everything (during close the device is gone: free/detach must not raise)
        stop.set()
        await asyncio.wait_for(streaming, 5)
        for w in (w1, w2, w3):
            w.close()
            await w.wait_closed()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.3)
        fds1 = fd_count()
        assert fds1 <= fds0, f"fds {fds0} -> {fds1} after the daemon died and all closed"
        assert shm_listing() == shm0
        return time.monotonic() - t_kill, stats["sent"], fds0, fds1

    try:
        (elapsed, sent, fds0, fds1), errors = run_loop(main())
        for ctx in errors:
            assert isinstance(ctx.get("exception"), ConnectionResetError), ctx
        print(f"after the kill: {sent} bytes echoed in total, fds {fds0} -> {fds1}")
        # a restarted daemon: new listeners get shared memory again
        daemon2 = Ismd("--socket-mode", "666", socket_dir=daemon.dir)

        async def again():
            server = await smcish.create_server(EchoProto, HOST, 0, **kw)
            port = server.sockets[0].getsockname()[1]
            r, w = await smcish.open_connection(HOST, port, **kw)
            mode = w.get_extra_info("smcish").mode
            w.write(b"abc")
            assert await r.readexactly(3) == b"abc"
            w.close()
            await w.wait_closed()
            server.close()
            await server.wait_closed()
            return mode

        try:
            mode, _ = run_loop(again())
            assert mode == "ism", mode
        finally:
            daemon2.stop()
    finally:
        if daemon.alive():
            daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)
