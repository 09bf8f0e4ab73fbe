"""Acceleration policy (smcish/policy.py, docs/policy.md): rules from SMCISH_POLICY and a TOML
config file, a Python callable, and the learned rules, each checked on real connections (both
loops) by the mode and reason the connection reports, and under `python -m smcish run`."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import textwrap

import pytest

import smcish
from conftest import PYTHON, new_loop, python_env
from smcish import policy
from smcish.clc import DeclineReason as R
from test_optimistic import ThreadServer, expected, payload, sha_echo

HOST = "127.0.0.1"


@pytest.fixture(autouse=True)
def clean_policy(monkeypatch, tmp_path):
    """No policy from the environment or a user's config file; nothing learned; no callable."""
    monkeypatch.delenv("SMCISH_POLICY", raising=False)
    monkeypatch.delenv("SMCISH_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    policy.set_policy(None)
    policy.forget()
    yield
    policy.set_policy(None)
    policy.forget()


def run(loop_kind, coro, timeout=60):
    loop = new_loop(loop_kind)
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    assert not errors, errors
    return result


async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def one_exchange(port, host=HOST, **kw):
    """Connect, echo 100 KiB, return the client's SmcInfo."""
    reader, writer = await smcish.open_connection(host, port, **kw)
    data = payload(100_000, port)
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 20) == data
    info = writer.get_extra_info("smcish")
    writer.close()
    await writer.wait_closed()
    return info


# ----------------------------------------------------------------- parsing


def test_inline_rules_parse_and_describe():
    rules = policy.parse_rules("tcp port=5432,6379 ; TCP dst=10.0.0.0/8\n"
                               "ism side=server port=8000-8999; tcp program=redis*")
    assert [r.describe() for r in rules] == [
        "tcp port=5432,6379", "tcp address=10.0.0.0/8", "ism side=server port=8000-8999",
        "tcp program=redis*"]


@pytest.mark.parametrize("text, words", [
    ("accelerate", "action must be one of"),
    ("tcp port=http", "is not a port or a range"),
    ("tcp port=9-3", "not within 0-65535"),
    ("tcp side=both", "side must be one of"),
    ("tcp address=10.0.0.300/8", "address '10.0.0.300/8'"),
    ("tcp colour=red", "is not key=value with key one of"),
    ("tcp port", "is not key=value"),
    ("tcp port=1 port=2", "port given twice"),
])
def test_malformed_inline_rules_name_the_rule(text, words):
    with pytest.raises(policy.PolicyError) as err:
        policy.parse_rules("ism port=1; " + text)
    assert words in str(err.value) and "SMCISH_POLICY rule 2" in str(err.value)


def write_config(path, text, mode=0o600):
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return str(path)


def test_config_file_rules_settings_and_env_rules_first(tmp_path, monkeypatch):
    path = write_config(tmp_path / "smcish.toml", """
        [policy]
        default = "tcp"
        decline_after = 5
        decline_ttl = 2.5
        [[policy.rules]]
        action = "ism"
        port = [8080, "9000-9100"]
        [[policy.rules]]
        action = "tcp"
        side = "server"
        address = ["127.0.0.0/8", "::1"]
        program = "worker-*"
        """)
    monkeypatch.setenv("SMCISH_CONFIG", path)
    monkeypatch.setenv("SMCISH_POLICY", "tcp port=9050")
    p = policy.current()
    assert p.default == "tcp" and p.decline_after == 5 and p.decline_ttl == 2.5
    assert [r.describe() for r in p.rules] == [
        "tcp port=9050", "ism port=8080,9000-9100",
        "tcp side=server address=127.0.0.0/8,::1/128 program=worker-*"]
    assert policy.decide("client", "127.0.0.1", 9050) is R.DISABLED_BY_POLICY   # env rule first
    assert policy.decide("client", "127.0.0.1", 9001) is None
    assert policy.decide("client", "127.0.0.1", 7000) is R.DISABLED_BY_POLICY   # default tcp


