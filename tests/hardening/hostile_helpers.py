"""Shared helpers of the security half of the hardening suite (v2), and the programs it runs.

Parent side (imported by the tests): ``JsonProc`` (a child process driven by JSON lines, every
read bounded), ``HostilePeer`` (``hostile_peer.py``), ``Arena`` (a victim process, a healthy peer
process in another link group of the victim, and a hostile peer; leak and health checks between
cases), ``shm_listing`` and small waiting helpers.

Child side (``python hostile_helpers.py victim|healthy CONFIG_JSON``): the **victim** runs an
smcish echo server on asyncio or uvloop, records how each connection was made and how it ended,
and on command connects as an smcish client, starts plain servers, and reports its device state
(regions, attachments, fds net of the device's bounded caches), its link groups and every
exception its loop's handler saw. The **healthy** peer connects to the victim's server (its own
link group) and pings it all along with random payloads, checking each echo.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import time
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HELPERS = os.path.abspath(__file__)
HOSTILE_PEER = os.path.join(HERE, "hostile_peer.py")
PYTHON = sys.executable
HOST = "127.0.0.1"
OTHER_UID = 1234

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import children  # noqa: E402 - needs ROOT on sys.path (also as a child program)


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def shm_listing() -> set:
    """/dev/shm entries, minus smcish runtime directories (sessions create their own): regions
    are memfds and must never appear there."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    return {n for n in names
            if not (n.startswith("smcish-") and os.path.isdir(os.path.join("/dev/shm", n)))}


def wait_until(pred, timeout: float, what: str, interval: float = 0.005):
    """Poll ``pred()`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def exc_info(exc) -> dict | None:
    if exc is None:
        return None
    return {"type": type(exc).__name__, "msg": str(exc)[:500],
            "mro": [c.__name__ for c in type(exc).__mro__]}


# ====================================================================== parent side

ChildError = children.ChildError   # a child exited, stayed silent, or answered with an error


class JsonProc:
    """A child process speaking JSON lines: commands carry an ``id``, replies echo it. Its stderr
    is kept (``stderr_tail``); every read is bounded (benchmarks/children.py)."""

    def __init__(self, argv: list, env: dict | None = None, name: str = "child",
                 hello_timeout: float = 30.0) -> None:
        self.name = name
        self.child = children.Child(argv, env=env or child_env(), cwd=ROOT, name=name)
        self.proc = self.child.proc
        self.pid = self.child.pid
        self._replies: dict = {}
        self._next = 0
        try:
            self.hello = self.read_line(hello_timeout)
        except BaseException:
            self.kill()
            raise
        if not self.hello.get("ready"):
            raise ChildError(f"{name} did not start: {self.hello} {self.stderr_tail()}")

    def stderr_tail(self, n: int = 3000) -> str:
        return self.child.stderr_text(n)

    def read_line(self, timeout: float) -> dict:
        return json.loads(self.child.read_line(timeout))

    def send(self, /, **cmd) -> int:
        self._next += 1
        cmd["id"] = self._next
        self.child.send_json(cmd)
        return self._next

    def wait(self, ident: int, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while ident not in self._replies:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            self._replies[line.get("id")] = line
        line = self._replies.pop(ident)
        if not line.get("ok", True):
            raise ChildError(f"{self.name}: {line.get('error')}\n{line.get('trace', '')}")
        return line.get("result", line)

    def request(self, bound: float = 30.0, /, **cmd) -> dict:
        return self.wait(self.send(**cmd), bound)

    def alive(self) -> bool:
        return self.child.alive()

    def exit(self, timeout: float = 15.0) -> int | None:
        """Ask the child to exit; its return code (negative: killed by that signal)."""
        if self.child.alive():
            try:
                self.send(cmd="exit", op="exit")
                self.child.wait(timeout)
            except (BrokenPipeError, children.ChildTimeout, OSError):
                self.kill()
                return None
        self.child.stop()
        return self.proc.returncode

    def kill(self) -> None:
        if self.child.alive():
            self.child.kill(10)
        self.child.stop()


class HostilePeer(JsonProc):
    """hostile_peer.py in its own process (optionally as another uid, imports done as root)."""

    def __init__(self, env: dict | None = None, setuid: int | None = None) -> None:
        argv = [PYTHON, HOSTILE_PEER]
        if setuid is not None:
            argv.append(f"--setuid={setuid}")
        super().__init__(argv, env=env, name="hostile")

    def client(self, case: str, port: int, args: dict | None = None, timeout: float = 30.0) -> dict:
        return self.request(timeout, cmd="client", case=case, port=port, args=args or {},
                            timeout=timeout - 5)

    def listen(self, honest: bool = False) -> dict:
        return self.request(30.0, cmd="listen", honest=honest)

    def reset(self) -> dict:
        return self.request(30.0, cmd="reset")


class Victim(JsonProc):
    def __init__(self, cfg: dict, env: dict | None = None) -> None:
        super().__init__([PYTHON, HELPERS, "victim", json.dumps(cfg)], env=env, name="victim")
        self.port = self.hello["port"]

    def op(self, op: str, bound: float = 30.0, **fields) -> dict:
        return self.request(bound, op=op, **fields)

    def status(self) -> dict:
        return self.op("status")

    def conn(self, port: int, until: str = "lost", timeout: float = 5.0) -> dict | None:
        """The victim's record of the connection from ``port`` once ``until`` ("made", "lost")."""
        return self.op("wait_conn", timeout + 10, port=port, until=until, timeout=timeout)

    def connect(self, port: int, payload: bytes, timeout: float = 5.0, **kw) -> dict:
        return self.op("connect", timeout + 15, port=port, payload=payload.hex(), timeout=timeout,
                       **kw)


