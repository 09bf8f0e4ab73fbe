"""vmhost (ismd guest mode, docs/vm.md sections 2-3) against scripted guests, without QEMU.

Each test starts the real ``python -m ism_backend.vmhost`` and plays its guests: the test is the
server of every guest's QMP socket (answering like QEMU: greeting, ``{"return": {}}``,
``DEVICE_DELETED`` after ``device_del``) and of its channel socket, where it speaks vmlink as the
guest agent. Every wait is bounded; the process and its files are cleaned up.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from ism_backend.contract import MAX_REGION_SIZE
from ism_backend.errors import (
    DeviceGone,
    DeviceProtocolError,
    PermissionDenied,
    QuotaExceeded,
    UnknownToken,
)
from ism_backend.vmlink import Link, b64, unb64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 5.0


def wait_for(pred: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def eid() -> str:
    return secrets.token_hex(16)


class _RecordingLink(Link):
    """The test guest's end of the link: records every incoming frame in arrival order."""

    def __init__(self, *args: Any, frames: list[dict[str, Any]], gate: threading.Event,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames = frames
        self._gate = gate

    def _dispatch(self, msg: dict[str, Any]) -> None:
        self._gate.wait(30)          # cleared: this guest stops reading its link
        self._frames.append(msg)
        super()._dispatch(msg)


class FakeGuest:
    """One guest as vmhost sees it: a QEMU (QMP + chardev servers) and its agent."""

    def __init__(self, base: str, name: str) -> None:
        self.name = name
        self.qmp_path = os.path.join(base, f"{name}.qmp")
        self.chan_path = os.path.join(base, f"{name}.chan")
        self._listeners = []
        for path in (self.qmp_path, self.chan_path):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            sock.listen(1)
            sock.settimeout(15)
            self._listeners.append(sock)
        self.commands: list[dict[str, Any]] = []
        self.fail: dict[str, dict[str, str]] = {}     # QMP command -> error to answer
        self.delete_events = True                     # False: the guest kernel does not ack
        self.unplugging: set[str] = set()
        self.frames: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.handlers: dict[str, Callable[[Link, dict[str, Any]], dict[str, Any]]] = {
            "take": lambda link, msg: {},
            "match": lambda link, msg: {"found": False, "endpoint_id": "00" * 16,
                                        "hub_id": "00" * 16, "pid": 0, "uid": 0},
            "check": lambda link, msg: {"verified": False},
        }
        self.link: Link | None = None
        self.qmp_conn: socket.socket | None = None
        self.chan_conn: socket.socket | None = None
        self._qmp_lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def spec(self) -> str:
        return f"{self.name},qmp={self.qmp_path},chan={self.chan_path}"

    # --- QEMU ---

    def _accept(self) -> None:
        try:
            conn, _ = self._listeners[0].accept()
        except OSError:
            return
        self.qmp_conn = conn
        threading.Thread(target=self._serve_qmp, args=(conn,), daemon=True).start()
        try:
            chan, _ = self._listeners[1].accept()
        except OSError:
            return
        self.chan_conn = chan
        link = _RecordingLink(os.dup(chan.fileno()), self._on_request, lambda *a: None,
                              name=f"fake {self.name}", frames=self.frames, gate=self.gate)
        link.start()
        self.link = link

    def _send_qmp(self, conn: socket.socket, obj: dict[str, Any]) -> None:
        with self._qmp_lock:
            conn.sendall(json.dumps(obj).encode() + b"\r\n")

    def _serve_qmp(self, conn: socket.socket) -> None:
        try:
            self._send_qmp(conn, {"QMP": {"version": {"qemu": {"major": 7, "minor": 2}},
                                          "capabilities": []}})
            for line in conn.makefile("rb"):
                msg = json.loads(line)
                self.commands.append(msg)
                name = msg.get("execute")
                if name in self.fail:
                    self._send_qmp(conn, {"error": self.fail[name], "id": msg.get("id")})
                    continue
                device = msg.get("arguments", {}).get("id")
                if name == "device_del" and device in self.unplugging:
                    # what QEMU 7.2 answers while the guest has not acked the unplug
                    self._send_qmp(conn, {"error": {
                        "class": "GenericError",
                        "desc": f"Device {device} is already in the process of unplug"},
                        "id": msg.get("id")})
                    continue
                self._send_qmp(conn, {"return": {}, "id": msg.get("id")})
                if name == "device_del":
                    self.unplugging.add(device)
                    if self.delete_events:
                        self.ack_unplugs()
        except (OSError, ValueError):
            pass

    def ack_unplugs(self) -> None:
        """The guest kernel finishes its pending unplugs: DEVICE_DELETED for each."""
        assert self.qmp_conn is not None
        for device in sorted(self.unplugging):
            self.unplugging.discard(device)
            self._send_qmp(self.qmp_conn, {
                "event": "DEVICE_DELETED",
                "data": {"device": device, "path": f"/machine/peripheral/{device}"},
                "timestamp": {"seconds": 0, "microseconds": 0}})

    def qmp(self, name: str) -> list[dict[str, Any]]:
        """The arguments of every QMP command ``name`` received so far."""
        return [c.get("arguments", {}) for c in list(self.commands) if c.get("execute") == name]

    def close_qmp(self) -> None:
        assert self.qmp_conn is not None
        self.qmp_conn.shutdown(socket.SHUT_RDWR)
        self.qmp_conn.close()

    def close_channel(self) -> None:
        assert self.link is not None and self.chan_conn is not None
        self.link.close()
        self.chan_conn.close()

    # --- the agent ---

    def _on_request(self, link: Link, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((op, msg))
        return self.handlers[op](link, msg)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.link is not None
        reply = self.link.call(op, WAIT, **fields)
        return {k: v for k, v in reply.items() if k not in ("re", "ok")}

    def notify(self, op: str, **fields: Any) -> None:
        assert self.link is not None
        self.link.notify(op, **fields)

    def notes(self, op: str) -> list[dict[str, Any]]:
        return [f for f in list(self.frames) if f.get("op") == op and "id" not in f]

    def got(self, op: str) -> list[dict[str, Any]]:
        return [m for o, m in list(self.requests) if o == op]

    def hello(self) -> dict[str, Any]:
        return self.call("hello", version=1)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        for sock in [*self._listeners, self.qmp_conn, self.chan_conn]:
            if sock is not None:
                sock.close()


class World:
    """A running vmhost and its fake guests."""

    def __init__(self, base: str, names: tuple[str, ...], quota: str, total: str, ports: int,
                 extra: tuple[str, ...], regions: str | None) -> None:
        self.base = base
        self.guests = {name: FakeGuest(base, name) for name in names}
        self.dir = regions or os.path.join(base, "regions")
        self.status_path = os.path.join(base, "status.sock")
        self.log_path = os.path.join(base, "vmhost.log")
        cmd = [sys.executable, "-m", "ism_backend.vmhost"]
        for guest in self.guests.values():
            cmd += ["--guest", guest.spec]
        cmd += ["--quota", quota, "--total-memory", total, "--dir", self.dir, "--ports", str(ports),
                "--status-socket", self.status_path, "--connect-timeout", "10", *extra]
        env = dict(os.environ, PYTHONPATH=ROOT)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=env)
        try:
            for guest in self.guests.values():
                wait_for(lambda g=guest: g.link is not None or self.proc.poll() is not None,
                         15, f"vmhost to connect to guest {guest.name}")
                assert self.proc.poll() is None, self.log()
            wait_for(lambda: self._try_status() is not None, 15, "the status socket")
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except OSError:
            return None

    def status(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT)
            sock.connect(self.status_path)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data)

    def guest_status(self, name: str) -> dict[str, Any]:
        return next(g for g in self.status()["guests"] if g["name"] == name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for guest in self.guests.values():
            guest.close()


@pytest.fixture
def world():
    base = tempfile.mkdtemp(prefix="vmh-")   # short: Unix socket paths are limited to 108 bytes
    made: list[World] = []

    def make(names: tuple[str, ...] = ("a", "b"), quota: str = "1M", total: str = "64M",
             ports: int = 3, extra: tuple[str, ...] = (), regions: str | None = None) -> World:
        sub = os.path.join(base, str(len(made)))
        os.mkdir(sub)
        w = World(sub, names, quota, total, ports, extra, regions)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
        print(w.log())
    shutil.rmtree(base, ignore_errors=True)


# --- regions --------------------------------------------------------------------------------

def test_hello_first_then_alloc_writes_header_and_plugs_read_write(world):
    w = world()
    a, b = w.guests["a"], w.guests["b"]
    with pytest.raises(DeviceProtocolError, match="hello"):
        a.call("alloc", size=100)
    assert a.hello() == {"name": "a", "quota": 1 << 20, "ports": 3}
    with pytest.raises(DeviceProtocolError, match="version 2"):
        a.call("hello", version=2)

    r = a.call("alloc", size=10000)
    assert (r["size"], r["offset"], r["bar"]) == (10000, 4096, 16384)
    rid, token = r["region"], bytes.fromhex(r["token"])
    path = os.path.join(w.dir, str(rid))
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) == 16384
    assert data[:8] == b"ISMREG1\0" and data[8:24] == token
    assert struct.unpack("<QQ", data[24:40]) == (10000, rid)
    assert data[40:4096] == bytes(4056)
    assert stat_mode(w.dir) == 0o700
    assert a.qmp("object-add") == [{"qom-type": "memory-backend-file", "id": f"ismm{rid}",
                                    "mem-path": path, "size": 16384, "share": True,
                                    "readonly": False}]
    assert a.qmp("device_add") == [{"driver": "ivshmem-plain", "memdev": f"ismm{rid}",
                                    "bus": "ismrp0", "id": f"ismd{rid}"}]
    assert b.qmp("object-add") == []

    # attach from the other guest: read-only, on a free port of that guest; idempotent
    b.hello()
    with pytest.raises(UnknownToken):
        b.call("attach", token="00" * 16)
    with pytest.raises(PermissionDenied, match="own"):
        a.call("attach", token=r["token"])
    assert b.call("attach", token=r["token"]) == {"region": rid, "size": 10000, "offset": 4096,
                                                  "bar": 16384}
    assert b.qmp("object-add") == [{"qom-type": "memory-backend-file", "id": f"ismm{rid}",
                                    "mem-path": path, "size": 16384, "share": True,
                                    "readonly": True}]
    assert b.qmp("device_add")[0]["bus"] == "ismrp0"
    assert b.call("attach", token=r["token"])["region"] == rid
    assert len(b.qmp("object-add")) == 1

    # doorbells: an attacher's ring reaches the owner; the owner's own ring goes nowhere
    b.notify("ring", region=rid)
    wait_for(lambda: a.notes("ring"), what="the ring at the owner")
    assert a.notes("ring") == [{"op": "ring", "region": rid}]
    a.notify("ring", region=rid)
    b.notify("ring", region=rid + 1000)     # not attached: dropped
    time.sleep(0.2)
    assert b.notes("ring") == [] and len(a.notes("ring")) == 1

    # the owner frees while b still maps it: token dead, unplugged from a only, file kept
    with pytest.raises(PermissionDenied, match="free it"):
        a.call("detach", region=rid)
    with pytest.raises(UnknownToken):
        b.call("free", region=rid)
    assert a.call("free", region=rid) == {}
    assert a.qmp("device_del") == [{"id": f"ismd{rid}"}]
    assert a.qmp("object-del") == [{"id": f"ismm{rid}"}]
    assert b.qmp("device_del") == []
    assert os.path.exists(path)
    with pytest.raises(UnknownToken):
        a.call("free", region=rid)
    with pytest.raises(UnknownToken):
        w.guests["b"].call("attach", token=r["token"])
    region = w.status()["regions"]
    assert [(x["id"], x["live"], x["plugged_in"]) for x in region] == [(rid, False, ["b"])]
    assert w.guest_status("a")["quota_used"] == 16384

    # the last guest detaches: unplugged there, file deleted, quota back
    assert b.call("detach", region=rid) == {}
    assert b.qmp("device_del") == [{"id": f"ismd{rid}"}]
    assert b.qmp("object-del") == [{"id": f"ismm{rid}"}]
    assert not os.path.exists(path)
    with pytest.raises(UnknownToken):
        b.call("detach", region=rid)
    state = w.status()
    assert state["regions"] == [] and state["used"] == 0
    assert w.guest_status("a")["quota_used"] == 0 and w.guest_status("b")["ports_used"] == []


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def test_quota_total_memory_ports_and_failed_plug(world):
    w = world(quota="64K", total="96K", ports=2, extra=("--unplug-timeout", "0.5"))
    a, b = w.guests["a"], w.guests["b"]
    a.hello()
    b.hello()
    with pytest.raises(DeviceProtocolError, match="size"):
        a.call("alloc", size=0)
    with pytest.raises(QuotaExceeded, match=r"pref64-reserve.*--port-reserve"):
        a.call("alloc", size=MAX_REGION_SIZE)

    # QEMU refuses device_add: the object is removed again, nothing stays charged
    a.fail["device_add"] = {"class": "GenericError", "desc": "Bus 'ismrp0' not found"}
    with pytest.raises(DeviceGone, match="Bus 'ismrp0' not found"):
        a.call("alloc", size=100)
    del a.fail["device_add"]
    assert [x["id"] for x in a.qmp("object-del")] == [a.qmp("object-add")[0]["id"]]
    state = w.status()
    assert state["used"] == 0 and state["regions"] == [] and os.listdir(w.dir) == [".vmhost.lock"]

    r1 = a.call("alloc", size=28000)      # bar 32768
    r2 = a.call("alloc", size=28000)
    assert r1["bar"] == r2["bar"] == 32768
    with pytest.raises(QuotaExceeded) as exc:
        a.call("alloc", size=1)
    message = str(exc.value)
    assert "65536 of its 65536" in message and "8192" in message and "--quota" in message
    rb = b.call("alloc", size=28000)
    with pytest.raises(QuotaExceeded, match=r"98304 of 98304.*--total-memory"):
        b.call("alloc", size=1)
    with pytest.raises(QuotaExceeded, match="guest a has all 2 region ports in use"):
        a.call("attach", token=rb["token"])

    # a guest whose kernel never finishes the unplug: detach fails (bounded) and can be retried
    b.call("attach", token=r1["token"])
    b.delete_events = False
    t0 = time.monotonic()
    with pytest.raises(DeviceGone, match=r"did not release.*retry detach"):
        b.call("detach", region=r1["region"])
    assert time.monotonic() - t0 < 3
    assert w.guest_status("b")["ports_used"] == [0, 1]
    assert b.qmp("object-del") == []             # never under a device QEMU still has
    b.ack_unplugs()                              # the event comes late; the retry finds it
    b.call("detach", region=r1["region"])
    assert len(b.qmp("device_del")) == 2 and b.qmp("object-del") == [{"id": f"ismm{r1['region']}"}]
    assert w.guest_status("b")["ports_used"] == [0]


