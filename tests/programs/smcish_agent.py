"""The hardening suite's agent: a real smcish (or plain asyncio) client or server process driven by
JSON commands on stdin, replying and reporting events as JSON lines on stdout.

    python smcish_agent.py CONFIG_JSON

Started by ``Agent`` of tests/hardening/conftest.py (see there for CONFIG_JSON: role, loop, kw,
device, nofile, raise_nofile, install, plain...). The commands are the ``cmd_*`` functions below;
the hooks (``take_hook``) stop a set-up at an exact point. ``kill -USR1 <pid>`` prints every
thread's stack on stderr.
"""

import asyncio
import collections
import faulthandler
import json
import os
import random
import resource
import signal
import socket
import sys
import time
import traceback
import zlib

from stream_pattern import PATTERN_PERIOD as PERIOD
from stream_pattern import pattern_at

import ism_backend
import smcish
from ism_backend import sockets as _isockets
from smcish import clc, linkgroup
from smcish import discovery as _discovery
from smcish import ring as _sring

CFG = json.loads(sys.argv[1])

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

if CFG.get("nofile"):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (CFG["nofile"], hard))
elif CFG.get("raise_nofile"):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, CFG["raise_nofile"]), hard))

def new_loop():
    if CFG.get("loop") == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()

KW = {k: CFG[k] for k in ("ring_size", "handshake_timeout", "device", "poll_us") if k in CFG}

def fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:          # EMFILE: listing needs an fd
        return -1

def rss():
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def served(dev):
    path = getattr(dev, "_sock_path", None)
    if not path:
        return 0
    inodes = set()
    with open("/proc/net/unix") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path:
                inodes.add(parts[6])
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            n += 1
    return max(0, n - 1)

def status(extra=None):
    dev = ism_backend.get_device(CFG.get("device"))
    st = dev.status()
    if st.get("kind") == "daemon":
        c = st.get("client", {})
        net = fds() - c.get("pooled_fds", 0)
        me = next((x for x in st.get("clients", []) if x["pid"] == os.getpid()), {})
        dst = {"regions": me.get("regions", 0) - c.get("pooled", 0),
               "attached": me.get("attachments", 0)}
        peer_conns = 0
    else:
        # the device's cached control connections (ours to peers, peers' to us): bounded by
        # the peers, opened when first needed (a peer-op one at a group's first growth)
        peer_conns = st["peers"] + served(dev)
        net = fds() - st["pooled_fds"] - peer_conns
        dst = {k: st.get(k, 0) for k in ("regions", "attached", "draining",
                                         "served_attachments", "zombies", "pooled", "peers",
                                         "peer_channels")}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"fds": fds(), "fds_net": net, "peer_conns": peer_conns, "rss": rss(), "device": dst,
           "stats": smcish.stats(), "cpu": usage.ru_utime + usage.ru_stime}
    out.update(extra or {})
    return out

def stdin_commands(loop, handler):
    buf = bytearray()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    def ready():
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not chunk:
            loop.remove_reader(fd)
            handler("exit")
            return
        buf.extend(chunk)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if line.strip():
                handler(line.decode().strip())
    loop.add_reader(fd, ready)

faulthandler.register(signal.SIGUSR1, all_threads=True)     # `kill -USR1 <pid>`: stacks on stderr

ROLE = CFG.get("role", "server")
PLAIN = bool(CFG.get("plain"))          # plain asyncio (same harness, no smcish): the baseline
KW = dict(CFG.get("kw", {}))
CONNS = {}                              # key (the client's port) -> Conn, until "forget"
BEHAVIOR = {"echo": ROLE == "server", "paused": False, "verify": False, "keep_closed": True}
HELD = []                               # final words the "delay_final" hook holds back
ARMED = collections.Counter()           # one-shot hooks: name -> how many more times
FREEZE_S = {}                           # freeze hooks: name -> seconds (default: until killed)
SERVERS = []
BACKGROUND = set()                      # tasks started by commands, kept until done


def reply(rid, **kw):
    kw["id"] = rid
    emit(kw)


def seed_of(role, port):
    """Where the pattern a side sends on connection `port` starts (its own stream per side)."""
    return (port * 7919 + (0 if role == "client" else 500009)) % PERIOD


