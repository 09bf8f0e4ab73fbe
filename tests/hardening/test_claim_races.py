"""Claim races and forged claims: a hostile peer with a link group to a victim server posts
claims for other sockets' 4-tuples, and publishes listeners it does not hold.

A hostile process can learn every socket's ports and inode (``ss -tie``, sock_diag) and, once it
has a link group with the victim's hub (by connecting once, legitimately), it can post a claim
record for any 4-tuple into its own extent 0. The victim's server must serve a plain client of its
(client-first and server-first protocols alike) as plain TCP with zero added delay and its bytes
unaltered, and never send a byte of its own to it. Through ismd the same with two uids (the
hostile one a setuid child): a uid cannot advertise another uid's listener (it must hold the
socket), cannot make another user's client talk to it instead of that user's plain server, cannot
delay another user's server-first plain client. Plus the misdirection cases of
``tests/test_misdirection.py`` through ismd. Known smcish bugs are ``xfail(strict=True)``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time

import pytest

from .hostile_helpers import OTHER_UID, ROOT, Arena, child_env, plain_client

T = 0.5
NO_DELAY = 0.5              # bound on the first byte of a plain client (<< the 2 s set-up timeout)
BANNER = b"220 plain-ish smcish server ready\r\n"
ROOT_USER = os.geteuid() == 0


@pytest.fixture(scope="module")
def arena():
    a = Arena("asyncio", timeout=T)
    a.banner_port = a.victim.op("smcish_server", banner=BANNER.hex())["port"]
    a.rebase()
    yield a
    a.close(check=False)


def _bound() -> tuple[socket.socket, int, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1], os.fstat(sock.fileno()).st_ino


INODES = {
    "random_inode": lambda ino: int.from_bytes(os.urandom(6), "little"),
    "inode_zero": lambda ino: 0,
    "neighbour_inode": lambda ino: ino + 1,
}


def _forge_then_connect(a: Arena, server_port: int, banner: bytes, inode_fn,
                        timeout: float = 5.0) -> tuple[dict, dict]:
    sock, cport, ino = _bound()
    payload = os.urandom(2000)
    forged = a.hostile.request(30, cmd="forge", port=a.port, args={
        "answer": True, "targets": [{"cport": cport, "sport": server_port, "ino": inode_fn(ino)}]})
    assert all(p["posted"] for p in forged["posted"]), forged
    res = plain_client(server_port, payload, banner=banner, sock=sock, timeout=timeout)
    res["payload"] = payload
    return res, forged


@pytest.mark.parametrize("variant", list(INODES))
@pytest.mark.parametrize("proto", ["client_first", "server_first"])
def test_forged_claim_for_a_plain_clients_4tuple_costs_it_nothing(arena, proto, variant):
    """The hostile claims the exact 4-tuple a plain client is about to connect from (a record
    naming another inode): the victim's server serves that client as plain TCP at once, bytes
    exact, and the hostile gets nothing (it would have answered FINAL_ISM to an ACCEPTED)."""
    port, banner = (arena.port, b"") if proto == "client_first" else (arena.banner_port, BANNER)
    res, _forged = _forge_then_connect(arena, port, banner, INODES[variant])
    print(proto, variant, "first byte after", round(res["first_byte_s"] or -1, 4), "s")
    assert "error" not in res, res
    assert res["got"] == banner + res["payload"], res
    assert res["first_byte_s"] < NO_DELAY, res
    stolen = arena.hostile.request(10, cmd="stolen")["stolen"]
    assert not any(stolen.values()), stolen
    arena.hostile.reset()
    arena.check(f"forged claim ({proto}, {variant})")


def test_claims_for_hundreds_of_ports_then_plain_clients(arena):
    """The hostile pre-claims 300 client ports at once (every record a full 4-tuple toward the
    victim's server); 20 plain clients then connect from some of those ports: each is served as
    plain TCP at once, its bytes exact."""
    socks = [_bound() for _ in range(20)]
    targets = [{"cport": p, "sport": arena.port, "ino": ino + 7} for _, p, ino in socks]
    used = {p for _, p, _ in socks}
    extra = [p for p in range(33000, 33600) if p not in used][:280]
    targets += [{"cport": p, "sport": arena.port, "ino": 12345} for p in extra]
    forged = arena.hostile.request(60, cmd="forge", port=arena.port, args={"targets": targets})
    assert sum(p["posted"] for p in forged["posted"]) >= 290, forged
    worst = 0.0
    for sock, _, _ in socks:
        payload = os.urandom(500)
        res = plain_client(arena.port, payload, sock=sock)
        assert res["got"] == payload and "error" not in res, res
        worst = max(worst, res["first_byte_s"])
    assert worst < NO_DELAY, worst
    arena.hostile.reset()
    arena.check("300 forged claims")


@pytest.mark.xfail(strict=True, reason=(
    "smcish/protocol.py HandshakeProtocol._verify_local accepts a claim iff the kernel's socket "
    "at the other end has the claimed inode and the group peer's uid; inodes are public "
    "(sock_diag, ss -e, /proc/<pid>/fd), so any process of the same uid with a link group to "
    "the server can claim another process's plain connection: the server accepts it, the plain "
    "client's first bytes then reset the connection (client-first) or the server's banner goes "
    "into the hostile's ring (server-first)"))
@pytest.mark.parametrize("proto", ["client_first", "server_first"])
def test_forged_claim_with_the_real_inode_same_uid(arena, proto):
    port, banner = (arena.port, b"") if proto == "client_first" else (arena.banner_port, BANNER)
    res, _forged = _forge_then_connect(arena, port, banner, lambda ino: ino, timeout=1.5)
    try:
        assert "error" not in res and res["got"] == banner + res["payload"], res
        assert res["first_byte_s"] < NO_DELAY, res
    finally:
        arena.hostile.reset()


def test_forged_claim_does_not_delay_an_honest_smcish_client(arena):
    """The hostile's group with the victim exists before the honest client's; it claims the
    honest client's exact 4-tuple (another inode) first. The honest client must still be served
    over shared memory (its own claim is the one the kernel confirms)."""
    sock, cport, ino = _bound()
    sock.close()                                # the honest client binds this port itself
    arena.hostile.request(30, cmd="forge", port=arena.port, args={
        "targets": [{"cport": cport, "sport": arena.port, "ino": ino + 1}]})
    payload = os.urandom(1000)
    # read_timeout: generous for a cold first run in a fresh venv (seen once: no reply in 3 s as
    # the suite's third test in CI); "not delayed" is checked by final_mode: a claim that waited
    # for the set-up timeout would have moved to TCP.
    res = arena.victim.connect(arena.port, payload, timeout=5.0, local_port=cport,
                               read_timeout=10.0)
    try:
        assert res.get("reply") == payload.hex(), res
        assert res["final_mode"] == "ism", res
    finally:
        arena.hostile.reset()


# ------------------------------------------------------------------ listener tables (a hint)

def _capture(a: Arena) -> tuple[dict, dict, dict, bytes]:
    """The victim (client) has a group with the hostile's server; the hostile publishes the
    victim's own plain server's listener inode in that group's listener table; the victim then
    connects to its plain server."""
    plain = a.victim.op("plain_server")
    listening = a.hostile.listen(honest=True)
    prime = a.victim.connect(listening["port"], b"prime", timeout=5.0)
    assert prime.get("reply") == b"prime".hex(), prime
    table = a.hostile.request(10, cmd="listeners", args={"inodes": [plain["inode"]]})
    assert table["groups"] >= 1, table
    ident = a.hostile.send(cmd="hijack", args={"sport": plain["port"], "expect": 6})
    payload = b"SECRET" + os.urandom(10)
    res = a.victim.connect(plain["port"], payload, timeout=5.0, read_timeout=2.0)
    captured = a.hostile.wait(ident, 30)
    received = a.victim.op("plain_received", port=plain["port"])["received"]
    return res, captured, {"received": received}, payload


def test_hostile_server_cannot_capture_connections_to_another_listener(arena):
    res, captured, plain, payload = _capture(arena)
    try:
        assert not captured.get("captured"), captured
        assert res.get("final_mode") == "tcp" and res.get("reply") == (b"PLAIN:" + payload).hex(), res
        assert plain["received"] == [payload.hex()], plain
    finally:
        arena.hostile.reset()


# ------------------------------------------------------------------ through ismd, two uids

@pytest.fixture(scope="module")
def two_uids():
    if not ROOT_USER:
        pytest.skip("needs root to run the hostile as another uid")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from device_helpers import Ismd

    daemon = Ismd("--allow-uid", str(OTHER_UID))
    env = child_env(SMCISH_DEVICE=daemon.spec)
    try:
        a = Arena("asyncio", device=daemon.spec, timeout=T, hostile_uid=OTHER_UID, env=env)
    except BaseException:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)
        raise
    a.daemon = daemon
    a.banner_port = a.victim.op("smcish_server", banner=BANNER.hex())["port"]
    a.rebase()
    who = a.hostile.request(10, cmd="whoami")
    assert who["uid"] == OTHER_UID and who["device"] == "daemon", who
    yield a
    try:
        a.close(check=False)
    finally:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


@pytest.mark.parametrize("proto", ["client_first", "server_first"])
def test_other_uid_cannot_claim_or_delay_a_root_plain_client(two_uids, proto):
    """uid 1234 (a link group with root's server through ismd) claims a root plain client's
    4-tuple naming its real inode: the kernel says the socket is root's, so the server serves it
    as plain TCP at once, bytes exact."""
    a = two_uids
    port, banner = (a.port, b"") if proto == "client_first" else (a.banner_port, BANNER)
    res, _forged = _forge_then_connect(a, port, banner, lambda ino: ino)
    print(proto, "uid 1234, real inode: first byte after", round(res["first_byte_s"] or -1, 4), "s")
    assert "error" not in res and res["got"] == banner + res["payload"], res
    assert res["first_byte_s"] < NO_DELAY, res
    stolen = a.hostile.request(10, cmd="stolen")["stolen"]
    assert not any(stolen.values()), stolen
    a.hostile.reset()
    a.check(f"uid {OTHER_UID} forged claim ({proto})")


def test_other_uid_cannot_hold_or_advertise_a_root_listener(two_uids):
    """uid 1234 cannot get hold of root's listening socket (/proc/<pid>/fd, pidfd_getfd), so it
    cannot advertise it (ismd reads the listener from the socket it is handed); ismd names
    root's server as the advertiser of that listener, whoever asks."""
    a = two_uids
    stolen = a.hostile.request(10, cmd="try_steal_listener", args={
        "pid": a.victim.hello["pid"], "fd": a.victim.hello["listener_fd"]})
    assert stolen["proc_open"] != "OPENED" and stolen["pidfd_getfd"] != "GOT", stolen
    found = a.hostile.request(10, cmd="find_listener", args={"inode": a.victim.hello["inode"]})
    assert found["advert"] is not None and found["advert"]["pid"] == a.victim.hello["pid"], found
    assert found["advert"]["uid"] == os.geteuid(), found


def test_other_uids_closed_listener_replaced_by_a_root_plain_server(two_uids):
    """uid 1234 listened (advertised through ismd) on a port, then closed; root's plain server
    binds that port: root's smcish client is served as plain TCP at once and the plain server
    receives exactly the application's bytes."""
    a = two_uids
    port = a.hostile.listen()["port"]
    a.hostile.reset()
    plain = a.victim.op("plain_server", port=port)
    payload = os.urandom(300)
    res = a.victim.connect(port, payload, timeout=5.0)
    assert res.get("reply") == (b"PLAIN:" + payload).hex(), res
    assert res["final_mode"] == "tcp" and res["connect_s"] < NO_DELAY, res
    assert a.victim.op("plain_received", port=plain["port"])["received"] == [payload.hex()]
    a.victim.op("close_plain", port=plain["port"])


def test_other_uid_cannot_capture_connections_to_a_root_plain_server(two_uids):
    _res, captured, plain, payload = _capture(two_uids)
    try:
        assert not captured.get("captured"), captured
        assert plain["received"] == [payload.hex()], plain
    finally:
        two_uids.hostile.reset()


# ------------------------------------------------------------------ misdirection, through ismd

@pytest.fixture(scope="module")
def ismd_spec():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from device_helpers import Ismd

    daemon = Ismd()
    yield daemon.spec
    daemon.stop()
    shutil.rmtree(daemon.dir, ignore_errors=True)


def _run(coro, timeout: float = 30.0):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()


def _misdirection():
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_misdirection as m
    return m


def test_misdirection_through_ismd_v6only_listener_does_not_capture_ipv4(ismd_spec):
    m = _misdirection()
    if not m._has_ipv6():
        pytest.skip("no IPv6 loopback")

    async def main():
        for _ in range(20):
            smc = await m.smcish_echo("::", 0, device=ismd_spec)
            port = smc.sockets[0].getsockname()[1]
            sink = m.PlainSink()
            try:
                await sink.start("127.0.0.1", port)
                break
            except OSError:
                smc.close()
                await smc.wait_closed()
        async with smc, sink.server:
            reply, info, took = await m.talk("127.0.0.1", port, device=ismd_spec)
            assert reply == b"ok" and sink.received == [b"hello plain world"]
            assert info.mode == "tcp" and took < 1.0
            reply6, info6, _ = await m.talk("::1", port, b"v6", device=ismd_spec)
            assert reply6 == b"v6" and info6.mode == "ism"

    _run(main())


def test_misdirection_through_ismd_closed_listener_replaced_by_a_plain_one(ismd_spec):
    m = _misdirection()

    async def main():
        smc = await m.smcish_echo("127.0.0.1", 0, device=ismd_spec)
        port = smc.sockets[0].getsockname()[1]
        reply, info, _ = await m.talk("127.0.0.1", port, b"first", device=ismd_spec)
        assert reply == b"first" and info.mode == "ism"
        smc.close()
        await smc.wait_closed()
        sink = m.PlainSink()
        await sink.start("127.0.0.1", port, reuse_address=True)
        async with sink.server:
            for _ in range(3):
                reply, info, took = await m.talk("127.0.0.1", port, device=ismd_spec)
                assert reply == b"ok" and info.mode == "tcp" and took < 1.0
        assert sink.received == [b"hello plain world"] * 3

    _run(main())


def test_misdirection_through_ismd_server_first_plain_server(ismd_spec):
    m = _misdirection()

    async def main():
        smc = await m.smcish_echo("127.0.0.1", 0, device=ismd_spec)
        port = smc.sockets[0].getsockname()[1]
        smc.close()
        await smc.wait_closed()
        got = []

        async def banner(reader, writer):
            writer.write(b"220 plain ready\r\n")
            await writer.drain()
            got.append(await reader.read(100))
            writer.close()

        plain = await asyncio.start_server(banner, "127.0.0.1", port, reuse_address=True)
        async with plain:
            import smcish
            started = time.monotonic()
            reader, writer = await smcish.open_connection("127.0.0.1", port, device=ismd_spec)
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line == b"220 plain ready\r\n" and time.monotonic() - started < 1.0
            writer.write(b"QUIT\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
        assert got == [b"QUIT\r\n"]

    _run(main())


def test_misdirection_through_ismd_plain_client_with_the_old_magic(ismd_spec):
    m = _misdirection()

    async def main():
        smc = await m.smcish_echo("127.0.0.1", 0, device=ismd_spec)
        port = smc.sockets[0].getsockname()[1]
        async with smc:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = m.MAGIC + b"\x01\x01\x00\x41" + bytes(57)
            writer.write(payload)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(4096), 5) == payload
            writer.close()

    _run(main())


def test_misdirection_through_ismd_name_whose_first_address_is_a_plain_server(ismd_spec):
    m = _misdirection()
    if not m._has_ipv6():
        pytest.skip("no IPv6 loopback")

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(20):
            smc = await m.smcish_echo("127.0.0.1", 0, device=ismd_spec)
            port = smc.sockets[0].getsockname()[1]
            sink = m.PlainSink()
            try:
                await sink.start("::1", port)
                break
            except OSError:
                smc.close()
                await smc.wait_closed()
        orig = loop.getaddrinfo

        async def two_addresses(host, *args, **kwargs):
            if host == "both.test":
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
            return await orig(host, *args, **kwargs)

        loop.getaddrinfo = two_addresses
        try:
            async with smc, sink.server:
                reply, info, took = await m.talk("both.test", port, device=ismd_spec)
                assert reply == b"ok" and sink.received == [b"hello plain world"]
                assert info.mode == "tcp" and took < 1.0
        finally:
            loop.getaddrinfo = orig

    _run(main())