def test_dir_checks(world):
    base = tempfile.mkdtemp(prefix="vmhd-")
    try:
        def run(directory: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "ism_backend.vmhost", "--guest",
                 f"x,qmp={base}/none.qmp,chan={base}/none.chan", "--quota", "1M",
                 "--total-memory", "1M", "--dir", directory, "--connect-timeout", "0.2"],
                capture_output=True, text=True, timeout=20, cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=ROOT), check=False)

        shared = os.path.join(base, "shared")
        os.mkdir(shared, 0o755)
        proc = run(shared)
        assert proc.returncode != 0 and "refusing --dir" in proc.stderr
        assert os.path.isdir(shared)
        foreign = os.path.join(base, "foreign")
        os.mkdir(foreign, 0o700)
        with open(os.path.join(foreign, "notes"), "w") as f:
            f.write("someone's")
        proc = run(foreign)
        assert proc.returncode != 0 and "not made by vmhost" in proc.stderr
        assert os.listdir(foreign) == ["notes"]
        # unreachable guests: a clear message, and the directory it made is gone again
        fresh = os.path.join(base, "fresh")
        proc = run(fresh)
        assert proc.returncode != 0 and "cannot connect to its QMP socket" in proc.stderr
        assert not os.path.exists(fresh)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    # a dead vmhost's directory (ours, with its lock file): stale region files are removed
    stale = os.path.join(tempfile.mkdtemp(prefix="vmhs-"), "regions")
    os.mkdir(stale, 0o700)
    for name in (".vmhost.lock", "7"):
        with open(os.path.join(stale, name), "wb") as f:
            f.write(b"x")
    w = world(regions=stale)
    assert os.listdir(stale) == [".vmhost.lock"]
    w.stop()
    assert not os.path.exists(stale)
    # an empty private directory made for it (the harness's mkdtemp): used, removed at exit
    empty = os.path.dirname(stale)
    os.chmod(empty, 0o700)
    w = world(regions=empty)
    w.guests["a"].hello()
    w.guests["a"].call("alloc", size=1)
    assert sorted(os.listdir(empty)) == [".vmhost.lock", "1"]
    w.stop()
    assert not os.path.exists(empty)


