"""What only the embedded device has, with real processes: its runtime dir and the files in it
(endpoints, advertisements, what crashed processes leave), the own-region short-circuit, the peer
connection cache, its timeouts, selection and forks (the contract shared with ismd, regions,
pooling and crashes included: test_device_contract.py).
"""

import fcntl
import os
import shutil
import socket
import stat
import time

import pytest

import ism_backend
from device_helpers import Agent, AgentError, child_env, short_tmpdir
from ism_backend import DeviceGone, NoDevice, get_device, open_device, sockets
from ism_backend.embedded import EmbeddedDevice

HUB = bytes(range(16))
GROUP = b"G" * 16


def listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(8)
    return sock

SIZE = 512 + 16384


@pytest.fixture
def rtdir(monkeypatch):
    path = short_tmpdir()
    monkeypatch.setenv("SMCISH_RUNTIME_DIR", path)
    monkeypatch.setenv("SMCISH_DEVICE", "embedded")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def device(rtdir):
    dev = EmbeddedDevice(rtdir)
    yield dev
    dev.close()


@pytest.fixture
def agents(rtdir):
    started = []

    def start(**kw):
        kw.setdefault("env", child_env(SMCISH_RUNTIME_DIR=rtdir, SMCISH_DEVICE="embedded"))
        agent = Agent(**kw)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


def leftovers(path):
    """Per-process files left in a runtime dir (``gid`` and ``.mutex`` belong to the domain)."""
    return sorted(set(os.listdir(path)) - {"gid", ".mutex"})


def test_attach_to_a_missing_endpoint_is_device_gone(device):
    started = time.monotonic()
    with pytest.raises(DeviceGone, match="fall back to TCP"):
        device.attach(os.urandom(16), os.urandom(16))
    assert time.monotonic() - started < 2.5


def test_stale_files_of_a_killed_process_are_cleaned_at_open(rtdir, agents):
    victim = agents()
    victim.call("open")
    sock = victim.call("listen")
    victim.call("advertise", sock=sock["id"])
    victim.kill()
    assert sorted(n.split("-")[0] for n in leftovers(rtdir)) == ["adv", "ep", "ep"]
    old = os.path.join(rtdir, f".adv-{sock['inode']}-deadbeef0000")  # a crashed advertise
    open(old, "w").close()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    dev = EmbeddedDevice(rtdir)
    try:
        mine = {f"ep-{dev.endpoint_id.hex()}.lock", f"ep-{dev.endpoint_id.hex()}.sock"}
        assert set(leftovers(rtdir)) == mine
    finally:
        dev.close()
    assert leftovers(rtdir) == []


def test_normal_exit_removes_every_file(rtdir, agents):
    peer = agents()
    peer.call("open")
    peer.call("advertise", sock=peer.call("listen")["id"])
    peer.call("alloc", size=SIZE)
    assert len(leftovers(rtdir)) == 3
    assert peer.exit() == 0  # atexit closes the device
    assert leftovers(rtdir) == []


def test_advertisement_files_are_atomic_and_a_shared_listener_names_nobody(device, agents, rtdir):
    lsock = listener()
    inode = sockets.socket_inode(lsock)
    first = device.advertise(lsock, HUB)
    path = os.path.join(rtdir, f"adv-{inode}")
    with open(path, "rb") as fh:
        assert fh.read() == (f"{device.endpoint_id.hex()} {HUB.hex()} {os.getpid()} "
                             f"{os.getuid()}\n").encode()
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(BlockingIOError):  # held LOCK_EX by its advertiser from the start
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    os.close(fd)
    assert not [n for n in os.listdir(rtdir) if n.startswith(".adv-")], "no temp file left"
    assert device.find_listener(inode).hub_id == HUB
    again = device.advertise(lsock, HUB)     # the same hub again: still named
    assert device.find_listener(inode).hub_id == HUB
    device.withdraw(again)
    first = device.advertise(lsock, HUB)
    worker = agents()
    worker_ep = bytes.fromhex(worker.call("open")["endpoint"])
    theirs = worker.call("listen")
    other = device.find_listener(theirs["inode"])
    assert other is None
    # another hub advertises the same socket inode (a pre-fork server's workers share one):
    # any of them may accept, a claim reaches one: nobody is named, clients stay TCP
    second = device.advertise(lsock, b"\x22" * 16)
    assert device.find_listener(inode) is None
    with open(path, "rb") as fh:
        assert fh.read() == b"shared\n"
    device.withdraw(first)  # the replaced one: removing it must not remove the live file
    assert device.find_listener(inode) is None and os.path.exists(path)
    device.withdraw(second)
    assert device.find_listener(inode) is None and not os.path.exists(path)
    worker.call("advertise", sock=theirs["id"], hub=HUB.hex())
    assert device.find_listener(theirs["inode"]).endpoint_id == worker_ep
    lsock.close()


