"""Resource limits: ismd quota exhausted, a ring full for a long time, a low RLIMIT_NOFILE.

New connections must fall back to TCP with a reason (and work) instead of failing; a writer facing
a peer that never reads pauses without burning CPU; nothing leaks once the limit is gone.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import smcish

from .conftest import (
    CLIENT_CHILD, HOST, Child, EchoProto, cpu_seconds, raise_nofile, run_loop,
    start_server_child,
)

R = smcish.DeclineReason
RING = 16384


def test_quota_exhausted_falls_back_with_reason():
    """ismd --quota 64K (three 20 KiB regions per uid; the server child and this process are the
    same uid): the first connection gets shared memory, the next ones fall back to TCP with reason
    QUOTA and still carry data; once the first closes, shared memory is available again."""
    from device_helpers import Ismd

    daemon = Ismd("--total-memory", "8M", "--quota", "64K")
    kw = {"device": daemon.spec, "ring_size": RING}
    child, port = start_server_child(mode="echo", **kw)

    async def main():
        conns = []
        for _ in range(6):
            r, w = await smcish.open_connection(HOST, port, **kw)
            info = w.get_extra_info("smcish")
            payload = os.urandom(5000)
            w.write(payload)
            assert await asyncio.wait_for(r.readexactly(5000), 5) == payload
            conns.append((r, w, info.mode, info.reason))
        modes = [(m, getattr(reason, "name", None)) for _, _, m, reason in conns]
        assert modes[0] == ("ism", None), modes
        assert all(m == "tcp" and reason == "QUOTA" for m, reason in modes[1:]), modes
        for _, w, _, _ in conns:
            w.close()
            await w.wait_closed()
        await asyncio.sleep(0.3)
        r, w = await smcish.open_connection(HOST, port, **kw)
        again = w.get_extra_info("smcish").mode
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        w.close()
        await w.wait_closed()
        return modes, again

    try:
        (modes, again), errors = run_loop(main())
        assert not errors, errors
        assert again == "ism", "quota not given back after the connections closed"
        st = child.status()
        assert st["device"]["regions"] == 0, st
        print("quota:", modes, "then", again)
    finally:
        child.close()
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


def test_ring_full_for_a_long_time_no_busy_loop():
    """The server never reads. The client's writes fill the 16 KiB ring, then its protocol is
    paused (drain() blocks) and the process sleeps: < 5% of a CPU over 2 s, on both sides. When
    the server resumes reading, everything is delivered. Same for a reader whose peer never
    writes."""
    child, port = start_server_child(mode="stall", ring_size=RING)

    async def main():
        r, w = await smcish.open_connection(HOST, port, ring_size=RING)
        assert w.get_extra_info("smcish").mode == "ism"
        w.write(os.urandom(1 << 20))
        drain = asyncio.ensure_future(w.drain())
        await asyncio.sleep(0.3)                   # polling budgets spent, now asleep
        assert not drain.done() and w.transport.get_write_buffer_size() > 0
        srv0 = (await child.astatus())["cpu"]
        cpu0 = cpu_seconds()
        t0 = time.monotonic()
        await asyncio.sleep(2.0)
        wall = time.monotonic() - t0
        writer_cpu = cpu_seconds() - cpu0
        srv_cpu = (await child.astatus())["cpu"] - srv0
        assert not drain.done(), "the writer was not paused"
        # the reverse: we wait for data the server never sends
        read = asyncio.ensure_future(r.read(100))
        cpu1 = cpu_seconds()
        await asyncio.sleep(1.0)
        reader_cpu = cpu_seconds() - cpu1
        assert not read.done()
        child.send("resume")
        await asyncio.wait_for(drain, 10)
        assert w.transport.get_write_buffer_size() == 0
        read.cancel()
        w.close()
        await w.wait_closed()
        return writer_cpu / wall, srv_cpu / wall, reader_cpu

    try:
        (writer_share, srv_share, reader_cpu), errors = run_loop(main())
        assert not errors, errors
        print(f"ring full 2 s: writer {writer_share:.1%} CPU, stalled server {srv_share:.1%}; "
              f"idle reader {reader_cpu * 1000:.0f} ms CPU in 1 s")
        assert writer_share < 0.05, writer_share
        assert srv_share < 0.05, srv_share
        assert reader_cpu < 0.05, reader_cpu
    finally:
        child.close()


def _many(child_cfg: dict, port: int) -> dict:
    child = Child(CLIENT_CHILD, dict(child_cfg, mode="many", port=port, ring_size=RING),
                  quiet=True)
    try:
        return child.wait_for(lambda ev: ev.get("event") == "many", 60)
    finally:
        child.close()


def test_low_fd_limit_client_falls_back():
    """A client child with RLIMIT_NOFILE just above what it starts with opens connections one
    after the other (keeping them): the first ones get shared memory (7 fds each), then the
    device cannot get fds and the next connections fall back to TCP with a reason (1 fd each),
    all echoing correctly; only when not even a socket is left does a connect fail, with EMFILE,
    as it would without smcish. After closing, the child's fds are back to the start."""
    async def main():
        server = await smcish.create_server(EchoProto, HOST, 0, ring_size=RING)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(None, _many, {"nofile": 48, "count": 12}, port)
        server.close()
        await server.wait_closed()
        return out

    out, errors = run_loop(main())
    results = out["results"]
    summary = [r.get("mode", "error") + ("/" + r["reason"] if r.get("reason") else "")
               for r in results]
    print("fd limit 48:", summary, "fds", out["fds0"], "->", out["fds_end"])
    modes = [r.get("mode") for r in results]
    assert "ism" in modes, summary
    tcp = [r for r in results if r.get("mode") == "tcp"]
    assert tcp, f"no connection fell back: {summary}"
    assert all(r["reason"] for r in tcp), summary
    # every connection that got through carries its bytes intact (a failed claim once let the
    # PROPOSAL reach the server application: test_claims.py)
    assert all(r["echo"] is True for r in results if "mode" in r), results
    first_error = next((i for i, r in enumerate(results) if "error" in r), len(results))
    assert all("error" in r for r in results[first_error:]), "a connect failed, then one worked"
    for r in results[first_error:]:
        assert "Too many open files" in r["error"] or "EMFILE" in r["error"], r
    # every connection that fell back did so while a socket could still be had
    assert all(r.get("mode") for r in results[:first_error])
    assert out["fds_end"] <= out["fds0"] + 3 * 8, out       # at most the region pool
    st = out["status"]["device"]
    assert st["regions"] == 0 and st["attached"] == 0, st