def take_hook(name):
    if ARMED[name] > 0:
        ARMED[name] -= 1
        return True
    return False


def reason_name(info):
    return getattr(getattr(info, "reason", None), "name", None)


class Conn(asyncio.Protocol):
    def __init__(self, role):
        self.role = role
        self.peer_role = "server" if role == "client" else "client"
        self.t = None
        self.rx = 0
        self.rx_crc = 0
        self.tx_crc = 0
        self.rx_ok = True
        self.verify = BEHAVIOR["verify"]
        self.echo = BEHAVIOR["echo"]
        self.tx = 0
        self.eof = False
        self.lost = None
        self.lost_type = None
        self.lost_at = None
        self.made_at = time.monotonic()
        self.win = None                 # [target, got, crc, future] of a request
        self.echo_paused = False
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, t):
        self.t = t
        info = t.get_extra_info("smcish")
        self.mode = getattr(info, "mode", "plain")
        self.reason = reason_name(info)
        name = "peername" if self.role == "server" else "sockname"
        self.port = t.get_extra_info(name)[1]
        self.group = None
        g = getattr(t, "_group", None)
        if g is not None:
            self.group = g.id.hex()
        CONNS[self.port] = self
        if BEHAVIOR["paused"]:
            t.pause_reading()

    def data_received(self, data):
        if self.verify and self.rx_ok and data != pattern_at(seed_of(self.peer_role, self.port)
                                                             + self.rx, len(data)):
            self.rx_ok = False
        self.rx += len(data)
        self.rx_crc = zlib.crc32(data, self.rx_crc)
        win = self.win
        if win is not None:
            win[1] += len(data)
            win[2] = zlib.crc32(data, win[2])
            if win[1] >= win[0] and not win[3].done():
                win[3].set_result(None)
        if self.echo:
            self.send(data)
            if not self.echo_paused and self.t.get_write_buffer_size() > (1 << 20):
                self.echo_paused = True
                self.t.pause_reading()

    def send(self, data):
        self.t.write(data)
        self.tx += len(data)
        self.tx_crc = zlib.crc32(data, self.tx_crc)

    def pause_writing(self):
        pass

    def resume_writing(self):
        if self.echo_paused:
            self.echo_paused = False
            self.t.resume_reading()

    def eof_received(self):
        self.eof = True
        return False

    def connection_lost(self, exc):
        self.lost = "clean" if exc is None else repr(exc)
        self.lost_type = None if exc is None else type(exc).__name__
        self.lost_reset = isinstance(exc, ConnectionResetError)
        self.lost_at = time.monotonic()
        win = self.win
        if win is not None and not win[3].done():
            win[3].set_exception(exc or ConnectionResetError("closed"))
        if not self.done.done():
            self.done.set_result(None)
        if not BEHAVIOR["keep_closed"] and CONNS.get(getattr(self, "port", None)) is self:
            del CONNS[self.port]

    async def request(self, payload, timeout):
        fut = asyncio.get_running_loop().create_future()
        self.win = [len(payload), 0, 0, fut]
        self.send(payload)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            win, self.win = self.win, None
        return win[1] == len(payload) and win[2] == zlib.crc32(payload)

    def row(self):
        return {"port": self.port, "mode": self.mode, "reason": self.reason, "rx": self.rx,
                "rx_crc": self.rx_crc, "tx_crc": self.tx_crc,
                "ok": self.rx_ok, "tx": self.tx, "eof": self.eof, "lost": self.lost,
                "lost_type": self.lost_type, "lost_reset": getattr(self, "lost_reset", False),
                "lost_at": self.lost_at, "made_at": self.made_at, "group": self.group,
                "pending": None if self.t is None or self.lost else
                self.t.get_write_buffer_size(), "ring": self.ring_size()}

    def ring_size(self):
        """Capacity of our current tx ring (ISM, open), else None."""
        ring = getattr(self.t, "_ring", None)
        try:
            return None if ring is None or ring.closed else ring.tx_capacity
        except Exception:
            return None


