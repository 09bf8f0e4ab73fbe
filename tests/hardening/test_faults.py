"""SIGKILL of the client, the server and ismd at every set-up point, mid-transfer and during close.

Both sides are real smcish processes (``Agent``); hooks in the agent stop a set-up at an exact
point of docs/design.md 3.3 (the client's claim published but not accepted; the server's
ACCEPTED published but no final word yet; the client's FINAL_ISM written) before the kill.
"many" cases add 15 established connections to the same link group, each with a pattern of its
own published (1 B to 60,000 B) that the survivor has not read yet. For every case:

- the survivor reports within 1 s of the kill: every established connection delivers all the
  bytes the dead side published (checked byte for byte against the pattern), then fails with
  ConnectionResetError; a connection in set-up ends (the application never sees it, or sees it
  fail or end), and the survivor's link group is torn down;
- nothing leaks: no region, attachment, peer mapping or link group is left in the survivor, its
  fds are back to the start (net of the device's region pool), /dev/shm is unchanged, and the
  dead process's runtime-dir files are gone (reaped by the survivor, or by the next device open);
- a new connection afterwards works, through a new link group (to a restarted peer).

With ismd killed, connections already set up keep working (and set-ups in flight finish over
their group: nothing of the set-up goes through ismd), new ones fall back at once with
NO_DEVICE and work, nothing leaks, and a restarted ismd serves new listeners over ISM.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from device_helpers import Ismd

from .conftest import (
    Agent,
    idle_device,
    published_size,
    runtime_files,
    shm_listing,
    wait_until,
)

HT = 5.0                    # handshake timeout: long, so what happens within 1 s is the kill's
KW = {"handshake_timeout": HT}
REPORT_WITHIN = 1.0
BYSTANDERS = 15             # "many": established connections in the same group as the victim's
PUBLISH_LIMIT = 60000       # pattern sizes 1..60,000 B per connection: they fit the 64 KiB ring


@pytest.fixture(autouse=True, scope="module")
def _dev_shm_untouched():
    """Regions are memfds: nothing of ours may ever appear in (or stay in) /dev/shm."""
    before = shm_listing()
    yield
    assert shm_listing() == before


def _torn_down(st: dict) -> bool:
    groups = st["linkgroups"]
    return (groups["link_groups"] == 0 and groups["slots"] == 0 and idle_device(st)
            and st["smaps"]["ro_size"] == 0 and st["conns_open"] == 0)


class Case:
    """A server and a client agent; `bystanders` established connections with unread patterns."""

    def __init__(self, loop: str = "asyncio", bystanders: int = 0, device: str | None = None,
                 kw: dict | None = None, install: bool = False) -> None:
        self.kw = dict(KW, **(kw or {}))
        extra = {"device": device} if device else {}
        if install:
            extra["install"] = True          # transparent mode: classic claims (via="sock")
        if device:
            self.kw["device"] = device
        self.loop = loop
        self.extra = extra
        self.server = Agent("server", loop=loop, kw=self.kw, **extra)
        self.client = Agent("client", loop=loop, kw=self.kw, **extra)
        self.agents = [self.server, self.client]
        self.port = self.server.call("listen")["port"]
        self.base = {a.role: a.status() for a in self.agents}
        self.bystanders: list[int] = []
        self.group = None
        if bystanders:
            for a in self.agents:
                a.call("behave", paused=True, verify=True, echo=False)
            res = self.client.call("connect", port=self.port, count=bystanders, timeout=20)
            assert res["summary"] == {"ism": bystanders}, res["summary"]
            assert len(res["groups"]) == 1, res["groups"]
            self.group = res["groups"][0]
            self.bystanders = [r["port"] for r in res["results"]]
            self.server.wait_conns(bystanders)
            for a in self.agents:
                assert a.call("publish", limit=PUBLISH_LIMIT)["pending"] == 0

    def other(self, agent: Agent) -> Agent:
        return self.client if agent is self.server else self.server

    def endpoint(self, agent: Agent) -> str:
        return self.base[agent.role]["raw_device"]["endpoint_id"]

    def check_bystanders(self, survivor: Agent, t_kill: float, frozen: float = 0.0) -> list:
        """Resume the survivor's reads: each bystander delivers all the dead side published,
        byte-exact, then ConnectionResetError, within REPORT_WITHIN of the kill (plus
        `frozen`: how long a hook kept the survivor itself frozen after the kill)."""
        survivor.call("resume")
        conns = {c["port"]: c for c in survivor.call("report", wait_lost=5)["conns"]}
        late = []
        for port in self.bystanders:
            c = conns[port]
            want = published_size(port, PUBLISH_LIMIT)
            assert c["ok"] and c["rx"] == want, (c, want)
            assert c["lost_reset"], c
            late.append(c["lost_at"] - t_kill)
            assert late[-1] <= REPORT_WITHIN + frozen, (c, late[-1])
        return late

    def check_clean(self, survivor: Agent, t_kill: float) -> float:
        """The survivor's group is torn down and it holds nothing more than before the case."""
        base = self.base[survivor.role]
        after = wait_until(survivor.status, lambda st: _torn_down(st)
                           and st["fds_net"] <= base["fds_net"], timeout=REPORT_WITHIN + 4.0)
        took = time.monotonic() - t_kill
        assert _torn_down(after), (after["linkgroups"], after["device"], after["smaps"],
                                   after["conns_open"])
        assert after["fds_net"] <= base["fds_net"], (base["fd_kinds"], after["fd_kinds"])
        return took

    def check_new_connection(self, survivor: Agent, victim: Agent, old_groups: set) -> str:
        """A restarted peer and a new connection: shared memory again, in a new group."""
        fresh = Agent(victim.role, loop=self.loop, kw=self.kw, **self.extra)
        self.agents.append(fresh)
        server = fresh if victim is self.server else survivor
        client = survivor if victim is self.server else fresh
        port = self.port if victim is self.client else server.call("listen")["port"]
        for a in (server, client):
            a.call("behave", paused=False, verify=False, echo=a is server)
        res = client.call("connect", port=port, count=1, timeout=20)
        assert res["summary"] == {"ism": 1}, res
        assert res["groups"] and res["groups"][0] not in old_groups, res["groups"]
        echo = client.call("echo_round", rounds=3, lo=1, hi=200000, timeout=20)
        assert echo["messages"] == 3 and not echo.get("mismatch"), echo
        return res["groups"][0]

    def check_runtime_dir(self, victim: Agent) -> None:
        """No file of the dead process is left once another process opened the device (the
        restarted peer did): its endpoint and its advertisements."""
        ep = self.endpoint(victim)
        left = [f for f in runtime_files() if ep in f]
        path = os.environ["SMCISH_RUNTIME_DIR"]
        for name in runtime_files():
            if re.fullmatch(r"adv-\d+", name):
                try:
                    with open(os.path.join(path, name)) as fh:
                        if fh.read().startswith(ep):
                            left.append(name)
                except FileNotFoundError:
                    pass
        assert not left, f"files of the dead process left in the runtime dir: {left}"

    def close(self) -> None:
        for a in self.agents:
            a.close()