# --- peer channels --------------------------------------------------------------------------

def test_peer_channel_connect_take_data_close_in_order(world):
    w = world()
    a, b = w.guests["a"], w.guests["b"]
    a.hello()
    b.hello()
    ea, eb = eid(), eid()
    assert a.call("endpoint", endpoint_id=ea, up=True) == {}
    b.call("endpoint", endpoint_id=eb, up=True)
    with pytest.raises(PermissionDenied, match="another guest"):
        b.call("endpoint", endpoint_id=ea, up=True)
    with pytest.raises(PermissionDenied, match="not served in guest a"):
        a.call("connect", from_endpoint=eb, to_endpoint=eb, pid=1, uid=0, gid=0)
    with pytest.raises(DeviceGone, match="fall back to TCP"):
        a.call("connect", from_endpoint=ea, to_endpoint=eid(), pid=1, uid=0, gid=0)

    def take(link: Link, msg: dict[str, Any]) -> dict[str, Any]:
        # the acceptor talks at once, before its reply: a must see the reply first
        for i in range(3):
            link.notify("data", chan=msg["chan"], rec=b64(b"early-%d" % i))
        return {"pid": 7, "uid": 8, "gid": 9}

    b.handlers["take"] = take
    r = a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=100, uid=101, gid=102)
    assert (r["pid"], r["uid"], r["gid"]) == (7, 8, 9)
    chan_a = r["chan"]
    (msg,) = b.got("take")
    chan_b = msg["chan"]
    assert {k: msg[k] for k in ("from_endpoint", "to_endpoint", "pid", "uid", "gid")} == \
        {"from_endpoint": ea, "to_endpoint": eb, "pid": 100, "uid": 101, "gid": 102}
    wait_for(lambda: len(a.notes("data")) == 3, what="the early records at a")
    ops = [("reply" if "re" in f else f["op"]) for f in a.frames]
    assert ops == ["reply"] * ops.count("reply") + ["data"] * 3
    assert [(d["chan"], unb64(d["rec"])) for d in a.notes("data")] == \
        [(chan_a, b"early-%d" % i) for i in range(3)]

    for i in range(50):
        a.notify("data", chan=chan_a, rec=b64(b"a%d" % i))
    wait_for(lambda: len(b.notes("data")) == 50, what="50 records at b")
    assert [(d["chan"], unb64(d["rec"])) for d in b.notes("data")] == \
        [(chan_b, b"a%d" % i) for i in range(50)]
    b.notify("data", chan=chan_b, rec=b64(b"late"))
    wait_for(lambda: len(a.notes("data")) == 4, what="b's record at a")
    assert unb64(a.notes("data")[-1]["rec"]) == b"late"
    a.notify("close", chan=chan_a)
    wait_for(lambda: b.notes("close"), what="the close at b")
    assert b.notes("close") == [{"op": "close", "chan": chan_b}]
    b.notify("data", chan=chan_b, rec=b64(b"after close"))     # dropped
    a.notify("data", chan=999, rec=b64(b"no such channel"))  # dropped
    time.sleep(0.1)
    assert len(a.notes("data")) == 4 and len(b.notes("data")) == 50

    # the acceptor refuses: the connector hears why; nothing stays
    def refuse(link: Link, msg: dict[str, Any]) -> dict[str, Any]:
        raise PermissionDenied("no such local endpoint")

    b.handlers["take"] = refuse
    with pytest.raises(PermissionDenied, match=r"did not take.*no such local endpoint"):
        a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=1, uid=0, gid=0)
    # a malformed take reply counts as a refusal
    b.handlers["take"] = lambda link, msg: {"pid": "seven"}
    with pytest.raises(DeviceProtocolError, match="did not take"):
        a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=1, uid=0, gid=0)
    # b closes before a even has its reply: a gets the reply, then the close
    b.handlers["take"] = lambda link, msg: (link.notify("close", chan=msg["chan"]), {})[1]
    r2 = a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=1, uid=0, gid=0)
    wait_for(lambda: any(c["chan"] == r2["chan"] for c in a.notes("close")), what="close at a")
    assert w.status()["totals"]["channels"] == 0
    # endpoint down: no more routing to it
    b.call("endpoint", endpoint_id=eb, up=False)
    with pytest.raises(DeviceGone):
        a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=1, uid=0, gid=0)


