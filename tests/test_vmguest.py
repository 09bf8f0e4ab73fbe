"""The guest agent (ism_backend.vmguest) and DaemonDevice's guest mode, without a VM: a real agent
serves real DaemonDevices, its "host" is a vmlink peer the test plays over a socketpair, and its
"PCI devices" are a fake sysfs tree (regular files of BAR size with the host's header) the test
plugs and unplugs. What only a VM can show (hot-plug, read-only backends, SIGBUS) is the VM
harness's (docs/vm.md)."""

import contextlib
import json
import logging
import mmap
import os
import queue
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tty

import pytest

from device_helpers import REPO, child_env, short_tmpdir, wait_for
from ism_backend import (
    DeviceGone,
    DeviceProtocolError,
    IsmError,
    PermissionDenied,
    UnknownToken,
    factory,
    proto,
    sockets,
    vmlink,
)
from ism_backend.client import GUEST_SOCKET_PATH, GUEST_TIMEOUT, DaemonDevice, find_guest_port
from ism_backend.control import ControlClient, ControlServer
from ism_backend.daemon import bind_listener, default_socket_path
from ism_backend.embedded import EmbeddedDevice
from ism_backend.vmguest import HEADER, MAGIC, FdTransport, GuestAgent, PortTransport, SocketTransport

ROOT = os.geteuid() == 0
HUB = bytes(range(16))
GROUP = b"G" * 16
REMOTE_EP = b"R" * 16
SIZE = 8192


def bar_of(size: int) -> int:
    return 1 << (size + 4096 - 1).bit_length()


