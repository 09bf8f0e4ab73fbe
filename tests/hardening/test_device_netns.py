"""Cross-namespace discovery through ismd (docs/design.md section 3.4), with real namespaces.

Two network namespaces made by ``ip netns`` (so owned by ismd's user namespace), joined by a
veth pair: a server agent listens and advertises in B, a client agent in A asks ismd which
listener its bound socket would reach; ismd runs the kernel's lookup inside B and keeps the
client socket as a remote claim; the server verifies its accepted socket against the claim.
Negative cases: unadvertised, absent, same-namespace, ambiguous, wildcard-bound, a namespace of
another user namespace, and an ismd that is not root. Needs root; skipped otherwise.
"""

import os
import secrets
import shutil
import subprocess

import pytest

from device_helpers import Agent, Ismd, child_env, wait_for
from ism_backend.client import DaemonDevice

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) not installed"),
]

HUB = bytes(range(16)).hex()
A_ADDR, B_ADDR = "10.77.0.1", "10.77.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Namespaces:
    """Root-made namespaces A and B joined by a veth pair (A_ADDR <-> B_ADDR), and C: an
    isolated namespace that also owns B_ADDR (for the ambiguity case)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.a, self.b, self.c = f"smcA{tag}", f"smcB{tag}", f"smcC{tag}"
        self.made: list[str] = []
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    def _build(self, tag: str) -> None:
        for ns in (self.a, self.b, self.c):
            ip("netns", "add", ns)
            self.made.append(ns)
        va, vb = f"sva{tag}", f"svb{tag}"
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        ip("link", "set", va, "netns", self.a)
        ip("link", "set", vb, "netns", self.b)
        ip("-n", self.a, "addr", "add", f"{A_ADDR}/24", "dev", va)
        ip("-n", self.b, "addr", "add", f"{B_ADDR}/24", "dev", vb)
        ip("-n", self.c, "link", "add", "c0", "type", "veth", "peer", "name", "c1")
        ip("-n", self.c, "addr", "add", f"{B_ADDR}/24", "dev", "c0")
        for ns, dev in ((self.a, va), (self.b, vb), (self.c, "c0"), (self.c, "c1")):
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def namespaces():
    try:
        nss = Namespaces()
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create namespaces/veth here: {exc}")
    yield nss
    nss.close()


@pytest.fixture
def ismd():
    daemon = Ismd()
    yield daemon
    assert daemon.alive()
    err = daemon.stop()
    shutil.rmtree(daemon.dir, ignore_errors=True)
    assert "Traceback" not in err, err


def test_a_client_finds_and_the_server_verifies_across_namespaces(namespaces, ismd):
    env = child_env(SMCISH_DEVICE=ismd.spec)
    agents = []
    try:
        server = Agent(env=env, prefix=namespaces.prefix(namespaces.b))
        client = Agent(env=env, prefix=namespaces.prefix(namespaces.a))
        agents += [server, client]
        assert server.call("netns") != client.call("netns")
        server_ep = server.call("open")["endpoint"]
        lsock = server.call("listen", host="0.0.0.0")
        server.call("advertise", sock=lsock["id"], hub=HUB)
        plain = server.call("listen", host=B_ADDR)  # not advertised

        csock = client.call("client_socket", host=A_ADDR)
        found = client.call("find_remote_listener", sock=csock["id"], host=B_ADDR,
                            port=lsock["port"])
        assert found == {"endpoint_id": server_ep, "hub_id": HUB, "pid": server.real_pid,
                         "uid": 0}
        observer = DaemonDevice(ismd.path)
        status = observer.status()
        (claim,) = status["remote_claims"]
        assert (claim["inode"], claim["listener"], claim["pid"]) == (
            csock["inode"], lsock["inode"], client.real_pid)
        assert claim["client_netns"] != claim["server_netns"]

        client.call("connect", id=csock["id"], host=B_ADDR, port=lsock["port"])
        accepted = server.call("accept", id=lsock["id"])
        assert accepted["peer"] == [A_ADDR, csock["port"]]
        # another connection's accepted socket does not match the claim
        stranger = client.call("client_socket", host=A_ADDR)
        client.call("connect", id=stranger["id"], host=B_ADDR, port=lsock["port"])
        other = server.call("accept", id=lsock["id"])
        client_ep = client.call("open")["endpoint"]
        assert server.call("verify_remote_peer", sock=other["id"], inode=csock["inode"],
                           endpoint=client_ep) is False
        # the right socket, but asked for another endpoint's claim (a claim naming this inode
        # posted in another process's link group with the server): not verified
        assert server.call("verify_remote_peer", sock=accepted["id"], inode=csock["inode"],
                           endpoint=server_ep) is False
        assert server.call("verify_remote_peer", sock=accepted["id"], inode=csock["inode"],
                           endpoint=client_ep) is True
        # a verified claim is released: it proves one connection, once
        assert server.call("verify_remote_peer", sock=accepted["id"], inode=csock["inode"],
                           endpoint=client_ep) is False
        assert observer.status()["counts"]["remote_claims"] == 0
        fd_dir = f"/proc/{ismd.pid}/fd"
        held = {os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)}
        for inode in (accepted["inode"], other["inode"], lsock["inode"]):
            assert f"socket:[{inode}]" not in held, "ismd kept a socket it was shown"

        # not found: an unadvertised listener, an address B does not have, a wildcard-bound
        # client, and a client in the listener's own namespace (its own oracle serves it)
        for host, port in ((B_ADDR, plain["port"]), ("10.77.0.99", lsock["port"])):
            probe = client.call("client_socket", host=A_ADDR)
            assert client.call("find_remote_listener", sock=probe["id"], host=host,
                               port=port) is None
        wild = client.call("client_socket", host="0.0.0.0")
        assert client.call("find_remote_listener", sock=wild["id"], host=B_ADDR,
                           port=lsock["port"]) is None
        local = server.call("client_socket", host=B_ADDR)
        assert server.call("find_remote_listener", sock=local["id"], host=B_ADDR,
                           port=lsock["port"]) is None
        assert observer.status()["counts"]["remote_claims"] == 0, "no claim kept when not found"

        # release_remote_claim, and claims die with the client's connection
        again = client.call("client_socket", host=A_ADDR)
        assert client.call("find_remote_listener", sock=again["id"], host=B_ADDR,
                           port=lsock["port"]) is not None
        client.call("release_remote_claim", inode=again["inode"])
        assert observer.status()["counts"]["remote_claims"] == 0
        last = client.call("client_socket", host=A_ADDR)
        client.call("find_remote_listener", sock=last["id"], host=B_ADDR, port=lsock["port"])
        assert observer.status()["counts"]["remote_claims"] == 1
        client.kill()
        wait_for(lambda: observer.status()["counts"]["remote_claims"] == 0, what="claim gone")
        observer.close()
    finally:
        for agent in agents:
            agent.kill()


def test_two_namespaces_owning_the_address_are_ambiguous(namespaces, ismd):
    """B and C both have B_ADDR with an advertised listener on the same port: which one the
    client reaches depends on A's routes, which ismd does not model. Not found: stay TCP."""
    env = child_env(SMCISH_DEVICE=ismd.spec)
    agents = []
    try:
        server_b = Agent(env=env, prefix=namespaces.prefix(namespaces.b))
        server_c = Agent(env=env, prefix=namespaces.prefix(namespaces.c))
        client = Agent(env=env, prefix=namespaces.prefix(namespaces.a))
        agents += [server_b, server_c, client]
        lb = server_b.call("listen", host=B_ADDR)
        server_b.call("advertise", sock=lb["id"], hub=HUB)
        probe = client.call("client_socket", host=A_ADDR)
        assert client.call("find_remote_listener", sock=probe["id"], host=B_ADDR,
                           port=lb["port"]) is not None
        lc = server_c.call("listen", host=B_ADDR, port=lb["port"])
        server_c.call("advertise", sock=lc["id"], hub=HUB)
        probe = client.call("client_socket", host=A_ADDR)
        assert client.call("find_remote_listener", sock=probe["id"], host=B_ADDR,
                           port=lb["port"]) is None
    finally:
        for agent in agents:
            agent.kill()