# ------------------------------------------------------------------ kills at the set-up points
#
# Two kinds of claim (docs/design.md 3.3): OPTIMISTIC (create_connection: the application gets
# its connection at once, sending into a send-only ring until the server's ACCEPTED) and CLAIMED
# ("classic": a socket the application connects itself with the patched loop.sock_connect, then
# hands to create_connection(sock=): the client waits for ACCEPTED, then writes its final word).
# point -> (hook, agent that gets it), per kind and per killed side.

CLIENT_KILLED = {
    ("optimistic", "claim_published"): ("freeze_after_claim", "client"),
    ("optimistic", "after_accepted"): ("freeze_after_accept", "server"),  # server thaws after 1 s
    ("classic", "claim_published"): ("freeze_after_claim", "client"),
    ("classic", "after_accepted"): ("freeze_before_final", "client"),    # no final word yet
    ("classic", "after_final_ism"): ("freeze_after_final", "client"),    # FINAL_ISM notified
}


def _case_for(kind: str, bystanders: int, **kw) -> Case:
    return Case("uvloop" if bystanders else "asyncio", bystanders, install=kind == "classic",
                **kw)


@pytest.mark.parametrize("bystanders", [0, BYSTANDERS], ids=["one", "many"])
@pytest.mark.parametrize("kind,point", list(CLIENT_KILLED))
def test_kill_client_during_setup(kind, point, bystanders):
    """The client is stopped at `point` of a set-up and SIGKILLed. The server releases what it
    prepared (slot, ring block) and its group within 1 s. Its application never sees a
    connection that never connected (claim only); otherwise it sees the connection end (TCP:
    the client's death is its final word; ISM: ConnectionResetError) within 1 s of the kill."""
    case = _case_for(kind, bystanders)
    try:
        server, client = case.server, case.client
        hook, where = CLIENT_KILLED[(kind, point)]
        agent = server if where == "server" else client
        freeze = 0.5 if where == "server" else 0.0   # (the server thaws by itself)
        agent.call("arm", hook=hook, seconds=freeze or None)
        client.send("connect", port=case.port, count=1, timeout=30,
                    via="sock" if kind == "classic" else "create")
        ev = agent.hook_event(hook)
        time.sleep(0.1)                              # the server did whatever it does meanwhile
        groups = {g["id"] for g in server.status(wait=10)["linkgroups"]["groups"]} \
            if where == "client" else set()
        t_kill = client.kill()
        if where == "server":
            server.wait_event(lambda e: e.get("event") == "thawed", 10)
            groups = {g["id"] for g in server.status()["linkgroups"]["groups"]}
        late = case.check_bystanders(server, t_kill, freeze)
        conns = {c["port"]: c for c in server.call("report", wait_lost=3)["conns"]}
        mine = conns.get(ev["port"])
        if point == "claim_published":
            assert mine is None, "the server's application saw a connection that never connected"
        elif point == "after_final_ism":
            assert mine is not None and mine["mode"] == "ism", mine
        elif kind == "classic":
            assert mine is None or mine["mode"] == "tcp", mine
        if mine is not None:
            assert mine["lost"] is not None, mine
            assert mine["lost_at"] - t_kill <= REPORT_WITHIN + freeze, mine
        took = case.check_clean(server, t_kill)
        new_group = case.check_new_connection(server, client, groups)
        case.check_runtime_dir(client)
        print(f"\nclient killed, {kind} claim at {point} ({len(case.bystanders)} bystanders): "
              f"server's connection {None if mine is None else (mine['mode'], mine['lost'])}; "
              f"bystanders reset {max(late, default=0) * 1000:.0f} ms after; clean after "
              f"{took * 1000:.0f} ms; new group {new_group[:8]}")
    finally:
        case.close()