class Healthy(JsonProc):
    def __init__(self, port: int, device: str | None = None, env: dict | None = None) -> None:
        super().__init__([PYTHON, HELPERS, "healthy", json.dumps({"port": port, "device": device})],
                         env=env, name="healthy")

    def stats(self, reset_gap: bool = False) -> dict:
        return self.request(10.0, op="stats", reset_gap=reset_gap)


LEAK_KEYS = ("regions", "attached", "draining", "served_attachments", "zombies")


class Arena:
    """A victim (echo server on ``loop_kind``), a healthy peer in another link group of the
    victim, and a hostile peer. ``check()`` after each case: the victim is alive, back to its
    baseline (device regions/attachments, link groups, slots; fds net of bounded caches not
    above) once the hostile let go, and its healthy connection kept answering."""

    def __init__(self, loop_kind: str = "asyncio", device: str | None = None, timeout: float = 0.5,
                 hostile_uid: int | None = None, env: dict | None = None,
                 hostile: bool = True) -> None:
        self.loop_kind = loop_kind
        self.device = device
        self.shm_before = shm_listing()
        cfg = {"loop": loop_kind, "device": device, "timeout": timeout}
        self.victim = Victim(cfg, env=env)
        self.port = self.victim.port
        self.healthy = None
        self.hostile = None
        try:
            self.healthy = Healthy(self.port, device, env=env)
            wait_until(lambda: self.healthy.stats()["pings"] >= 3, 15, "healthy pings")
            assert self.healthy.stats()["mode"] == "ism"
            self.base = self._settled(None, 5.0)
            if hostile:
                self.hostile = HostilePeer(env=env, setuid=hostile_uid)
            self._pings = self.healthy.stats(reset_gap=True)["pings"]
        except BaseException:
            self.close(check=False)
            raise

    # ---------------------------------------------------------------- state
    def _settled(self, base: dict | None, timeout: float) -> dict:
        """Poll the victim until its state equals ``base`` (None: until it stops changing)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            st = self.victim.status()
            if base is None:
                if last is not None and _comparable(st) == _comparable(last):
                    return st
            elif not _leak_diff(base, st):
                return st
            if time.monotonic() > deadline:
                return st
            last = st
            time.sleep(0.02)

    def rebase(self) -> dict:
        """Take the baseline again (after the test added servers of its own to the victim)."""
        self.base = self._settled(None, 5.0)
        return self.base

    def leak_since(self, before: dict, timeout: float = 3.0) -> dict:
        """Wait (bounded) until the victim is back to ``before``; the difference left, if any."""
        return _leak_diff(before, self._settled(before, timeout))

    def check(self, what: str = "", timeout: float = 8.0) -> dict:
        """After a case (the hostile reset): no leak, healthy answered, victim alive."""
        assert self.victim.alive(), f"victim died ({what}): rc={self.victim.proc.poll()} " \
            f"{self.victim.stderr_tail()}"
        st = self._settled(self.base, timeout)
        diff = _leak_diff(self.base, st)
        assert not diff, f"victim leak after {what}: {diff}\nbase={self.base}\nnow={st}"
        self.check_healthy(what)
        return st

    def check_healthy(self, what: str = "") -> dict:
        target = self._pings + 1
        stats = wait_until(lambda: (lambda s: s if s["pings"] >= target or s["error"] else None)(
            self.healthy.stats()), 10, f"healthy connection answering after {what}")
        assert stats["error"] is None, f"healthy connection failed after {what}: {stats}"
        assert stats["max_gap"] < 5.0, f"healthy connection stalled {stats['max_gap']:.2f} s ({what})"
        self._pings = stats["pings"]
        return stats

    def close(self, check: bool = True) -> dict:
        """Stop everything; with ``check``: every process exited cleanly (no signal), the victim
        holds nothing once the hostile is gone, and /dev/shm is unchanged."""
        out = {}
        if self.hostile is not None:
            out["hostile_rc"] = self.hostile.exit()
        if check:
            st = self._settled(self.base, 8.0)
            out["leak"] = _leak_diff(self.base, st)
        if self.healthy is not None:
            out["healthy_rc"] = self.healthy.exit()
        out["victim_errors"] = None
        if self.victim.alive():
            try:
                out["victim_errors"] = self.victim.status()["errors"]
            except ChildError:
                pass
        out["victim_rc"] = self.victim.exit()
        out["shm_new"] = sorted(shm_listing() - self.shm_before)
        if check:
            assert out["victim_rc"] == 0, f"victim exit {out['victim_rc']}: {self.victim.stderr_tail()}"
            assert out["healthy_rc"] == 0, f"healthy exit {out['healthy_rc']}"
            assert out["hostile_rc"] in (0, None) or out["hostile_rc"] >= 0, out
            assert not out["leak"], f"victim leak once the hostile exited: {out['leak']}"
            assert not out["shm_new"], out["shm_new"]
        return out


def _comparable(st: dict) -> tuple:
    return tuple(st["device"].get(k) for k in LEAK_KEYS) + (st["groups"], st["slots"],
                                                           st["device"]["fds_net"])


def _leak_diff(base: dict, st: dict) -> dict:
    diff = {}
    for k in LEAK_KEYS:
        if st["device"].get(k) != base["device"].get(k):
            diff[k] = (base["device"].get(k), st["device"].get(k))
    for k in ("groups", "slots"):
        if st[k] != base[k]:
            diff[k] = (base[k], st[k])
    if st["device"]["fds_net"] > base["device"]["fds_net"]:
        diff["fds_net"] = (base["device"]["fds_net"], st["device"]["fds_net"])
    return diff


def plain_client(port: int, payload: bytes, banner: bytes = b"", bind_port: int = 0,
                 sock: socket.socket | None = None, timeout: float = 5.0) -> dict:
    """A plain (non-smcish) TCP client: connect (on ``sock`` if given: bound already), read the
    banner first if the protocol is server-first, send ``payload``, read the echo. Returns the
    bytes and when the first byte came (the "added delay" a hostile might cause)."""
    if sock is None:
        sock = socket.socket()
        sock.bind((HOST, bind_port))
    sock.settimeout(timeout)
    t0 = time.monotonic()
    out = {"first_byte_s": None}
    got = bytearray()
    try:
        sock.connect((HOST, port))
        want = len(banner)
        if not banner:
            sock.sendall(payload)
            want = len(payload)
        while len(got) < want:
            chunk = sock.recv(65536)
            if not chunk:
                out["eof"] = True
                break
            if out["first_byte_s"] is None:
                out["first_byte_s"] = time.monotonic() - t0
            got += chunk
        if banner and len(got) >= want:
            sock.sendall(payload)
            while len(got) < len(banner) + len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    out["eof"] = True
                    break
                got += chunk
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    out["got"] = bytes(got)
    out["elapsed"] = time.monotonic() - t0
    return out


def record_failed(rec: dict | None) -> dict:
    """The exception a victim connection ended with (asserting it ended with one)."""
    assert rec is not None, "the victim has no record of that connection"
    lost = rec.get("lost")
    assert isinstance(lost, dict), f"the victim's connection did not fail: {rec}"
    return lost


class EchoProto(asyncio.Protocol):
    """An echo application (the in-process tests' server)."""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self):
        return False


def run_loop(coro, loop_kind: str = "asyncio", timeout: float = 120.0):
    """Run a coroutine on a fresh loop; returns (result, the loop handler's contexts)."""
    loop = _new_loop(loop_kind)
    errors: list = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout)), errors
    finally:
        try:
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