def test_config_file_in_xdg_config_home_is_read(tmp_path, monkeypatch):
    (tmp_path / "xdg" / "smcish").mkdir(parents=True)
    write_config(tmp_path / "xdg" / "smcish" / "config.toml", """
        [[policy.rules]]
        action = "tcp"
        port = 4242
        """)
    assert policy.decide("client", "127.0.0.1", 4242) is R.DISABLED_BY_POLICY
    assert policy.decide("client", "127.0.0.1", 4243) is None


@pytest.mark.parametrize("text, words", [
    ("[policy]\ndefault = 'off'\n", "default must be one of"),
    ("[policy]\ndecline_ttl = -1\n", "decline_ttl must be a number >= 0"),
    ("[policy]\ncolour = 1\n", "unknown key(s) in [policy]: colour"),
    ("[[policy.rules]]\nport = 1\n", "needs action"),
    ("[[policy.rules]]\naction = 'tcp'\nports = 1\n", "unknown key(s) ports"),
    ("[[policy.rules]]\naction = 'tcp'\nport = 'x'\n", "#1: port 'x'"),
    ("[policy\n", "not valid TOML"),
])
def test_malformed_config_file_is_a_clear_error(tmp_path, monkeypatch, text, words):
    path = write_config(tmp_path / "bad.toml", text)
    monkeypatch.setenv("SMCISH_CONFIG", path)
    with pytest.raises(policy.PolicyError) as err:
        policy.current()
    assert words in str(err.value) and path in str(err.value)


def test_config_file_writable_by_others_is_refused(tmp_path, monkeypatch):
    path = write_config(tmp_path / "open.toml", "[policy]\ndefault = 'tcp'\n", mode=0o666)
    monkeypatch.setenv("SMCISH_CONFIG", path)
    with pytest.raises(policy.PolicyError, match="writable by group or others"):
        policy.current()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_config_file_of_another_user_is_refused(tmp_path, monkeypatch):
    path = write_config(tmp_path / "theirs.toml", "[policy]\ndefault = 'tcp'\n")
    os.chown(path, 65534, 65534)
    monkeypatch.setenv("SMCISH_CONFIG", path)
    with pytest.raises(policy.PolicyError, match="owned by uid 65534"):
        policy.current()


def test_missing_config_file_is_a_clear_error_from_the_connection(tmp_path, monkeypatch,
                                                                 loop_kind):
    monkeypatch.setenv("SMCISH_CONFIG", str(tmp_path / "nope.toml"))

    async def main():
        with pytest.raises(ValueError, match="cannot read the smcish config file"):
            await smcish.open_connection(HOST, 9)
        with pytest.raises(ValueError, match="cannot read the smcish config file"):
            await smcish.start_server(echo, HOST, 0)

    run(loop_kind, main())


# ----------------------------------------------------------------- rules on real connections


def test_client_rules_by_port_and_address(monkeypatch, loop_kind):
    async def main():
        s1 = await smcish.start_server(echo, HOST, 0)
        s2 = await smcish.start_server(echo, HOST, 0)
        p1 = s1.sockets[0].getsockname()[1]
        p2 = s2.sockets[0].getsockname()[1]
        async with s1, s2:
            monkeypatch.setenv("SMCISH_POLICY", f"tcp port={p1}")
            before = smcish.stats()["fallbacks"].get("DISABLED_BY_POLICY", 0)
            a = await one_exchange(p1)
            b = await one_exchange(p2)
            assert (a.mode, a.reason) == ("tcp", R.DISABLED_BY_POLICY)
            assert (b.mode, b.reason) == ("ism", None)
            # the server saw a plain client on p1 (the claim never happened)
            assert smcish.stats()["fallbacks"]["DISABLED_BY_POLICY"] == before + 1
            monkeypatch.setenv("SMCISH_POLICY", "tcp address=127.0.0.0/8")
            c = await one_exchange(p2)
            assert (c.mode, c.reason) == ("tcp", R.DISABLED_BY_POLICY)
            monkeypatch.setenv("SMCISH_POLICY", "tcp address=::1/128,10.0.0.0/8")
            d = await one_exchange(p2)
            assert d.mode == "ism"

    run(loop_kind, main())