SERVER_KILLED = {
    ("optimistic", "claim_published"): ("freeze_at_accept", "server"),
    ("optimistic", "after_accepted"): ("freeze_after_accept", "server"),
    ("classic", "claim_published"): ("freeze_at_accept", "server"),      # no decision yet
    ("classic", "after_accepted"): ("delay_final", "client"),            # final word held back
    ("classic", "after_final_ism"): ("freeze_after_accept", "server"),   # FINAL_ISM unseen
}


@pytest.mark.parametrize("bystanders", [0, BYSTANDERS], ids=["one", "many"])
@pytest.mark.parametrize("kind,point", list(SERVER_KILLED))
def test_kill_server_during_setup(kind, point, bystanders):
    """The server is stopped at `point` of a set-up and SIGKILLed. The client's open ends within
    1 s of the kill (for a final word the test held back: of its release) with an error, or
    with a connection that then ends (ConnectionResetError, or EOF); its group is torn down."""
    case = _case_for(kind, bystanders)
    try:
        server, client = case.server, case.client
        hook, where = SERVER_KILLED[(kind, point)]
        (server if where == "server" else client).call("arm", hook=hook)
        rid = client.send("connect", port=case.port, count=1, timeout=30,
                          via="sock" if kind == "classic" else "create")
        ev = (server if where == "server" else client).hook_event(hook)
        res = None
        if point == "after_final_ism" or (kind == "optimistic" and point == "after_accepted"):
            res = client.result(rid, 10)             # the client decided ISM; the server froze
            assert res["summary"] == {"ism": 1}, res
        time.sleep(0.1)
        groups = {g["id"] for g in client.status()["linkgroups"]["groups"]}
        t_kill = server.kill()
        late = case.check_bystanders(client, t_kill)
        t_ref = t_kill
        if point == "after_accepted" and kind == "classic":
            time.sleep(0.2)
            t_ref = time.monotonic()
            client.call("release")
        if res is None:
            res = client.result(rid, REPORT_WITHIN + 0.5)    # the open ends by itself, at once
        t_open = time.monotonic() - t_ref
        conns = {c["port"]: c for c in client.call("report", wait_lost=3)["conns"]}
        mine = conns.get(ev["port"])
        if mine is not None:
            assert mine["lost"] is not None, mine
            assert mine["lost"] == "clean" or mine["lost_reset"], mine
            assert mine["lost_at"] - t_ref <= REPORT_WITHIN, (mine, t_ref)
        else:
            assert "error" in res["results"][0], res
        assert t_open <= REPORT_WITHIN + 0.5
        took = case.check_clean(client, t_kill)
        new_group = case.check_new_connection(client, server, groups)
        case.check_runtime_dir(server)
        print(f"\nserver killed, {kind} claim at {point} ({len(case.bystanders)} bystanders): "
              f"client's connection {None if mine is None else (mine['mode'], mine['lost'])}; "
              f"bystanders reset {max(late, default=0) * 1000:.0f} ms after; clean after "
              f"{took * 1000:.0f} ms; new group {new_group[:8]}")
    finally:
        case.close()