# ---- hooks that stop a set-up at an exact point (armed one-shot with the "arm" command)
#
# They sit where the set-up records of docs/design.md 3.3 reach shared memory (smcish.ring.Group:
# post_claim, publish_setup, set_phase, notify) and where the server looks for a claim at accept
# (linkgroup.Hub.find_claim), not in protocol.py's private methods.


_orig = {name: getattr(_sring.Group, name) for name in ("post_claim", "publish_setup",
                                                        "set_phase", "notify")}
_orig_find_claim = linkgroup.Hub.find_claim
_after_notify = {}          # id(group), slot -> hook to run after the next notify of that slot


def _freeze(hook, **info):
    emit(dict(event="hook", hook=hook, **info))
    time.sleep(FREEZE_S.get(hook, 3600))
    emit({"event": "thawed", "hook": hook})


def _post_claim(self, port, slot):
    """client: the claim record is published and in the claim table; the socket is about to
    connect. freeze_after_claim: freeze here (the server never sees the connection)."""
    ok = _orig["post_claim"](self, port, slot)
    if ok and take_hook("freeze_after_claim"):
        _freeze("freeze_after_claim", slot=slot, port=port)
    return ok


_slot_port = {}             # id(group), slot -> the client port of its connection


def _publish_setup(self, slot, setup):
    _orig["publish_setup"](self, slot, setup)
    _slot_port[(id(self), slot)] = setup.cport
    if ROLE == "server" and setup.phase == clc.PHASE_ACCEPTED and ARMED["freeze_after_accept"]:
        _after_notify[(id(self), slot)] = ("freeze_after_accept", setup.cport)


def _set_phase(self, slot, gen, phase, reason=0):
    if ROLE == "client" and phase == clc.PHASE_FINAL_ISM:
        port = _slot_port.get((id(self), slot))
        if take_hook("freeze_before_final"):
            _freeze("freeze_before_final", slot=slot, port=port)
        elif take_hook("delay_final"):
            # the final word is held back (the client itself goes on as established)
            HELD.append((self, slot, gen, phase, reason))
            emit({"event": "hook", "hook": "delay_final", "slot": slot, "port": port})
            return
        elif take_hook("freeze_after_final"):
            _after_notify[(id(self), slot)] = ("freeze_after_final", None)
    _orig["set_phase"](self, slot, gen, phase, reason)


def _notify(self, slot):
    _orig["notify"](self, slot)
    hook = _after_notify.pop((id(self), slot), None)
    if hook is not None and (hook[0] == "freeze_after_final" or take_hook(hook[0])):
        _freeze(hook[0], slot=slot, port=_slot_port.get((id(self), slot)))


def _find_claim(self, peer_addr, local_addr):
    """server, at accept: the TCP connection is accepted, its claim not looked at yet."""
    if take_hook("freeze_at_accept"):
        _freeze("freeze_at_accept", port=peer_addr[1])
    return _orig_find_claim(self, peer_addr, local_addr)


_orig_serve_extent_add = linkgroup.LinkGroup.serve_extent_add


def _serve_extent_add(self, fields):
    """endpoint thread: the peer added an extent. delay_extent_add_reply: install it, then
    answer late (as when our loop took most of the hand-over bound to run the install)."""
    out = _orig_serve_extent_add(self, fields)
    if take_hook("delay_extent_add_reply"):
        emit({"event": "hook", "hook": "delay_extent_add_reply", "index": fields["index"]})
        time.sleep(FREEZE_S.get("delay_extent_add_reply", 2.5))
    return out


linkgroup.LinkGroup.serve_extent_add = _serve_extent_add
_sring.Group.post_claim = _post_claim
_sring.Group.publish_setup = _publish_setup
_sring.Group.set_phase = _set_phase
_sring.Group.notify = _notify
linkgroup.Hub.find_claim = _find_claim


# ---- what discovery saw (why a connection was not claimed): counted, reported by "status"

ORACLE = collections.Counter()
_orig_bound_socket = _discovery.bound_socket


def _bound_socket(family, host, port, local_addr, remote_ok=False):
    try:
        sock, hit = _orig_bound_socket(family, host, port, local_addr, remote_ok)
    except OSError as exc:
        ORACLE[f"bind_error_{exc.errno or 0:d}"] += 1
        raise
    ORACLE["no_listener" if hit is None else f"state_{hit.state:d}"] += 1
    if hit is None:
        ORACLE["no_listener_bound" if sock.getsockname()[1] else "no_listener_unbound"] += 1
    return sock, hit


