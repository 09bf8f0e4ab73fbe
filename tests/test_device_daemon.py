"""ismd with real processes: lifecycle, policy, grants, crash reclaim, containers, status CLI."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from device_helpers import (
    REPO, Agent, AgentError, Ismd, child_env, fd_count, rss_kib, short_tmpdir,
)
from ism_backend import (
    DeviceGone, NoDevice, PermissionDenied, QuotaExceeded, UnknownToken, get_device, open_device,
)
from ism_backend.client import DaemonDevice

SIZE = 512 + 16384
NO_EP = bytes(16)
ROOT = os.geteuid() == 0


@pytest.fixture
def ismd():
    daemon = Ismd("--total-memory", "8M", "--quota", "4M", "--allow-uid", "1234",
                  "--allow-uid", "1235")
    yield daemon
    assert daemon.alive(), "ismd died during the test"
    err = daemon.stop()
    assert "Traceback" not in err, err
    shutil.rmtree(daemon.dir, ignore_errors=True)


@pytest.fixture
def device(ismd):
    dev = DaemonDevice(ismd.path)
    yield dev
    dev.close()


@pytest.fixture
def agents(ismd):
    started = []

    def start(**kw):
        kw.setdefault("env", child_env(SMCISH_DEVICE=ismd.spec))
        agent = Agent(**kw)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_lifecycle_across_processes(device, agents, ismd):
    assert device.kind == "daemon" and device.endpoint_id == NO_EP and len(device.gid) == 16
    owner, reader = agents(), agents()
    assert bytes.fromhex(owner.call("open")["gid"]) == device.gid
    theirs = [owner.call("alloc", size=SIZE, fill=f"region {i}".encode().hex()) for i in range(8)]
    views = [device.attach(bytes.fromhex(t["token"]), NO_EP) for t in theirs]
    for i, view in enumerate(views):
        assert bytes(view.mem[:8]) == f"region {i}".encode()
    owner.call("write", id=theirs[0]["id"], data=b"changed".hex())
    assert bytes(views[0].mem[:7]) == b"changed"
    status = device.status()
    assert status["counts"]["regions"] == 8 and status["counts"]["attachments"] == 8
    assert status["counts"]["clients"] == 2
    assert "token" not in json.dumps(status["regions"])  # tokens are capabilities: never shown

    mine = device.alloc(SIZE)
    mine.mem[:5] = b"hello"
    a = reader.call("attach", token=mine.token.hex(), endpoint=NO_EP.hex())
    assert reader.call("read", id=a["id"], n=5) == b"hello".hex()
    result = reader.call("try_write", id=a["id"])
    assert all(result[k].startswith("refused") for k in
               ("api", "mmap", "proc_mmap", "proc_write", "truncate")), result

    for view in views:
        device.detach(view)
    for t in theirs:
        owner.call("free", id=t["id"])
    reader.call("detach", id=a["id"])
    device.free(mine)
    status = device.status()
    assert status["counts"]["attachments"] == 0 and status["counts"]["live_tokens"] == 0


@pytest.mark.skipif(not ROOT, reason="attachers under other uids need root (setuid)")
def test_grants_revokes_and_wrong_tokens(device, agents):
    region = device.alloc(SIZE)
    first = agents(setuid=1234)
    second = agents(setuid=1235)
    assert second.call("uid") == 1235
    first.call("attach", token=region.token.hex(), endpoint=NO_EP.hex())  # the one-shot claim
    with pytest.raises(AgentError) as info:
        second.call("attach", token=region.token.hex(), endpoint=NO_EP.hex())
    assert info.value.name == "PermissionDenied" and "grant(token, uid=1235)" in str(info.value)
    device.grant(region.token, 1235)
    b = second.call("attach", token=region.token.hex(), endpoint=NO_EP.hex())
    second.call("detach", id=b["id"])
    device.revoke(region.token, 1235)
    with pytest.raises(AgentError) as info:
        second.call("attach", token=region.token.hex(), endpoint=NO_EP.hex())
    assert info.value.name == "PermissionDenied" and "revoked" in str(info.value)
    with pytest.raises(AgentError) as info:
        second.call("attach", token=os.urandom(16).hex(), endpoint=NO_EP.hex())
    assert info.value.name == "UnknownToken"
    # only the owner's connection may grant; others learn nothing about the token
    other = DaemonDevice(device.path)
    try:
        with pytest.raises(UnknownToken):
            other.grant(region.token, 1235)
        with pytest.raises(PermissionDenied):
            other.attach(region.token, NO_EP, access="rw")
    finally:
        other.close()
    token = region.token
    device.free(region)
    with pytest.raises(AgentError) as info:
        first.call("attach", token=token.hex(), endpoint=NO_EP.hex())
    assert info.value.name == "UnknownToken"


@pytest.mark.skipif(not ROOT, reason="running a client under another uid needs root (setuid)")
def test_uid_outside_the_policy_is_refused(ismd, agents):
    outsider = agents(setuid=65534)
    with pytest.raises(AgentError) as info:
        outsider.call("open")
    assert info.value.name == "PermissionDenied"
    assert "--allow-uid 65534" in str(info.value)
    insider = agents(setuid=1234)
    assert insider.call("open")["kind"] == "daemon"
    insider.call("alloc", size=SIZE)
    root_dev = DaemonDevice(ismd.path)
    root_dev.alloc(SIZE)
    seen = insider.call("status")  # a non-root viewer sees totals, and only its own entries
    assert seen["counts"]["regions"] == 2
    assert [r["owner_uid"] for r in seen["regions"]] == [1234]
    assert {c["uid"] for c in seen["clients"]} == {1234}
    assert len(root_dev.status()["regions"]) == 2
    root_dev.close()


def test_connections_per_uid_are_capped():
    daemon = Ismd("--max-connections", "3")
    try:
        devs = [DaemonDevice(daemon.path) for _ in range(3)]
        with pytest.raises(QuotaExceeded, match="--max-connections"):
            DaemonDevice(daemon.path)
        devs.pop().close()

        def reopens():
            try:
                DaemonDevice(daemon.path).close()
                return True
            except QuotaExceeded:
                return False  # ismd has not processed the disconnect yet

        wait_for(reopens)
        for dev in devs:
            dev.close()
    finally:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


def test_quota_and_total_memory(device, ismd):
    regions = [device.alloc(1 << 20) for _ in range(3)]  # 3 MiB of the 4 MiB quota
    with pytest.raises(QuotaExceeded, match="--quota"):
        device.alloc(2 << 20)
    for region in regions:
        device.free(region)  # pooled: still charged, until we need the room
    big = device.alloc(4 << 20)  # the pool is released to make room
    assert device.status()["used"] == 4 << 20
    device.free(big)
    other = DaemonDevice(ismd.path, pool_per_size=0)
    try:
        with pytest.raises(QuotaExceeded):
            other.alloc((8 << 20) + 1)
    finally:
        other.close()
    with pytest.raises(ValueError):
        device.alloc(0)


def test_owner_sigkill_peer_keeps_reading_then_reclaim(device, agents, ismd):
    shm_before = set(os.listdir("/dev/shm"))
    owner = agents()
    info = owner.call("alloc", size=SIZE, fill=b"last words".hex())
    owner.call("advertise", host="0.0.0.0", port=7000)
    owner.call("add_intent", local_port=45000, remote_host="127.0.0.1", remote_port=7000)
    assert device.lookup("127.0.0.1", 7000) and device.has_intent(45000, "127.0.0.1", 7000)
    view = device.attach(bytes.fromhex(info["token"]), NO_EP)
    owner.kill()
    wait_for(lambda: device.status()["counts"]["clients"] == 1)
    assert bytes(view.mem[:10]) == b"last words"
    status = device.status()
    assert [r["state"] for r in status["regions"]] == ["orphaned"]
    assert status["used"] > 0
    # listener and intent died with the connection
    assert not device.lookup("127.0.0.1", 7000)
    assert not device.has_intent(45000, "127.0.0.1", 7000)
    assert bytes(view.mem[:10]) == b"last words"
    device.detach(view)
    status = device.status()
    assert status["regions"] == [] and status["used"] == 0
    assert set(os.listdir("/dev/shm")) == shm_before
    assert sorted(os.listdir(ismd.dir)) == ["ismd.sock"]


def test_attacher_death_releases_and_pool_reuse(device, agents):
    region = device.alloc(SIZE)
    region.mem[:6] = b"secret"
    fd, token = region.fd, region.token
    peer = agents()
    a = peer.call("attach", token=token.hex(), endpoint=NO_EP.hex())
    device.free(region)
    fresh = device.alloc(SIZE)  # pooled one is still attached: a new memfd
    assert fresh.fd != fd
    assert peer.call("read", id=a["id"], n=6) == b"secret".hex()
    peer.kill()
    wait_for(lambda: device.status()["counts"]["attachments"] == 0)
    reused = device.alloc(SIZE)
    assert reused.fd == fd and reused.token != token
    assert bytes(reused.mem[:SIZE]) == bytes(SIZE)
    with pytest.raises(UnknownToken):
        device.attach(token, NO_EP)
    view = device.attach(reused.token, NO_EP)
    assert bytes(view.mem[:6]) == bytes(6)
    device.detach(view)


def test_daemon_detach_waits_for_buffer_exports(device):
    region = device.alloc(SIZE)
    view = device.attach(region.token, NO_EP)
    exported = memoryview(view.mem)
    device.detach(view)
    device.free(region)
    assert device.status()["counts"]["attachments"] == 1, "still mapped: not released yet"
    exported.release()
    device.alloc(4096)
    assert device.status()["counts"]["attachments"] == 0


def test_stalled_daemon_is_device_gone_within_the_timeout():
    import socket
    import threading

    from ism_backend import memfd, proto

    path = os.path.join(short_tmpdir(), "stalled.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    conns = []

    def serve():  # answers hello, then never again
        conn, _ = listener.accept()
        conns.append(conn)
        request = proto.decode_request(conn.recv(proto.MAX_RECORD))
        memfd.send_msg(conn, proto.encode_reply(request.id, kind="daemon", gid=bytes(16),
                                                endpoint_id=bytes(16), pid=1, uid=0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        dev = DaemonDevice(path, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(DeviceGone, match="did not answer alloc"):
            dev.alloc(SIZE)
        assert time.monotonic() - started < 1.0
        assert not dev.available
        thread.join(5)
        with pytest.raises(NoDevice, match="did not answer hello"):
            DaemonDevice(path, timeout=0.3)  # nobody accepts any more: hello times out
    finally:
        listener.close()
        for conn in conns:
            conn.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def test_daemon_gone_then_reopened(monkeypatch):
    daemon = Ismd()
    try:
        monkeypatch.setenv("SMCISH_DEVICE", daemon.spec)
        dev = get_device()
        region = dev.alloc(SIZE)
        region.mem[:2] = b"ok"
        daemon.stop()
        with pytest.raises(DeviceGone, match="fall back to TCP"):
            dev.alloc(SIZE)
        assert not dev.available
        assert dev.lookup("127.0.0.1", 1) is False
        dev.free(region)  # cleanup still works without the daemon
        with pytest.raises(NoDevice, match="start ismd"):
            get_device()
        daemon = Ismd(socket_dir=daemon.dir)  # same path: the stale socket is replaced
        again = get_device()
        assert again is not dev and again.available
        again.alloc(SIZE)
    finally:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


def test_second_daemon_on_a_live_socket_refuses(ismd):
    proc = subprocess.run([sys.executable, "-m", "ism_backend", "--socket", ismd.path],
                          env=child_env(), cwd=str(REPO), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and "already serving" in proc.stderr
    assert ismd.alive()


def test_status_cli_prints_json(device, ismd):
    region = device.alloc(SIZE)
    view = device.attach(region.token, NO_EP)
    device.advertise("127.0.0.1", 8443)
    proc = subprocess.run([sys.executable, "-m", "ism_backend.daemon", "status", "--socket",
                           ismd.path], env=child_env(), cwd=str(REPO), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["counts"]["regions"] == 1 and status["counts"]["attachments"] == 1
    assert status["listeners"] == [{"host": "127.0.0.1", "port": 8443, "pid": os.getpid()}]
    assert {c["pid"] for c in status["clients"]} >= {os.getpid()}
    assert status["regions"][0]["state"] == "live"
    device.detach(view)


@pytest.mark.skipif(not ROOT, reason="unshare --net --mount needs root")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare not installed")
def test_socket_bind_mounted_into_a_container(device, ismd):
    # The "container": new network and mount namespaces. Inside, the daemon socket is
    # bind-mounted at another path and the original directory is hidden under a tmpfs.
    inner_dir = short_tmpdir(0o755, "ctr")
    inner = os.path.join(inner_dir, "ismd.sock")
    open(inner, "w").close()
    script = (f'mount --bind "{ismd.path}" "{inner}" && mount -t tmpfs none "{ismd.dir}" '
              '&& exec "$@"')
    agent = Agent(env=child_env(SMCISH_DEVICE=f"unix:{inner}"),
                  prefix=["unshare", "--net", "--mount", "--", "sh", "-c", script, "sh"])
    try:
        assert agent.call("netns") != os.readlink("/proc/self/ns/net")
        assert agent.call("listdir", path=ismd.dir) == []  # only the bind mount leads to ismd
        assert bytes.fromhex(agent.call("open")["gid"]) == device.gid
        theirs = agent.call("alloc", size=SIZE, fill=b"from the container".hex())
        view = device.attach(bytes.fromhex(theirs["token"]), NO_EP)
        assert bytes(view.mem[:18]) == b"from the container"
        mine = device.alloc(SIZE)
        mine.mem[:9] = b"from host"
        a = agent.call("attach", token=mine.token.hex(), endpoint=NO_EP.hex())
        assert agent.call("read", id=a["id"], n=9) == b"from host".hex()
        agent.call("advertise", host="10.0.0.2", port=80)
        assert device.lookup("10.0.0.2", 80)
        device.detach(view)
    finally:
        agent.kill()
        shutil.rmtree(inner_dir, ignore_errors=True)
    assert os.listdir(ismd.dir) == ["ismd.sock"], "the tmpfs stayed inside the namespace"


def test_alloc_free_cycles_leak_no_fds(ismd):
    """10,000 fresh alloc/free cycles (pool off) plus attaches: ismd's fd count returns."""
    baseline = fd_count(ismd.pid)
    own_baseline = fd_count(os.getpid())
    rss_before = rss_kib(ismd.pid)
    dev = DaemonDevice(ismd.path, pool_per_size=0)
    for i in range(10_000):
        region = dev.alloc(4096 if i % 2 else SIZE)
        if i % 500 == 0:
            view = dev.attach(region.token, NO_EP)
            dev.free(region)  # freed while attached: reclaimed at detach
            dev.detach(view)
        else:
            dev.free(region)
    assert dev.status()["used"] == 0
    dev.close()
    wait_for(lambda: fd_count(ismd.pid) == baseline)
    assert fd_count(os.getpid()) == own_baseline
    growth = rss_kib(ismd.pid) - rss_before
    print(f"ismd RSS growth over 10,000 cycles: {growth} KiB")
    assert growth < 4096, f"ismd RSS grew {growth} KiB"
    pooled = DaemonDevice(ismd.path)  # and with the pool on: same memfd over and over
    for _ in range(1000):
        pooled.free(pooled.alloc(SIZE))
    assert pooled.status()["counts"]["regions"] == 1
    pooled.close()
    wait_for(lambda: fd_count(ismd.pid) == baseline)


