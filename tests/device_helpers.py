"""Test helpers for ism_backend: an agent process driven over stdin/stdout, and an ismd runner.

``Agent`` starts ``python tests/device_helpers.py`` as a real separate process that executes device
operations sent as JSON lines (regions, sockets and handles are named by small ids in the agent),
so tests can put an owner, an attacher, an advertiser, a listener or a peer-op handler in another
process, kill it with SIGKILL, run it under another uid or inside other namespaces. ``Ismd``
runs a real daemon (optionally as another uid). Bytes cross the JSON lines as hex.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve()
PROGRAMS = HELPER.parent / "programs"
if str(REPO) not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.children import Child, ChildTimeout, python_argv, spawn_python  # noqa: E402


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env.update(extra)
    return env


def short_tmpdir(mode: int = 0o700, prefix: str = "ism") -> str:
    """A fresh dir directly under /tmp (unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, mode)
    return path


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds (every wait is bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class AgentError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def _is_hello(line: str) -> bool:
    return bool(json.loads(line).get("ready"))


class Agent:
    """A separate process executing device operations (see ``agent_main``)."""

    def __init__(self, env: dict[str, str] | None = None, prefix: list[str] | None = None,
                 setuid: int | None = None) -> None:
        args = [f"--setuid={setuid}"] if setuid is not None else []
        self.child = spawn_python(script=HELPER, args=args, prefix=prefix or (), env=env or child_env(),
                                  cwd=str(REPO), name="agent", handshake=_is_hello,
                                  handshake_timeout=20.0)
        self.proc = self.child.proc
        self.pid = self.child.pid
        hello = json.loads(self.child.hello)
        self.real_pid = hello["pid"]  # differs from self.pid when started through a wrapper

    def _read(self, timeout: float) -> dict:
        return json.loads(self.child.read_line(timeout))

    def call(self, op: str, timeout: float = 20.0, **args):
        self.child.send_json({"op": op, **args})
        reply = self._read(timeout)
        if not reply["ok"]:
            raise AgentError(reply["error"], reply["message"])
        return reply.get("result")

    def kill(self) -> None:
        if self.child.alive():
            os.kill(self.real_pid, signal.SIGKILL)
            if self.real_pid != self.pid:
                self.child.send_signal(signal.SIGKILL)
        self.child.wait(10)

    def exit(self) -> int:
        """Ask the agent to return from main normally (atexit hooks run)."""
        if self.child.alive():
            with contextlib.suppress(BrokenPipeError):
                self.child.send_json({"op": "exit"})
        return self.child.wait(10)

    def close(self) -> None:
        if self.child.alive():
            try:
                self.exit()
            except ChildTimeout:
                self.kill()
        self.child.stop()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Runs ismd as another uid: imports everything as root (the interpreter lives under root's
# home), then drops privileges.
AS_UID = PROGRAMS / "ismd_as_uid.py"


def ismd_argv(*args: str, setuid: int | None = None, prefix: list[str] | None = None) -> list[str]:
    """``ismd *args`` (as uid ``setuid``: tests/programs/ismd_as_uid.py), behind ``prefix``."""
    if setuid is not None:
        return python_argv(script=AS_UID, args=[setuid, *args], prefix=prefix or ())
    return python_argv(module="ism_backend.daemon", args=args, prefix=prefix or ())


class Ismd:
    """An ismd subprocess on a socket in its own short temp dir (world-traversable).

    ``setuid``: run the daemon as that uid (needs root; the socket dir is given to that uid).
    Its stderr is kept: ``stop()`` returns it.
    """

    def __init__(self, *args: str, socket_dir: str | None = None,
                 prefix: list[str] | None = None, setuid: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.dir = socket_dir or short_tmpdir(0o755, "ismd")
        self.path = os.path.join(self.dir, "ismd.sock")
        self.spec = f"unix:{self.path}"
        if setuid is not None:
            os.chown(self.dir, setuid, setuid)
        self.child = Child(ismd_argv("serve", "--socket", self.path, *args, setuid=setuid,
                                     prefix=prefix),
                           env=env or child_env(), cwd=str(REPO), stdin=None, stdout=None, name="ismd")
        self.proc = self.child.proc
        self.pid = self.child.pid
        deadline = time.monotonic() + 15
        try:
            while True:
                if not self.child.alive():
                    raise RuntimeError(f"ismd exited: {self.child.stderr_text(None)}")
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    probe.connect(self.path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
                finally:
                    probe.close()
        except BaseException:
            self.stop()
            if socket_dir is None:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise
        # The probe connected and left at once: wait until ismd processed that disconnect, so
        # fd counts taken now are the idle baseline.
        time.sleep(0.05)

    def alive(self) -> bool:
        return self.child.alive()

    def stop(self) -> str:
        """Stop it (SIGTERM, SIGKILL after 10 s; reaped); everything it wrote on stderr."""
        self.child.stop(10)
        return self.child.stderr_text(None)


# --- the agent side ----------------------------------------------------------------------------

def agent_main(argv: list[str]) -> None:
    import dataclasses
    import mmap
    import threading

    for arg in argv:
        if arg.startswith("--setuid="):
            uid = int(arg.split("=", 1)[1])
            import ism_backend.client  # import everything before dropping root
            import ism_backend.embedded
            import ism_backend.factory
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    import ism_backend
    from ism_backend import memfd

    devices: dict[str, ism_backend.Device] = {}
    regions: dict[int, ism_backend.Region] = {}
    handles: dict[int, object] = {}
    socks: dict[int, socket.socket] = {}
    held: list[int] = []
    counter = [0]

    def new_id() -> int:
        counter[0] += 1
        return counter[0]

    def dev(spec=None):
        key = spec or "default"
        if key not in devices:
            devices[key] = ism_backend.get_device(spec)
        return devices[key]

    def region_info(rid: int, region) -> dict:
        d = region._device
        return {"id": rid, "token": region.token.hex(), "size": region.size, "fd": region.fd,
                "endpoint": d.endpoint_id.hex(), "gid": d.gid.hex()}

    def op_open(spec=None):
        d = dev(spec)
        return {"kind": d.kind, "gid": d.gid.hex(), "endpoint": d.endpoint_id.hex()}

    def op_alloc(size, spec=None, fill=None):
        region = dev(spec).alloc(size)
        if fill is not None:
            region.mem[: len(bytes.fromhex(fill))] = bytes.fromhex(fill)
        rid = new_id()
        regions[rid] = region
        return region_info(rid, region)

    def op_alloc_many(size, n, spec=None):
        """n regions at once (benchmarks): [(token hex, endpoint hex), ...]."""
        out = []
        for _ in range(n):
            region = dev(spec).alloc(size)
            regions[new_id()] = region
            out.append((region.token.hex(), region._device.endpoint_id.hex()))
        return out

    def op_write(id, data, offset=0):
        regions[id].mem[offset: offset + len(bytes.fromhex(data))] = bytes.fromhex(data)

    def op_read(id, n, offset=0):
        return bytes(regions[id].mem[offset: offset + n]).hex()

    def op_attach(token, endpoint, spec=None):
        region = dev(spec).attach(bytes.fromhex(token), bytes.fromhex(endpoint))
        rid = new_id()
        regions[rid] = region
        return region_info(rid, region)

    def op_detach(id):
        region = regions.pop(id)
        region._device.detach(region)

    def op_free(id):
        region = regions.pop(id)
        region._device.free(region)

    def op_grant(id, uid):
        regions[id]._device.grant(regions[id].token, uid)

    def op_revoke(id, uid):
        regions[id]._device.revoke(regions[id].token, uid)

    def op_ring(id):
        regions[id].ring()

    def op_try_write(id):
        """Every route an attacher could use to write the region; each must fail."""
        region = regions[id]
        out = {}
        try:
            region.mem[0] = 1
            out["api"] = "wrote"
        except TypeError as exc:
            out["api"] = f"refused: {exc}"
        try:
            m = mmap.mmap(region.fd, region.size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
            m.close()
            out["mmap"] = "mapped"
        except OSError as exc:
            out["mmap"] = f"refused: {exc.strerror}"
        try:
            fd = os.open(f"/proc/self/fd/{region.fd}", os.O_RDWR)
        except OSError as exc:
            out["proc_open"] = f"refused: {exc.strerror}"
        else:
            out["proc_open"] = "opened"
            try:
                m = mmap.mmap(fd, region.size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
                m.close()
                out["proc_mmap"] = "mapped"
            except OSError as exc:
                out["proc_mmap"] = f"refused: {exc.strerror}"
            try:
                os.pwrite(fd, b"x", 0)
                out["proc_write"] = "wrote"
            except OSError as exc:
                out["proc_write"] = f"refused: {exc.strerror}"
            try:
                os.ftruncate(fd, 0)
                out["truncate"] = "truncated"
            except OSError as exc:
                out["truncate"] = f"refused: {exc.strerror}"
            os.close(fd)
        out["seals"] = memfd.get_seals(region.fd)
        return out

    def hexify(value):
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).hex()
        if isinstance(value, dict):
            return {k: hexify(v) for k, v in value.items()}
        return value

    def unhex(fields):
        binary = {"group_id", "hub_id", "token", "endpoint_id"}
        return {k: bytes.fromhex(v) if k in binary else v for k, v in fields.items()}

    def peer_dict(peer):
        return {"endpoint": peer.endpoint_id.hex(), "pid": peer.pid, "uid": peer.uid,
                "gid": peer.gid}

    class Handler:
        """A peer-op handler: records calls; ``mode`` picks its answer."""

        def __init__(self, mode, dev):
            self.mode = mode
            self.dev = dev
            self.calls = []
            self.gone = []

        def handle(self, peer, op, fields):
            self.calls.append({"peer": peer_dict(peer), "op": op, "fields": hexify(fields),
                               "thread": threading.current_thread().name})
            if self.mode == "refuse":
                raise ism_backend.PermissionDenied(f"agent refuses {op}")
            if self.mode == "quota":
                raise ism_backend.QuotaExceeded(f"agent has no room for {op}")
            if self.mode == "gone":        # what a hub whose loop did not take the op answers
                raise ism_backend.DeviceGone(f"agent's event loop did not answer {op} in time")
            if self.mode == "crash":
                raise RuntimeError("agent handler bug")
            if self.mode == "invalid":
                return {"bogus": 1}
            if self.mode == "sleep":
                time.sleep(30)
            if self.mode == "attach_peer" and op == "extent_add":
                # what a link group does with a peer's new extent: map it from the requester
                time.sleep(0.3)          # (lets the test's own request to us be in flight too)
                view = self.dev.attach(fields["token"], peer.endpoint_id)
                first = bytes(view.mem[:8]).hex()
                self.dev.detach(view)
                self.calls[-1]["first"] = first
            if self.mode == "attach_own" and op == "group_open":
                region = self.dev.alloc(4096)
                view = self.dev.attach(region.token, self.dev.endpoint_id)
                self.dev.detach(view)
                self.dev.free(region)
            if op == "group_open":
                return {"token": fields["token"], "size": fields["size"],
                        "max_slots": fields["max_slots"]}
            return {}

        def peer_gone(self, peer):
            self.gone.append(peer_dict(peer))

    handlers: dict[str, Handler] = {}

    def op_listen(host="127.0.0.1", port=0, v6only=None, reuseport=False):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((host, port))
        sock.listen(16)
        sid = new_id()
        socks[sid] = sock
        return {"id": sid, "port": sock.getsockname()[1], "inode": os.fstat(sock.fileno()).st_ino}

    def op_client_socket(host, port=0):
        """A TCP socket bound to (host, port), not connected."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((host, port))
        sid = new_id()
        socks[sid] = sock
        name = sock.getsockname()
        return {"id": sid, "addr": name[0], "port": name[1],
                "inode": os.fstat(sock.fileno()).st_ino}

    def op_connect(id, host, port):
        socks[id].settimeout(10)
        socks[id].connect((host, port))
        return list(socks[id].getsockname()[:2])

    def op_accept(id):
        socks[id].settimeout(10)
        conn, peer = socks[id].accept()
        sid = new_id()
        socks[sid] = conn
        return {"id": sid, "peer": list(peer[:2]), "inode": os.fstat(conn.fileno()).st_ino}

    def op_close_socket(id):
        socks.pop(id).close()

    def op_advertise(sock, hub="11" * 16, spec=None):
        hid = new_id()
        handles[hid] = dev(spec).advertise(socks[sock], bytes.fromhex(hub))
        return hid

    def op_withdraw(handle, spec=None):
        dev(spec).withdraw(handles.pop(handle))

    def op_find_listener(inode, spec=None):
        advert = dev(spec).find_listener(inode)
        return None if advert is None else hexify(dataclasses.asdict(advert))

    def op_find_remote_listener(sock, host, port, spec=None):
        advert = dev(spec).find_remote_listener(socks[sock], host, port)
        return None if advert is None else hexify(dataclasses.asdict(advert))

    def op_verify_remote_peer(sock, inode, endpoint, spec=None):
        return dev(spec).verify_remote_peer(socks[sock], inode, bytes.fromhex(endpoint))

    def op_release_remote_claim(inode, spec=None):
        dev(spec).release_remote_claim(inode)

    def op_set_handler(mode="echo", spec=None):
        d = dev(spec)
        handlers[spec or "default"] = Handler(mode, d)
        d.set_endpoint_handler(handlers[spec or "default"])

    def op_handler_log(spec=None):
        h = handlers[spec or "default"]
        return {"calls": h.calls, "gone": h.gone}

    def op_peer_request(endpoint, peer_op, fields, spec=None):
        return hexify(dev(spec).peer_request(bytes.fromhex(endpoint), peer_op, **unhex(fields)))

    def op_peer_alive(endpoint, spec=None):
        return dev(spec).peer_alive(bytes.fromhex(endpoint))

    def op_hold_fds(n):
        """Open n more fds (pipes) and keep them: for fd-limit tests."""
        for _ in range(n):
            held.extend(os.pipe())

    def op_set_info(connections, spec=None):
        dev(spec).set_info_provider(lambda: connections)

    def op_status(spec=None):
        return dev(spec).status()

    def op_listdir(path):
        return sorted(os.listdir(path))

    def op_netns():
        return os.readlink("/proc/self/ns/net")

    def op_close(spec=None):
        devices.pop(spec or "default").close()

    def op_uid():
        return os.getuid()

    ops = {name[3:]: fn for name, fn in locals().items() if name.startswith("op_")}
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            return
        try:
            result = ops[op](**request)
            reply = {"ok": True, "result": result}
        except Exception as exc:  # reported to the test
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    agent_main(sys.argv[1:])
