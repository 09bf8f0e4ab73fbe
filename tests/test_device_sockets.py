"""The kernel oracle and socket facts (ism_backend/sockets.py), with real sockets.

Each case is one way an address lookup misdirected handshake bytes in v1 (v6only, several
addresses per name, specific-over-wildcard, a recycled port in TIME_WAIT, a listener replaced
under the same address): the kernel's own lookup names exactly the socket that receives.
"""

import errno
import json
import os
import socket
import subprocess
import threading

import pytest

from benchmarks.children import python_argv
from device_helpers import PROGRAMS, REPO, child_env
from ism_backend import sockets
from ism_backend.sockets import TCP_ESTABLISHED, TCP_LISTEN, TCP_TIME_WAIT

ROOT = os.geteuid() == 0


def listen(host: str, port: int = 0, v6only: bool | None = None,
           reuseport: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((host, port))
    sock.listen(8)
    return sock


def ino(sock: socket.socket) -> int:
    return sockets.socket_inode(sock)


@pytest.fixture
def diag():
    return sockets.diag()


def test_v6only_listener_and_v4_listener_on_one_port(diag):
    v6 = listen("::", v6only=True)
    port = v6.getsockname()[1]
    v4 = listen("127.0.0.1", port)
    try:
        hit = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40001))
        assert (hit.state, hit.inode) == (TCP_LISTEN, ino(v4)), "IPv4 goes to the plain v4 one"
        hit = diag.lookup(socket.AF_INET6, ("::1", port), ("::1", 40001))
        assert (hit.state, hit.inode) == (TCP_LISTEN, ino(v6))
        # the v4-mapped form of the IPv4 query is the same IPv4 lookup
        mapped = diag.lookup(socket.AF_INET6, ("::ffff:127.0.0.1", port),
                             ("::ffff:127.0.0.1", 40001))
        assert mapped.inode == ino(v4)
    finally:
        v6.close()
        v4.close()


def test_a_v6only_listener_alone_does_not_answer_ipv4(diag):
    v6 = listen("::", v6only=True)
    port = v6.getsockname()[1]
    try:
        assert diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40002)) is None
        assert diag.lookup(socket.AF_INET6, ("::1", port), ("::1", 40002)).inode == ino(v6)
    finally:
        v6.close()


def test_a_dual_stack_listener_answers_ipv4(diag):
    dual = listen("::", v6only=False)
    port = dual.getsockname()[1]
    try:
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
                             (socket.AF_INET6, "::ffff:127.0.0.1")):
            hit = diag.lookup(family, (addr, port), (addr, 40003))
            assert (hit.state, hit.inode) == (TCP_LISTEN, ino(dual)), addr
    finally:
        dual.close()


def test_the_specific_listener_wins_over_the_wildcard(diag):
    wildcard = listen("0.0.0.0", reuseport=True)
    port = wildcard.getsockname()[1]
    specific = listen("127.0.0.1", port, reuseport=True)
    try:
        hit = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40004))
        assert hit.inode == ino(specific)
        hit = diag.lookup(socket.AF_INET, ("127.0.0.2", port), ("127.0.0.1", 40004))
        assert hit.inode == ino(wildcard), "another local address: only the wildcard serves it"
    finally:
        wildcard.close()
        specific.close()


def test_a_name_with_two_addresses_each_with_its_own_listener(diag, monkeypatch):
    """``twohomed.test`` resolves to 127.0.0.1 and 127.0.0.2; an smcish server listens on the
    first, a plain one on the second. v1 matched the name: both looked advertised. The oracle
    answers per address, so the caller checks the address it really connects to."""
    smcish_server = listen("127.0.0.1")
    port = smcish_server.getsockname()[1]
    plain_server = listen("127.0.0.2", port)
    real = socket.getaddrinfo

    def fake(host, *args, **kw):
        if host == "twohomed.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port))]
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    try:
        answers = {}
        for family, _, _, _, (addr, p) in socket.getaddrinfo("twohomed.test", port):
            hit = diag.lookup(family, (addr, p), ("127.0.0.1", 40005))
            answers[addr] = hit.inode
        assert answers == {"127.0.0.1": ino(smcish_server), "127.0.0.2": ino(plain_server)}
    finally:
        smcish_server.close()
        plain_server.close()


def test_established_connections_are_named_before_listeners(diag):
    server = listen("127.0.0.1")
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    cport = client.getsockname()[1]
    try:
        # from the client's side: the segment reaches the accepted socket, not the listener
        hit = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", cport))
        assert (hit.state, hit.inode) == (TCP_ESTABLISHED, ino(accepted))
        # from the server's side (at accept): which socket receives local -> peer? the client's
        hit = diag.lookup(socket.AF_INET, ("127.0.0.1", cport), ("127.0.0.1", port))
        assert (hit.state, hit.inode, hit.uid) == (TCP_ESTABLISHED, ino(client), os.getuid())
    finally:
        for sock in (client, accepted, server):
            sock.close()