def test_default_tcp_with_an_allow_rule(monkeypatch, loop_kind):
    async def main():
        s1 = await smcish.start_server(echo, HOST, 0)
        s2 = await smcish.start_server(echo, HOST, 0)
        p1 = s1.sockets[0].getsockname()[1]
        p2 = s2.sockets[0].getsockname()[1]
        async with s1, s2:
            monkeypatch.setenv("SMCISH_POLICY", f"ism side=client port={p1}; tcp side=client")
            assert (await one_exchange(p1)).mode == "ism"
            info = await one_exchange(p2)
            assert (info.mode, info.reason) == ("tcp", R.DISABLED_BY_POLICY)

    run(loop_kind, main())


def test_server_rule_by_listening_port_is_not_advertised(monkeypatch, loop_kind):
    """A listener the policy keeps on TCP is not advertised: clients without any policy stay
    TCP (PEER_NOT_ADVERTISED), and the server reports DISABLED_BY_POLICY for them."""
    accepted = []

    async def handler(reader, writer):
        accepted.append(writer.get_extra_info("smcish"))
        await echo(reader, writer)

    async def main():
        monkeypatch.setenv("SMCISH_POLICY", "tcp side=server port=1-65535")
        server = await smcish.start_server(handler, HOST, 0)    # ephemeral: decided after bind
        port = server.sockets[0].getsockname()[1]
        monkeypatch.delenv("SMCISH_POLICY")
        async with server:
            info = await one_exchange(port)
            assert (info.mode, info.reason) == ("tcp", R.PEER_NOT_ADVERTISED)
            # a server rule does not touch this process's client connections
            monkeypatch.setenv("SMCISH_POLICY", "tcp side=server")
            other = await smcish.start_server(echo, HOST, 0)
            monkeypatch.delenv("SMCISH_POLICY")
            async with other:
                pass
        assert [(i.mode, i.reason) for i in accepted] == [("tcp", R.DISABLED_BY_POLICY)]

    run(loop_kind, main())


def test_server_rule_for_one_of_two_listening_sockets(monkeypatch, loop_kind):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main():
        probe = socket.socket()
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
        probe.close()
        monkeypatch.setenv("SMCISH_POLICY", "tcp side=server address=::1")
        try:
            server = await smcish.start_server(echo, ["127.0.0.1", "::1"], port)
        except OSError as exc:
            pytest.skip(f"cannot listen on ::1: {exc}")
        monkeypatch.delenv("SMCISH_POLICY")
        async with server:
            v4 = await one_exchange(port, "127.0.0.1")
            v6 = await one_exchange(port, "::1")
        assert v4.mode == "ism"
        assert (v6.mode, v6.reason) == ("tcp", R.PEER_NOT_ADVERTISED)

    run(loop_kind, main())


def test_callable_policy_sees_the_query_and_decides(loop_kind):
    seen = []

    def decide(query):
        seen.append(query)
        if query.side == "server":
            return None
        return query.port % 2 == 0

    async def main():
        servers = [await smcish.start_server(echo, HOST, 0) for _ in range(4)]
        try:
            ports = [s.sockets[0].getsockname()[1] for s in servers]
            for port in ports:
                info = await one_exchange(port)
                want = ("ism", None) if port % 2 == 0 else ("tcp", R.DISABLED_BY_POLICY)
                assert (info.mode, info.reason) == want, (port, info)
            return ports
        finally:
            for s in servers:
                s.close()
                await s.wait_closed()

    policy.set_policy(decide)
    ports = run(loop_kind, main())
    clients = [q for q in seen if q.side == "client"]
    assert [(q.host, q.port) for q in clients] == [(HOST, p) for p in ports]
    assert all(q.program for q in seen)
    assert {q.port for q in seen if q.side == "server"} == set(ports)


