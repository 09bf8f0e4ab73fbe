"""Link groups: set-up once, reuse, growth of rings and extents, idle return, teardown, hostile queues.

In one process (client and server hubs on one loop, a real group over real sealed memfds); the
two-process and SIGKILL cases are in tests/test_groups_processes.py.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import ism_backend
import smcish
from conftest import new_loop
from smcish import linkgroup
from smcish import ring as _ring

HOST = "127.0.0.1"
KiB, MiB = 1024, 1024 * 1024


def run(loop_kind, coro, timeout=60):
    loop = new_loop(loop_kind)
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(asyncio.sleep(0.02))
        loop.run_until_complete(_cancel_rest())
        loop.close()


async def _cancel_rest():
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def echo(reader, writer):
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def start_echo(**kw):
    server = await smcish.start_server(echo, HOST, 0, **kw)
    return server, server.sockets[0].getsockname()[1]


def hub_of(writer):
    return writer.transport._group.hub


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_one_group_for_many_connections_and_no_device_work_per_connection(loop_kind):
    async def main():
        device = ism_backend.get_device()
        server, port = await start_echo()
        async with server:
            _r, w = await smcish.open_connection(HOST, port)
            assert w.get_extra_info("smcish").mode == "ism"
            group = w.transport._group
            before = device.status()
            fds_before = open_fds()
            conns = [await smcish.open_connection(HOST, port) for _ in range(100)]
            for i, (_r2, w2) in enumerate(conns):
                assert w2.get_extra_info("smcish").mode == "ism"
                assert w2.transport._group is group           # the same link group
                w2.write(b"%d" % i)
            for i, (r2, _w2) in enumerate(conns):
                assert await r2.readexactly(len(b"%d" % i)) == b"%d" % i
            after = device.status()
            # No region allocated or attached for these 100 connections (earlier tests' groups
            # may be torn down meanwhile, so the counts may only fall)...
            assert after["regions"] <= before["regions"] and after["attached"] <= before["attached"]
            # ...and one fd each on our side (the TCP socket) plus one on the server side.
            assert open_fds() - fds_before <= 2 * 100 + 2
            assert len(hub_of(w).client_groups) == 1
            for _r2, w2 in conns:
                w2.close()
            w.close()

    run(loop_kind, main())


def test_slots_are_reused_after_both_sides_released(loop_kind):
    async def main():
        server, port = await start_echo()
        async with server:
            slots = []
            for _ in range(20):
                r, w = await smcish.open_connection(HOST, port)
                slots.append(w.get_extra_info("smcish").slot)
                w.write(b"x")
                assert await r.readexactly(1) == b"x"
                w.close()
                await w.wait_closed()
                await asyncio.sleep(0.01)            # the server closes its side after our EOF
            assert len(set(slots)) < len(slots), slots   # freed slots come back
            assert max(slots) < 10

    run(loop_kind, main())


def test_bulk_flow_grows_its_ring_and_idle_shrinks_it(loop_kind):
    async def main():
        server, port = await start_echo()
        async with server:
            r, w = await smcish.open_connection(HOST, port)
            ring = w.transport._ring
            assert ring.tx_capacity == 64 * KiB
            payload = os.urandom(16 * MiB)
            w.write(payload)
            got = await r.readexactly(len(payload))
            assert got == payload
            assert ring.tx_capacity == 4 * MiB, ring.tx_capacity
            assert ring.tx_switches >= 1
            # Idle for two maintenance ticks: back to the initial size (ticks driven by hand).
            t = w.transport
            for _ in range(3):
                t._smc_tick(time.monotonic())
            assert ring.tx_capacity == 64 * KiB
            w.write(b"after shrink")
            assert await r.readexactly(12) == b"after shrink"
            for _ in range(3):
                t._smc_tick(time.monotonic())
            assert t._old_block is None           # the 4 MiB block went back to the allocator
            w.close()

    run(loop_kind, main())


def test_new_extents_when_extent_zero_is_full_and_returned_when_idle(loop_kind):
    async def main():
        device = ism_backend.get_device()
        server, port = await start_echo(ring_size=1 * MiB)
        async with server:
            conns = [await smcish.open_connection(HOST, port, ring_size=1 * MiB)]
            base = device.status()               # the group is open: its two extent 0s attached
            conns += [await smcish.open_connection(HOST, port, ring_size=1 * MiB) for _ in range(11)]
            assert all(w.get_extra_info("smcish").mode == "ism" for _, w in conns)
            group = conns[0][1].transport._group
            assert len(group.my_exts) >= 2, "12 x 1 MiB rings do not fit the 7.75 MiB heap of extent 0"
            for _r, w in conns:
                w.write(b"ping")
            for r, _w in conns:
                assert await r.readexactly(4) == b"ping"
            for _r, w in conns:
                w.close()
            await asyncio.sleep(0.2)
            server_group = group.hub.server_groups[group.id]
            grown = set(group.my_exts) - {0}
            server_grown = set(server_group.my_exts) - {0}
            assert server_grown, "the server's 1 MiB rings did not fit its extent 0 either"
            peak = device.status()               # each side attached the other's grown extents
            later = time.monotonic() + linkgroup.EXTENT_IDLE_S + 1
            group.maintain(later)
            server_group.maintain(later)
            assert not (set(group.my_exts) & grown), "idle extents were not returned"
            assert not (set(server_group.my_exts) & server_grown)
            await asyncio.sleep(0.3)
            # The peer detached them too: back to the group's extent 0s. (An earlier test's hub,
            # torn down by a sweep that may come after `base` was taken, can only lower the count:
            # so at most base, and at least the grown extents fewer than at the peak.)
            now = device.status()["attached"]
            assert now <= base["attached"], (now, base["attached"])
            assert peak["attached"] - now >= len(grown) + len(server_grown), (peak, now)

    run(loop_kind, main())


def test_idle_client_group_is_closed_and_both_sides_let_go(loop_kind):
    async def main():
        device = ism_backend.get_device()
        base = device.status()
        server, port = await start_echo()
        async with server:
            r, w = await smcish.open_connection(HOST, port)
            hub = hub_of(w)
            w.write(b"x")
            await r.readexactly(1)
            w.close()
            await asyncio.sleep(0.1)
            (group,) = hub.client_groups.values()
            (server_group,) = hub.server_groups.values()
            assert not group.conns
            group.maintain(time.monotonic() + linkgroup.GROUP_IDLE_S + 1)
            assert group.destroyed and not hub.client_groups
            for _ in range(50):
                await asyncio.sleep(0.02)
                if server_group.destroyed:
                    break
            assert server_group.destroyed, "the server side did not follow the group_close"
            await asyncio.sleep(0.2)
            st = device.status()
            assert st["regions"] <= base["regions"] and st["attached"] <= base["attached"]
            # a new connection opens a new group
            r, w = await smcish.open_connection(HOST, port)
            assert w.get_extra_info("smcish").mode == "ism"
            w.close()

    run(loop_kind, main())


def test_hostile_indices_in_the_notification_queue_fail_that_group_only(loop_kind):
    """The peer's queue names slots beyond max_slots / moves its cursor backwards: the victim's
    group fails cleanly (its connections see a reset naming the problem), nothing crashes, and a
    connection in another group keeps working."""
    async def main():
        server, port = await start_echo()
        other, other_port = await start_echo()
        async with server, other:
            # Two client hubs: this loop's default one, and a second device -> a second group.
            r1, w1 = await smcish.open_connection(HOST, port)
            w1.write(b"quiet")
            assert await r1.readexactly(5) == b"quiet"     # established, nothing in flight
            victim_client = w1.transport._group
            server_hub = victim_client.hub
            victim = server_hub.server_groups[victim_client.id]
            # Scribble into the client's own extent 0 (the side the server reads): entries far
            # beyond max_slots after the last real one, then publish them.
            mem = victim_client.my_exts[0][0].mem
            q = _ring.G_OFF_NQ
            nq_prod = int.from_bytes(mem[_ring.G_OFF_NQ_PROD:_ring.G_OFF_NQ_PROD + 8], "little")
            for i in range(8):
                at = q + 4 * ((nq_prod + i) % _ring.G_NQ_ENTRIES)
                mem[at:at + 4] = (0xFFFF0000 + i).to_bytes(4, "little")
            mem[_ring.G_OFF_NQ_PROD:_ring.G_OFF_NQ_PROD + 8] = (nq_prod + 8).to_bytes(8, "little")
            os.eventfd_write(victim.my_exts[0][0].doorbell_fd, 1)     # wake the victim
            for _ in range(100):
                await asyncio.sleep(0.01)
                if victim.dying:
                    break
            assert victim.dying and isinstance(victim.error, _ring.GroupCorrupted), victim.error
            assert "queue" in str(victim.error) or "slot" in str(victim.error)
            # the victim server's side of connection 1 was reset: the client sees it end
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                w1.write(b"x" * 10)
                await asyncio.wait_for(r1.readexactly(10), 5)
            # a fresh connection opens a fresh group and works
            r3, w3 = await smcish.open_connection(HOST, other_port)
            w3.write(b"still fine")
            assert await r3.readexactly(10) == b"still fine"
            assert w3.get_extra_info("smcish").mode == "ism"
            w3.close()

    run(loop_kind, main())


def test_a_burst_of_set_ups_grows_the_extents_as_often_as_needed(loop_kind):
    """300 connections at once with 256 KiB rings need several new extents on each side: the
    set-ups that one growth cannot hold grow again instead of falling back (NO_MEMORY)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))

    async def one(port, i):
        r, w = await smcish.open_connection(HOST, port, ring_size=256 * KiB)
        msg = b"burst %d " % i * 10
        w.write(msg)
        got = await r.readexactly(len(msg))
        return w, got == msg

    async def main():
        # backlog: an overflowing accept queue delays accept() by seconds (SYN-ACK retries),
        # past the set-up timeout; that is a different test (tests/hardening/test_load.py)
        server, port = await start_echo(ring_size=256 * KiB, backlog=1024)
        async with server:
            results = await asyncio.gather(*(one(port, i) for i in range(300)))
            infos = [w.get_extra_info("smcish") for w, _ in results]
            assert all(ok for _, ok in results)
            tcp = [i for i in infos if i.mode != "ism"]
            assert not tcp, f"{len(tcp)} fell back, e.g. {tcp[0]}"
            group = results[0][0].transport._group
            assert len(group.my_exts) > 2, "the burst did not need several extents"
            for w, _ in results:
                w.close()

    try:
        run(loop_kind, main(), timeout=120)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _device_regions() -> tuple[int, int]:
    status = ism_backend.get_device().status()
    return status["regions"], status["attached"]


def test_a_closed_and_dropped_loop_gives_its_idle_groups_back(loop_kind):
    """Finding 17 of docs/reliability.md: asyncio.run() after asyncio.run(), each with a server
    and a client of its own that close their connection: a loop closed and then dropped used to
    leave its link groups' regions allocated and attached for the life of the process."""
    import gc

    async def once():
        server = await smcish.start_server(echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await smcish.open_connection(HOST, port)
        assert writer.get_extra_info("smcish").mode == "ism"
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    def cycle():
        run(loop_kind, once())
        gc.collect()

    cycle()                                   # the device and pools exist from here on
    deadline = time.monotonic() + 5
    before = _device_regions()
    for _ in range(4):
        cycle()
    # the groups' memory goes back through the device threads: bounded wait for it
    def grown() -> bool:   # (earlier tests' leftovers may drain meanwhile: never more)
        now = _device_regions()
        return now[0] > before[0] or now[1] > before[1]

    while grown() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not grown(), (before, _device_regions())