def test_a_guest_that_does_not_read_costs_only_its_own_channel(world):
    w = world()
    a, b = w.guests["a"], w.guests["b"]
    a.hello()
    b.hello()
    ea, eb = eid(), eid()
    a.call("endpoint", endpoint_id=ea, up=True)
    b.call("endpoint", endpoint_id=eb, up=True)
    chan_a = a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=1, uid=0, gid=0)["chan"]
    chan_b = b.got("take")[0]["chan"]

    b.gate.clear()                                   # b stops reading
    rec = b64(os.urandom(600_000))
    for _ in range(14):                              # 11 MB of records for b
        a.notify("data", chan=chan_a, rec=rec)
    wait_for(lambda: a.notes("close"), what="vmhost to close the piled-up channel")
    assert a.notes("close") == [{"op": "close", "chan": chan_a}]
    assert a.hello()["name"] == "a"                  # a is served while b does not read
    b.gate.set()
    wait_for(lambda: b.notes("close"), what="the close at b")
    got = b.notes("data")
    assert 0 < len(got) < 14 and all(d["rec"] == rec and d["chan"] == chan_b for d in got)
    assert w.guest_status("b")["live"] is True

    # a record too large to relay closes its channel on both sides
    chan_a = a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=1, uid=0, gid=0)["chan"]
    chan_b = b.got("take")[1]["chan"]
    a.notify("data", chan=chan_a, rec=b64(bytes(786_282)))
    wait_for(lambda: len(a.notes("close")) == 2 and len(b.notes("close")) == 2,
             what="both closes")
    assert (a.notes("close")[1]["chan"], b.notes("close")[1]["chan"]) == (chan_a, chan_b)
    assert w.status()["totals"]["channels"] == 0