# ====================================================================== child side

def _device_snapshot(device) -> dict:
    st = device.status()
    fds = len(os.listdir("/proc/self/fd"))
    if st.get("kind") == "daemon":
        c = st.get("client", {})
        me = next((x for x in st.get("clients", []) if x.get("pid") == os.getpid()), {})
        out = {"regions": me.get("regions", 0) - c.get("pooled", 0),
               "attached": me.get("attachments", 0), "zombies": c.get("zombies", 0),
               "fds": fds, "fds_net": fds - c.get("pooled_fds", 0) - c.get("peer_channels", 0)
               - c.get("served_peers", 0)}
    else:
        out = {k: st[k] for k in LEAK_KEYS}
        out["fds"] = fds
        out["fds_net"] = fds - st["pooled_fds"] - st["peers"] - st["served_peers"]
    return out


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _stdin_commands(loop, handle) -> asyncio.Future:
    """Feed each JSON line of stdin to ``handle`` (a coroutine function) as its own task; the
    returned future completes on EOF or an ``exit`` command."""
    done = loop.create_future()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    buf = bytearray()
    tasks = set()

    async def run(cmd: dict) -> None:
        try:
            result = await handle(cmd)
            _emit({"id": cmd.get("id"), "ok": True, "result": result})
        except BaseException as exc:  # reported to the parent
            _emit({"id": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                   "trace": traceback.format_exc()[-2000:]})

    def ready() -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)
            return
        buf.extend(chunk)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("op") == "exit":
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            task = loop.create_task(run(cmd))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_reader(fd, ready)
    return done