_discovery.bound_socket = _bound_socket
_orig_lookup = _isockets.Diag.lookup


def _lookup(self, family, local, remote):
    hit = _orig_lookup(self, family, local, remote)
    ORACLE["lookup_none" if hit is None else f"lookup_state_{hit.state:d}"] += 1
    return hit


_isockets.Diag.lookup = _lookup




# ---- measurements

def _socket_kinds():
    kinds = {}
    for name in ("tcp", "tcp6", "udp", "udp6", "unix", "netlink"):
        try:
            with open("/proc/net/" + name) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        col = {"unix": 6}.get(name, 9)
        for line in lines:
            parts = line.split()
            if len(parts) > col:
                kinds[parts[col]] = name.rstrip("6")
    return kinds


def fd_kinds():
    kinds = collections.Counter()
    socks = None
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if link.startswith("socket:"):
            if socks is None:
                socks = _socket_kinds()
            kinds["socket_" + socks.get(link[8:-1], "other")] += 1
        elif link.startswith("/memfd:"):
            kinds["memfd"] += 1
        elif "eventfd" in link:
            kinds["eventfd"] += 1
        elif link == "/dev/null":
            kinds["devnull"] += 1
        elif link.startswith("pipe:"):
            kinds["pipe"] += 1
        elif "eventpoll" in link:
            kinds["epoll"] += 1
        else:
            kinds["other"] += 1
    return dict(kinds)