def test_a_guest_that_stops_reading_is_dropped_and_the_other_served(world):
    w = world(extra=("--send-timeout", "0.5"))
    a, b = w.guests["a"], w.guests["b"]
    a.hello()
    b.hello()
    ea, eb = eid(), eid()
    a.call("endpoint", endpoint_id=ea, up=True)
    b.call("endpoint", endpoint_id=eb, up=True)
    chan_a = a.call("connect", from_endpoint=ea, to_endpoint=eb, pid=1, uid=0, gid=0)["chan"]
    b.gate.clear()
    try:
        rec = b64(os.urandom(300_000))
        for _ in range(10):                       # 4 MB: under the channel's bound
            a.notify("data", chan=chan_a, rec=rec)
        wait_for(lambda: not w.guest_status("b")["live"], what="vmhost to drop b")
        wait_for(lambda: a.notes("close"), what="the close at a")
        assert a.notes("close") == [{"op": "close", "chan": chan_a}]
        assert a.call("alloc", size=100)["region"] > 0
    finally:
        b.gate.set()
    wait_for(lambda: b.link is not None and b.link.closed, what="b's link to end")


# --- listener lookups and claims ------------------------------------------------------------

def test_find_match_verify_check(world):
    w = world(names=("a", "b", "c"))
    a, b, c = (w.guests[n] for n in "abc")
    ea, eb, ec, hub = eid(), eid(), eid(), eid()
    for guest, endpoint in ((a, ea), (b, eb), (c, ec)):
        guest.hello()
        guest.call("endpoint", endpoint_id=endpoint, up=True)

    def found(endpoint: str) -> Callable[[Link, dict[str, Any]], dict[str, Any]]:
        return lambda link, msg: {"found": True, "endpoint_id": endpoint, "hub_id": hub,
                                  "pid": 5, "uid": 6}

    b.handlers["match"] = found(eb)
    q = {"family": 4, "src": "10.0.0.1", "sport": 40000, "dst": "10.0.0.2", "dport": 80,
         "endpoint_id": ea}
    r = a.call("find", **q)
    assert r["found"] is True and r["claim"] > 0
    assert (r["endpoint_id"], r["hub_id"], r["pid"], r["uid"]) == (eb, hub, 5, 6)
    asked = {k: v for k, v in b.got("match")[0].items() if k not in ("id", "op")}
    assert asked == {**{k: q[k] for k in ("family", "src", "sport", "dst", "dport")},
                     "claim": r["claim"]}
    assert len(c.got("match")) == 1 and a.got("match") == []

    good = {"inode": 1234, "endpoint_id": ea, "family": 4, "local": "10.0.0.2", "lport": 80,
            "peer": "10.0.0.1", "pport": 40000}
    a.handlers["check"] = lambda link, msg: {"verified": True}
    # only the claim's server guest may spend it; others are told no and spend nothing
    assert c.call("verify", claim=r["claim"], **good) == {"verified": False}
    assert a.call("verify", claim=r["claim"], **good) == {"verified": False}
    # the server guest with a 4-tuple that is not the claim's, mirrored: no, and spent
    assert b.call("verify", claim=r["claim"], **{**good, "lport": 81}) == {"verified": False}
    assert b.call("verify", claim=r["claim"], **good) == {"verified": False}
    assert a.got("check") == []

    r = a.call("find", **q)
    assert b.call("verify", claim=r["claim"], **good) == {"verified": True}
    (chk,) = a.got("check")
    assert {k: v for k, v in chk.items() if k not in ("id", "op")} == {
        "inode": 1234, "endpoint_id": ea, "family": 4, "local": "10.0.0.1", "lport": 40000,
        "peer": "10.0.0.2", "pport": 80}
    assert b.call("verify", claim=r["claim"], **good) == {"verified": False}   # consumed
    assert len(a.got("check")) == 1
    # the client guest says no: not verified
    a.handlers["check"] = lambda link, msg: {"verified": False}
    r = a.call("find", **q)
    assert b.call("verify", claim=r["claim"], **good) == {"verified": False}
    # released claims are gone
    r = a.call("find", **q)
    assert c.call("release", claim=r["claim"]) == {}             # not c's: ignored
    assert w.status()["totals"]["claims"] == 1
    assert a.call("release", claim=r["claim"]) == {}
    assert w.status()["totals"]["claims"] == 0
    assert b.call("verify", claim=r["claim"], **good) == {"verified": False}

    # two guests match: ambiguous, stay on TCP
    c.handlers["match"] = found(ec)
    assert a.call("find", **q) == {"found": False, "endpoint_id": "00" * 16, "hub_id": "00" * 16,
                                   "pid": 0, "uid": 0, "claim": 0}
    # a match naming an endpoint its guest does not serve is ignored
    c.handlers["match"] = found(eb)
    b.handlers["match"] = lambda link, msg: {"found": False, "endpoint_id": "00" * 16,
                                             "hub_id": "00" * 16, "pid": 0, "uid": 0}
    assert a.call("find", **q)["found"] is False
    # malformed and slow answers count as no match
    c.handlers["match"] = lambda link, msg: {"found": True}
    assert a.call("find", **q)["found"] is False
    c.handlers["match"] = lambda link, msg: (time.sleep(4), found(ec)(link, msg))[1]
    t0 = time.monotonic()
    assert a.call("find", **q)["found"] is False
    assert time.monotonic() - t0 < 3.5                       # about 1 s per guest, in parallel
    with pytest.raises(DeviceProtocolError, match="IPv4"):
        a.call("find", **{**q, "src": "::1"})
    with pytest.raises(DeviceProtocolError, match="family"):
        a.call("find", **{**q, "family": 5})
    assert w.status()["totals"]["claims"] == 0


