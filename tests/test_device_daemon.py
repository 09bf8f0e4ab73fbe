"""What only ismd has, with real processes: its policy (uids, grants to other uids, connection
caps, quotas), its lifecycle (stalled, gone, restarted, a second daemon), containers, the status
CLI, fd exhaustion, socket-bound advertisements through SCM_RIGHTS, the daemon identity and socket
directory checks, brokered peer channels (the contract shared with the embedded device, regions,
pooling and crash reclaim included: tests/test_device_contract.py)."""

import contextlib
import gc
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

from benchmarks.children import Child, ChildTimeout, python_argv
from device_helpers import (
    AS_UID,
    REPO,
    Agent,
    AgentError,
    Ismd,
    child_env,
    fd_count,
    rss_kib,
    short_tmpdir,
    wait_for,
)
from ism_backend import (
    DeviceGone,
    DeviceProtocolError,
    NoDevice,
    PermissionDenied,
    QuotaExceeded,
    UnknownToken,
    get_device,
    open_device,
    proto,
    sockets,
)
from ism_backend.client import DaemonDevice
from ism_backend.control import ControlClient

SIZE = 512 + 16384
NO_EP = bytes(16)
HUB = bytes(range(16))
GROUP = b"G" * 16
ROOT = os.geteuid() == 0
OTHER = 1234


def listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(8)
    return sock


def raw_client(path: str, endpoint_id: bytes | None = None) -> ControlClient:
    """A bare control connection (no DaemonDevice checks), introduced with ``endpoint_id``."""
    conn = ControlClient(path, 2.0, "ismd")
    if endpoint_id is not None:
        conn.request("hello", endpoint_id=endpoint_id)
    return conn


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
    daemon = Ismd("--max-connections", "6")  # a device is two connections
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


