"""The Device contract v2, written once and run against the embedded device and ismd.

Real processes (agents), real sockets, a real ismd started by the fixture. Covers regions across
processes (read-only attachments, one-shot tokens, the reuse pool, buffer exports, a killed owner,
doorbells), socket-bound advertisements, and peer messaging (PeerInfo, typed errors, a dying
peer), a forked child, plus the ``none`` device. Where the two devices report differently (each
``status()``), a test checks each its own way. What only one device has is tested in
test_device_embedded.py (the runtime dir, its files, the peer connection cache) and
test_device_daemon.py (uids, quotas, the socket and its directory, the status CLI, brokering).
"""

import asyncio
import gc
import json
import os
import shutil
import socket
import threading
import time

import pytest

import ism_backend
from device_helpers import Agent, AgentError, Ismd, child_env, fd_count, short_tmpdir, wait_for
from ism_backend import (
    Advert,
    DeviceGone,
    IsmError,
    NoDevice,
    PeerInfo,
    PermissionDenied,
    UnknownToken,
    open_device,
    sockets,
)
from ism_backend.client import DaemonDevice
from ism_backend.embedded import EmbeddedDevice

SIZE = 512 + 16384
HUB = bytes(range(16))
GROUP = b"G" * 16
OPEN = {"group_id": GROUP, "hub_id": HUB, "token": b"T" * 16, "size": 65536, "max_slots": 128, "version": 2}


class Kit:
    """One device implementation: an in-process device factory and agents using the same."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ismd: Ismd | None = None
        self.rtdir: str | None = None
        self.agents: list[Agent] = []
        self.devices: list = []
        if kind == "embedded":
            self.rtdir = short_tmpdir()
            self.env = child_env(SMCISH_RUNTIME_DIR=self.rtdir, SMCISH_DEVICE="embedded")
        else:
            self.ismd = Ismd("--total-memory", "64M", "--quota", "32M")
            self.env = child_env(SMCISH_DEVICE=self.ismd.spec)

    def device(self, **kw):
        dev = (EmbeddedDevice(self.rtdir, **kw) if self.kind == "embedded"
               else DaemonDevice(self.ismd.path, **kw))
        self.devices.append(dev)
        return dev

    def agent(self, **kw) -> Agent:
        kw.setdefault("env", self.env)
        agent = Agent(**kw)
        self.agents.append(agent)
        return agent

    def wait_gone(self, dev, agent: Agent) -> None:
        """After an agent died: wait (bounded) until the device side noticed."""
        if self.kind == "ismd":
            wait_for(lambda: not any(c["pid"] == agent.real_pid
                                     for c in dev.status()["clients"]), what="ismd reaping")

    def wait_released(self, dev) -> None:
        """After an attacher of our freed region died: wait (bounded) until the region is back
        in our pool."""
        if self.kind == "embedded":
            wait_for(lambda: dev.status()["pooled"] == 1, 5, "the region back in the pool")
        else:
            wait_for(lambda: dev.status()["counts"]["attachments"] == 0, what="ismd releasing")

    def pooled_fds(self, dev) -> int:
        """The fds the device's reuse pool holds in this process."""
        status = dev.status()
        return status["pooled_fds"] if self.kind == "embedded" else status["client"]["pooled_fds"]

    def close(self) -> None:
        for agent in self.agents:
            agent.close()
        for dev in self.devices:
            dev.close()
        if self.ismd is not None:
            assert self.ismd.alive(), "ismd died during the test"
            err = self.ismd.stop()
            assert "Traceback" not in err, err
            shutil.rmtree(self.ismd.dir, ignore_errors=True)
        if self.rtdir is not None:
            shutil.rmtree(self.rtdir, ignore_errors=True)


@pytest.fixture(params=["embedded", "ismd"])
def kit(request):
    k = Kit(request.param)
    yield k
    k.close()


@pytest.fixture
def device(kit):
    return kit.device()