# ------------------------------------------------------------------ mid-transfer and close

@pytest.mark.parametrize("streams", [1, 8], ids=["one", "many"])
@pytest.mark.parametrize("killed,sender", [("client", "client"), ("client", "server"),
                                           ("server", "server"), ("server", "client")])
def test_kill_mid_transfer(killed, sender, streams):
    """`streams` connections in one group carry a pattern stream (64 KiB writes, flow-controlled)
    from `sender`; `killed` is SIGKILLed after 2 MiB per connection. A surviving receiver gets at
    least every byte the sender reported published, byte-exact, then ConnectionResetError; a
    surviving sender's connections fail with ConnectionResetError; all within 1 s."""
    case = Case("uvloop" if streams > 1 else "asyncio")
    try:
        victim = case.server if killed == "server" else case.client
        survivor = case.other(victim)
        src = case.server if sender == "server" else case.client
        dst = case.other(src)
        dst.call("behave", verify=True, echo=False)
        src.call("behave", verify=False, echo=False)
        res = case.client.call("connect", port=case.port, count=streams, timeout=20)
        assert res["summary"] == {"ism": streams}, res
        groups = set(res["groups"])
        assert len(groups) == 1
        case.server.wait_conns(streams)
        src.call("stream")
        ports = [r["port"] for r in res["results"]]
        published = {}
        deadline = time.monotonic() + 60
        while len([p for p in ports if published.get(p, 0) >= 2 << 20]) < len(ports):
            assert time.monotonic() < deadline, published
            ev = src.wait_event(lambda e: e.get("event") == "published"
                                and e["n"] > published.get(e["port"], -1), 30)
            published[ev["port"]] = ev["n"]
        if src is not victim:
            before = {c["port"]: c for c in dst.call("report")["conns"]}
            assert all(c["ok"] for c in before.values()), before
        t_kill = victim.kill()
        for ev in src.events:                        # everything reported before the kill
            if ev.get("event") == "published":
                published[ev["port"]] = max(published.get(ev["port"], 0), ev["n"])
        conns = {c["port"]: c for c in survivor.call("report", wait_lost=5)["conns"]}
        moved = 0
        for port in ports:
            c = conns[port]
            assert c["lost_reset"], c
            assert c["lost_at"] - t_kill <= REPORT_WITHIN, (c, c["lost_at"] - t_kill)
            if survivor is dst:
                assert c["ok"], f"a byte differs from what the dead sender published: {c}"
                assert c["rx"] >= published[port], (c, published[port])
                moved += c["rx"]
            else:
                moved += c["tx"]
        took = case.check_clean(survivor, t_kill)
        case.check_new_connection(survivor, victim, groups)
        case.check_runtime_dir(victim)
        print(f"\n{killed} killed, {sender} sending on {streams}: {moved / 2**20:.1f} MiB "
              f"checked, resets <= {max(c['lost_at'] for c in conns.values()) - t_kill:.3f} s "
              f"after the kill; clean after {took * 1000:.0f} ms")
    finally:
        case.close()