class FakeSysfs:
    """``<root>/bus/pci/devices/*``: ivshmem devices whose resource2 is a regular file."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.devices = os.path.join(root, "bus", "pci", "devices")
        os.makedirs(self.devices)
        self.n = 0
        self._device("0000:00:01.0", "0x8086", "0x1234")      # a decoy that is no ivshmem

    def _device(self, name: str, vendor: str, device: str) -> str:
        path = os.path.join(self.devices, name)
        os.makedirs(path)
        for attr, value in (("vendor", vendor), ("device", device), ("enable", "0")):
            with open(os.path.join(path, attr), "w") as fh:
                fh.write(value + "\n")
        return path

    def plug(self, region: int, token: bytes, size: int) -> str:
        self.n += 1
        path = self._device(f"0000:01:{self.n:02x}.0", "0x1af4", "0x1110")
        with open(os.path.join(path, "resource2"), "wb") as fh:
            fh.truncate(bar_of(size))
            fh.write(HEADER.pack(MAGIC, token, size, region))
        return path

    @staticmethod
    def unplug(path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


class FakeHost:
    """The host's end of the link, scripted: default handlers plug regions into the fake sysfs;
    every request and notification from the agent is recorded."""

    def __init__(self, sock: socket.socket | int, sysfs: FakeSysfs) -> None:
        self.sysfs = sysfs
        self.calls: list[tuple[str, dict]] = []
        self.notes: list[tuple[str, dict]] = []
        self.cv = threading.Condition()
        self.next_id = 100
        self.plugged: dict[int, str] = {}
        self.remote: dict[bytes, tuple[int, int]] = {}     # token -> (region, size)
        self.on_data = None
        self.handlers = {
            "hello": lambda f: {"name": "guest-a", "quota": 1 << 30, "ports": 12},
            "alloc": self._alloc, "attach": self._attach, "detach": self._unplug,
            "free": self._unplug, "endpoint": lambda f: {}, "connect": self._connect,
            "find": lambda f: {"found": False, "endpoint_id": bytes(16), "hub_id": bytes(16),
                               "pid": 0, "uid": 0, "claim": 0},
            "verify": lambda f: {"verified": True}, "release": lambda f: {},
        }
        self._closed = False
        fd = sock if isinstance(sock, int) else sock.detach()
        self.link = vmlink.Link(fd, self._request, self._notify, name="fake-host")
        self.link.start()

    def close(self) -> None:
        """Close the link once (vmlink's ``Link.close`` closes its fd number every time)."""
        if not self._closed:
            self._closed = True
            self.link.close()

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _alloc(self, f: dict) -> dict:
        rid, token, size = self._id(), os.urandom(16), f["size"]
        self.plugged[rid] = self.sysfs.plug(rid, token, size)
        return {"region": rid, "token": token, "size": size, "offset": 4096, "bar": bar_of(size)}

    def _attach(self, f: dict) -> dict:
        entry = self.remote.get(bytes.fromhex(f["token"]))
        if entry is None:
            raise UnknownToken("fake host: unknown token")
        rid, size = entry
        if rid not in self.plugged:
            self.plugged[rid] = self.sysfs.plug(rid, bytes.fromhex(f["token"]), size)
        return {"region": rid, "size": size, "offset": 4096, "bar": bar_of(size)}

    def _unplug(self, f: dict) -> dict:
        path = self.plugged.pop(f["region"], None)
        if path is not None:
            self.sysfs.unplug(path)
        return {}

    def _connect(self, f: dict) -> dict:
        return {"chan": self._id(), "pid": 4242, "uid": 0, "gid": 0}

    def _request(self, link, op, fields):
        fields = {k: v for k, v in fields.items() if k not in ("id", "op")}
        with self.cv:
            self.calls.append((op, fields))
            self.cv.notify_all()
        handler = self.handlers.get(op)
        if handler is None:
            raise IsmError(f"fake host: no {op}")
        return handler(fields)

    def _notify(self, link, op, fields):
        fields = {k: v for k, v in fields.items() if k != "op"}
        with self.cv:
            self.notes.append((op, fields))
            self.cv.notify_all()
        if op == "data" and self.on_data is not None:
            self.on_data(fields)

    def ops(self, op: str) -> list[dict]:
        with self.cv:
            return [f for o, f in self.calls if o == op]

    def wait_call(self, op: str, n: int = 1, timeout: float = 5.0) -> list[dict]:
        with self.cv:
            assert self.cv.wait_for(lambda: len([1 for o, _ in self.calls if o == op]) >= n,
                                    timeout), f"no {op} (calls: {[o for o, _ in self.calls]})"
        return self.ops(op)

    def wait_note(self, op: str, pred=lambda f: True, timeout: float = 5.0) -> dict:
        with self.cv:
            assert self.cv.wait_for(lambda: any(o == op and pred(f) for o, f in self.notes),
                                    timeout), f"no {op} note (notes: {self.notes[-5:]})"
            return next(f for o, f in self.notes if o == op and pred(f))

    def add_remote(self, size: int = SIZE) -> tuple[bytes, int]:
        token, rid = os.urandom(16), self._id()
        self.remote[token] = (rid, size)
        return token, rid


class Guest:
    """A real agent in this process (its own threads) on a socket in a fresh directory."""

    def __init__(self, transport, sysfs_root: str, **kw) -> None:
        self.dir = short_tmpdir(0o755, "vmg")
        self.path = os.path.join(self.dir, "ismd.sock")
        listener = bind_listener(self.path, 0o666)
        kw.setdefault("bar_timeout", 1.0)
        self.agent = GuestAgent(transport, sysfs_root=sysfs_root, socket_path=self.path,
                                retry_interval=0.2, linger_interval=0.2, **kw)
        self.server = ControlServer(listener, self.agent)
        self.agent.start(self.server)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        self.devices: list[DaemonDevice] = []

    def device(self) -> DaemonDevice:
        dev = DaemonDevice(self.path)
        self.devices.append(dev)
        return dev

    def status(self) -> dict:
        conn = ControlClient(self.path, 5.0, "agent")
        try:
            return conn.request("status")[0]["status"]
        finally:
            conn.close()

    def stop(self) -> None:
        for dev in self.devices:
            dev.close()
        self.server.stop()
        self.thread.join(5)
        self.server.close()
        self.agent.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sysfs(tmp_path):
    return FakeSysfs(str(tmp_path / "sys"))


@pytest.fixture
def rig(sysfs):
    """(host, guest): an agent linked to a scripted host over a socketpair."""
    ours, theirs = socket.socketpair()
    host = FakeHost(ours, sysfs)
    guest = Guest(FdTransport(theirs.detach()), sysfs.root)
    assert guest.agent.wait_linked(5), "the agent never linked"
    yield host, guest
    guest.stop()
    host.close()


def drained(region, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if region.drain():
            return True
        time.sleep(0.01)
    return False


# --- identity -----------------------------------------------------------------------------------

def test_hello_says_guest_and_the_endpoint_is_registered_with_the_host(rig):
    host, guest = rig
    dev = guest.device()
    assert (dev.kind, dev.guest, dev.geometry) == ("daemon", True, "guest")
    assert dev.timeout == GUEST_TIMEOUT and dev.status()["client"]["geometry"] == "guest"
    assert host.calls[0][0] == "hello" and host.calls[0][1] == {"version": 1}
    ups = host.wait_call("endpoint")
    assert ups[0] == {"endpoint_id": dev.endpoint_id.hex(), "up": True}
    status = guest.status()
    assert status["kind"] == "guest"
    assert status["guest"]["link"] == "up" and status["guest"]["host"]["name"] == "guest-a"
    dev.close()
    downs = host.wait_call("endpoint", 2)
    assert downs[1] == {"endpoint_id": dev.endpoint_id.hex(), "up": False}


def test_geometry_of_the_other_devices_and_the_hello_kind_schema(tmp_path):
    assert factory.NoneDevice().geometry == "none"
    assert EmbeddedDevice.geometry == "embedded" and DaemonDevice.geometry == "daemon"
    good = {"kind": "guest", "gid": "0" * 32, "endpoint_id": "0" * 32, "pid": 1, "uid": 0}
    record = proto.encode_reply(1, **good)
    assert proto.decode_reply(record, "hello", 1)["kind"] == "guest"
    with pytest.raises(DeviceProtocolError):
        proto.decode_reply(proto.encode_reply(1, **{**good, "kind": "vm"}), "hello", 1)


# --- regions ------------------------------------------------------------------------------------

def test_alloc_maps_the_plugged_bar_and_free_unplugs_it_after_the_unmap(rig, sysfs, caplog):
    caplog.set_level(logging.INFO, logger="ism_backend.vmguest")
    host, guest = rig
    dev = guest.device()
    region = dev.alloc(SIZE)
    (call,) = host.ops("alloc")
    assert call == {"size": SIZE}
    assert (region.size, region.offset, region.access) == (SIZE, 4096, "rw")
    region.mem[:5] = b"hello"
    path = host.plugged[max(host.plugged)]
    with open(os.path.join(path, "resource2"), "rb") as fh:
        fh.seek(4096)
        assert fh.read(5) == b"hello"                        # the BAR itself, past the header
    with open(os.path.join(path, "enable")) as fh:
        assert fh.read().strip() == "1"                       # memory decoding turned on
    rid = max(host.plugged)
    dev.free(region)
    assert host.wait_call("free")[0] == {"region": rid}
    assert guest.status()["guest"]["regions"]["owned"] == 0
    assert "still maps" not in caplog.text                    # the device unmapped first


def test_a_freed_region_still_exported_is_freed_at_the_host_once_unmapped(rig):
    host, guest = rig
    dev = guest.device()
    region = dev.alloc(SIZE)
    view = memoryview(region.mem)                             # keeps the mapping alive
    dev.free(region)
    time.sleep(0.3)
    assert host.ops("free") == []
    view.release()
    other = dev.alloc(SIZE)                                   # reaps the zombie
    host.wait_call("free")
    dev.free(other)


def test_a_local_attach_needs_no_host_and_free_waits_for_the_last_attacher(rig):
    host, guest = rig
    owner, attacher, third = guest.device(), guest.device(), guest.device()
    mine = owner.alloc(SIZE)
    mine.mem[:4] = b"data"
    theirs = attacher.attach(mine.token, owner.endpoint_id)
    assert host.ops("attach") == []
    assert bytes(theirs.mem[:4]) == b"data"
    with pytest.raises(TypeError):
        theirs.mem[0] = 1                                     # read-only mapping
    theirs.ring()
    assert drained(mine)                                      # the owner's own doorbell
    with pytest.raises(PermissionDenied):
        third.attach(mine.token, owner.endpoint_id)           # tokens are one-shot
    owner.free(mine)
    time.sleep(0.5)
    assert host.ops("free") == [], "freed at the host while a process of the guest maps it"
    attacher.detach(theirs)
    host.wait_call("free")
    with pytest.raises(UnknownToken):
        third.attach(mine.token, owner.endpoint_id)


def test_remote_regions_are_counted_per_guest_and_rings_cross_the_link(rig):
    host, guest = rig
    token, rid = host.add_remote()
    one, two = guest.device(), guest.device()
    a = one.attach(token, REMOTE_EP)
    assert host.ops("attach") == [{"token": token.hex()}]
    path = host.plugged[rid]
    with open(os.path.join(path, "resource2"), "r+b") as fh:  # the owner guest writes
        fh.seek(4096)
        fh.write(b"remote")
    assert bytes(a.mem[:6]) == b"remote"
    b = two.attach(token, REMOTE_EP)
    assert len(host.ops("attach")) == 2 and host.sysfs.n == 1   # one BAR for the guest
    a.ring()
    assert host.wait_note("ring") == {"region": rid}
    one.detach(a)
    time.sleep(0.5)
    assert host.ops("detach") == [], "unplugged while another process of the guest maps it"
    two.detach(b)
    assert host.wait_call("detach")[0] == {"region": rid}
    with pytest.raises(UnknownToken):
        one.attach(os.urandom(16), REMOTE_EP)                  # the host's refusal


def test_a_host_ring_wakes_the_owner(rig):
    host, guest = rig
    dev = guest.device()
    region = dev.alloc(SIZE)
    host.link.notify("ring", region=max(host.plugged))
    assert drained(region)
    host.link.notify("ring", region=99999)                    # unknown: ignored
    dev.free(region)


def test_a_bar_that_never_appears_fails_in_bounded_time_and_is_freed(rig):
    host, guest = rig
    dev = guest.device()
    host.handlers["alloc"] = lambda f: {"region": 7, "token": os.urandom(16), "size": f["size"],
                                        "offset": 4096, "bar": bar_of(f["size"])}
    start = time.monotonic()
    with pytest.raises(DeviceGone, match="no ivshmem device"):
        dev.alloc(SIZE)
    assert time.monotonic() - start < 3.0
    assert host.wait_call("free")[0] == {"region": 7}


def test_a_process_gone_with_a_live_mapping_is_unplugged_only_after_it_unmapped(rig):
    host, guest = rig
    token, rid = host.add_remote()
    conn = ControlClient(guest.path, 8.0, "agent")
    conn.request("hello", endpoint_id=os.urandom(16))
    reply, (fd, bell) = conn.request("attach", token=token, access="r")
    mem = mmap.mmap(fd, reply["size"], mmap.MAP_SHARED, mmap.PROT_READ, offset=reply["offset"])
    conn.close()                                              # disconnect, still mapped
    time.sleep(1.0)
    assert host.ops("detach") == []
    assert guest.status()["guest"]["regions"]["lingering"] == 1
    mem.close()
    os.close(fd)
    os.close(bell)
    assert host.wait_call("detach")[0] == {"region": rid}


def test_an_agent_cycle_leaks_no_fds_and_no_threads(sysfs):
    def cycle():
        ours, theirs = socket.socketpair()
        host = FakeHost(ours, sysfs)
        guest = Guest(FdTransport(theirs.detach()), sysfs.root)
        try:
            assert guest.agent.wait_linked(5)
            a, b = guest.device(), guest.device()
            host.on_data = lambda f: host.link.notify("data", chan=f["chan"], rec=vmlink.b64(
                proto.encode_result("group_close",
                                    proto.decode_request(vmlink.unb64(f["rec"])).id, {})))
            mine = a.alloc(SIZE)
            local = b.attach(mine.token, a.endpoint_id)
            token, _ = host.add_remote()
            one, two = b.attach(token, REMOTE_EP), a.attach(token, REMOTE_EP)
            a.peer_request(REMOTE_EP, "group_close", group_id=GROUP, side="client")
            b.detach(local)
            a.free(mine)
            b.detach(one)
            a.detach(two)
            host.wait_call("detach")
        finally:
            guest.stop()
            host.close()
    cycle()
    time.sleep(0.2)
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for _ in range(3):
        cycle()
    wait_for(lambda: threading.active_count() <= threads, 5, "threads gone")
    assert len(os.listdir("/proc/self/fd")) == fds


# --- peer channels --------------------------------------------------------------------------

class Handler:
    def __init__(self) -> None:
        self.calls: list = []
        self.gone: queue.Queue = queue.Queue()

    def handle(self, peer, op, fields):
        self.calls.append((peer, op, fields))
        return {}

    def peer_gone(self, peer):
        self.gone.put(peer)


def test_a_peer_channel_to_another_guest_is_relayed_both_ways(rig):
    host, guest = rig
    dev = guest.device()

    def answer(f):  # the other guest's endpoint answers every request
        request = proto.decode_request(vmlink.unb64(f["rec"]))
        reply = proto.encode_result(request.op, request.id, {})
        host.link.notify("data", chan=f["chan"], rec=vmlink.b64(reply))
    host.on_data = answer
    assert dev.peer_request(REMOTE_EP, "group_close", group_id=GROUP, side="client") == {}
    (call,) = host.ops("connect")
    assert call == {"from_endpoint": dev.endpoint_id.hex(), "to_endpoint": REMOTE_EP.hex(),
                    "pid": os.getpid(), "uid": os.geteuid(), "gid": os.getegid()}
    assert dev.peer_alive(REMOTE_EP)
    chan = host.wait_note("data")["chan"]
    host.link.notify("close", chan=chan)                      # the other guest went away
    wait_for(lambda: not dev.peer_alive(REMOTE_EP), 3, "channel closed")
    dev.peer_request(REMOTE_EP, "group_close", group_id=GROUP, side="client")
    second = host.wait_call("connect", 2)
    assert len(second) == 2
    chan2 = host.wait_note("data", lambda f: f["chan"] != chan)["chan"]
    dev.close()                                               # our end goes away
    host.wait_note("close", lambda f: f["chan"] == chan2)


def test_a_close_overtaking_the_connect_reply_closes_the_new_channel(rig):
    host, guest = rig
    dev = guest.device()

    def connect(f):  # the other guest refused at once: its close is sent before our reply
        chan = host._id()
        host.link.notify("close", chan=chan)
        return {"chan": chan, "pid": 4242, "uid": 0, "gid": 0}
    host.handlers["connect"] = connect
    start = time.monotonic()
    with pytest.raises(DeviceGone):
        dev.peer_request(REMOTE_EP, "group_close", group_id=GROUP, side="client")
    assert time.monotonic() - start < 2.0                     # not the request timeout
    assert not any(o == "data" for o, _ in host.notes)


def test_take_hands_a_local_endpoint_a_channel_from_another_guest(rig):
    host, guest = rig
    dev = guest.device()
    handler = Handler()
    dev.set_endpoint_handler(handler)
    host.wait_call("endpoint")
    took = host.link.call("take", 3.0, chan=9, from_endpoint=REMOTE_EP,
                          to_endpoint=dev.endpoint_id, pid=4242, uid=0, gid=0)
    assert (took["pid"], took["uid"], took["gid"]) == (os.getpid(), os.geteuid(), os.getegid())
    request = proto.encode_request("group_close", 1, group_id=GROUP, side="server")
    host.link.notify("data", chan=9, rec=vmlink.b64(request))
    note = host.wait_note("data", lambda f: f["chan"] == 9)
    assert proto.decode_reply(vmlink.unb64(note["rec"]), "group_close", 1) == {}
    ((peer, op, fields),) = handler.calls
    assert fields == {"group_id": GROUP, "side": "server"}
    assert (peer.endpoint_id, peer.pid, op) == (REMOTE_EP, 4242, "group_close")
    host.link.notify("close", chan=9)
    assert handler.gone.get(timeout=3).endpoint_id == REMOTE_EP
    with pytest.raises(DeviceGone, match="no process of this guest"):
        host.link.call("take", 3.0, chan=10, from_endpoint=REMOTE_EP, to_endpoint=b"Z" * 16,
                       pid=1, uid=0, gid=0)


# --- listener lookups and claims ------------------------------------------------------------

def bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def listening() -> socket.socket:
    sock = bound()
    sock.listen(8)
    return sock


@pytest.mark.skipif(not ROOT, reason="the agent reads socket namespaces (SIOCGSKNS) as root")
def test_find_keeps_a_claim_the_host_checks_once(rig):
    host, guest = rig
    dev = guest.device()
    host.handlers["find"] = lambda f: {"found": True, "endpoint_id": REMOTE_EP, "hub_id": HUB,
                                       "pid": 4242, "uid": 0, "claim": 42}
    server, client = listening(), bound()
    advert = dev.find_remote_listener(client, "192.0.2.1", 5000)
    assert (advert.endpoint_id, advert.hub_id, advert.pid) == (REMOTE_EP, HUB, 4242)
    (call,) = host.ops("find")
    assert call == {"family": 4, "src": "127.0.0.1", "sport": client.getsockname()[1],
                    "dst": "192.0.2.1", "dport": 5000, "endpoint_id": dev.endpoint_id.hex()}
    assert dev.find_remote_listener(bound(), "127.0.0.1", 5000) is None  # this guest's own
    assert len(host.ops("find")) == 1
    client.connect(server.getsockname())
    inode, sport, lport = (sockets.socket_inode(client), client.getsockname()[1],
                           server.getsockname()[1])

    def check(**over):
        fields = {"inode": inode, "endpoint_id": dev.endpoint_id, "family": 4,
                  "local": "127.0.0.1", "lport": sport, "peer": "127.0.0.1", "pport": lport,
                  **over}
        return host.link.call("check", 3.0, **fields)["verified"]
    assert check(endpoint_id=REMOTE_EP) is False
    assert check(pport=1) is False
    assert check() is True
    assert check() is False                                   # spent
    other = bound()
    dev.find_remote_listener(other, "192.0.2.1", 5000)
    dev.release_remote_claim(sockets.socket_inode(other))
    assert host.wait_call("release")[0] == {"claim": 42}
    for sock in (server, client, other):
        sock.close()


@pytest.mark.skipif(not ROOT, reason="the agent reads socket namespaces (SIOCGSKNS) as root")
def test_match_names_an_advertised_listener_and_verify_asks_the_host(rig):
    host, guest = rig
    dev = guest.device()
    server = listening()
    dev.advertise(server, HUB)
    lport = server.getsockname()[1]
    client = bound()
    cport = client.getsockname()[1]
    match = {"family": 4, "src": "127.0.0.1", "sport": cport, "dst": "127.0.0.1", "dport": lport}
    found = host.link.call("match", 3.0, claim=7, **match)
    assert found["found"] is True and found["endpoint_id"] == dev.endpoint_id.hex()
    assert found["hub_id"] == HUB.hex() and found["pid"] == os.getpid()
    assert host.link.call("match", 3.0, **{**match, "dport": 1})["found"] is False
    assert host.link.call("match", 3.0, **{**match, "dst": "192.0.2.1"})["found"] is False
    client.connect(("127.0.0.1", lport))
    accepted, _ = server.accept()
    assert dev.verify_remote_peer(accepted, 1234, REMOTE_EP) is True
    (call,) = host.ops("verify")
    assert call == {"claim": 7, "inode": 1234, "endpoint_id": REMOTE_EP.hex(), "family": 4,
                    "local": "127.0.0.1", "lport": lport, "peer": "127.0.0.1", "pport": cport}
    assert dev.verify_remote_peer(accepted, 1234, REMOTE_EP) is False   # spent: no host call
    assert len(host.ops("verify")) == 1
    for sock in (server, client, accepted):
        sock.close()


# --- the host going away, and a hostile or broken host --------------------------------------

def test_link_eof_fails_cross_guest_requests_clearly_and_local_service_goes_on(rig):
    host, guest = rig
    dev = guest.device()
    host.on_data = lambda f: host.link.notify("data", chan=f["chan"], rec=vmlink.b64(
        proto.encode_result("group_close", proto.decode_request(vmlink.unb64(f["rec"])).id, {})))
    dev.peer_request(REMOTE_EP, "group_close", group_id=GROUP, side="client")
    region = dev.alloc(SIZE)
    host.close()
    wait_for(lambda: guest.agent.session is None, 3, "link down")
    wait_for(lambda: not dev.peer_alive(REMOTE_EP), 3, "relay closed")
    with pytest.raises(DeviceGone, match="no ISM host"):
        dev.alloc(SIZE)
    with pytest.raises(DeviceGone, match="no ISM host"):
        dev.attach(os.urandom(16), REMOTE_EP)
    with pytest.raises(DeviceGone, match="no ISM host"):
        dev.peer_request(b"Q" * 16, "group_close", group_id=GROUP, side="client")
    region.mem[:2] = b"ok"                                    # still mapped and usable
    dev.free(region)
    server = listening()
    dev.advertise(server, HUB)                                # local service goes on
    assert guest.status()["guest"]["link"] == "down"
    server.close()


def test_malformed_host_messages_do_not_crash_the_agent(rig):
    host, guest = rig
    dev = guest.device()
    host.link.notify("ring", region="x")
    host.link.notify("data", chan=1, rec="!!!")
    host.link.notify("bogus")
    with pytest.raises(DeviceProtocolError):
        host.link.call("match", 3.0, family=4)
    with pytest.raises(DeviceProtocolError):
        host.link.call("nonsense", 3.0)
    host.handlers["alloc"] = lambda f: {"region": "x"}
    with pytest.raises(IsmError, match="malformed") as bad:
        dev.alloc(SIZE)
    assert type(bad.value) is IsmError                        # not the connection's fault
    host.handlers["alloc"] = lambda f: {"region": 5, "token": os.urandom(16), "size": f["size"],
                                        "offset": 0, "bar": bar_of(f["size"])}
    with pytest.raises(IsmError, match="impossible layout"):
        dev.alloc(SIZE)
    assert host.wait_call("free")[0] == {"region": 5}
    assert dev.available
    assert guest.agent.session is not None and guest.status()["guest"]["link"] == "up"
    os.write(host.link.fd, struct.pack(">I", 5) + b"hello")  # not JSON: the link ends
    wait_for(lambda: guest.agent.session is None, 3, "link ended")
    assert guest.status()["kind"] == "guest"                   # the agent serves on


def test_the_agent_reconnects_and_registers_its_endpoints_again(sysfs):
    directory = short_tmpdir(0o700, "vml")
    path = os.path.join(directory, "link.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(5)
    guest = Guest(SocketTransport(path), sysfs.root)
    hosts = []
    try:
        hosts.append(FakeHost(listener.accept()[0], sysfs))
        assert guest.agent.wait_linked(5)
        dev = guest.device()
        hosts[0].wait_call("endpoint")
        hosts[0].close()
        hosts.append(FakeHost(listener.accept()[0], sysfs))
        calls = hosts[1].wait_call("endpoint")
        assert hosts[1].calls[0][0] == "hello"
        assert calls[0] == {"endpoint_id": dev.endpoint_id.hex(), "up": True}
        wait_for(lambda: guest.agent.session is not None, 3, "linked again")
        region = dev.alloc(SIZE)                              # served through the new link
        dev.free(region)
    finally:
        guest.stop()
        for host in hosts:
            host.close()
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_the_port_transport_pumps_a_character_device(sysfs):
    """A pty stands in for the virtio-serial port (a character device the agent opens by path,
    non-blocking, with pump threads): the link runs over it, and a hang-up of the other side
    ends the session."""
    master, slave = os.openpty()
    tty.setraw(slave)                                         # bytes through unchanged
    ours, theirs = socket.socketpair()
    host = FakeHost(ours, sysfs)
    stop = threading.Event()

    def host_side():  # the chardev: theirs <-> master, until it hangs up (closes the master)
        try:
            while not stop.is_set():
                ready, _, _ = select.select([master, theirs], [], [], 0.05)
                if master in ready:
                    theirs.sendall(os.read(master, 65536))
                if theirs in ready:
                    data = theirs.recv(65536)
                    if not data:
                        return
                    os.write(master, data)
        except OSError:
            return
        finally:
            os.close(master)
    pump = threading.Thread(target=host_side, daemon=True)
    pump.start()
    guest = Guest(PortTransport(os.ttyname(slave), sysfs.root), sysfs.root)
    os.close(slave)                                           # the agent opened its own
    try:
        assert guest.agent.wait_linked(5)
        dev = guest.device()
        region = dev.alloc(SIZE)                              # a few frames each way
        stop.set()                                            # the host side hangs up
        pump.join(5)
        wait_for(lambda: guest.agent.session is None, 5, "session ended")
        dev.free(region)
    finally:
        stop.set()
        guest.stop()
        host.close()
        theirs.close()


# --- against the real host side ------------------------------------------------------------

class FakeQemu:
    """What vmhost sees of one guest's QEMU: a QMP server whose ``device_add`` makes an ivshmem
    device in the guest's fake sysfs (resource2: a symlink to vmhost's region file), and the
    chardev socket vmhost connects to (handed to the guest's agent as its link)."""

    def __init__(self, base: str, name: str, sysfs: FakeSysfs) -> None:
        self.name, self.sysfs = name, sysfs
        self.qmp_path = os.path.join(base, f"{name}.qmp")
        self.chan_path = os.path.join(base, f"{name}.chan")
        self.listeners = []
        for path in (self.qmp_path, self.chan_path):
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path)
            sock.listen(1)
            sock.settimeout(15)
            self.listeners.append(sock)
        self.objects: dict[str, dict] = {}
        self.devices: dict[str, str] = {}
        self.chan: socket.socket | None = None
        self.qmp_conn: socket.socket | None = None
        self.lock = threading.Lock()
        threading.Thread(target=self._serve_qmp, daemon=True).start()
        threading.Thread(target=self._accept_chan, daemon=True).start()

    @property
    def spec(self) -> str:
        return f"{self.name},qmp={self.qmp_path},chan={self.chan_path}"

    def _accept_chan(self) -> None:
        with contextlib.suppress(OSError):
            self.chan = self.listeners[1].accept()[0]

    def _send(self, conn: socket.socket, obj: dict) -> None:
        with self.lock:
            conn.sendall(json.dumps(obj).encode() + b"\r\n")

    def _serve_qmp(self) -> None:
        try:
            conn = self.qmp_conn = self.listeners[0].accept()[0]
            self._send(conn, {"QMP": {"version": {"qemu": {"major": 7, "minor": 2}},
                                      "capabilities": []}})
            for line in conn.makefile("rb"):
                msg = json.loads(line)
                name, args = msg.get("execute"), msg.get("arguments", {})
                if name == "object-add":
                    self.objects[args["id"]] = args
                elif name == "device_add":
                    self.sysfs.n += 1
                    path = self.sysfs._device(f"0000:{self.sysfs.n + 1:02x}:00.0", "0x1af4",
                                              "0x1110")
                    os.symlink(self.objects[args["memdev"]]["mem-path"],
                               os.path.join(path, "resource2"))
                    self.devices[args["id"]] = path
                self._send(conn, {"return": {}, "id": msg.get("id")})
                if name == "device_del":
                    self.sysfs.unplug(self.devices.pop(args["id"]))
                    self._send(conn, {"event": "DEVICE_DELETED", "data": {"device": args["id"]},
                                      "timestamp": {"seconds": 0, "microseconds": 0}})
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for sock in (*self.listeners, self.qmp_conn):
            if sock is not None:
                sock.close()


@pytest.mark.skipif(not (REPO / "ism_backend" / "vmhost.py").exists(), reason="no vmhost yet")
@pytest.mark.skipif(not ROOT, reason="the agent reads socket namespaces (SIOCGSKNS) as root")
def test_two_agents_work_through_the_real_vmhost(tmp_path):
    base = short_tmpdir(0o700, "vme")
    qemus = {name: FakeQemu(base, name, FakeSysfs(str(tmp_path / name))) for name in "ab"}
    regions = os.path.join(base, "regions")
    cmd = [sys.executable, "-m", "ism_backend.vmhost", "--quota", "64M", "--total-memory", "128M",
           "--dir", regions, "--ports", "4", "--connect-timeout", "10"]
    for qemu in qemus.values():
        cmd += ["--guest", qemu.spec]
    proc = subprocess.Popen(cmd, env=child_env(), cwd=str(REPO), stderr=subprocess.PIPE,
                            text=True)
    guests: dict[str, Guest] = {}
    try:
        for name, qemu in qemus.items():
            wait_for(lambda q=qemu: q.chan is not None or proc.poll() is not None, 15,
                     "vmhost connecting")
            assert qemu.chan is not None, proc.communicate(timeout=5)[1]
            guests[name] = Guest(FdTransport(qemu.chan.detach()), qemu.sysfs.root)
            assert guests[name].agent.wait_linked(5)
        a, b = guests["a"].device(), guests["b"].device()
        # a region of guest a, attached read-only in guest b; b's ring wakes a
        mine = a.alloc(SIZE)
        mine.mem[:5] = b"hello"
        theirs = b.attach(mine.token, a.endpoint_id)
        assert bytes(theirs.mem[:5]) == b"hello"
        theirs.ring()
        assert drained(mine)
        # a peer channel from a's endpoint to b's
        handler = Handler()
        b.set_endpoint_handler(handler)
        assert a.peer_request(b.endpoint_id, "group_close", group_id=GROUP, side="client") == {}
        assert handler.calls[0][0].endpoint_id == a.endpoint_id
        # find (a) -> match (b, with the claim id) -> verify (b) -> check (a). Both fake guests
        # share this network namespace: a's "the destination is in this guest" shortcut is off.
        guests["a"].agent._find_query = lambda sock, host, port: (
            4, "127.0.0.1", sock.getsockname()[1], host, port)
        server = listening()
        b.advertise(server, HUB)
        client = bound()
        advert = a.find_remote_listener(client, "127.0.0.1", server.getsockname()[1])
        assert advert is not None and advert.endpoint_id == b.endpoint_id
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        assert b.verify_remote_peer(accepted, sockets.socket_inode(client), a.endpoint_id)
        assert not b.verify_remote_peer(accepted, sockets.socket_inode(client), a.endpoint_id)
        for sock in (server, client, accepted):
            sock.close()
        # regions go away once nobody maps them
        b.detach(theirs)
        a.free(mine)
        wait_for(lambda: os.listdir(regions) == [".vmhost.lock"], 5, "region reclaimed")
        # the host goes away: the agents say so
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        wait_for(lambda: all(g.agent.session is None for g in guests.values()), 5, "links down")
        with pytest.raises(DeviceGone, match="no ISM host"):
            a.alloc(SIZE)
    finally:
        for guest in guests.values():
            guest.stop()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for qemu in qemus.values():
            qemu.close()
        shutil.rmtree(base, ignore_errors=True)


# --- selection, and the command line --------------------------------------------------------

def test_a_guest_is_detected_by_its_port_name_and_selected_by_default(tmp_path, monkeypatch):
    ports = tmp_path / "class" / "virtio-ports"
    for name, label in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", "org.smcish.ism.0")):
        (ports / name).mkdir(parents=True)
        (ports / name / "name").write_text(label + "\n")
    assert find_guest_port(str(tmp_path)) == "/dev/vport1p1"
    assert find_guest_port(str(tmp_path / "nothing")) is None
    if ROOT:
        assert default_socket_path() == GUEST_SOCKET_PATH
    monkeypatch.delenv("SMCISH_DEVICE", raising=False)
    monkeypatch.setattr(factory, "_default_spec", None)
    monkeypatch.setattr(factory, "find_guest_port", lambda: "/dev/vport1p1")
    assert factory._resolve(None) == "unix:" + GUEST_SOCKET_PATH
    monkeypatch.setattr(factory, "find_guest_port", lambda: None)
    assert factory._resolve(None) == "unix:" + GUEST_SOCKET_PATH   # detected once per process
    monkeypatch.setattr(factory, "_default_spec", None)
    assert factory._resolve(None) == "embedded"
    assert factory._resolve("guest") == "unix:" + GUEST_SOCKET_PATH


def test_the_command_line_serves_reports_status_and_stops_on_sigterm(sysfs):
    ours, theirs = socket.socketpair()
    host = FakeHost(ours, sysfs)
    directory = short_tmpdir(0o755, "vmc")
    path = os.path.join(directory, "ismd.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ism_backend.vmguest", "--link-fd", str(theirs.fileno()),
         "--socket", path, "--sysfs-root", sysfs.root], pass_fds=[theirs.fileno()],
        env=child_env(), cwd=str(REPO), stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        host.wait_call("hello", timeout=15)
        wait_for(lambda: os.path.exists(path), 10, "socket bound")
        out = subprocess.run([sys.executable, "-m", "ism_backend.vmguest", "status", "--socket",
                              path], capture_output=True, text=True, env=child_env(),
                             cwd=str(REPO), timeout=20)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["kind"] == "guest" and status["guest"]["link"] == "up"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
        host.close()
        shutil.rmtree(directory, ignore_errors=True)