def test_stalled_daemon_is_device_gone_within_the_timeout():
    import threading

    from ism_backend import memfd

    path = os.path.join(short_tmpdir(), "stalled.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    conns = []

    def serve():  # answers the set-up (hello; hello + serve_endpoint), then never again
        for expected in (["hello"], ["hello", "serve_endpoint"]):
            conn, _ = listener.accept()
            conns.append(conn)
            for op in expected:
                request = proto.decode_request(conn.recv(proto.MAX_RECORD))
                assert request.op == op
                fields = ({"kind": "daemon", "gid": bytes(16), "endpoint_id": bytes(16),
                           "pid": 1, "uid": 0} if op == "hello" else {})
                memfd.send_msg(conn, proto.encode_reply(request.id, **fields))

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
        assert dev.find_listener(1) is None
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
    lsock = listener("::1")  # Linux makes a socket bound to a specific IPv6 address v6only
    device.advertise(lsock, HUB)
    proc = subprocess.run([sys.executable, "-m", "ism_backend.daemon", "status", "--socket",
                           ismd.path], env=child_env(), cwd=str(REPO), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["counts"]["regions"] == 1 and status["counts"]["attachments"] == 1
    assert status["adverts"] == [{
        "inode": sockets.socket_inode(lsock), "addr": "::1", "port": lsock.getsockname()[1],
        "v6only": True, "netns": sockets.netns_inode() if ROOT else None, "pid": os.getpid(),
        "uid": os.getuid()}]
    assert status["endpoint_channels"] == [{"endpoint_id": device.endpoint_id.hex(),
                                            "pid": os.getpid(), "uid": os.getuid()}]
    assert {c["pid"] for c in status["clients"]} >= {os.getpid()}
    assert status["regions"][0]["state"] == "live"
    device.detach(view)
    lsock.close()


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
        sock = agent.call("listen", host="127.0.0.1")  # the container's own loopback
        agent.call("advertise", sock=sock["id"], hub=HUB.hex())
        found = device.find_listener(sock["inode"])
        assert found is not None and found.pid == agent.real_pid and found.hub_id == HUB
        assert device.status()["adverts"][0]["netns"] == int(
            agent.call("netns").split("[")[1].rstrip("]"))
        device.detach(view)
    finally:
        agent.kill()
        shutil.rmtree(inner_dir, ignore_errors=True)
    assert os.listdir(ismd.dir) == ["ismd.sock"], "the tmpfs stayed inside the namespace"


def test_alloc_free_cycles_leak_no_fds(ismd):
    """10,000 fresh alloc/free cycles (pool off) plus attaches: ismd's fd count returns."""
    baseline = fd_count(ismd.pid)
    gc.collect()  # earlier tests' garbage must not close fds during the count
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
    assert fd_count(os.getpid()) <= own_baseline
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
    # the EMFILE path was really taken (a connection it could not keep is refused at once)
    assert "refused a device connection" in err or "pausing accepts" in err


# --- socket-bound advertisements through SCM_RIGHTS ----------------------------------------

def test_ismd_reads_the_socket_itself_and_never_keeps_it(device, ismd):
    lsock = listener()
    inode = sockets.socket_inode(lsock)
    port = lsock.getsockname()[1]
    handle = device.advertise(lsock, HUB)
    assert device.find_listener(inode).endpoint_id == device.endpoint_id
    held = {os.readlink(f"/proc/{ismd.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{ismd.pid}/fd")}
    assert f"socket:[{inode}]" not in held, "ismd kept a copy of the listener"
    lsock.close()  # our close really closes it: the port is free again at once
    again = socket.socket()
    again.bind(("127.0.0.1", port))
    again.close()
    device.withdraw(handle)


def test_ismd_refuses_advertising_what_is_not_a_listening_tcp_socket(ismd):
    conn = raw_client(ismd.path, os.urandom(16))
    unbound, udp = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pipe_r, pipe_w = os.pipe()
    try:
        for fd in (unbound.fileno(), udp.fileno(), pipe_r):
            with pytest.raises(PermissionDenied, match=r"listening TCP socket|must carry a socket"):
                conn.request("advertise", fds=[fd], hub_id=HUB)
        with pytest.raises(DeviceProtocolError, match="carry 1 file descriptors"):
            conn.request("advertise", hub_id=HUB)  # no socket at all
        conn2 = raw_client(ismd.path, os.urandom(16))
        lsock = listener()
        with pytest.raises(DeviceProtocolError, match="carry 0 file descriptors"):
            conn2.request("find_listener", fds=[lsock.fileno()], inode=1)  # fds where none go
        anonymous = raw_client(ismd.path)
        with pytest.raises(PermissionDenied, match="hello"):
            anonymous.request("advertise", fds=[lsock.fileno()], hub_id=HUB)
        lsock.close()
        for c in (conn2, anonymous):
            c.close()
    finally:
        conn.close()
        unbound.close()
        udp.close()
        os.close(pipe_r)
        os.close(pipe_w)


def test_advertisements_count_against_the_entry_limit():
    daemon = Ismd("--max-entries", "3")
    try:
        dev = DaemonDevice(daemon.path)
        socks = [listener() for _ in range(4)]
        handles = [dev.advertise(s, HUB) for s in socks[:3]]
        with pytest.raises(QuotaExceeded, match="--max-entries"):
            dev.advertise(socks[3], HUB)
        dev.withdraw(handles[0])
        dev.advertise(socks[3], HUB)
        dev.close()
        for s in socks:
            s.close()
    finally:
        daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)


def test_an_endpoint_id_belongs_to_one_process(device, agents, ismd):
    """Another process cannot introduce itself with our endpoint id, so it cannot publish
    advertisements in our name, nor receive peer channels meant for us."""
    impostor = Agent(env=child_env(SMCISH_DEVICE=ismd.spec))
    try:
        script = (f"c = __import__('ism_backend.control').control.ControlClient({ismd.path!r})\n"
                  f"c.request('hello', endpoint_id=bytes.fromhex({device.endpoint_id.hex()!r}))\n")
        proc = subprocess.run([sys.executable, "-c", script], env=child_env(), cwd=str(REPO),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0 and "belongs to another process" in proc.stderr
        mine = raw_client(ismd.path, device.endpoint_id)  # the same process may reconnect
        mine.close()
    finally:
        impostor.close()


@pytest.mark.skipif(not ROOT, reason="needs root to run an agent as another uid")
def test_another_uid_cannot_make_ismd_attribute_a_socket_it_does_not_hold(device, agents):
    ours = listener()
    inode = sockets.socket_inode(ours)
    other = agents(setuid=OTHER)
    assert other.call("uid") == OTHER
    # Its own listener is attributed to it, by SO_PEERCRED, whatever it claims.
    theirs = other.call("listen")
    other.call("advertise", sock=theirs["id"], hub=HUB.hex())
    got = device.find_listener(theirs["inode"])
    assert (got.uid, got.pid) == (OTHER, other.real_pid)
    # It cannot name our socket: ismd takes no inode, address or port from a client, only
    # the socket itself, and our socket is not in its fd table.
    with pytest.raises(AgentError):
        other.call("advertise", sock=999)  # no such socket in the agent
    assert device.find_listener(inode) is None
    assert not any(a["inode"] == inode for a in device.status()["adverts"])
    ours.close()


# --- the daemon's identity and its socket directory ---------------------------------------

@pytest.mark.skipif(not ROOT, reason="needs root to run a daemon as another uid")
def test_clients_refuse_a_daemon_of_another_uid_unless_trusted(monkeypatch):
    fake = Ismd(setuid=OTHER)  # "another user bound the socket path"
    try:
        with pytest.raises(NoDevice, match=f"SMCISH_DAEMON_UID={OTHER}"):
            DaemonDevice(fake.path)
        proc = subprocess.run([sys.executable, "-m", "ism_backend", "status", "--socket",
                               fake.path], env=child_env(), cwd=str(REPO), capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode != 0 and "SMCISH_DAEMON_UID" in proc.stderr
        monkeypatch.setenv("SMCISH_DAEMON_UID", str(OTHER))
        trusted = DaemonDevice(fake.path)
        trusted.free(trusted.alloc(4096))
        trusted.close()
        monkeypatch.setenv("SMCISH_DAEMON_UID", "nobody")
        with pytest.raises(NoDevice, match="not a numeric uid"):
            DaemonDevice(fake.path)
    finally:
        err = fake.stop()
        shutil.rmtree(fake.dir, ignore_errors=True)
    assert "Traceback" not in err, err


def _serve_briefly(socket_path: str, *extra: str, uid: int | None = None,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """Start ismd and expect it to refuse at once (or stop it after it started); its stderr."""
    args = ["serve", *extra, *(["--socket", socket_path] if socket_path else [])]
    argv = (python_argv(script=AS_UID, args=[uid, *args]) if uid is not None
            else python_argv(module="ism_backend", args=args))
    with Child(argv, env=env or child_env(), cwd=str(REPO), stdin=None, stdout=subprocess.DEVNULL,
               name="ismd") as child, contextlib.suppress(ChildTimeout):
        child.wait(5)  # still running after 5 s: it is serving, stopped when the block ends
    return subprocess.CompletedProcess(argv, child.proc.returncode, "", child.stderr_text(None))


@pytest.mark.skipif(not ROOT, reason="needs root to make directories of another uid")
def test_ismd_refuses_a_socket_directory_others_control():
    base = short_tmpdir(0o755, "sockdir")
    try:
        cases = {"0777 of another uid": (0o777, OTHER), "0777 of root": (0o777, 0),
                 "0775 of root": (0o775, 0), "0755 of another uid": (0o755, OTHER)}
        for name, (mode, owner) in cases.items():
            path = os.path.join(base, name.replace(" ", "-"))
            os.mkdir(path)
            os.chown(path, owner, owner)
            os.chmod(path, mode)
            proc = _serve_briefly(os.path.join(path, "ismd.sock"))
            assert proc.returncode not in (0, None), (name, proc.stderr)
            assert "refusing the socket directory" in proc.stderr, (name, proc.stderr)
            assert not os.path.exists(os.path.join(path, "ismd.sock")), name
        link = os.path.join(base, "link")
        os.symlink("/tmp", link)
        proc = _serve_briefly(os.path.join(link, "ismd.sock"))
        assert proc.returncode != 0 and "not a directory" in proc.stderr
        fine = os.path.join(base, "fine")
        os.mkdir(fine, 0o755)
        proc = _serve_briefly(os.path.join(fine, "ismd.sock"))
        assert "serving" in proc.stderr and "refusing" not in proc.stderr, proc.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not ROOT, reason="needs root to run ismd as another uid")
def test_non_root_default_socket_directory_is_private():
    uid = 54321  # an unused uid: its default directory is ours to create and remove
    default = f"/tmp/smcish-{uid}"
    env = {k: v for k, v in child_env().items() if k != "XDG_RUNTIME_DIR"}
    shutil.rmtree(default, ignore_errors=True)
    try:
        proc = _serve_briefly("", uid=uid, env=env)
        assert f"serving {default}/ismd.sock" in proc.stderr, proc.stderr
        st = os.lstat(default)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700)
        os.chmod(default, 0o755)  # someone loosened it: refused
        proc = _serve_briefly("", uid=uid, env=env)
        assert proc.returncode != 0 and "must be private" in proc.stderr, proc.stderr
        os.chmod(default, 0o700)
        os.chown(default, OTHER, OTHER)  # made by another user: refused
        proc = _serve_briefly("", uid=uid, env=env)
        assert proc.returncode != 0 and f"owned by uid {OTHER}" in proc.stderr, proc.stderr
        xdg = short_tmpdir(0o700, "xdg")
        os.chown(xdg, uid, uid)
        proc = _serve_briefly("", uid=uid, env={**env, "XDG_RUNTIME_DIR": xdg})
        assert f"serving {xdg}/ismd.sock" in proc.stderr, proc.stderr
        assert "cross-namespace discovery off" in proc.stderr
        shutil.rmtree(xdg, ignore_errors=True)
    finally:
        shutil.rmtree(default, ignore_errors=True)


# --- brokered peer channels -----------------------------------------------------------------

def test_connect_endpoint_to_nobody_is_device_gone(device, ismd):
    conn = raw_client(ismd.path, os.urandom(16))
    with pytest.raises(DeviceGone, match="no process serves endpoint"):
        conn.request("connect_endpoint", endpoint_id=os.urandom(16))
    with pytest.raises(PermissionDenied, match="hello"):
        raw_client(ismd.path).request("connect_endpoint", endpoint_id=device.endpoint_id)
    conn.close()


def test_a_flood_of_channels_is_bounded_by_the_target(device, ismd):
    """Each connect_endpoint hands the target an fd: beyond its per-peer bound it refuses
    (the requester's end then reads EOF), so nobody can exhaust another process's fds."""
    from ism_backend.client import MAX_CHANNELS_PER_PEER

    device.set_endpoint_handler(type("H", (), {"handle": lambda self, p, o, f: {}})())
    device.status()
    gc.collect()
    before = fd_count(os.getpid())
    flood = raw_client(ismd.path, os.urandom(16))
    ends = []
    for _ in range(MAX_CHANNELS_PER_PEER + 4):
        reply, (fd,) = flood.request("connect_endpoint", endpoint_id=device.endpoint_id)
        assert reply == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}
        ends.append(ControlClient(sock=socket.socket(fileno=fd), timeout=2.0))
    answered = 0
    for end in ends:
        try:
            end.request("group_close", group_id=GROUP, side="server")
            answered += 1
        except DeviceGone:
            pass
    assert answered == MAX_CHANNELS_PER_PEER
    assert device.status()["client"]["served_peers"] == 1
    for end in ends:
        end.close()
    flood.close()
    wait_for(lambda: device.status()["client"]["served_peers"] == 0, what="channels closed")
    wait_for(lambda: fd_count(os.getpid()) <= before, what="our fds back")


def test_take_peer_is_only_accepted_from_ismd(device, ismd):
    """A peer channel cannot pass further channels (or any fd) to the process it talks to."""
    class Echo:
        def handle(self, peer, op, fields):
            return {}

    device.set_endpoint_handler(Echo())
    requester = raw_client(ismd.path, os.urandom(16))
    _, (fd,) = requester.request("connect_endpoint", endpoint_id=device.endpoint_id)
    channel = ControlClient(sock=socket.socket(fileno=fd), timeout=2.0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(Exception, match="not served on a peer channel"):
        channel.request("take_peer", fds=[a.fileno()], endpoint_id=os.urandom(16), pid=1,
                        uid=0, gid=0)
    assert channel.request("group_close", group_id=GROUP, side="server") == ({}, [])
    with pytest.raises(Exception, match="is a peer op"):
        # ismd itself serves no peer op
        requester.request("group_close", group_id=GROUP, side="server")
    for s in (a, b):
        s.close()
    channel.close()
    requester.close()
