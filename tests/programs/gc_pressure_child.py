"""Transparent mode (smcish.install) under garbage-collector pressure, for
tests/hardening/test_finalizers.py: ``python gc_pressure_child.py CONFIG_JSON``.

Connections of five kinds (create_connection; sock_connect then create_connection(sock=); a
sock_connect socket dropped in an old reference cycle; sock_sendall/sock_recv on the socket; abort
in a cycle) against an echo server in this process, with gc.set_threshold(1, 1, 1) and full
collections forced at the entry of device and link-group calls made from inside others. Prints a
JSON summary; a hang dumps every stack and exits 3 (faulthandler watchdog). Runs against the tree
on PYTHONPATH (the test sets it: this checkout, or FINALIZER_ROOT).
"""

import asyncio
import collections
import faulthandler
import gc
import json
import os
import random
import socket
import sys
import threading
import time

CFG = json.loads(sys.argv[1])
# A hang is the failure this test exists for: dump every thread's stack, then exit 3.
faulthandler.dump_traceback_later(CFG["watchdog"], exit=True)

import ism_backend  # noqa: E402 - after the watchdog: a hang while importing is caught too
import smcish  # noqa: E402

PKG_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (ism_backend,))
LINKGROUP = os.path.join(os.path.dirname(smcish.__file__), "linkgroup.py")
STATS = collections.Counter()
RNG = random.Random(CFG["seed"])


def target(code):
    f = code.co_filename
    return f.startswith(PKG_DIRS) or f == LINKGROUP


def inside_target(frame):
    while frame is not None:
        if target(frame.f_code):
            return True
        frame = frame.f_back
    return False


def on_gc(phase, info):
    if phase == "start":
        STATS["collections"] += 1
        if info["generation"] == 2:
            STATS["full_collections"] += 1
        try:
            caller = sys._getframe(1)
        except ValueError:        # a collection at the very bottom of a thread's stack
            caller = None
        if caller is not None and inside_target(caller):
            STATS["collections_inside_device_or_group_calls"] += 1


def profile(frame, event, arg):
    # At the entry of a device or link-group function called from another one (its caller may
    # hold the device's or the registry's lock): a full collection, now (sampled).
    if event == "call" and target(frame.f_code) and frame.f_back is not None \
            and target(frame.f_back.f_code) and RNG.random() < CFG["force_p"]:
        STATS["forced_full_collections"] += 1
        gc.collect()


gc.callbacks.append(on_gc)
gc.set_threshold(1, 1, 1)
threading.setprofile(profile)
sys.setprofile(profile)

HOST = "127.0.0.1"
server_made = []
server_lost = []


class Echo(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        server_made.append(1)

    def data_received(self, data):
        self.t.write(data)

    def connection_lost(self, exc):
        server_lost.append(1)


class Client(asyncio.Protocol):
    def __init__(self):
        self.buf = bytearray()
        self.waiter = asyncio.get_running_loop().create_future()
        self.want = 0

    def connection_made(self, t):
        self.t = t

    def data_received(self, data):
        self.buf += data
        if len(self.buf) >= self.want and not self.waiter.done():
            self.waiter.set_result(bytes(self.buf))

    def connection_lost(self, exc):
        if not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("closed"))


def cycle(*objs):
    """Drop objects in a reference cycle (only the collector frees them)."""
    holder = {"objs": list(objs)}
    holder["self"] = holder
    for o in objs:
        try:
            o._cycle = holder
        except (AttributeError, TypeError):
            pass


async def echo_proto(loop, t, p):
    payload = os.urandom(RNG.randrange(1, 20000))
    p.want = len(payload)
    t.write(payload)
    got = await asyncio.wait_for(p.waiter, 10)
    assert got == payload, "echo differs"


async def kind_create_connection(loop, port):
    t, p = await loop.create_connection(Client, HOST, port)
    STATS["mode_" + str(getattr(t.get_extra_info("smcish"), "mode", "?"))] += 1
    await echo_proto(loop, t, p)
    t.close()
    cycle(t, p)


async def kind_sock_connect_handed_over(loop, port):
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    t, p = await loop.create_connection(Client, sock=sock)
    STATS["mode_" + str(getattr(t.get_extra_info("smcish"), "mode", "?"))] += 1
    await echo_proto(loop, t, p)
    t.close()
    cycle(t, p, sock)


async def kind_sock_connect_dropped(loop, port):
    sock = socket.socket()
    sock.setblocking(False)
    holder = {"sock": sock}
    holder["self"] = holder
    gc.collect()                        # the cycle is old (generation 2) before it is dropped
    await loop.sock_connect(sock, (HOST, port))
    del sock, holder                    # never handed to create_connection: garbage now


async def kind_sock_connect_raw(loop, port):
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    payload = os.urandom(RNG.randrange(1, 4000))
    await loop.sock_sendall(sock, payload)
    got = b""
    while len(got) < len(payload):
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        if not chunk:
            break
        got += chunk
    assert got == payload, "raw echo differs"
    sock.close()


async def kind_abort_in_cycle(loop, port):
    t, p = await loop.create_connection(Client, HOST, port)
    t.abort()
    cycle(t, p)


KINDS = [kind_create_connection, kind_sock_connect_handed_over, kind_sock_connect_dropped,
         kind_sock_connect_raw, kind_abort_in_cycle]


async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    sem = asyncio.Semaphore(CFG["in_flight"])
    errors = []

    async def one(i):
        kind = KINDS[i % len(KINDS)]
        async with sem:
            try:
                await kind(loop, port)
                STATS[kind.__name__] += 1
            except Exception as exc:
                errors.append(f"{kind.__name__}: {exc!r}")

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(CFG["connections"])))
    work = time.monotonic() - t0
    # every connection the server accepted must end (dropped sockets too: the collector closes
    # them, or smcish drops an unused pre-claim after its set-up timer)
    deadline = time.monotonic() + CFG["settle"]
    while (len(server_lost) < len(server_made) or len(server_made) < CFG["connections"]) \
            and time.monotonic() < deadline:
        gc.collect()
        await asyncio.sleep(0.1)
    preclaims = None
    try:
        from smcish import loop as _sloop
        preclaims = len(_sloop._preclaims)
    except (ImportError, AttributeError):
        pass
    server.close()
    sys.setprofile(None)
    threading.setprofile(None)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({"stats": dict(STATS), "errors": errors[:10], "n_errors": len(errors),
                      "server_made": len(server_made), "server_lost": len(server_lost),
                      "preclaims": preclaims, "work_s": work,
                      "smcish": os.path.dirname(smcish.__file__)}), flush=True)


loop = asyncio.new_event_loop()
if CFG["loop"] == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
smcish.install(loop)
loop.run_until_complete(main())