def test_a_namespace_of_another_user_namespace_is_refused(namespaces, ismd):
    """A server in a network namespace owned by a new user namespace (what an unprivileged
    user can create, with addresses of its choosing): ismd does not look inside it."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("util-linux unshare/nsenter not installed")
    env = child_env(SMCISH_DEVICE=ismd.spec)
    tag = secrets.token_hex(3)
    agents = []
    try:
        server = Agent(env=env, prefix=["unshare", "--user", "--map-root-user", "--net", "--"])
        agents.append(server)
        pid = str(server.real_pid)
        vu, vv = f"svu{tag}", f"svv{tag}"
        ip("link", "add", vu, "type", "veth", "peer", "name", vv)
        ip("link", "set", vv, "netns", namespaces.a)
        ip("link", "set", vu, "netns", pid)
        ip("-n", namespaces.a, "addr", "add", "10.78.0.1/24", "dev", vv)
        ip("-n", namespaces.a, "link", "set", vv, "up")
        for args in (["addr", "add", "10.78.0.2/24", "dev", vu], ["link", "set", vu, "up"],
                     ["link", "set", "lo", "up"]):
            subprocess.run(["nsenter", "-t", pid, "-n", "ip", *args], check=True,
                           capture_output=True, timeout=30)
        lsock = server.call("listen", host="10.78.0.2")
        server.call("advertise", sock=lsock["id"], hub=HUB)
        client = Agent(env=env, prefix=namespaces.prefix(namespaces.a))
        agents.append(client)
        probe = client.call("client_socket", host="10.78.0.1")
        assert client.call("find_remote_listener", sock=probe["id"], host="10.78.0.2",
                           port=lsock["port"]) is None
        client.call("connect", id=probe["id"], host="10.78.0.2", port=lsock["port"])
        accepted = server.call("accept", id=lsock["id"])  # the route exists: only policy said no
        assert server.call("verify_remote_peer", sock=accepted["id"], inode=probe["inode"],
                           endpoint=client.call("open")["endpoint"]) is False
    finally:
        for agent in agents:
            agent.kill()


def test_a_non_root_ismd_does_not_discover_across_namespaces(namespaces):
    daemon = Ismd("--allow-uid", "0", setuid=1234)
    env = child_env(SMCISH_DEVICE=daemon.spec, SMCISH_DAEMON_UID="1234")
    agents = []
    try:
        server = Agent(env=env, prefix=namespaces.prefix(namespaces.b))
        client = Agent(env=env, prefix=namespaces.prefix(namespaces.a))
        agents += [server, client]
        lsock = server.call("listen", host=B_ADDR)
        server.call("advertise", sock=lsock["id"], hub=HUB)
        assert server.call("status")["adverts"][0]["netns"] is None  # SIOCGSKNS refused
        assert server.call("status")["cross_netns"] is False
        probe = client.call("client_socket", host=A_ADDR)
        assert client.call("find_remote_listener", sock=probe["id"], host=B_ADDR,
                           port=lsock["port"]) is None
    finally:
        for agent in agents:
            agent.kill()
        err = daemon.stop()
        shutil.rmtree(daemon.dir, ignore_errors=True)
    assert "Traceback" not in err, err
