"""Permissions: another uid cannot attach our regions or open link groups with our endpoint;
read-only mappings stay read-only; region tokens are 128-bit random capabilities with no
structure; the runtime dir stays private.

The "other uid" is a child that imports everything as root, then drops to uid/gid 1234 (as
tests/device_helpers.py does: the interpreter lives under root's home).

Each property is checked at the device level (regions from ``alloc``/``attach`` in real
processes: the ``*_device`` tests) and on a live smcish connection (v2: the regions are a link
group's extents; their tokens travel in the ``group_open`` / ``extent_add`` peer ops).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import errno
import itertools
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import tempfile

import pytest

import ism_backend
import smcish
from conftest import program
from ism_backend.embedded import EmbeddedDevice

from .hostile_helpers import HOST, PYTHON, ROOT, EchoProto, child_env, run_loop

ROOT_USER = os.geteuid() == 0
OTHER = 1234
SIZE = 512 + 16384

def _as_other_uid(args: dict) -> dict:
    """tests/programs/device_as_other_uid.py: ``args`` tried as uid OTHER; its outcomes."""
    proc = subprocess.run([PYTHON, program("device_as_other_uid.py"), str(OTHER), json.dumps(args)],
                          capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


async def _ism_pair(**kw):
    server = await smcish.create_server(EchoProto, HOST, 0, ring_size=16384, **kw)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await smcish.open_connection(HOST, port, ring_size=16384, **kw)
    assert writer.get_extra_info("smcish").mode == "ism"
    writer.write(b"x")
    await reader.readexactly(1)
    return server, reader, writer


def _assert_private_device_refuses_other_uids() -> None:
    """A private device whose dir and socket an admin made world-accessible: the endpoint
    itself refuses other uids (SO_PEERCRED)."""
    loose = tempfile.mkdtemp(prefix="smcish-loose-", dir="/tmp")
    os.chmod(loose, 0o700)
    private = EmbeddedDevice(loose)
    try:
        region = private.alloc(SIZE)
        os.chmod(loose, 0o711)
        os.chmod(private._sock_path, 0o777)
        out = _as_other_uid({"runtime_dir": loose, "endpoint_path": private._sock_path,
                             "token": region.token.hex()})
        print("other uid vs loosened dir:", out)
        assert not out["attach_via_endpoint"].startswith("ok"), out
        assert "PermissionDenied" in out["attach_via_endpoint"] or \
            "DeviceGone" in out["attach_via_endpoint"], out
        assert private.status()["served_attachments"] == 0
        private.free(region)
    finally:
        private.close()
        shutil.rmtree(loose, ignore_errors=True)


@pytest.mark.skipif(not ROOT_USER, reason="needs root to run a child as another uid")
def test_other_uid_cannot_attach_embedded_regions_device():
    """Our runtime dir is 0700 and ours: uid 1234 can neither list it, open the device there,
    reach our endpoint, nor attach a live region (whose one-shot token stays unspent). And if
    an admin loosened the dir and socket modes, the endpoint itself refuses other uids."""
    dev = ism_backend.get_device()
    st = os.stat(dev.dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), oct(st.st_mode)
    region = dev.alloc(SIZE)
    try:
        out = _as_other_uid({"runtime_dir": dev.dir, "endpoint_path": dev._sock_path,
                             "token": region.token.hex()})
        print("other uid vs 0700 runtime dir:", out)
        assert out["uid"] == OTHER
        for key in ("listdir", "open_device", "connect_endpoint", "attach_via_endpoint"):
            assert not out[key].startswith("ok"), (key, out[key])
        assert "PermissionError" in out["listdir"]
        assert "Permission denied" in out["connect_endpoint"]
        view = dev.attach(region.token, dev.endpoint_id)  # the one-shot is still ours to spend
        dev.detach(view)
    finally:
        dev.free(region)
    _assert_private_device_refuses_other_uids()


@pytest.mark.skipif(not ROOT_USER, reason="needs root to run a child as another uid")
def test_other_uid_cannot_attach_embedded_regions():
    """v2, a live connection: uid 1234 can neither list our runtime dir, open a device there,
    reach our endpoint, attach a link group's extent (its token, spent by the peer), nor open a
    link group with our hub through our endpoint. If an admin loosened the dir and socket
    modes, the endpoint itself refuses other uids (SO_PEERCRED), attach and group_open alike.
    And the runtime dir is still 0700 and ours, nothing in it writable by others."""
    dev = ism_backend.get_device()

    async def main():
        server, reader, writer = await _ism_pair()
        group = writer.transport._group
        region = group.my_exts[0][0]               # the client's extent 0: spent by the server
        hub_id = group.peer_hub.hex()
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(None, _as_other_uid, {
            "runtime_dir": dev.dir, "endpoint_path": dev._sock_path, "token": region.token.hex(),
            "hub_id": hub_id, "size": region.size})
        writer.write(b"still fine")
        assert await reader.readexactly(10) == b"still fine"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return out, hub_id

    (out, hub_id), _ = run_loop(main())
    print("other uid vs 0700 runtime dir (live group):", out)
    assert out["uid"] == OTHER
    for key in ("listdir", "open_device", "connect_endpoint", "attach_via_endpoint",
                "group_open_via_endpoint"):
        assert not out[key].startswith("ok"), (key, out[key])
    assert "PermissionError" in out["listdir"]
    assert "Permission denied" in out["connect_endpoint"]
    st = os.stat(dev.dir)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid(), oct(st.st_mode)
    for name in os.listdir(dev.dir):
        mode = os.lstat(os.path.join(dev.dir, name)).st_mode
        assert not stat.S_ISLNK(mode) and not mode & 0o002, (name, oct(mode))

    # Defence in depth: a private device whose dir and socket an admin made world-accessible.
    loose = tempfile.mkdtemp(prefix="smcish-loose-", dir="/tmp")
    os.chmod(loose, 0o700)
    private = EmbeddedDevice(loose)
    try:
        region = private.alloc(SIZE)
        os.chmod(loose, 0o711)
        os.chmod(private._sock_path, 0o777)
        out = _as_other_uid({"runtime_dir": loose, "endpoint_path": private._sock_path,
                             "token": region.token.hex(), "hub_id": hub_id, "size": SIZE})
        print("other uid vs loosened dir:", out)
        for key in ("attach_via_endpoint", "group_open_via_endpoint"):
            assert not out[key].startswith("ok"), out
            assert "PermissionDenied" in out[key] or "DeviceGone" in out[key], out
        assert private.status()["served_attachments"] == 0
        private.free(region)
    finally:
        private.close()
        shutil.rmtree(loose, ignore_errors=True)


@pytest.mark.skipif(not ROOT_USER, reason="needs root to run a child as another uid")
def test_other_uid_cannot_attach_via_ismd_device():
    """Through ismd: uid 1234 outside the policy is refused at connect; allowed by
    --allow-uid it still cannot attach a region whose token a peer spent (one-shot), nor guess
    one."""
    from device_helpers import Ismd

    for allow in ([], ["--allow-uid", str(OTHER)]):
        daemon = Ismd(*allow)
        owner = ism_backend.open_device(daemon.spec)
        peer = ism_backend.open_device(daemon.spec)
        try:
            region = owner.alloc(SIZE)
            view = peer.attach(region.token, owner.endpoint_id)  # the peer spends the one-shot
            out = _as_other_uid({"ismd": daemon.path, "token": region.token.hex()})
            print("ismd", allow or "default policy", out)
            live, rand = out["ismd_attach_live_token"], out["ismd_attach_random_token"]
            assert not live.startswith("ok") and not rand.startswith("ok"), out
            if not allow:
                assert "PermissionDenied" in live and "PermissionDenied" in rand, out
                assert "--allow-uid 1234" in live, out
            else:
                assert "PermissionDenied" in live and "one-shot" in live, out
                assert "UnknownToken" in rand, out
            peer.detach(view)
            owner.free(region)
        finally:
            peer.close()
            owner.close()
            daemon.stop()
            shutil.rmtree(daemon.dir, ignore_errors=True)


@pytest.mark.skipif(not ROOT_USER, reason="needs root to run a child as another uid")
def test_other_uid_cannot_attach_via_ismd():
    """v2 through ismd, a live connection: uid 1234 outside the policy is refused at connect;
    allowed by --allow-uid it still cannot attach a link group's extents (their one-shot tokens
    were spent by the peer: the client's extent 0 and the server's) nor guess one."""
    from device_helpers import Ismd

    for allow in ([], ["--allow-uid", str(OTHER)]):
        daemon = Ismd(*allow)
        try:
            async def main(daemon=daemon):
                server, reader, writer = await _ism_pair(device=daemon.spec)
                group = writer.transport._group
                tokens = [group.my_exts[0][0].token.hex(), group.peer_exts[0][0].token.hex()]
                loop = asyncio.get_running_loop()
                outs = []
                for token in tokens:
                    outs.append(await loop.run_in_executor(None, _as_other_uid, {
                        "ismd": daemon.path, "token": token}))
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                writer.close()
                await writer.wait_closed()
                server.close()
                await server.wait_closed()
                return outs

            outs, _ = run_loop(main())
            print("ismd", allow or "default policy", outs)
            for out in outs:
                live, rand = out["ismd_attach_live_token"], out["ismd_attach_random_token"]
                assert not live.startswith("ok") and not rand.startswith("ok"), out
                if not allow:
                    assert "PermissionDenied" in live and "PermissionDenied" in rand, out
                else:
                    assert "PermissionDenied" in live, out       # spent one-shot token
                    assert "UnknownToken" in rand, out
        finally:
            daemon.stop()
            shutil.rmtree(daemon.dir, ignore_errors=True)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
MAP_FAILED = ctypes.c_void_p(-1).value

def _write_attempts(peer) -> dict:
    """Every route to write through an attached (read-only) region ``peer``; each must fail."""
    results = {}
    try:
        peer.mem[0] = 1
        results["buffer_write"] = "WROTE"
    except TypeError as exc:
        results["buffer_write"] = f"TypeError: {exc}"
    page = mmap.PAGESIZE
    addr = _libc.mmap(None, page, mmap.PROT_READ, mmap.MAP_SHARED, peer.fd, 0)
    assert addr != MAP_FAILED
    rc = _libc.mprotect(addr, page, mmap.PROT_READ | mmap.PROT_WRITE)
    results["mprotect_rw"] = f"rc={rc} errno={errno.errorcode.get(ctypes.get_errno())}"
    _libc.munmap(addr, page)
    addr = _libc.mmap(None, page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, peer.fd, 0)
    results["mmap_rw_fd"] = ("MAPPED" if addr != MAP_FAILED else
                             f"errno={errno.errorcode.get(ctypes.get_errno())}")
    try:
        rw = os.open(f"/proc/self/fd/{peer.fd}", os.O_RDWR)
    except OSError as exc:
        results["reopen_rdwr"] = f"{exc.strerror}"
    else:
        addr = _libc.mmap(None, page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, rw, 0)
        results["reopen_rdwr_mmap"] = ("MAPPED" if addr != MAP_FAILED else
                                       f"errno={errno.errorcode.get(ctypes.get_errno())}")
        for name, fn in (("pwrite", lambda: os.pwrite(rw, b"x", 0)),
                         ("ftruncate", lambda: os.ftruncate(rw, 0))):
            try:
                fn()
                results[name] = "WROTE"
            except OSError as exc:
                results[name] = errno.errorcode.get(exc.errno)
        rc = _libc.fallocate(rw, 0x02 | 0x01, 0, page)     # PUNCH_HOLE | KEEP_SIZE
        results["punch_hole"] = f"rc={rc} errno={errno.errorcode.get(ctypes.get_errno())}"
        os.close(rw)
    proc = subprocess.run([PYTHON, program("store_into_readonly_map.py"), str(peer.fd), str(page)],
                          pass_fds=(peer.fd,), capture_output=True, text=True, timeout=30)
    results["raw_store_child"] = (proc.returncode, proc.stdout.split())
    return results


def _assert_all_refused(results: dict) -> None:
    assert results["buffer_write"].startswith("TypeError")
    assert results["mprotect_rw"].startswith("rc=-1"), results
    assert results["mmap_rw_fd"] != "MAPPED", results
    assert results.get("reopen_rdwr_mmap", "refused") != "MAPPED", results
    assert results.get("pwrite") != "WROTE" and results.get("ftruncate") != "WROTE", results
    assert results.get("punch_hole", "rc=-1").startswith("rc=-1"), results
    assert results["raw_store_child"] == (-signal.SIGSEGV, ["mapped"]), results


@pytest.mark.parametrize("kind", ["embedded", "ismd"])
def test_readonly_mapping_stays_readonly_device(kind):
    """A region owned by another process, as this process attached it: every route to write
    fails (buffer write, mprotect, writable mmap of its fd, O_RDWR re-open + mmap, pwrite,
    ftruncate, hole punching), a raw store kills a process (SIGSEGV), and the owner's later
    writes still show."""
    from device_helpers import Agent, Ismd

    daemon = Ismd() if kind == "ismd" else None
    env = child_env(SMCISH_DEVICE=daemon.spec if daemon else "embedded")
    dev = ism_backend.open_device(daemon.spec if daemon else "embedded")
    owner = Agent(env=env)
    try:
        info = owner.call("alloc", size=SIZE, fill=b"owner".hex())
        peer = dev.attach(bytes.fromhex(info["token"]), bytes.fromhex(info["endpoint"]))
        assert peer.access == "r"
        results = _write_attempts(peer)
        print(f"read-only mapping ({kind}):", results)
        _assert_all_refused(results)
        owner.call("write", id=info["id"], data=b"still fine".hex())
        assert bytes(peer.mem[:10]) == b"still fine"
        dev.detach(peer)
    finally:
        owner.close()
        dev.close()
        if daemon is not None:
            daemon.stop()
            shutil.rmtree(daemon.dir, ignore_errors=True)


def test_readonly_mapping_stays_readonly():
    """v2, live connections: the peer's extents as this process holds them (the server's
    extent 0, with the slot headers and the rings it writes, and an extent it grew for more
    rings): every route to write fails (buffer write, mprotect, writable mmap of its fd, O_RDWR
    re-open via /proc + mmap, pwrite, ftruncate, hole punching), and a raw store through a
    mapping kills a process (SIGSEGV); the connection is unharmed."""
    async def main():
        mib = 1 << 20
        server = await smcish.create_server(EchoProto, HOST, 0, ring_size=mib)
        port = server.sockets[0].getsockname()[1]
        conns = []
        # 1 MiB rings: a dozen of them do not fit the server's extent 0, so it grows an extent
        for _ in range(12):
            reader, writer = await smcish.open_connection(HOST, port, ring_size=mib)
            assert writer.get_extra_info("smcish").mode == "ism"
            writer.write(b"x")
            await reader.readexactly(1)
            conns.append((reader, writer))
        reader, writer = conns[0]
        group = writer.transport._group
        regions = [r for _, (r, _) in sorted(group.peer_exts.items())]
        assert len(regions) >= 2, "the server grew no extent"
        results = []
        for peer in regions:
            assert peer.access == "r"
            results.append(_write_attempts(peer))
        writer.write(b"still fine")
        assert await reader.readexactly(10) == b"still fine"
        for _, w in conns:
            w.close()
            await w.wait_closed()
        server.close()
        await server.wait_closed()
        return results

    results, _ = run_loop(main())
    print("read-only mappings of the peer's extents:", results)
    assert results
    for r in results:
        _assert_all_refused(r)


# ------------------------------------------------------------------ tokens

def _token_checks(tokens: list[bytes], pids: list[int]) -> dict:
    n = len(tokens)
    assert all(len(t) == 16 for t in tokens)
    assert len(set(tokens)) == n, "a token repeated"
    # every bit is a fair coin: within 5 standard deviations of n/2
    ones = [0] * 128
    for t in tokens:
        value = int.from_bytes(t, "big")
        for bit in range(128):
            ones[bit] += (value >> bit) & 1
    sd = (n / 4) ** 0.5
    worst_bit = max(abs(c - n / 2) / sd for c in ones)
    assert worst_bit < 5.5, f"bit bias {worst_bit:.1f} sd"
    # byte values at every position: chi-square over 256 cells (df 255; p=1e-6 near 370)
    worst_chi = 0.0
    for pos in range(16):
        counts = collections.Counter(t[pos] for t in tokens)
        expected = n / 256
        chi = sum((counts.get(v, 0) - expected) ** 2 / expected for v in range(256))
        worst_chi = max(worst_chi, chi)
    assert worst_chi < 400, f"byte distribution chi2 {worst_chi:.0f}"
    # no shared prefixes beyond chance: longest common prefix between neighbours once sorted
    ordered = sorted(tokens)
    lcp = max(len(os.path.commonprefix([a, b]))  # noqa: RUF071 - byte-wise: what we measure
              for a, b in itertools.pairwise(ordered))
    assert lcp <= 5, f"two tokens share a {lcp}-byte prefix"
    # consecutive tokens are unrelated: Hamming distance averages 64 bits (sd of mean ~0.06)
    hamming = [bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1")
               for a, b in itertools.pairwise(tokens)]
    mean_h = sum(hamming) / len(hamming)
    assert abs(mean_h - 64) < 1.0, mean_h
    # not derived from the pid: its bytes appear no more often than chance would put them there
    pid_hits4 = pid_hits2 = 0
    for pid in pids:
        pats4 = {pid.to_bytes(4, "little"), pid.to_bytes(4, "big")}
        pats2 = {(pid & 0xFFFF).to_bytes(2, "little"), (pid & 0xFFFF).to_bytes(2, "big")}
        for t in tokens:
            pid_hits4 += any(p in t for p in pats4)
            pid_hits2 += any(p in t for p in pats2)
    expect2 = len(pids) * n * 15 * 2 / 65536
    assert pid_hits4 == 0, pid_hits4
    assert pid_hits2 < 5 * expect2 + 10, (pid_hits2, expect2)
    return {"tokens": n, "worst_bit_sd": round(worst_bit, 2), "worst_chi2": round(worst_chi),
            "longest_common_prefix_bytes": lcp, "mean_hamming": round(mean_h, 2),
            "pid_hits_2byte": pid_hits2, "pid_hits_2byte_expected": round(expect2, 1)}


def _device_tokens() -> tuple[list[bytes], dict, list[bytes], int]:
    """10,000 tokens from this process's embedded device (fresh and pool-reused regions), 2,000
    from a child process, 1,000 from ismd."""
    from device_helpers import Ismd

    dev = ism_backend.get_device()
    tokens = []
    held = []
    for i in range(10_000):
        region = dev.alloc(SIZE)
        tokens.append(region.token)
        if i % 3:                      # a mix of pool reuse and fresh memfds
            dev.free(region)
        else:
            held.append(region)
        if len(held) > 8:
            for region in held:
                dev.free(region)
            held = []
    for region in held:
        dev.free(region)
    proc = subprocess.run([PYTHON, program("device_tokens.py"), "2000"], capture_output=True, text=True,
                          env=child_env(), cwd=ROOT, timeout=120)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    daemon = Ismd()
    try:
        ddev = ism_backend.open_device(daemon.spec)
        daemon_tokens = []
        for _ in range(1000):
            region = ddev.alloc(SIZE)
            daemon_tokens.append(region.token)
            ddev.free(region)
        ddev.close()
    finally:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)
    return tokens, child, daemon_tokens, daemon.pid


def test_tokens_are_128_bit_random_without_structure_device():
    """Distinct, unbiased bits and bytes, no shared prefixes, unrelated successors, no pid
    inside; endpoint ids and gids are random 16-byte values too (embedded and ismd)."""
    tokens, child, daemon_tokens, daemon_pid = _device_tokens()
    child_tokens = [bytes.fromhex(t) for t in child["tokens"]]
    local = _token_checks(tokens, [os.getpid()])
    crossed = _token_checks(tokens[:2000] + child_tokens, [os.getpid(), child["pid"]])
    via_ismd = _token_checks(daemon_tokens, [os.getpid(), daemon_pid])
    all_tokens = set(tokens) | set(child_tokens) | set(daemon_tokens)
    assert len(all_tokens) == len(tokens) + len(child_tokens) + len(daemon_tokens)
    dev = ism_backend.get_device()
    ids = [dev.endpoint_id, dev.gid]
    assert all(len(x) == 16 and x != bytes(16) for x in ids)
    print("tokens:", {"embedded": local, "two_processes": crossed, "ismd": via_ismd})


def test_tokens_are_128_bit_random_without_structure():
    """v2: the tokens that really travel between processes (the extent tokens of group_open
    requests and replies, and of extent_add) for 60 link groups: all 16 bytes, distinct, none
    seen among 12,000 device tokens of this process, unbiased bits, no shared prefixes,
    unrelated successors."""
    wire = []
    dev = ism_backend.get_device()
    orig_request = type(dev).peer_request

    def spy_request(self, endpoint_id, op, **fields):
        if "token" in fields:
            wire.append(bytes(fields["token"]))
        reply = orig_request(self, endpoint_id, op, **fields)
        if isinstance(reply, dict) and "token" in reply:
            wire.append(bytes(reply["token"]))
        return reply

    async def groups():
        loop = asyncio.get_running_loop()
        for _ in range(60):
            await loop.run_in_executor(None, _one_group)     # a fresh loop, hub and group

    type(dev).peer_request = spy_request
    try:
        run_loop(_serve_and(groups))
    finally:
        type(dev).peer_request = orig_request
    assert len(wire) >= 120, len(wire)
    assert all(len(t) == 16 and t != bytes(16) for t in wire)
    assert len(set(wire)) == len(wire), "a token repeated on the wire"
    n = len(wire)
    ones = [0] * 128
    for t in wire:
        value = int.from_bytes(t, "big")
        for bit in range(128):
            ones[bit] += (value >> bit) & 1
    sd = (n / 4) ** 0.5
    worst_bit = max(abs(c - n / 2) / sd for c in ones)
    assert worst_bit < 5.5, worst_bit
    ordered = sorted(wire)
    lcp = max(len(os.path.commonprefix([a, b]))  # noqa: RUF071 - byte-wise: what we measure
              for a, b in itertools.pairwise(ordered))
    assert lcp <= 5, lcp
    hamming = [bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1")
               for a, b in itertools.pairwise(wire)]
    mean_h = sum(hamming) / len(hamming)
    assert abs(mean_h - 64) < 4.0, mean_h
    local = set()
    for _ in range(12_000):
        region = dev.alloc(SIZE)
        local.add(region.token)
        dev.free(region)
    assert not local & set(wire)
    print("wire tokens:", {"n": n, "worst_bit_sd": round(worst_bit, 2), "lcp": lcp,
                           "mean_hamming": round(mean_h, 2)})


_SERVER_PORT: list = []


async def _serve_and(fn):
    server = await smcish.create_server(EchoProto, HOST, 0, ring_size=16384)
    _SERVER_PORT[:] = [server.sockets[0].getsockname()[1]]
    try:
        return await fn()
    finally:
        server.close()
        await server.wait_closed()


def _one_group() -> None:
    """In a thread: a client on its own loop (its own hub: a new link group), one echo, closed."""
    async def client():
        r, w = await smcish.open_connection(HOST, _SERVER_PORT[0], ring_size=16384)
        w.write(b"x")
        await r.readexactly(1)
        hub = w.transport._group.hub
        w.close()
        await w.wait_closed()
        for group in list(hub.client_groups.values()):
            group.close()
        hub.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(client(), 30))
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