def test_low_fd_limit_server_declines_with_reason():
    """The server child has RLIMIT_NOFILE 40: once it cannot map regions it declines
    (ATTACH_FAILED/NO_MEMORY/QUOTA) and its clients get TCP connections with that reason, which
    carry data; the connections it already has keep working. Only when it cannot even accept()
    does a connect stall (as plain asyncio does: see docs/reliability.md), which the client's
    handshake timer turns into an error."""
    raise_nofile(4096)
    child, port = start_server_child(mode="echo", ring_size=RING, nofile=40, quiet=True)
    try:
        async def main():
            conns = []
            failure = None
            for _ in range(12):
                try:
                    r, w = await asyncio.wait_for(smcish.open_connection(
                        HOST, port, ring_size=RING, handshake_timeout=0.5), 5)
                except (ConnectionError, asyncio.TimeoutError) as exc:
                    failure = repr(exc)
                    break
                info = w.get_extra_info("smcish")
                payload = os.urandom(2000)
                w.write(payload)
                got = await asyncio.wait_for(r.readexactly(2000), 5)
                conns.append((r, w, info.mode, getattr(info.reason, "name", None),
                              got == payload))
            # the connections it has keep working
            for r, w, *_ in conns:
                w.write(b"again")
                assert await asyncio.wait_for(r.readexactly(5), 5) == b"again"
            result = [(m, reason, ok) for _, _, m, reason, ok in conns]
            for _, w, *_ in conns:
                w.close()
                await w.wait_closed()
            return result, failure

        (result, failure), errors = run_loop(main())
        print("server fd limit 40:", result, "then", failure)
        assert all(ok for _, _, ok in result), result
        assert result[0][0] == "ism", result
        fell_back = [(m, reason) for m, reason, _ in result if m == "tcp"]
        assert fell_back and all(reason for _, reason in fell_back), result
        st = child.status()
        assert st["device"]["regions"] == 0 and st["device"]["attached"] == 0, st
    finally:
        child.close()