def _new_loop(kind: str):
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def _victim(cfg: dict) -> None:
    import ism_backend
    import smcish
    from smcish import linkgroup

    loop = asyncio.get_running_loop()
    errors: list = []

    def on_error(lp, context) -> None:
        errors.append({"message": str(context.get("message"))[:300],
                       "exc": exc_info(context.get("exception"))})

    loop.set_exception_handler(on_error)
    spec = cfg.get("device")
    timeout = cfg.get("timeout", 0.5)
    kw = {"handshake_timeout": timeout}
    if spec:
        kw["device"] = spec
    device = ism_backend.get_device(spec)
    records: dict = {}
    plain: dict = {}

    class Echo(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.t = transport
            info = transport.get_extra_info("smcish")
            self.rec = {"port": transport.get_extra_info("peername")[1], "mode": info.mode,
                        "reason": getattr(info.reason, "name", None),
                        "peer_declined": info.peer_declined, "n": 0, "crc": 0, "eof": False,
                        "lost": None, "made": loop.time(), "lost_after": None}
            records[self.rec["port"]] = self.rec

        def data_received(self, data: bytes) -> None:
            self.rec["n"] += len(data)
            self.rec["crc"] = zlib.crc32(data, self.rec["crc"])
            self.t.write(data)

        def eof_received(self):
            self.rec["eof"] = True
            return False

        def connection_lost(self, exc) -> None:
            self.rec["lost"] = exc_info(exc) or "clean"
            self.rec["lost_after"] = round(loop.time() - self.rec["made"], 4)

    server = await smcish.create_server(Echo, HOST, 0, **kw)
    lsock = server.sockets[0]
    client_ends: list = []
    extra_servers: list = []

    def status() -> dict:
        hubs = linkgroup.live_hubs()
        groups = [g for h in hubs for g in list(h.client_groups.values())
                  + list(h.server_groups.values())]
        return {"device": _device_snapshot(device), "groups": len(groups),
                "slots": sum(len(g.conns) for g in groups),
                "group_list": [repr(g) for g in groups], "stats": smcish.stats(),
                "errors": errors[-20:], "n_errors": len(errors), "records": len(records)}

    async def connect(cmd: dict) -> dict:
        """Be an smcish client: connect, write the payload, read what comes back, close."""
        payload = bytes.fromhex(cmd["payload"])
        bound = cmd.get("timeout", 5.0)
        out = {"connect_s": None}
        t0 = loop.time()
        ckw = dict(kw)
        if cmd.get("local_port"):
            ckw["local_addr"] = (HOST, cmd["local_port"])
        try:
            reader, writer = await asyncio.wait_for(
                smcish.open_connection(cmd.get("host", HOST), cmd["port"], **ckw), bound)
        except TimeoutError:
            out["hang"] = True
            out["connect_s"] = round(loop.time() - t0, 3)
            return out
        except Exception as exc:  # reported
            out["connect_error"] = exc_info(exc)
            out["connect_s"] = round(loop.time() - t0, 3)
            return out
        out["connect_s"] = round(loop.time() - t0, 3)
        info = writer.get_extra_info("smcish")
        out.update(mode=info.mode, reason=getattr(info.reason, "name", None),
                   peer_declined=info.peer_declined,
                   local_port=writer.get_extra_info("sockname")[1])
        got = bytearray()
        want = cmd.get("read_n", len(payload))
        try:
            if cmd.get("first_read"):
                got += await asyncio.wait_for(reader.read(65536), cmd.get("read_timeout", 2.0))
            writer.write(payload)
            deadline = loop.time() + cmd.get("read_timeout", 2.0)
            while len(got) < want:
                chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
                if not chunk:
                    out["eof"] = True
                    break
                got += chunk
        except TimeoutError:
            out["read_timeout"] = True
        except Exception as exc:
            out["read_error"] = exc_info(exc)
        out["reply"] = bytes(got).hex()
        info = writer.get_extra_info("smcish")          # an optimistic connection may have moved
        out.update(final_mode=info.mode, final_reason=getattr(info.reason, "name", None))
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except Exception as exc:
            out["close_error"] = exc_info(exc)
        return out

    async def start_plain(cmd: dict) -> dict:
        """A plain asyncio server: records what each connection sent, answers b"PLAIN:" + it
        (or a banner first, for server-speaks-first protocols)."""
        got: list = []
        banner = bytes.fromhex(cmd.get("banner", ""))

        async def handle(reader, writer) -> None:
            if banner:
                writer.write(banner)
            data = b""
            try:
                data = await asyncio.wait_for(reader.read(4096), 5)
                got.append(data.hex())
                writer.write(b"PLAIN:" + data)
                await writer.drain()
            except Exception as exc:
                got.append("error:" + type(exc).__name__)
            writer.close()

        srv = await asyncio.start_server(handle, cmd.get("host", HOST), cmd.get("port", 0),
                                         reuse_address=True)
        port = srv.sockets[0].getsockname()[1]
        plain[port] = (srv, got)
        return {"port": port, "inode": os.fstat(srv.sockets[0].fileno()).st_ino}

    async def start_smcish(cmd: dict) -> dict:
        """Another smcish server: echo, or (``banner``) a server-speaks-first protocol."""
        banner = bytes.fromhex(cmd.get("banner", ""))

        class Banner(Echo):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                if banner:
                    transport.write(banner)

        srv = await smcish.create_server(Banner, HOST, 0, **kw)
        extra_servers.append(srv)
        sock = srv.sockets[0]
        return {"port": sock.getsockname()[1], "inode": os.fstat(sock.fileno()).st_ino}

    async def handle(cmd: dict) -> dict:
        op = cmd["op"]
        if op == "status":
            return status()
        if op == "smcish_server":
            return await start_smcish(cmd)
        if op == "wait_conn":
            deadline = loop.time() + cmd.get("timeout", 5.0)
            key = {"made": "mode", "lost": "lost"}[cmd.get("until", "lost")]
            while loop.time() < deadline:
                rec = records.get(cmd["port"])
                if rec is not None and rec.get(key) is not None:
                    return rec
                await asyncio.sleep(0.002)
            return records.get(cmd["port"])
        if op == "records":
            return {"records": list(records.values())}
        if op == "connect":
            return await connect(cmd)
        if op == "plain_server":
            return await start_plain(cmd)
        if op == "plain_received":
            return {"received": plain[cmd["port"]][1]}
        if op == "close_plain":
            srv, _ = plain.pop(cmd["port"])
            srv.close()
            await srv.wait_closed()
            return {}
        if op == "stats":
            return smcish.stats()
        raise ValueError(f"unknown op {op!r}")

    done = _stdin_commands(loop, handle)
    _emit({"ready": True, "pid": os.getpid(), "port": lsock.getsockname()[1],
           "inode": os.fstat(lsock.fileno()).st_ino, "listener_fd": lsock.fileno()})
    await done
    server.close()
    for srv in extra_servers:
        srv.close()
    for srv, _ in plain.values():
        srv.close()
    for end in client_ends:
        end.close()
    await asyncio.sleep(0.05)


async def _healthy(cfg: dict) -> None:
    import smcish

    loop = asyncio.get_running_loop()
    kw = {"device": cfg["device"]} if cfg.get("device") else {}
    reader, writer = await smcish.open_connection(HOST, cfg["port"], **kw)
    state = {"pings": 0, "error": None, "max_gap": 0.0, "bytes": 0,
             "mode": writer.get_extra_info("smcish").mode}
    stop = asyncio.Event()

    async def pinger() -> None:
        rng = random.Random(cfg["port"])
        last = loop.time()
        try:
            while not stop.is_set():
                payload = rng.randbytes(rng.randrange(1, 4096))
                writer.write(payload)
                got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
                if got != payload:
                    raise AssertionError("healthy connection: echo differs")
                now = loop.time()
                state["max_gap"] = max(state["max_gap"], now - last)
                last = now
                state["pings"] += 1
                state["bytes"] += len(payload)
                await asyncio.sleep(0.004)
        except Exception as exc:  # reported
            state["error"] = repr(exc)[:300]

    task = loop.create_task(pinger())

    async def handle(cmd: dict) -> dict:
        if cmd["op"] == "stats":
            out = dict(state)
            if cmd.get("reset_gap"):
                state["max_gap"] = 0.0
            return out
        raise ValueError(cmd["op"])

    done = _stdin_commands(loop, handle)
    _emit({"ready": True, "pid": os.getpid()})
    await done
    stop.set()
    try:
        await asyncio.wait_for(task, 10)
    except Exception:
        pass
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5)
    except Exception:
        pass


def _child_main(argv: list) -> None:
    role, cfg = argv[0], json.loads(argv[1])
    loop = _new_loop(cfg.get("loop", "asyncio"))
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete({"victim": _victim, "healthy": _healthy}[role](cfg))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