@pytest.mark.parametrize("bad", ["raises", "not-a-bool"])
def test_broken_callable_keeps_the_connection_on_tcp(loop_kind, bad, caplog):
    def decide(query):
        if bad == "raises":
            raise RuntimeError("policy bug")
        return "yes"

    async def main():
        server = await smcish.start_server(echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            policy.set_policy(decide)
            return await one_exchange(port)

    caplog.set_level("ERROR", logger="smcish.policy")
    info = run(loop_kind, main())
    assert (info.mode, info.reason) == ("tcp", R.DISABLED_BY_POLICY)
    assert any("policy callable" in r.getMessage() for r in caplog.records)


def test_transparent_sock_connect_reports_the_policy_reason(monkeypatch, loop_kind):
    """aiohttp's way (its own socket, loop.sock_connect, then create_connection(sock=)) under
    install(): a tcp rule gives DISABLED_BY_POLICY, not PEER_NOT_ADVERTISED."""
    async def main():
        loop = asyncio.get_running_loop()
        smcish.install(loop)
        server = await smcish.start_server(echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            infos = []
            for rules in (f"tcp port={port}", ""):
                monkeypatch.setenv("SMCISH_POLICY", rules)
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, (HOST, port))
                reader = asyncio.StreamReader()
                transport, _ = await loop.create_connection(
                    lambda reader=reader: asyncio.StreamReaderProtocol(reader), sock=sock)
                transport.write(b"x" * 1000)
                assert await asyncio.wait_for(reader.readexactly(1000), 10) == b"x" * 1000
                infos.append(transport.get_extra_info("smcish"))
                transport.close()
        return infos

    denied, allowed = run(loop_kind, main())
    assert (denied.mode, denied.reason) == ("tcp", R.DISABLED_BY_POLICY)
    assert allowed.mode == "ism"


# ----------------------------------------------------------------- learned rules


def test_a_destination_that_keeps_timing_out_is_skipped_for_a_while(loop_kind):
    """A server whose loop is stuck: three optimistic set-ups to it time out (each moves to TCP
    with its bytes), the fourth connection skips shared memory at once (LEARNED_DECLINE),
    and after decline_ttl the destination is tried again (and is back on shared memory)."""
    srv = ThreadServer(loop_kind, sha_echo)
    policy.set_policy(policy.Policy(decline_after=3, decline_ttl=1.5))
    try:
        async def main():
            reader, writer = await smcish.open_connection(HOST, srv.port)   # opens the group
            writer.write_eof()
            assert await reader.read() == expected(b"")
            writer.close()
            srv.stall(1.2)
            await asyncio.sleep(0.05)
            conns = []
            for i in range(3):
                reader, writer = await smcish.open_connection(HOST, srv.port,
                                                              handshake_timeout=0.3)
                writer.write(payload(1000, i))
                conns.append((reader, writer, payload(1000, i)))
            await asyncio.sleep(0.6)
            infos = [w.get_extra_info("smcish") for _, w, _ in conns]
            assert [(i.mode, i.reason) for i in infos] == [("tcp", R.TIMEOUT)] * 3
            assert policy.learned() and policy.learned()[0]["reason"] == "LEARNED_DECLINE"
            assert smcish.stats()["policy_skipped"] == 1
            reader, writer = await smcish.open_connection(HOST, srv.port)
            info = writer.get_extra_info("smcish")
            assert (info.mode, info.reason) == ("tcp", R.LEARNED_DECLINE)
            data = payload(50_000, 9)
            writer.write(data)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 20) == expected(data)
            writer.close()
            for r, w, data in conns:                    # every byte of the timed-out ones too
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 20) == expected(data)
                w.close()
            await asyncio.sleep(1.6)                      # past decline_ttl
            assert policy.learned() == []
            reader, writer = await smcish.open_connection(HOST, srv.port)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 20) == expected(b"")
            assert writer.get_extra_info("smcish").mode == "ism"
            writer.close()
            return smcish.stats()["fallbacks"]

        fallbacks = run(loop_kind, main())
        assert fallbacks.get("LEARNED_DECLINE", 0) >= 1
    finally:
        srv.close()


def test_decline_learning_can_be_switched_off(loop_kind):
    srv = ThreadServer(loop_kind, sha_echo)
    policy.set_policy(policy.Policy(decline_after=0))
    try:
        async def main():
            reader, writer = await smcish.open_connection(HOST, srv.port)
            writer.write_eof()
            await reader.read()
            writer.close()
            srv.stall(1.0)
            await asyncio.sleep(0.05)
            conns = [await smcish.open_connection(HOST, srv.port, handshake_timeout=0.2)
                     for _ in range(4)]
            await asyncio.sleep(0.5)
            assert [w.get_extra_info("smcish").reason for _, w in conns] == [R.TIMEOUT] * 4
            assert policy.learned() == []
            for r, w in conns:
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 20) == expected(b"")
                w.close()

        run(loop_kind, main())
    finally:
        srv.close()