@pytest.mark.parametrize("how", ["after_clean_close", "while_close_drains"])
@pytest.mark.parametrize("killed", ["client", "server"])
def test_kill_during_close(killed, how):
    """after_clean_close: the victim wrote 10 rings' worth + 1,234 B on each of 4 connections,
    closed them and saw connection_lost; killed then, the survivor gets every byte and a clean
    EOF. while_close_drains: the survivor does not read; the victim's close() waits with bytes
    pending; killed then: the survivor, resuming, gets at least every byte published (the total
    minus what was pending after close()), byte-exact, then ConnectionResetError within 1 s."""
    case = Case()
    ring = 64 << 10
    total = 10 * ring + 1234
    try:
        victim = case.server if killed == "server" else case.client
        survivor = case.other(victim)
        survivor.call("behave", verify=True, echo=False,
                      paused=how == "while_close_drains")
        victim.call("behave", verify=False, echo=False)
        res = case.client.call("connect", port=case.port, count=4, timeout=20)
        assert res["summary"] == {"ism": 4}, res
        groups = set(res["groups"])
        case.server.wait_conns(4)
        out = victim.call("send_close", n=total, until_lost=how == "after_clean_close")
        if how == "after_clean_close":
            assert all(v == "clean" for v in out["lost"].values()), out
        else:
            assert all(v > 0 for v in out["pending"].values()), out
            time.sleep(0.2)
        t_kill = victim.kill()
        t_ref = t_kill
        if how == "while_close_drains":
            time.sleep(0.1)
            t_ref = survivor.call("resume")["at"]
        conns = {c["port"]: c for c in survivor.call("report", wait_lost=5)["conns"]}
        for port_s, pending in out["pending"].items():
            c = conns[int(port_s)]
            assert c["ok"], c
            if how == "after_clean_close":
                assert c["rx"] == total and c["eof"] and c["lost"] == "clean", c
            else:
                assert c["rx"] >= total - pending, (c, total, pending)
                assert c["lost_reset"], c
                assert c["lost_at"] - t_ref <= REPORT_WITHIN, c
        took = case.check_clean(survivor, t_kill)
        case.check_new_connection(survivor, victim, groups)
        case.check_runtime_dir(victim)
        print(f"\n{killed} killed {how}: {sum(c['rx'] for c in conns.values())} B delivered "
              f"({next(c['lost'] for c in conns.values())}); clean after {took * 1000:.0f} ms")
    finally:
        case.close()


# ------------------------------------------------------------------ ismd dies

def _device_gone_clean(st: dict) -> bool:
    """With ismd gone: no group, no slot, no shared mapping of any kind left."""
    return (st["linkgroups"]["link_groups"] == 0 and st["smaps"]["maps"] == 0
            and st["fd_kinds"].get("memfd", 0) == 0 and st["conns_open"] == 0)


ISMD_POINTS = {
    "claim_published": ("freeze_at_accept", "server"),
    "after_accepted": ("delay_final", "client"),
    "after_final_ism": ("freeze_after_accept", "server"),
}