def test_a_recycled_port_in_time_wait_is_detected(diag):
    """The server closed first: its side of (server, client port) sits in TIME_WAIT. A new
    client bound to the same port would reach that TIME_WAIT entry, not the listener."""
    server = listen("127.0.0.1")
    port = server.getsockname()[1]
    for attempt in range(5):
        client = socket.create_connection(("127.0.0.1", port))
        cport = client.getsockname()[1]
        accepted, _ = server.accept()
        accepted.close()                     # server closes first -> server side TIME_WAIT
        assert client.recv(10) == b""
        client.close()
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            again.bind(("127.0.0.1", cport))
            break
        except OSError as exc:               # another process took the freed port meanwhile
            again.close()
            if exc.errno != errno.EADDRINUSE or attempt == 4:
                raise
    try:
        hit = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", cport))
        assert (hit.state, hit.inode) == (TCP_TIME_WAIT, 0)
        other = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", cport + 1
                                                                    if cport < 65535 else 1024))
        assert other.state == TCP_LISTEN and other.inode == ino(server)
        again.close()
    finally:
        server.close()


def test_a_listener_closed_then_rebound_is_another_inode(diag):
    first = listen("127.0.0.1")
    port = first.getsockname()[1]
    old = ino(first)
    assert diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40006)).inode == old
    first.close()
    assert diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40006)) is None
    second = listen("127.0.0.1", port)
    try:
        hit = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40006))
        assert hit.inode == ino(second) != old
    finally:
        second.close()


def test_bad_queries_raise_value_error(diag):
    with pytest.raises(ValueError):
        diag.lookup(socket.AF_INET, ("localhost", 80), ("127.0.0.1", 1))  # names: never
    with pytest.raises(ValueError):
        diag.lookup(socket.AF_INET, ("127.0.0.1", 80), ("::1", 1))
    with pytest.raises(ValueError):
        diag.lookup(socket.AF_INET, ("::1", 80), ("::1", 1))
    with pytest.raises(ValueError):
        diag.lookup(socket.AF_INET, ("127.0.0.1", 70000), ("127.0.0.1", 1))
    with pytest.raises(ValueError):
        diag.lookup(socket.AF_UNIX, ("127.0.0.1", 80), ("127.0.0.1", 1))


def test_one_diag_per_thread_recreated_after_close_and_fork():
    mine = sockets.diag()
    assert sockets.diag() is mine
    seen = []
    thread = threading.Thread(target=lambda: seen.append(sockets.diag()))
    thread.start()
    thread.join(10)
    assert seen and seen[0] is not mine
    mine.close()
    with pytest.raises(OSError):
        mine.lookup(socket.AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 2))
    fresh = sockets.diag()
    assert fresh is not mine and not fresh.closed
    server = listen("127.0.0.1")
    port = server.getsockname()[1]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child must not share the parent's netlink socket
        code = 1
        try:
            child = sockets.diag()
            hit = child.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40007))
            code = 0 if child is not fresh and hit.inode == ino(server) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    os.close(read_end)
    os.close(write_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fresh.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40007)).inode == \
        ino(server)
    server.close()


def test_listener_facts():
    v6 = listen("::", v6only=True)
    v4 = listen("127.0.0.1")
    try:
        facts = sockets.listener_facts(v6)
        assert (facts.family, facts.addr, facts.v6only, facts.inode) == (
            socket.AF_INET6, "::", True, ino(v6))
        assert facts.port == v6.getsockname()[1]
        facts4 = sockets.listener_facts(v4)
        assert (facts4.family, facts4.addr, facts4.v6only) == (socket.AF_INET, "127.0.0.1", False)
        if ROOT:
            assert facts.netns == sockets.netns_inode() == sockets.socket_netns(v6)
        for sock in (socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                     socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)):
            with pytest.raises(ValueError):
                sockets.listener_facts(sock)
            sock.close()
    finally:
        v6.close()
        v4.close()


def test_route_source_and_netns_inode():
    assert sockets.route_source(socket.AF_INET, "127.0.0.1") == "127.0.0.1"
    assert sockets.route_source(socket.AF_INET6, "::1") == "::1"
    assert sockets.route_source(socket.AF_INET, "not an address") is None
    assert sockets.netns_inode() == os.stat("/proc/self/ns/net").st_ino
    assert sockets.netns_inode(os.getpid()) == sockets.netns_inode()
    assert sockets.netns_inode(2 ** 30) is None


@pytest.mark.skipif(not ROOT, reason="needs root to run a child as another uid")
def test_an_unprivileged_user_can_use_the_oracle_but_not_read_namespaces():
    proc = subprocess.run(python_argv(script=PROGRAMS / "oracle_as_uid.py"), capture_output=True,
                          text=True, env=child_env(), cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == 1234 and out["inode"] == out["mine"] and out["hit_uid"] == 1234
    assert out["netns"] is None and out["facts_netns"] is None  # SIOCGSKNS needs CAP_NET_ADMIN


def test_a_wildcard_listener_matches_any_destination_so_check_is_local(diag):
    """The socket lookup does not ask whether the destination is ours: a wildcard listener
    matches a remote address too. ``is_local`` (the ``ip route get`` answer) tells them apart."""
    wildcard = listen("0.0.0.0")
    port = wildcard.getsockname()[1]
    try:
        remote = "198.51.100.7"  # TEST-NET-2: never an address of this host
        assert diag.lookup(socket.AF_INET, (remote, port), ("127.0.0.1", 40009)).inode == \
            ino(wildcard)
        assert not diag.is_local(remote) and not diag.is_local("2001:db8::7")
        for own in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "0.0.0.0"):
            assert diag.is_local(own), own
        source = sockets.route_source(socket.AF_INET, remote)
        if source is not None:  # this host has a route out: its source address is local
            assert diag.is_local(source)
        with pytest.raises(ValueError):
            diag.is_local("localhost")
    finally:
        wildcard.close()