# --- hostile input --------------------------------------------------------------------------

def test_malformed_input_is_refused_and_the_host_serves_on(world):
    w = world()
    a, b = w.guests["a"], w.guests["b"]
    a.hello()
    b.hello()
    bad = [("alloc", {"size": "1"}), ("alloc", {"size": 1, "extra": 1}), ("alloc", {}),
           ("alloc", {"size": True}), ("attach", {"token": "ZZ" * 16}),
           ("attach", {"token": "AB" * 16}), ("detach", {"region": -1}),
           ("endpoint", {"endpoint_id": "00" * 16, "up": True}),
           ("endpoint", {"endpoint_id": eid(), "up": 1}), ("nosuch", {}),
           ("connect", {"from_endpoint": eid()}),
           ("verify", {"claim": 1, "inode": 1, "endpoint_id": eid(), "family": 4,
                       "local": "10.0.0.1x", "lport": 1, "peer": "10.0.0.2", "pport": 2}),
           ("find", {"family": 4, "src": "x" * 300, "sport": 1, "dst": "10.0.0.2", "dport": 2,
                     "endpoint_id": eid()})]
    for op, fields in bad:
        with pytest.raises(DeviceProtocolError):
            a.call(op, **fields)
    for op, fields in [("ring", {"region": "x"}), ("nosuch", {}), ("data", {"chan": 1}),
                       ("data", {"chan": 1, "rec": "!!"}), ("close", {"chan": 2 ** 70}),
                       ("ring", {"region": 12345})]:
        a.notify(op, **fields)
    assert a.hello()["name"] == "a"      # the link is still up

    # a broken frame ends the link: the guest is gone, the other one is served on
    assert a.link is not None
    os.write(a.link.fd, struct.pack(">I", 5) + b"nope!")
    wait_for(lambda: a.link.closed, what="vmhost to drop a's link")
    wait_for(lambda: not w.guest_status("a")["live"], what="a to be gone")
    assert b.call("alloc", size=100)["region"] > 0
    assert w.proc.poll() is None