def test_a_dead_advertisement_is_removed_by_the_reader(device, agents, rtdir):
    server = agents()
    sock = server.call("listen")
    server.call("advertise", sock=sock["id"])
    server.kill()
    path = os.path.join(rtdir, f"adv-{sock['inode']}")
    assert os.path.exists(path)
    assert device.find_listener(sock["inode"]) is None
    assert not os.path.exists(path)


def test_own_region_attach_never_uses_the_endpoint_socket(device, agents, monkeypatch):
    """Attaching our own region is local: it works with the endpoint unreachable, counts as
    an attachment (the pool waits for it) and spends the one-shot token like a peer's."""
    def unreachable(*args, **kw):
        raise AssertionError("the endpoint socket was used for our own region")

    monkeypatch.setattr(device, "_peer", unreachable)
    region = device.alloc(SIZE)
    region.mem[:4] = b"mine"
    view = device.attach(region.token, device.endpoint_id)
    assert bytes(view.mem[:4]) == b"mine" and view.access == "r"
    with pytest.raises(TypeError):
        view.mem[0] = 0
    assert device.status()["served_attachments"] == 1
    monkeypatch.undo()
    peer = agents()
    with pytest.raises(AgentError) as info:  # the one-shot was spent by our own attach
        peer.call("attach", token=region.token.hex(), endpoint=device.endpoint_id.hex())
    assert info.value.name == "PermissionDenied"
    device.free(region)
    assert device.status()["draining"] == 1
    device.detach(view)
    assert device.status()["pooled"] == 1 and device.status()["served_attachments"] == 0


def test_peers_info_asks_every_live_endpoint(device, agents):
    peer = agents()
    peer.call("open")
    peer.call("set_info", connections=[{"peer": "127.0.0.1:1234", "mode": "ism"}])
    device.set_info_provider(lambda: [{"mine": True}])
    infos = device.peers_info()
    assert {"mine": True} in next(i for i in infos if i.get("self"))["connections"]
    theirs = next(i for i in infos if not i.get("self"))
    assert theirs["connections"] == [{"peer": "127.0.0.1:1234", "mode": "ism"}]


def test_runtime_dir_must_be_private_and_ours(monkeypatch):
    base = short_tmpdir()
    try:
        shared = os.path.join(base, "shared")
        os.mkdir(shared, 0o700)
        os.chmod(shared, 0o750)
        with pytest.raises(NoDevice, match="group/others"):
            EmbeddedDevice(shared)
        foreign = os.path.join(base, "foreign")
        os.mkdir(foreign, 0o700)
        if os.geteuid() == 0:  # giving a dir away needs root
            os.chown(foreign, 65534, 65534)
            with pytest.raises(NoDevice, match="owned by uid 65534"):
                EmbeddedDevice(foreign)
        link = os.path.join(base, "link")
        os.symlink(foreign, link)
        with pytest.raises(NoDevice, match="not a directory"):
            EmbeddedDevice(link)
        fresh = os.path.join(base, "fresh")
        dev = EmbeddedDevice(fresh)
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
        dev.close()
        monkeypatch.setenv("SMCISH_RUNTIME_DIR", shared)
        with pytest.raises(NoDevice, match="chmod 700"):
            open_device("embedded")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_gid_is_created_once_and_shared(rtdir):
    devs = [EmbeddedDevice(rtdir) for _ in range(3)]
    try:
        assert len({d.gid for d in devs}) == 1 and len(devs[0].gid) == 16
        assert len({d.endpoint_id for d in devs}) == 3
        with open(os.path.join(rtdir, "gid")) as fh:
            assert bytes.fromhex(fh.read().strip()) == devs[0].gid
    finally:
        for d in devs:
            d.close()