def test_open_device_spec_and_env(ismd, monkeypatch):
    dev = open_device(ismd.spec)
    assert dev.kind == "daemon"
    dev.close()
    assert not dev.available
    monkeypatch.setenv("SMCISH_DEVICE", ismd.spec)
    assert get_device().kind == "daemon"


def test_claims_through_ismd(device, agents, monkeypatch):
    client = agents()
    key = dict(server_host="127.0.0.1", server_port=8000)
    h = client.call("claim", client_port=42000, role="client", **key)
    assert h is not None
    assert device.claim(42000, "::ffff:127.0.0.1", 8000, "server") is None
    assert device.has_intent(42000, "127.0.0.1", 8000)
    client.call("release_claim", handle=h)
    decided = device.claim(42001, "127.0.0.1", 8000, "server")
    assert decided is not None
    assert client.call("claim", client_port=42001, role="client", **key) is None
    device.release_claim(decided)
    assert client.call("claim", client_port=42001, role="client", **key) is not None
    client.kill()  # its claims die with its connection
    wait_for(lambda: device.status()["counts"]["clients"] == 1)
    assert device.claim(42001, "127.0.0.1", 8000, "server") is not None
    assert device.status()["counts"]["server_claims"] == 1
    device.close()  # and so do the server's
    assert device.claim(1, "127.0.0.1", 2, "client") is None  # no device: stay TCP
    # No device: the server must not assume "plain" (a claiming client's proposal would then
    # reach its application as data): None, wait for the client's first bytes.
    assert device.claim(1, "127.0.0.1", 2, "server") is None