# --- a guest goes away ----------------------------------------------------------------------

def test_guest_gone_closes_channels_keeps_attached_regions_until_detach(world):
    w = world()
    a, b = w.guests["a"], w.guests["b"]
    a.hello()
    b.hello()
    ea, eb = eid(), eid()
    a.call("endpoint", endpoint_id=ea, up=True)
    b.call("endpoint", endpoint_id=eb, up=True)
    r = a.call("alloc", size=5000)
    rid = r["region"]
    path = os.path.join(w.dir, str(rid))
    b.call("attach", token=r["token"])
    own = b.call("alloc", size=100)
    a.call("attach", token=own["token"])
    chan = b.call("connect", from_endpoint=eb, to_endpoint=ea, pid=1, uid=0, gid=0)["chan"]
    q = {"family": 6, "src": "fd00::1", "sport": 1000, "dst": "fd00::2", "dport": 22,
         "endpoint_id": ea}
    b.handlers["match"] = lambda link, msg: {"found": True, "endpoint_id": eb, "hub_id": eid(),
                                             "pid": 1, "uid": 1}
    a.call("find", **q)
    assert w.status()["totals"]["claims"] == 1

    a.close_channel()
    wait_for(lambda: b.notes("close"), what="the close at b")
    assert b.notes("close") == [{"op": "close", "chan": chan}]
    wait_for(lambda: w.guest_status("a")["plugged"] == [], what="a's plugs to be dropped")
    st = w.status()
    ga = w.guest_status("a")
    assert ga["live"] is False and ga["channels"] == [] and ga["endpoints"] == 0
    assert st["totals"]["claims"] == 0
    # a's QMP still answers: what was plugged into it was unplugged there
    assert sorted(x["id"] for x in a.qmp("device_del")) == sorted([f"ismd{rid}",
                                                                   f"ismd{own['region']}"])
    # a's region: token dead, still plugged in b (b maps it) until b detaches
    assert [(x["id"], x["live"], x["plugged_in"]) for x in st["regions"] if x["id"] == rid] == \
        [(rid, False, ["b"])]
    assert os.path.exists(path) and ga["quota_used"] == 16384
    with pytest.raises(UnknownToken):
        b.call("attach", token=r["token"])
    with pytest.raises(DeviceGone):
        b.call("connect", from_endpoint=eb, to_endpoint=ea, pid=1, uid=0, gid=0)
    b.notify("ring", region=rid)              # the owner is gone: dropped, no harm
    b.call("detach", region=rid)
    assert not os.path.exists(path)
    st = w.status()
    assert [x["id"] for x in st["regions"]] == [own["region"]]
    assert w.guest_status("a")["quota_used"] == 0
    assert [(x["id"], x["plugged_in"]) for x in st["regions"]] == [(own["region"], ["b"])]
    assert w.guest_status("b")["live"] is True