@pytest.mark.parametrize("point", list(ISMD_POINTS))
def test_kill_ismd_during_setup(point):
    """ismd is SIGKILLed while a set-up stands at `point` in a group that carries 4 established
    connections. The set-up finishes over the group (ISM: nothing of it goes through ismd), the
    established connections keep echoing (checksummed), new connections fall back at once with
    NO_DEVICE and work; once everything is closed neither process holds a group, a shared
    mapping or a memfd; a restarted ismd serves a new listener over ISM."""
    ismd = Ismd()
    case = None
    try:
        case = Case(device=ismd.spec)
        server, client = case.server, case.client
        server.call("behave", echo=True)
        res = client.call("connect", port=case.port, count=4, timeout=20)
        assert res["summary"] == {"ism": 4}, res
        server.wait_conns(4)
        hook, where = ISMD_POINTS[point]
        agent = server if where == "server" else client
        agent.call("arm", hook=hook, seconds=1.0)
        rid = client.send("connect", port=case.port, count=1, timeout=30)
        agent.hook_event(hook)
        ismd.proc.kill()
        ismd.proc.wait(10)
        if point == "after_accepted":
            client.call("release")
        res = client.result(rid, 10)
        assert res["summary"] == {"ism": 1}, res
        echo = client.call("echo_round", rounds=3, lo=1, hi=300000, timeout=30)
        assert echo["messages"] == 15 and not echo.get("mismatch") and not echo.get("error"), echo
        new = client.call("connect", port=case.port, count=2, timeout=10)
        assert new["summary"] == {"tcp/NO_DEVICE": 2}, new
        assert new["max_t"] < HT / 2, new              # at once, not after a timer
        fresh = Agent("client", kw=case.kw, device=ismd.spec)
        case.agents.append(fresh)
        other = fresh.call("connect", port=case.port, count=2, timeout=10)
        assert other["summary"] == {"tcp/NO_DEVICE": 2}, other
        echo2 = fresh.call("echo_round", rounds=2, lo=1, hi=100000, timeout=30)
        assert echo2["messages"] == 4 and not echo2.get("mismatch"), echo2
        for a in (client, fresh):
            assert a.call("close_all")["open"] == 0
        for a in (client, fresh, server):
            st = wait_until(a.status, _device_gone_clean, 5.0)
            assert _device_gone_clean(st), (a.role, st["linkgroups"], st["smaps"], st["fd_kinds"])
        # ismd back (same socket path): a new listener is served over shared memory again
        ismd2 = Ismd(socket_dir=ismd.dir)
        try:
            server2 = Agent("server", kw=case.kw, device=ismd.spec)
            client2 = Agent("client", kw=case.kw, device=ismd.spec)
            case.agents += [server2, client2]
            port2 = server2.call("listen")["port"]
            again = client2.call("connect", port=port2, count=1, timeout=10)
            assert again["summary"] == {"ism": 1}, again
            print(f"\nismd killed at {point}: the set-up finished ISM, {echo['bytes']} B echoed "
                  f"after the kill, new connections {new['summary']} in "
                  f"{new['max_t'] * 1000:.1f} ms; restarted ismd: {again['summary']}")
        finally:
            for a in case.agents:
                a.close()
            ismd2.stop()
    finally:
        if case is not None:
            case.close()
        ismd.stop()
        shutil.rmtree(ismd.dir, ignore_errors=True)


# ------------------------------------------------------------------ a peer slow to answer



def test_extent_add_answered_late_leaves_no_orphan():
    """The server's group must grow (140 set-ups at once need more than its extent 0); the
    client installs the new extent but its answer comes 2.5 s late (the hook delays the reply
    after the install). Afterwards the two sides agree on the server's extents (the client maps
    none the server does not own) and the server holds no region still draining."""
    case = Case(kw={"handshake_timeout": 10.0})
    try:
        server, client = case.server, case.client
        client.call("arm", hook="delay_extent_add_reply", seconds=2.5)
        res = client.call("connect", port=case.port, count=140, concurrency=140, timeout=30)
        client.hook_event("delay_extent_add_reply")
        time.sleep(3.0)
        srv, cli = server.status(), client.status()
        owned = {g["id"]: set(g["ext_ids"]) for g in srv["linkgroups"]["groups"]}
        mapped = {g["id"]: set(g["peer_ext_ids"]) for g in cli["linkgroups"]["groups"]}
        orphans = {gid: sorted(ids - owned.get(gid, set())) for gid, ids in mapped.items()
                   if ids - owned.get(gid, set())}
        print(f"\nextent_add answered late: connections {res['summary']}; server's extents "
              f"{owned}, mapped by the client {mapped}; server regions draining "
              f"{srv['raw_device'].get('draining')}")
        assert not orphans, f"the client maps server extents the server freed: {orphans}"
        assert not srv["raw_device"].get("draining"), srv["raw_device"]
    finally:
        case.close()