def test_unreleased_server_claims_expire():
    daemon = Ismd("--claim-ttl", "0.2")
    try:
        dev = DaemonDevice(daemon.path)
        assert dev.claim(42000, "127.0.0.1", 8000, "server") is not None
        assert dev.claim(42000, "127.0.0.1", 8000, "client") is None
        time.sleep(0.3)
        assert dev.claim(42000, "127.0.0.1", 8000, "client") is not None
        assert dev.status()["counts"]["server_claims"] == 0
        dev.close()
    finally:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="util-linux prlimit not installed")
def test_fd_exhaustion_is_refused_not_fatal():
    import socket

    daemon = Ismd("--quota", "1G", prefix=["prlimit", "--nofile=48:48"])
    try:
        dev = DaemonDevice(daemon.path)
        regions = []
        with pytest.raises(QuotaExceeded, match="could not serve alloc"):
            for _ in range(40):  # two daemon fds per region: EMFILE long before 40
                regions.append(dev.alloc(4096))
        hogs = []
        for _ in range(30):  # connections it cannot accept any more
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(daemon.path)
            hogs.append(s)
        time.sleep(0.2)
        assert daemon.alive()
        for region in regions:
            dev.free(region)
        dev.close()
        for s in hogs:
            s.close()
        again = DaemonDevice(daemon.path)  # accepting resumed once fds came back
        again.free(again.alloc(4096))
        again.close()
        assert daemon.alive()
    finally:
        err = daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)
    assert "Traceback" not in err, err
    assert "pausing accepts" in err  # the EMFILE path was really taken