def test_qmp_eof_is_a_gone_guest(world):
    w = world()
    a, b = w.guests["a"], w.guests["b"]
    a.hello()
    b.hello()
    r = a.call("alloc", size=100)
    b.call("attach", token=r["token"])
    n_del = len(b.qmp("device_del"))
    b.close_qmp()
    wait_for(lambda: b.link is not None and b.link.closed, what="vmhost to close b's link")
    wait_for(lambda: w.guest_status("b")["plugged"] == [], what="b's plugs forgotten")
    assert len(b.qmp("device_del")) == n_del      # nothing to unplug from a closed QEMU
    assert [x["plugged_in"] for x in w.status()["regions"]] == [["a"]]
    assert a.call("free", region=r["region"]) == {}
    assert w.status()["regions"] == []


# --- status, stop ---------------------------------------------------------------------------

def test_status_command_and_sigterm_cleanup(world):
    w = world()
    a = w.guests["a"]
    a.hello()
    r = a.call("alloc", size=100)
    proc = subprocess.run([sys.executable, "-m", "ism_backend.vmhost", "status",
                           "--status-socket", w.status_path], capture_output=True, text=True,
                          timeout=20, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    state = json.loads(proc.stdout)
    assert state["kind"] == "vmhost" and state["quota"] == 1 << 20 and state["ports"] == 3
    assert state["used"] == 8192 and state["dir"] == w.dir
    ga = next(g for g in state["guests"] if g["name"] == "a")
    assert ga["live"] and ga["hello"] and ga["quota_used"] == 8192 and ga["ports_used"] == [0]
    assert ga["regions_owned"] == [{"id": r["region"], "size": 100, "bar": 8192, "live": True,
                                    "plugged_in": ["a"]}]
    assert ga["plugged"] == [{"region": r["region"], "owner": "a", "port": 0, "readonly": False,
                              "state": "plugged", "size": 100, "bar": 8192}]
    assert r["token"] not in proc.stdout          # tokens are capabilities: never shown
    gb = next(g for g in state["guests"] if g["name"] == "b")
    assert gb["live"] and not gb["hello"]

    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(10) == 0
    assert not os.path.exists(w.dir) and not os.path.exists(w.status_path)
    assert a.qmp("device_del") == []              # the guests go with it: nothing unplugged
    assert "stopped" in w.log()