def test_selection_and_caching(rtdir, monkeypatch):
    dev = get_device()
    assert dev.kind == "embedded" and get_device("embedded") is dev
    dev.close()
    again = get_device()
    assert again is not dev and again.available  # a closed device is reopened
    monkeypatch.setenv("SMCISH_DEVICE", "none")  # (the none device: test_device_contract)
    assert get_device().kind == "none"
    with pytest.raises(NoDevice, match="unknown ISM device spec"):
        open_device("bogus")
    with pytest.raises(NoDevice, match="start ismd"):
        open_device("unix:/nonexistent/ismd.sock")
    assert isinstance(ism_backend.IsmError("x"), Exception)


def test_a_fork_after_devices_closed_touches_no_stale_fd(rtdir):
    """Regression: a device closed in the parent keeps stale fd numbers, which other objects
    reuse; the child's at-fork hook must not close them (it once closed a live socket there,
    failed, and left the parent's devices cached for the child)."""
    for _ in range(3):
        open_device("embedded").close()
    pipes = [os.pipe() for _ in range(16)]  # likely to reuse the closed devices' numbers
    dev = get_device()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for r, w in pipes:
                os.fstat(r)
                os.fstat(w)
            child = get_device()
            code = 0 if child is not dev and child.available else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for r, w in pipes:
        os.close(r)
        os.close(w)
    assert dev.available


def test_peer_connection_cache_is_bounded(device, agents):
    device.peer_cache_max = 2
    owners = [agents() for _ in range(4)]
    infos = [o.call("alloc", size=SIZE) for o in owners]
    kept = device.attach(bytes.fromhex(infos[0]["token"]), bytes.fromhex(infos[0]["endpoint"]))
    for info in infos[1:]:
        view = device.attach(bytes.fromhex(info["token"]), bytes.fromhex(info["endpoint"]))
        device.detach(view)
    assert device.status()["peers"] <= 2
    # the connection carrying a live attachment is never the one dropped
    assert bytes.fromhex(infos[0]["endpoint"]) in device._peers
    owners[1].kill()
    device.detach(kept)
    # nor one we sent peer ops on (the peer would take its close for our death)
    chatty = agents()
    chatty_ep = bytes.fromhex(chatty.call("open")["endpoint"])
    chatty.call("set_handler")
    device.peer_request(chatty_ep, "group_close", group_id=GROUP, side="server")
    for _info in infos[2:]:
        more = agents().call("alloc", size=SIZE)
        device.detach(device.attach(bytes.fromhex(more["token"]), bytes.fromhex(more["endpoint"])))
    assert chatty_ep in device._peer_ops      # (peer ops have a connection of their own)
    assert chatty.call("handler_log")["gone"] == []


def test_attach_to_a_stalled_endpoint_is_bounded(rtdir):
    stalled_id = os.urandom(16)
    lock = os.open(os.path.join(rtdir, f"ep-{stalled_id.hex()}.lock"), os.O_CREAT | os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # looks alive...
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(os.path.join(rtdir, f"ep-{stalled_id.hex()}.sock"))
    listener.listen(8)  # ...but never answers
    dev = EmbeddedDevice(rtdir, timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(DeviceGone, match="did not answer"):
            dev.attach(os.urandom(16), stalled_id)
        assert time.monotonic() - started < 1.0, "a timeout is not retried"
    finally:
        dev.close()
        listener.close()
        os.close(lock)