def listener(host: str = "127.0.0.1", port: int = 0, v6only: bool | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    sock.listen(8)
    return sock


class Recorder:
    """An endpoint handler recording what it is called with, on which thread."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[PeerInfo, str, dict, str]] = []
        self.gone: list[PeerInfo] = []
        self.fail = fail

    def handle(self, peer, op, fields):
        self.calls.append((peer, op, fields, threading.current_thread().name))
        if self.fail is not None:
            raise self.fail
        if op == "group_open":
            return {"token": b"R" * 16, "size": fields["size"], "max_slots": 64}
        return {}

    def peer_gone(self, peer):
        self.gone.append(peer)


# --- regions --------------------------------------------------------------------------------

def test_regions_cross_processes_both_ways_and_stay_read_only(kit, device):
    """Bytes cross both ways through many regions; a write after the attach shows; an attacher
    can write by no route (the buffer, mmap of its read-only fd, a /proc re-open to O_RDWR: the
    seals refuse); the device accounts for every region and attachment, then for none."""
    assert device.kind == {"embedded": "embedded", "ismd": "daemon"}[kit.kind]
    assert len(device.endpoint_id) == 16 and len(device.gid) == 16
    peer = kit.agent()
    assert bytes.fromhex(peer.call("open")["gid"]) == device.gid  # same device domain
    mine = [device.alloc(SIZE) for _ in range(32)]
    for i, region in enumerate(mine):
        region.mem[0:8] = i.to_bytes(8, "little")
        region.mem[SIZE - 4:SIZE] = b"tail"
    attached = [peer.call("attach", token=r.token.hex(), endpoint=device.endpoint_id.hex())
                for r in mine]
    for i, a in enumerate(attached):
        assert peer.call("read", id=a["id"], n=8) == i.to_bytes(8, "little").hex()
        assert peer.call("read", id=a["id"], n=4, offset=SIZE - 4) == b"tail".hex()
    mine[0].mem[100:105] = b"later"  # written after attach: the mapping is shared
    assert peer.call("read", id=attached[0]["id"], n=5, offset=100) == b"later".hex()

    theirs = [peer.call("alloc", size=SIZE, fill=f"region {i}".encode().hex()) for i in range(8)]
    views = [device.attach(bytes.fromhex(t["token"]), bytes.fromhex(t["endpoint"])) for t in theirs]
    for i, view in enumerate(views):
        assert view.access == "r" and view.size == SIZE
        assert bytes(view.mem[:8]) == f"region {i}".encode()
    peer.call("write", id=theirs[0]["id"], data=b"changed".hex())
    assert bytes(views[0].mem[:7]) == b"changed"
    with pytest.raises(TypeError):
        views[0].mem[0] = 1

    status = device.status()
    if kit.kind == "embedded":  # this process's view: its regions, their attachments, its own
        assert (status["regions"], status["served_attachments"], status["attached"]) == (32, 32, 8)
    else:                       # ismd's: everyone's
        counts = status["counts"]
        assert counts["regions"] == 40 and counts["attachments"] == 40
        assert counts["clients"] == 4  # a control connection + an endpoint channel each
        assert counts["endpoint_channels"] == 2
        assert "token" not in json.dumps(status["regions"])  # tokens are capabilities: never shown

    mine[1].mem[:4] = b"keep"
    result = peer.call("try_write", id=attached[1]["id"])
    assert result["api"].startswith("refused")
    # the handed-out fd is O_RDONLY (EACCES); the seal would refuse it anyway (EPERM)
    assert result["mmap"].startswith("refused")
    # the /proc re-open upgrades the fd to O_RDWR, but the seals refuse mapping and writing
    assert result["proc_mmap"] == "refused: Operation not permitted"
    assert result["proc_write"] == "refused: Operation not permitted"
    assert result["truncate"] == "refused: Operation not permitted"
    assert result["seals"] & 0x1F == 0x17  # seal, shrink, grow, future_write
    assert bytes(mine[1].mem[:4]) == b"keep"

    for view in views:
        device.detach(view)
        assert view.closed and view.mem is None
    for t in theirs:
        peer.call("free", id=t["id"])
    for a in attached:
        peer.call("detach", id=a["id"])
    for r in mine:
        device.free(r)
    status = device.status()
    if kit.kind == "embedded":
        assert status["served_attachments"] == 0 and status["regions"] == 0
    else:
        assert status["counts"]["attachments"] == 0 and status["counts"]["live_tokens"] == 0


def test_tokens_are_one_shot_then_granted_or_revoked(kit, device):
    region = device.alloc(SIZE)
    first, second = kit.agent(), kit.agent()
    ep = device.endpoint_id.hex()
    first.call("attach", token=region.token.hex(), endpoint=ep)
    with pytest.raises(AgentError) as info:
        second.call("attach", token=region.token.hex(), endpoint=ep)
    assert info.value.name == "PermissionDenied" and "grant" in str(info.value)
    device.grant(region.token, os.getuid())
    again = second.call("attach", token=region.token.hex(), endpoint=ep)
    second.call("detach", id=again["id"])
    device.revoke(region.token, os.getuid())
    with pytest.raises(AgentError) as info:
        second.call("attach", token=region.token.hex(), endpoint=ep)
    assert info.value.name == "PermissionDenied" and "revoked" in str(info.value)
    with pytest.raises(AgentError) as info:
        second.call("attach", token=os.urandom(16).hex(), endpoint=ep)
    assert info.value.name == "UnknownToken"
    with pytest.raises(PermissionDenied, match="writable"):
        device.attach(region.token, device.endpoint_id, access="rw")
    token = region.token
    device.free(region)
    with pytest.raises(UnknownToken):
        device.grant(token, 1000)


def test_a_process_attaches_its_own_region(device):
    region = device.alloc(SIZE)
    region.mem[:2] = b"me"
    view = device.attach(region.token, device.endpoint_id)
    assert bytes(view.mem[:2]) == b"me"
    device.detach(view)
    device.free(region)


def test_the_pool_reuses_a_region_only_after_every_attacher_is_gone(kit, device):
    region = device.alloc(SIZE)
    region.mem[:6] = b"secret"
    fd, old_token = region.fd, region.token
    peer = kit.agent()
    a = peer.call("attach", token=region.token.hex(), endpoint=device.endpoint_id.hex())
    device.free(region)
    if kit.kind == "embedded":
        assert device.status()["draining"] == 1
    fresh = device.alloc(SIZE)  # the freed one is still mapped by the peer: not reused
    assert fresh.fd != fd
    assert peer.call("read", id=a["id"], n=6) == b"secret".hex()  # peer still reads its copy
    peer.call("detach", id=a["id"])
    if kit.kind == "embedded":
        assert device.status()["pooled"] == 1
    reused = device.alloc(SIZE)
    assert reused.fd == fd, "the drained region comes back from the pool"
    assert reused.token != old_token and len(reused.token) == 16
    assert bytes(reused.mem[:SIZE]) == bytes(SIZE), "zeroed before reuse"
    # the new token is attachable once, the old one never again
    with pytest.raises(UnknownToken):
        device.attach(old_token, device.endpoint_id)
    b = peer.call("attach", token=reused.token.hex(), endpoint=device.endpoint_id.hex())
    assert peer.call("read", id=b["id"], n=6) == bytes(6).hex()


def test_a_pooled_region_returns_when_its_attacher_dies(kit, device):
    region = device.alloc(SIZE)
    region.mem[:6] = b"secret"
    fd, token = region.fd, region.token
    peer = kit.agent()
    a = peer.call("attach", token=token.hex(), endpoint=device.endpoint_id.hex())
    device.free(region)
    fresh = device.alloc(SIZE)  # still attached: a new memfd
    assert fresh.fd != fd
    assert peer.call("read", id=a["id"], n=6) == b"secret".hex()
    peer.kill()  # its connection closes: the attachment is released
    kit.wait_released(device)
    reused = device.alloc(SIZE)
    assert reused.fd == fd and reused.token != token
    assert bytes(reused.mem[:SIZE]) == bytes(SIZE)
    with pytest.raises(UnknownToken):
        device.attach(token, device.endpoint_id)
    view = device.attach(reused.token, device.endpoint_id)
    assert bytes(view.mem[:6]) == bytes(6)
    device.detach(view)


def test_detach_waits_for_buffer_exports_before_releasing(kit, device):
    region = device.alloc(SIZE)
    view = device.attach(region.token, device.endpoint_id)
    exported = memoryview(view.mem)  # e.g. a ring still holding ffi.from_buffer(mem)
    device.detach(view)
    assert view.closed
    if kit.kind == "embedded":
        assert device.status()["zombies"] == 1
    device.free(region)
    if kit.kind == "embedded":
        assert device.status()["draining"] == 1, "still mapped here: the owner must not reuse it"
    else:
        assert device.status()["counts"]["attachments"] == 1, "still mapped: not released yet"
    assert exported[:1] == b"\0"
    exported.release()
    device.alloc(4096)  # any later call retries the unmap, then tells the owner
    status = device.status()
    if kit.kind == "embedded":
        assert (status["zombies"], status["draining"], status["pooled"]) == (0, 0, 1)
    else:
        assert status["counts"]["attachments"] == 0


def test_a_killed_owner_leaves_the_attacher_reading_and_nothing_behind(kit, device):
    shm_before = set(os.listdir("/dev/shm"))
    owner = kit.agent()
    info = owner.call("alloc", size=SIZE, fill=b"published before death".hex())
    view = device.attach(bytes.fromhex(info["token"]), bytes.fromhex(info["endpoint"]))
    if kit.kind == "embedded":
        assert any(n.startswith("ep-" + info["endpoint"]) for n in os.listdir(kit.rtdir))
    owner.kill()
    kit.wait_gone(device, owner)
    assert bytes(view.mem[:22]) == b"published before death"  # still mapped, still readable
    if kit.kind == "ismd":
        status = device.status()
        assert [r["state"] for r in status["regions"]] == ["orphaned"]
        assert status["used"] > 0
    assert bytes(view.mem[:22]) == b"published before death"
    device.detach(view)  # the owner is gone: no error; what it owned is reclaimed now
    if kit.kind == "embedded":  # its endpoint files are reaped
        mine = {f"ep-{device.endpoint_id.hex()}.lock", f"ep-{device.endpoint_id.hex()}.sock"}
        assert set(os.listdir(kit.rtdir)) - {"gid", ".mutex"} == mine
    else:
        status = device.status()
        assert status["regions"] == [] and status["used"] == 0
        assert sorted(os.listdir(kit.ismd.dir)) == ["ismd.sock"]
    assert set(os.listdir("/dev/shm")) == shm_before


def test_doorbell_across_processes_wakes_the_owner_loop(kit, device):
    region = device.alloc(SIZE)
    peer = kit.agent()
    a = peer.call("attach", token=region.token.hex(), endpoint=device.endpoint_id.hex())

    async def main():
        loop = asyncio.get_running_loop()
        rung = loop.create_future()
        loop.add_reader(region.doorbell_fd, lambda: rung.done() or rung.set_result(region.drain()))
        try:
            await loop.run_in_executor(None, lambda: peer.call("ring", id=a["id"]))
            return await asyncio.wait_for(rung, 5)
        finally:
            loop.remove_reader(region.doorbell_fd)

    assert asyncio.run(main()) >= 1


def test_status_accounts_for_pooled_fds(kit, device):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    before, pooled_fds = fds(), kit.pooled_fds(device)
    device.free(device.alloc(SIZE))
    device.free(device.alloc(SIZE + 4096))
    assert fds() - before == kit.pooled_fds(device) - pooled_fds > 0


# --- socket-bound advertisements ------------------------------------------------------------

def test_advertise_find_listener_withdraw(kit, device):
    lsock = listener()
    inode = sockets.socket_inode(lsock)
    handle = device.advertise(lsock, HUB)
    finder = kit.agent()
    got = finder.call("find_listener", inode=inode)
    assert got == {"endpoint_id": device.endpoint_id.hex(), "hub_id": HUB.hex(),
                   "pid": os.getpid(), "uid": os.getuid()}
    assert device.find_listener(inode) == Advert(device.endpoint_id, HUB, os.getpid(),
                                                 os.getuid())
    assert device.find_listener(inode + 1000003) is None
    device.withdraw(handle)
    device.withdraw(handle)  # idempotent
    assert device.find_listener(inode) is None
    assert finder.call("find_listener", inode=inode) is None
    lsock.close()


def test_find_listener_answers_repeatedly_without_leaking(device):
    """find_listener is on every connect: 2,000 hits and misses, no fd left behind (its cost is
    measured by benchmarks/bench_device.py)."""
    lsock = listener()
    inode = sockets.socket_inode(lsock)
    handle = device.advertise(lsock, HUB)
    before = len(os.listdir("/proc/self/fd"))
    for probe, expected in ((inode, True), (inode + 7919, False)):
        for _ in range(2000):
            assert (device.find_listener(probe) is not None) is expected
    assert len(os.listdir("/proc/self/fd")) == before
    device.withdraw(handle)
    lsock.close()


def test_a_listener_two_hubs_advertise_names_neither(kit, device):
    """A pre-fork server's workers share one listening socket: any of them may accept a given
    connection while a claim reaches only the hub named, so nobody is named (clients stay TCP).
    Before, the latest advertiser was named and the other workers' connections waited for the
    set-up timeout with the client's first bytes in the named worker's memory."""
    lsock = listener()
    inode = sockets.socket_inode(lsock)
    first = device.advertise(lsock, HUB)
    finder = kit.agent()
    assert finder.call("find_listener", inode=inode)["hub_id"] == HUB.hex()
    second = device.advertise(lsock, b"\x22" * 16)
    assert device.find_listener(inode) is None
    assert finder.call("find_listener", inode=inode) is None
    device.withdraw(second)
    if kit.kind == "ismd":          # ismd keeps every advertiser: the one left is named again
        assert device.find_listener(inode).hub_id == HUB
    else:                           # embedded: not named until advertised afresh
        assert device.find_listener(inode) is None
    device.withdraw(first)
    assert device.find_listener(inode) is None
    lsock.close()


def test_advertise_refuses_what_is_not_a_listening_tcp_socket(device):
    plain = socket.socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for sock in (plain, udp, unix):
            with pytest.raises(ValueError):
                device.advertise(sock, HUB)
        lsock = listener()
        with pytest.raises(ValueError, match="hub id"):
            device.advertise(lsock, b"short")
        with pytest.raises(ValueError):
            device.find_listener(0)
        with pytest.raises(ValueError):
            device.withdraw(object())
        lsock.close()
    finally:
        for sock in (plain, udp, unix):
            sock.close()


def test_the_oracle_names_exactly_the_advertised_listener(kit, device):
    """A v6only listener on :: and a plain one on 127.0.0.1, same port: only the v4 one is ours.
    The IPv4 lookup names ours; the IPv6 one names the other, which nobody advertised."""
    ours = listener("127.0.0.1")
    port = ours.getsockname()[1]
    theirs = listener("::", port, v6only=True)
    handle = device.advertise(ours, HUB)
    diag = sockets.diag()
    hit4 = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40000))
    hit6 = diag.lookup(socket.AF_INET6, ("::1", port), ("::1", 40000))
    assert hit4.state == sockets.TCP_LISTEN and hit4.inode == sockets.socket_inode(ours)
    assert hit6.state == sockets.TCP_LISTEN and hit6.inode == sockets.socket_inode(theirs)
    assert device.find_listener(hit4.inode).hub_id == HUB
    assert device.find_listener(hit6.inode) is None
    device.withdraw(handle)
    ours.close()
    theirs.close()


def test_an_advert_dies_with_its_advertiser(kit, device):
    server = kit.agent()
    sock = server.call("listen")
    server.call("advertise", sock=sock["id"], hub=HUB.hex())
    found = device.find_listener(sock["inode"])
    assert found is not None and found.pid == server.real_pid and found.hub_id == HUB
    server.kill()
    kit.wait_gone(device, server)
    assert device.find_listener(sock["inode"]) is None
    if kit.kind == "embedded":
        assert not [n for n in os.listdir(kit.rtdir) if n.startswith("adv-")], "stale advert"
    else:
        assert device.status()["counts"]["adverts"] == 0


def test_a_closed_then_rebound_listener_is_not_advertised(kit, device):
    """The advertisement names one socket: a new listener on the same address and port is
    another inode, which nobody advertised (the old advert is stale but names nothing live)."""
    old = listener()
    port = old.getsockname()[1]
    old_inode = sockets.socket_inode(old)
    device.advertise(old, HUB)
    old.close()
    other = kit.agent()
    new = other.call("listen", port=port)
    assert new["inode"] != old_inode
    hit = sockets.diag().lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 41000))
    assert hit.inode == new["inode"]
    assert device.find_listener(hit.inode) is None


# --- peer messaging -------------------------------------------------------------------------

def test_peer_requests_both_ways_carry_the_right_peer_info(kit, device):
    peer = kit.agent()
    info = peer.call("open")
    peer_ep = bytes.fromhex(info["endpoint"])
    peer.call("set_handler", mode="echo")
    reply = device.peer_request(peer_ep, "group_open", **OPEN)
    assert reply == {"token": OPEN["token"], "size": OPEN["size"], "max_slots": 128}
    assert device.peer_request(peer_ep, "extent_add", group_id=GROUP, side="server", index=1,
                               token=b"x" * 16,
                               size=1 << 20) == {}
    assert device.peer_request(peer_ep, "extent_remove", group_id=GROUP, side="server",
                               index=1) == {}
    assert device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server") == {}
    log = peer.call("handler_log")
    assert [c["op"] for c in log["calls"]] == ["group_open", "extent_add", "extent_remove",
                                               "group_close"]
    seen = log["calls"][0]
    assert seen["peer"] == {"endpoint": device.endpoint_id.hex(), "pid": os.getpid(),
                            "uid": os.getuid(), "gid": os.getgid()}
    assert seen["fields"]["hub_id"] == HUB.hex() and seen["fields"]["max_slots"] == 128
    assert seen["thread"] == "smcish-ism-handler"  # never the endpoint (attach) thread

    recorder = Recorder()
    device.set_endpoint_handler(recorder)
    got = peer.call("peer_request", endpoint=device.endpoint_id.hex(), peer_op="group_open",
                    fields={**{k: v.hex() if isinstance(v, bytes) else v
                               for k, v in OPEN.items()}})
    assert got == {"token": (b"R" * 16).hex(), "size": OPEN["size"], "max_slots": 64}
    (who, op, fields, thread), = recorder.calls
    assert who == PeerInfo(peer_ep, peer.real_pid, os.getuid(), os.getgid())
    assert op == "group_open" and fields["token"] == OPEN["token"]
    assert thread == "smcish-ism-handler"
    assert device.peer_alive(peer_ep) and peer.call("peer_alive", endpoint=device.endpoint_id.hex())


@pytest.mark.parametrize("mode, error", [("refuse", "PermissionDenied"),
                                         ("quota", "QuotaExceeded"), ("gone", "DeviceGone")])
def test_a_handler_refusal_comes_back_as_the_same_error(kit, device, mode, error):
    peer = kit.agent()
    peer_ep = bytes.fromhex(peer.call("open")["endpoint"])
    peer.call("set_handler", mode=mode)
    with pytest.raises(getattr(ism_backend, error), match="agent"):
        device.peer_request(peer_ep, "group_open", **OPEN)
    # A refusal is an answer, the channel stays: even a DeviceGone *answer* (a hub whose loop
    # was busy) must not close it, or the peer takes it for our death and fails the group.
    assert device.peer_alive(peer_ep)
    peer.call("set_handler", mode="echo")
    device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    assert peer.call("handler_log")["gone"] == []


def test_handler_bugs_no_handler_and_invalid_replies_are_ism_errors(kit, device):
    peer = kit.agent()
    peer_ep = bytes.fromhex(peer.call("open")["endpoint"])
    with pytest.raises(IsmError, match="no smcish hub in this process"):
        device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    peer.call("set_handler", mode="crash")
    with pytest.raises(IsmError, match="RuntimeError") as info:
        device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    assert type(info.value) is IsmError
    peer.call("set_handler", mode="invalid")
    with pytest.raises(IsmError, match="invalid reply"):
        device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    peer.call("set_handler", mode="echo")
    assert device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server") == {}


def test_invalid_peer_requests_are_refused_before_anything_is_sent(device):
    somebody = os.urandom(16)
    with pytest.raises(ValueError, match="not a peer op"):
        device.peer_request(somebody, "alloc", size=4096)
    with pytest.raises(ValueError, match="index"):
        device.peer_request(somebody, "extent_add", group_id=GROUP, side="server", index=32,
                            token=HUB, size=1)
    with pytest.raises(ValueError, match="index"):
        device.peer_request(somebody, "extent_remove", group_id=GROUP, side="server", index=0)
    with pytest.raises(ValueError):
        device.peer_request(somebody, "group_close", group_id=b"short", side="server")
    with pytest.raises(ValueError):
        device.peer_request(somebody, "group_close")
    with pytest.raises(ValueError, match="side"):
        device.peer_request(somebody, "group_close", group_id=GROUP, side="both")
    with pytest.raises(ValueError):
        device.peer_request(b"short", "group_close", group_id=GROUP, side="server")
    with pytest.raises(ValueError):
        device.peer_request(somebody, "group_open", **{**OPEN, "size": True})


def test_a_request_to_ourselves_runs_our_handler(device):
    recorder = Recorder()
    device.set_endpoint_handler(recorder)
    assert device.peer_request(device.endpoint_id, "group_open", **OPEN)["max_slots"] == 64
    (who, _op, _, thread), = recorder.calls
    assert who.endpoint_id == device.endpoint_id and who.pid == os.getpid()
    assert thread == "smcish-ism-handler"
    assert device.peer_alive(device.endpoint_id)


def test_a_handler_may_attach_its_own_regions(kit, device):
    """The handler thread attaching one of its own regions (a group's extent) must not wait
    for the endpoint thread: the embedded device short-circuits it."""
    peer = kit.agent()
    peer_ep = bytes.fromhex(peer.call("open")["endpoint"])
    peer.call("set_handler", mode="attach_own")
    assert device.peer_request(peer_ep, "group_open", **OPEN)["size"] == OPEN["size"]


def test_both_sides_adding_extents_at_once_do_not_wait_on_each_other(kit, device):
    """Each side's handler attaches the other's new extent while its own extent_add is in
    flight (both link-group ends grow together under a burst of set-ups). Found by the scale
    benchmark: on the embedded device peer ops and attaches shared one connection per peer,
    whose lock each requester held until its answer, so both handlers waited for the timeout,
    the connection was closed, and the link group with all its connections failed."""
    peer = kit.agent()
    peer_ep = bytes.fromhex(peer.call("open")["endpoint"])
    peer.call("set_handler", mode="attach_peer")
    seen: list = []

    class AttachPeer(Recorder):
        def handle(self, who, op, fields):
            time.sleep(0.3)
            view = device.attach(fields["token"], who.endpoint_id)
            seen.append(bytes(view.mem[:8]))
            device.detach(view)
            return {}

    device.set_endpoint_handler(AttachPeer())
    mine = device.alloc(SIZE)
    mine.mem[:8] = b"ours!!!!"
    theirs = peer.call("alloc", size=SIZE, fill=b"theirs!!".hex())
    ours_done: list = []

    def ours() -> None:
        try:
            ours_done.append(device.peer_request(peer_ep, "extent_add", group_id=GROUP,
                                                 side="client", index=1, token=mine.token,
                                                 size=SIZE))
        except BaseException as exc:  # reported below
            ours_done.append(exc)

    thread = threading.Thread(target=ours)
    thread.start()
    try:
        got = peer.call("peer_request", endpoint=device.endpoint_id.hex(), peer_op="extent_add",
                        fields={"group_id": GROUP.hex(), "side": "server", "index": 1,
                                "token": theirs["token"], "size": SIZE})
    finally:
        thread.join(10)
    assert got == {} and ours_done == [{}]
    assert seen == [b"theirs!!"]
    calls = peer.call("handler_log")["calls"]
    assert [c["first"] for c in calls if c["op"] == "extent_add"] == [b"ours!!!!".hex()]
    assert device.peer_alive(peer_ep) and peer.call("peer_alive", endpoint=device.endpoint_id.hex())


def test_a_dying_peer_is_device_gone_not_alive_and_reported_gone(kit, device):
    recorder = Recorder()
    device.set_endpoint_handler(recorder)
    peer = kit.agent()
    peer_ep = bytes.fromhex(peer.call("open")["endpoint"])
    peer.call("set_handler", mode="echo")
    device.peer_request(peer_ep, "group_open", **OPEN)               # our channel to it
    peer.call("peer_request", endpoint=device.endpoint_id.hex(),     # its channel to us
              peer_op="group_close", fields={"group_id": GROUP.hex(), "side": "client"})
    assert device.peer_alive(peer_ep)
    peer.kill()
    wait_for(lambda: recorder.gone, what="peer_gone")
    assert recorder.gone == [PeerInfo(peer_ep, peer.real_pid, os.getuid(), os.getgid())]
    wait_for(lambda: not device.peer_alive(peer_ep), what="peer_alive False")
    started = time.monotonic()
    with pytest.raises(DeviceGone, match="fall back to TCP"):
        device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    assert time.monotonic() - started < device.timeout + 1
    assert not device.peer_alive(os.urandom(16))


def test_a_stalled_handler_is_device_gone_within_the_timeout(kit):
    device = kit.device(timeout=0.5)
    peer = kit.agent()
    peer_ep = bytes.fromhex(peer.call("open")["endpoint"])
    peer.call("set_handler", mode="sleep")
    started = time.monotonic()
    with pytest.raises(DeviceGone, match="did not answer"):
        device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    assert time.monotonic() - started < 2.0, "a timeout is not retried"
    peer.kill()


def test_attach_and_peer_ops_keep_working_while_a_handler_blocks(kit, device):
    """A handler blocked in the peer does not stop the peer's endpoint from serving attaches."""
    peer = kit.agent()
    info = peer.call("open")
    peer.call("set_handler", mode="sleep")
    region = peer.call("alloc", size=SIZE, fill=b"still served".hex())
    other = kit.device(timeout=0.5)
    with pytest.raises(DeviceGone):
        other.peer_request(bytes.fromhex(info["endpoint"]), "group_close", group_id=GROUP,
                           side="server")
    started = time.monotonic()
    view = device.attach(bytes.fromhex(region["token"]), bytes.fromhex(info["endpoint"]))
    assert bytes(view.mem[:12]) == b"still served"
    assert time.monotonic() - started < 1.0
    device.detach(view)
    peer.kill()


def test_peer_messaging_leaks_no_fds(kit, device):
    peer = kit.agent()
    peer_ep = bytes.fromhex(peer.call("open")["endpoint"])
    peer.call("set_handler", mode="echo")
    device.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    gc.collect()  # earlier tests' garbage must not close fds during the count
    mine = fd_count(os.getpid())
    theirs = fd_count(peer.real_pid)
    daemon = fd_count(kit.ismd.pid) if kit.ismd else None
    for i in range(300):
        device.peer_request(peer_ep, "extent_add", group_id=GROUP, side="client",
                            index=1 + i % 31,
                            token=HUB, size=4096)
        lsock = listener()
        device.withdraw(device.advertise(lsock, HUB))
        lsock.close()
    assert fd_count(os.getpid()) <= mine
    assert fd_count(peer.real_pid) == theirs
    if daemon is not None:
        wait_for(lambda: fd_count(kit.ismd.pid) == daemon, what="ismd fd count back")
    for _ in range(20):  # peers coming and going: their channels are released too
        other = kit.device()
        other.set_endpoint_handler(Recorder())
        device.peer_request(other.endpoint_id, "group_close", group_id=GROUP, side="server")
        other.close()
        kit.devices.remove(other)

    def settled():
        status = device.status()
        if kit.kind == "ismd":
            client = status["client"]
            return client["served_peers"] == 0 and client["peer_channels"] == 1
        return status["served_peers"] == 0 and status["peers"] == 1

    wait_for(settled, what="the departed peers' channels released")
    assert fd_count(os.getpid()) <= mine
    if daemon is not None:
        wait_for(lambda: fd_count(kit.ismd.pid) == daemon, what="ismd fd count back")


def test_a_forked_child_opens_its_own_device(kit, monkeypatch):
    """The child never uses its parent's connections or threads: get_device() there opens a
    new device (another endpoint), which reaches the parent like any peer and serves its own
    regions; the child's exit leaves the parent's advertisement and endpoint alone."""
    for name, value in kit.env.items():
        if name.startswith("SMCISH_"):
            monkeypatch.setenv(name, value)
    parent = ism_backend.get_device()
    recorder = Recorder()
    parent.set_endpoint_handler(recorder)
    lsock = listener()
    inode = sockets.socket_inode(lsock)
    handle = parent.advertise(lsock, HUB)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = ism_backend.get_device()
            ok = child is not parent and child.endpoint_id != parent.endpoint_id
            ok = ok and child.peer_request(parent.endpoint_id, "group_close", group_id=GROUP,
                                           side="server") == {}
            ok = ok and child.find_listener(inode) is not None
            region = child.alloc(SIZE)  # its own regions, attached by itself
            view = child.attach(region.token, child.endpoint_id)
            code = 0 if ok and view.size == SIZE else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [call[0].pid for call in recorder.calls] == [pid]
    wait_for(lambda: recorder.gone, what="the child's exit seen")
    assert parent.find_listener(inode).endpoint_id == parent.endpoint_id
    assert parent.available and parent.peer_request(parent.endpoint_id, "group_close",
                                                    group_id=GROUP, side="server") == {}
    parent.withdraw(handle)
    parent.close()
    lsock.close()


# --- the none device ------------------------------------------------------------------------

def test_the_none_device_stays_tcp():
    none = open_device("none")
    assert not none.available and none.kind == "none"
    for call in (lambda: none.alloc(SIZE), lambda: none.attach(os.urandom(16), os.urandom(16)),
                 lambda: none.peer_request(os.urandom(16), "group_close", group_id=GROUP,
                                           side="server")):
        with pytest.raises(NoDevice, match="SMCISH_DEVICE"):
            call()
    lsock = listener()
    handle = none.advertise(lsock, HUB)
    none.withdraw(handle)
    assert none.find_listener(sockets.socket_inode(lsock)) is None
    assert none.find_remote_listener(lsock, "127.0.0.1", 1) is None
    assert none.verify_remote_peer(lsock, 1, b"\x01" * 16) is False
    none.release_remote_claim(1)
    none.set_endpoint_handler(Recorder())
    assert none.peer_alive(os.urandom(16)) is False
    lsock.close()


def test_embedded_has_no_cross_namespace_discovery(kit, device):
    if kit.kind != "embedded":
        pytest.skip("ismd's cross-namespace discovery: tests/hardening/test_device_netns.py")
    client = socket.socket()
    client.bind(("127.0.0.1", 0))
    assert device.find_remote_listener(client, "127.0.0.1", 80) is None
    assert device.verify_remote_peer(client, sockets.socket_inode(client), device.endpoint_id) is False
    device.release_remote_claim(sockets.socket_inode(client))
    client.close()


def test_an_unknown_peer_is_device_gone_quickly(kit, device):
    started = time.monotonic()
    with pytest.raises(DeviceGone, match="fall back to TCP"):
        device.peer_request(os.urandom(16), "group_close", group_id=GROUP, side="server")
    assert time.monotonic() - started < 1.0