def rss_parts():
    """RssAnon (the process's own memory: what a leak grows) and RssShmem (pages of shared
    memory it maps, which come and go with a group's extents), KiB; read after rss()'s trim."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssShmem:", "RssFile:")):
                key = line.split(":")[0]
                out[{"RssAnon": "rss_anon", "RssShmem": "rss_shmem", "RssFile": "rss_file"}[key]] \
                    = int(line.split()[1])
    return out


def smaps_memfd():
    """Shared memfd mappings of this process: [own (rw) KiB mapped, resident, peer (ro) ...]."""
    out = {"rw_size": 0, "rw_rss": 0, "ro_size": 0, "ro_rss": 0, "maps": 0}
    cur = None
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else ""
                    if path.startswith("/memfd:"):
                        cur = "rw" if parts[1].startswith("rw") else "ro"
                        out["maps"] += 1
                    else:
                        cur = None
                elif cur is not None and first in ("Size:", "Rss:"):
                    out[cur + ("_size" if first == "Size:" else "_rss")] += int(line.split()[1])
    except OSError:
        pass
    return out


def groups_info():
    """Every link group of this process not yet destroyed (dying ones included)."""
    hubs = linkgroup.live_hubs()
    groups = []
    with linkgroup._reg_lock:
        live = list(linkgroup._groups.values())
    for g in live:
        if g.destroyed:
            continue
        groups.append({"id": g.id.hex(), "role": g.role, "conns": len(g.conns),
                       "my_exts": len(g.my_exts), "peer_exts": len(g.peer_exts),
                       "dying": g.dying, "awaiting": len(g._awaiting),
                       "ext_ids": sorted(g.my_exts), "peer_ext_ids": sorted(g.peer_exts),
                       "peer_removals": sorted(getattr(g, "_peer_removals", ()))})
    return {"hubs": len(hubs), "groups": groups, "link_groups": len(groups),
            "slots": sum(g["conns"] for g in groups),
            "extents": sum(g["my_exts"] for g in groups)}


def agent_status(trim=True):
    st = {"fds": fds(), "rss": rss() if trim else None, "device": {}}
    if not PLAIN:
        try:
            st = status()
        except ism_backend.IsmError as exc:          # no device (ismd gone): no counts
            st["device_error"] = repr(exc)
            st["stats"] = smcish.stats()
    st.update(rss_parts())
    st["fd_kinds"] = fd_kinds()
    if "fds_net" in st:
        # uvloop opens /dev/null the first time it aborts a socket and keeps it for good
        st["fds_net"] -= st["fd_kinds"].get("devnull", 0)
    st["smaps"] = smaps_memfd()
    st["conns_open"] = sum(1 for c in CONNS.values() if c.lost is None)
    st["oracle"] = dict(ORACLE)
    st["conns"] = len(CONNS)
    if not PLAIN:
        st["linkgroups"] = groups_info()
        from smcish import loop as _sloop
        st["preclaims"] = len(_sloop._preclaims)
        try:
            st["raw_device"] = ism_backend.get_device(CFG.get("device")).status()
        except ism_backend.IsmError:
            st["raw_device"] = None
    return st


# ---- commands

def _connector(loop, via="create"):
    """How a client connects: smcish.create_connection (an optimistic claim), or via="sock":
    the application's own socket, connected with the (smcish-patched, CFG install) loop's
    sock_connect then handed over with create_connection(sock=) (a classic CLAIMED claim)."""
    if PLAIN:
        return lambda f, h, p: loop.create_connection(f, h, p)
    if via == "sock":
        async def connect(f, h, p):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (h, p))
            except BaseException:
                sock.close()
                raise
            return await loop.create_connection(f, sock=sock)
        return connect
    return lambda f, h, p: smcish.create_connection(f, h, p, **KW)


async def cmd_listen(rid, port=0, backlog=1024):
    loop = asyncio.get_running_loop()
    if PLAIN:
        server = await loop.create_server(lambda: Conn("server"), "127.0.0.1", port,
                                          backlog=backlog)
    else:
        server = await smcish.create_server(lambda: Conn("server"), "127.0.0.1", port,
                                            backlog=backlog, **KW)
    SERVERS.append(server)
    reply(rid, port=server.sockets[0].getsockname()[1])


async def cmd_connect(rid, port, count=1, concurrency=0, timeout=30.0, detail=True,
                      via="create"):
    loop = asyncio.get_running_loop()
    connect = _connector(loop, via)
    sem = asyncio.Semaphore(concurrency or count)
    results = [None] * count

    async def one(i):
        async with sem:
            t0 = time.monotonic()
            try:
                _, p = await asyncio.wait_for(connect(lambda: Conn("client"), "127.0.0.1", port),
                                              timeout)
            except BaseException as exc:
                where = [f"{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno} {fr.name}"
                         for fr in traceback.extract_tb(exc.__traceback__)][-3:]
                results[i] = {"error": repr(exc), "t": time.monotonic() - t0, "where": where}
                return
            results[i] = {"port": p.port, "mode": p.mode, "reason": p.reason,
                          "t": time.monotonic() - t0, "group": p.group}

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    summary = collections.Counter()
    for r in results:
        summary["error" if "error" in r else (r["mode"] + ("/" + r["reason"] if r["reason"]
                                                           else ""))] += 1
    reply(rid, summary=dict(summary), elapsed=time.monotonic() - t0,
          max_t=max((r["t"] for r in results), default=0),
          results=results if detail else [r for r in results if "error" in r][:20],
          groups=sorted({r.get("group") for r in results if r.get("group")}))


async def cmd_behave(rid, **kw):
    BEHAVIOR.update(kw)
    for c in CONNS.values():
        c.echo = BEHAVIOR["echo"]
        c.verify = BEHAVIOR["verify"]
    reply(rid, behavior=BEHAVIOR)


async def cmd_publish(rid, limit=60000, fixed=None):
    """Write this side's pattern on every open connection (size from the port, or fixed)."""
    total = pending = 0
    for c in CONNS.values():
        if c.lost is not None:
            continue
        n = fixed or 1 + (c.port * 2654435761) % limit
        c.send(pattern_at(seed_of(ROLE, c.port) + c.tx, n))
        total += n
        pending += c.t.get_write_buffer_size()
    reply(rid, total=total, pending=pending)