def test_short_lived_connections_make_a_destination_skip_when_enabled(loop_kind):
    async def main():
        server = await smcish.start_server(echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            policy.set_policy(policy.Policy(short_lived_ms=5000, short_lived_count=3,
                                            short_lived_ttl=30))
            modes = []
            for _ in range(4):
                reader, writer = await smcish.open_connection(HOST, port)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                info = writer.get_extra_info("smcish")
                modes.append((info.mode, info.reason))
                writer.close()
                await writer.wait_closed()
                await asyncio.sleep(0.02)
            assert modes == [("ism", None)] * 3 + [("tcp", R.LEARNED_SHORT_LIVED)]
            assert [e["reason"] for e in policy.learned()] == ["LEARNED_SHORT_LIVED"]
            policy.forget()
            assert (await one_exchange(port)).mode == "ism"
            # the default policy never learns from short connections
            policy.set_policy(None)
            policy.set_policy(policy.Policy())
            for _ in range(20):
                reader, writer = await smcish.open_connection(HOST, port)
                assert writer.get_extra_info("smcish").mode == "ism"
                writer.close()
                await writer.wait_closed()
            assert policy.learned() == []

    run(loop_kind, main())


def test_learned_cache_is_bounded():
    p = policy.Policy(decline_after=1, decline_ttl=60, cache_size=8)
    policy.set_policy(p)
    for port in range(1000, 1100):
        policy.note_outcome(("127.0.0.1", port), R.PEER_NOT_SMCISH)
    learned = policy.learned()
    assert len(learned) == 8 and {e["port"] for e in learned} == set(range(1092, 1100))
    assert policy.decide("client", "127.0.0.1", 1099) is R.LEARNED_DECLINE
    assert policy.decide("client", "::ffff:127.0.0.1", 1099) is R.LEARNED_DECLINE
    assert policy.decide("client", "127.0.0.1", 1000) is None
    # resource refusals and this side's own troubles are not held against a destination
    for reason in (R.NO_MEMORY, R.QUOTA, R.NO_FD, R.NO_PORT, R.INTERNAL, R.PEER_NOT_ADVERTISED):
        policy.note_outcome(("127.0.0.1", 2000), reason)
    assert policy.decide("client", "127.0.0.1", 2000) is None


# ----------------------------------------------------------------- under `smcish run`


PROGRAM = """
import asyncio, sys

async def main():
    reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
    writer.write(b"hello")
    await writer.drain()
    got = await reader.readexactly(5)
    info = writer.get_extra_info("smcish")
    print(got.decode(), info.mode, info.reason.name if info.reason else None, flush=True)
    writer.close()
    await writer.wait_closed()

asyncio.run(main())
"""


@pytest.mark.parametrize("rules, want", [
    ("tcp program=client_prog.py", "hello tcp DISABLED_BY_POLICY"),
    ("tcp program=other*", "hello ism None"),
    ("", "hello ism None"),
])
def test_program_rules_under_smcish_run(tmp_path, loop_kind, rules, want):
    """An unchanged asyncio program under `python -m smcish run`: `program` rules match its
    script name."""
    script = tmp_path / "client_prog.py"
    script.write_text(PROGRAM)

    async def main():
        server = await smcish.start_server(echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            env = python_env(SMCISH_POLICY=rules)
            proc = await asyncio.create_subprocess_exec(
                PYTHON, "-m", "smcish", "run", str(script), str(port), env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 60)
            finally:
                if proc.returncode is None:        # timed out: never leave it running
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0, err.decode()
            return out.decode().strip()

    assert run(loop_kind, main(), timeout=90) == want


def test_smcish_run_help_and_unknown_options():
    ok = subprocess.run([PYTHON, "-m", "smcish", "run", "--help"], env=python_env(),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "usage: python -m smcish run" in ok.stdout, ok
    bad = subprocess.run([PYTHON, "-m", "smcish", "run", "--bogus"], env=python_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown option '--bogus'" in bad.stderr, bad
    assert "Traceback" not in bad.stderr