async def cmd_stream(rid, chunk=65536):
    """Stream this side's pattern on every open connection until it ends; report progress."""
    async def run(c):
        while c.lost is None and not c.t.is_closing():
            c.send(pattern_at(seed_of(ROLE, c.port) + c.tx, chunk))
            while c.lost is None and c.t.get_write_buffer_size() > 4 * chunk:
                await asyncio.sleep(0.001)
            emit({"event": "published", "port": c.port,
                  "n": c.tx - (c.t.get_write_buffer_size() if c.lost is None else 0)})
            await asyncio.sleep(0)
    for c in list(CONNS.values()):
        if c.lost is None:
            task = asyncio.ensure_future(run(c))
            BACKGROUND.add(task)                # (a task nobody refers to may be collected)
            task.add_done_callback(BACKGROUND.discard)
    reply(rid, started=True)


async def cmd_send_close(rid, n, until_lost=True, timeout=10.0):
    """Write `n` bytes of this side's pattern on every open connection, then close() it; with
    `until_lost`, wait for connection_lost. Replies with what was pending right after close()."""
    pending = {}
    conns = [c for c in CONNS.values() if c.lost is None]
    for c in conns:
        c.send(pattern_at(seed_of(ROLE, c.port) + c.tx, n))
        c.t.close()
        pending[c.port] = c.t.get_write_buffer_size()
    deadline = time.monotonic() + timeout
    while until_lost and any(c.lost is None for c in conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    reply(rid, pending=pending, lost={c.port: c.lost for c in conns})


async def cmd_pause(rid):
    BEHAVIOR["paused"] = True
    for c in CONNS.values():
        if c.lost is None:
            c.t.pause_reading()
    reply(rid)


async def cmd_resume(rid):
    BEHAVIOR["paused"] = False
    t = time.monotonic()
    for c in CONNS.values():
        if c.lost is None:
            c.t.resume_reading()
    reply(rid, at=t)


async def cmd_report(rid, wait_lost=0.0):
    deadline = time.monotonic() + wait_lost
    while wait_lost and any(c.lost is None for c in CONNS.values()):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    reply(rid, conns=[c.row() for c in CONNS.values()])


async def cmd_close_all(rid, timeout=10.0, abort=False):
    for c in list(CONNS.values()):
        if c.lost is None:
            (c.t.abort if abort else c.t.close)()
    deadline = time.monotonic() + timeout
    while any(c.lost is None for c in CONNS.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    reply(rid, open=sum(1 for c in CONNS.values() if c.lost is None))


async def cmd_forget(rid):
    for k in [k for k, c in CONNS.items() if c.lost is not None]:
        del CONNS[k]
    reply(rid, left=len(CONNS))


async def cmd_echo_round(rid, rounds=1, lo=1, hi=65536, dist="uniform", seed=0, timeout=60.0):
    """Client: on every open connection at once, `rounds` random payloads echoed and CRC-checked."""
    out = collections.Counter()

    async def run(c, rng):
        for _ in range(rounds):
            if dist == "mix":           # the sizes that matter, and anything in between
                n = rng.choice((1, 17, 512, 4096, 16384, 40000, rng.randint(lo, hi)))
            elif dist == "log":
                n = min(hi, max(lo, int(2 ** rng.uniform(0, (hi).bit_length()))))
            else:
                n = rng.randint(lo, hi)
            payload = rng.randbytes(n)
            try:
                ok = await c.request(payload, timeout)
            except BaseException as exc:
                out["error"] += 1
                emit({"event": "echo_error", "port": c.port, "exc": repr(exc)})
                return
            out["messages"] += 1
            out["bytes"] += n
            if not ok:
                out["mismatch"] += 1

    t0 = time.monotonic()
    conns = [c for c in CONNS.values() if c.lost is None]
    await asyncio.gather(*(run(c, random.Random(seed * 1000003 + c.port)) for c in conns))
    reply(rid, conns=len(conns), elapsed=time.monotonic() - t0, **out)


async def cmd_soak(rid, port, count, inflight=4, size=64, sample_every=500, timeout=30.0):
    """Short connections one after another (`inflight` at a time): connect, one echo, close."""
    loop = asyncio.get_running_loop()
    connect = _connector(loop)
    modes = collections.Counter()
    errors = []
    samples = []
    done = [0]
    payload = os.urandom(size)
    it = iter(range(count))
    t0 = time.monotonic()

    async def worker():
        for _ in it:
            try:
                t, c = await asyncio.wait_for(connect(lambda: Conn("client"), "127.0.0.1", port),
                                              timeout)
                modes[c.mode + ("/" + c.reason if c.reason else "")] += 1
                ok = await c.request(payload, timeout)
                if not ok:
                    errors.append("mismatch")
                t.close()
                await asyncio.wait_for(asyncio.shield(c.done), timeout)
                CONNS.pop(c.port, None)
            except BaseException as exc:
                errors.append(repr(exc))
            done[0] += 1
            if done[0] % sample_every == 0:
                st = agent_status()
                samples.append({"n": done[0], "t": time.monotonic() - t0, "fds": st["fds"],
                                "fds_net": st.get("fds_net"), "rss": st["rss"],
                                "rss_anon": st["rss_anon"],
                                "slots": st["linkgroups"]["slots"],
                                "groups": st["linkgroups"]["link_groups"],
                                "extents": st["linkgroups"]["extents"],
                                "regions": st["device"].get("regions")})

    await asyncio.gather(*(worker() for _ in range(inflight)))
    reply(rid, modes=dict(modes), errors=errors[:20], n_errors=len(errors), samples=samples,
          elapsed=time.monotonic() - t0)


async def cmd_clients(rid, port, count, size=1024, hold=0.0, timeout=10.0, concurrency=0):
    """`count` clients at once: connect, one echo of `size` bytes, keep it `hold` seconds, close.
    Each result: served (echo intact), mode/reason, connect and total times, or the error."""
    loop = asyncio.get_running_loop()
    connect = _connector(loop)
    sem = asyncio.Semaphore(concurrency or count)
    results = []

    async def one(i):
        async with sem:
            row = {"i": i}
            t0 = time.monotonic()
            try:
                t, c = await asyncio.wait_for(connect(lambda: Conn("client"), "127.0.0.1", port),
                                              timeout)
                row.update(mode=c.mode, reason=c.reason, t_connect=time.monotonic() - t0)
                row["served"] = await c.request(os.urandom(size), timeout)
                row["t"] = time.monotonic() - t0
                await asyncio.sleep(hold)
                t.close()
                CONNS.pop(c.port, None)
            except BaseException as exc:
                row.update(error=repr(exc), t=time.monotonic() - t0, served=False,
                           stage="connect" if "mode" not in row else "echo")
            results.append(row)

    await asyncio.gather(*(one(i) for i in range(count)))
    modes = collections.Counter(r.get("mode", "error") + ("/" + r["reason"] if r.get("reason")
                                                          else "") for r in results)
    reply(rid, results=results, modes=dict(modes),
          served=sum(1 for r in results if r["served"] is True))


async def cmd_loops_clients(rid, port, count, size=1024, timeout=10.0, hold=True):
    """`count` clients, each on its own event loop in its own thread (so each is its own smcish
    hub, and opens its own link group with the server): connect, one echo of `size` bytes; with
    `hold`, every client keeps its connection open until all are served or have failed (all
    `count` connections are open together), then closes. Per client: served, mode/reason,
    times, or the error."""
    import threading
    results = [None] * count
    done = threading.Event()
    left = [count]
    lock = threading.Lock()

    def finished():
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    async def client(i):
        row = {"i": i}
        t0 = time.monotonic()
        try:
            if PLAIN:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            else:
                r, w = await asyncio.wait_for(smcish.open_connection("127.0.0.1", port, **KW),
                                              timeout)
        except BaseException as exc:
            row.update(error=repr(exc), stage="connect", t=time.monotonic() - t0, served=False)
            results[i] = row
            finished()
            return
        info = w.get_extra_info("smcish")
        row.update(mode=getattr(info, "mode", "plain"), reason=reason_name(info),
                   t_connect=time.monotonic() - t0)
        try:
            payload = os.urandom(size)
            w.write(payload)
            got = await asyncio.wait_for(r.readexactly(size), timeout)
            row["served"] = got == payload
        except BaseException as exc:
            row.update(error=repr(exc), stage="echo", served=False)
        row["t"] = time.monotonic() - t0
        results[i] = row
        finished()
        if hold:
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 2 * timeout)
        w.close()
        try:
            await asyncio.wait_for(w.wait_closed(), timeout)
        except BaseException:
            pass

    def thread_main(i):
        loop = new_loop()
        try:
            loop.run_until_complete(client(i))
        except BaseException as exc:
            if results[i] is None:
                results[i] = {"i": i, "error": repr(exc), "stage": "loop", "served": False}
                finished()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            except BaseException:
                pass
            loop.close()

    threads = [threading.Thread(target=thread_main, args=(i,), daemon=True) for i in range(count)]
    for th in threads:
        th.start()
    loop = asyncio.get_running_loop()
    for th in threads:
        await loop.run_in_executor(None, th.join, 4 * timeout + 10)
    results = [r if r is not None else {"error": "no result", "served": False} for r in results]
    modes = collections.Counter(r.get("mode", "error") + ("/" + r["reason"] if r.get("reason")
                                                          else "") for r in results)
    reply(rid, results=results, modes=dict(modes),
          served=sum(1 for r in results if r.get("served") is True))


SPARE_FDS = []


async def cmd_exhaust_fds(rid, leave=0):
    """Take every fd this process may still open (dup of stdin), then give back `leave` of them:
    the next fds anything opens are exactly those."""
    while True:
        try:
            SPARE_FDS.append(os.dup(0))
        except OSError:
            break
    for _ in range(min(leave, len(SPARE_FDS))):
        os.close(SPARE_FDS.pop())
    reply(rid, taken=len(SPARE_FDS))


async def cmd_release_fds(rid):
    while SPARE_FDS:
        os.close(SPARE_FDS.pop())
    reply(rid)


async def cmd_status(rid, trim=True):
    reply(rid, **agent_status(trim))


async def cmd_arm(rid, hook, count=1, seconds=None):
    ARMED[hook] += count
    if seconds is not None:
        FREEZE_S[hook] = seconds
    reply(rid, armed=dict(ARMED))


async def cmd_release(rid):
    """Write the final words the delay_final hook held back."""
    held = list(HELD)
    HELD.clear()
    for group, slot, gen, phase, reason in held:
        if not group.closed:
            _orig["set_phase"](group, slot, gen, phase, reason)
            _orig["notify"](group, slot)
    reply(rid, released=len(held))


async def cmd_freeze(rid, seconds=3600.0):
    reply(rid, freezing=seconds)
    time.sleep(seconds)


async def cmd_cpu(rid, seconds=2.0):
    """CPU this process uses over `seconds` while its loop idles (or is paused on a full ring)."""
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    used = (u1.ru_utime + u1.ru_stime) - (u0.ru_utime + u0.ru_stime)
    reply(rid, cpu=used, wall=time.monotonic() - t0)


async def cmd_close_servers(rid):
    for s in SERVERS:
        s.close()
    for s in SERVERS:
        await s.wait_closed()
    SERVERS.clear()
    reply(rid)


COMMANDS = {name[4:]: fn for name, fn in list(globals().items()) if name.startswith("cmd_")}


async def agent_main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    tasks = set()

    def handle(line):
        if line == "exit":
            if not done.done():
                done.set_result(None)
            return
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        rid = msg.pop("id", None)
        if cmd == "exit":
            if not done.done():
                done.set_result(None)
            return

        async def run():
            try:
                await COMMANDS[cmd](rid, **msg)
            except BaseException as exc:
                reply(rid, error=repr(exc), tb=traceback.format_exc()[-2000:])
        task = loop.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    stdin_commands(loop, handle)
    if not PLAIN:
        # Open what smcish opens lazily once per process (the device, the kernel's socket
        # lookup: two netlink sockets), so fd baselines taken now are the steady state.
        from ism_backend import sockets as _sockets
        try:
            ism_backend.get_device(CFG.get("device"))
        except ism_backend.IsmError as exc:
            emit({"event": "no_device", "error": repr(exc)})
        _sockets.diag().is_local("127.0.0.1")
        _discovery.source_address(socket.AF_INET, "127.0.0.1")
    emit({"ready": True, "pid": os.getpid()})
    await done
    for s in SERVERS:
        s.close()


loop = new_loop()
if CFG.get("install") and not PLAIN:
    smcish.install(loop, smcish.Config.from_env(**KW))     # transparent mode (via="sock")
loop.run_until_complete(agent_main())
