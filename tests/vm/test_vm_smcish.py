"""smcish between two QEMU guests (docs/vm.md): unchanged programs over shared memory, read-only
enforcement, a guest over its quota, a guest killed mid-transfer. Real guests booted by
``ism_backend.vmharness`` (TCG unless KVM works), real ismd guest mode on the host, the real
agent in each guest. The guest-killing test runs last: it takes guest a down.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm

HERE = Path(__file__).resolve().parent
PROGRAMS = HERE.parent / "programs"
EXAMPLES = HERE.parent.parent / "examples"
PY = sys.executable
ADDR = {"a": "10.77.0.1", "b": "10.77.0.2"}
OTHER = {"a": "b", "b": "a"}


def lines(out: bytes | str) -> list[dict[str, Any]]:
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


def last(out: bytes | str) -> dict[str, Any]:
    found = lines(out)
    assert found, f"no JSON line in the output:\n{out!r}"
    return found[-1]


def run_ok(pair: Any, guest: str, cmd: list[str], timeout: float = 120,
           env: dict[str, str] | None = None) -> str:
    rc, out = pair.run(guest, cmd, timeout=timeout, env=env)
    text = out.decode(errors="replace") if isinstance(out, bytes) else out
    assert rc == 0, f"{guest}: {cmd} exited {rc}:\n{text[-4000:]}"
    return text


def wait_listening(pair: Any, guest: str, port: int, timeout: float = 60) -> None:
    """Until something listens on ``port`` in ``guest`` (bounded)."""
    deadline = time.monotonic() + timeout
    probe = ("import socket,sys; s=socket.socket(); s.settimeout(1); "
             f"sys.exit(s.connect_ex(('127.0.0.1', {port})))")
    while time.monotonic() < deadline:
        rc, _ = pair.run(guest, [PY, "-c", probe], timeout=30)
        if rc == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on {guest}:{port} after {timeout} s")


class Server:
    """A background program in one guest, stopped at the end."""

    def __init__(self, pair: Any, guest: str, cmd: list[str], port: int,
                 env: dict[str, str] | None = None) -> None:
        self.pair, self.guest = pair, guest
        self.handle = pair.spawn(guest, cmd, env=env)
        wait_listening(pair, guest, port)

    def stop(self) -> str:
        self.pair.kill(self.guest, self.handle)
        _rc, out = self.pair.wait(self.guest, self.handle, timeout=30)
        return out.decode(errors="replace") if isinstance(out, bytes) else out


@pytest.mark.parametrize("server", ["a", "b"])
def test_echo_example_between_guests_is_ism(vm_pair: Any, server: str) -> None:
    client = OTHER[server]
    port = 18801 if server == "a" else 18802
    srv = Server(vm_pair, server, [PY, str(EXAMPLES / "echo_server.py"), "--host", "0.0.0.0",
                                   "--port", str(port)], port)
    try:
        out = run_ok(vm_pair, client, [PY, str(EXAMPLES / "echo_client.py"), "--host",
                                       ADDR[server], "--port", str(port), "--count", "200",
                                       "--size", "4096"])
    finally:
        srv_out = srv.stop()
    result = last(out)
    assert result["ok"] is True, out
    assert result["mode"] == "ism", (out, srv_out)
    closed = [e for e in lines(srv_out) if e.get("event") == "closed"]
    assert closed and closed[-1]["mode"] == "ism", srv_out


@pytest.mark.parametrize("server", ["a", "b"])
def test_grpclib_example_between_guests_is_ism(vm_pair: Any, server: str) -> None:
    port = 18803 if server == "a" else 18809
    srv = Server(vm_pair, server, [PY, str(EXAMPLES / "grpc_service.py"), "server", "--host",
                                   "0.0.0.0", "--port", str(port)], port)
    try:
        out = run_ok(vm_pair, OTHER[server], [PY, str(EXAMPLES / "grpc_service.py"), "client",
                                              "--host", ADDR[server], "--port", str(port),
                                              "--messages", "20", "--calls", "50"], timeout=180)
    finally:
        srv.stop()
    result = last(out)
    assert result["ok"] is True, out
    assert result["mode"] == "ism" and result["server_mode"] == "ism", out


@pytest.mark.parametrize("server", ["a", "b"])
def test_64mib_checksummed_both_ways(vm_pair: Any, server: str) -> None:
    client = OTHER[server]
    port = 18804 if server == "a" else 18805
    srv = Server(vm_pair, server, [PY, str(PROGRAMS / "vm_transfer.py"), "serve", "0.0.0.0",
                                   str(port)], port)
    try:
        out = run_ok(vm_pair, client, [PY, str(PROGRAMS / "vm_transfer.py"), "client",
                                       ADDR[server], str(port), "checksum", str(64 << 20)],
                     timeout=300)
    finally:
        srv_out = srv.stop()
    result = last(out)
    assert result["ok"] and result["sent_ok"] and result["received_ok"], out
    assert result["received"] == 64 << 20
    assert result["mode"] == "ism", (out, srv_out)
    done = [e for e in lines(srv_out) if e.get("event") == "checksum"]
    assert done and done[-1]["bytes"] == 64 << 20 and done[-1]["mode"] == "ism", srv_out


def test_plain_program_in_a_guest_stays_tcp(vm_pair: Any) -> None:
    """A stock asyncio server (no smcish) in guest a: the smcish client in b stays on TCP."""
    port = 18806
    plain = ("import asyncio\n"
             "async def h(r, w):\n"
             "    while d := await r.read(65536):\n"
             "        w.write(d); await w.drain()\n"
             "    w.close()\n"
             "async def main():\n"
             f"    s = await asyncio.start_server(h, '0.0.0.0', {port})\n"
             "    await s.serve_forever()\n"
             "asyncio.run(main())\n")
    srv = Server(vm_pair, "a", [PY, "-c", plain], port)
    try:
        out = run_ok(vm_pair, "b", [PY, str(EXAMPLES / "echo_client.py"), "--host", ADDR["a"],
                                    "--port", str(port), "--count", "20"])
    finally:
        srv.stop()
    result = last(out)
    assert result["ok"] is True and result["mode"] == "tcp", out
    assert result["reason"] == "PEER_NOT_ADVERTISED", out


def test_readonly_guest_cannot_change_the_owners_region(vm_pair: Any) -> None:
    workdir = "/tmp/vm-region-test"
    run_ok(vm_pair, "a", ["sh", "-c", f"rm -rf {workdir} && mkdir -p {workdir}"])
    owner = vm_pair.spawn("a", [PY, str(PROGRAMS / "vm_region.py"), "own", workdir])
    try:
        deadline = time.monotonic() + 60
        token = ""
        while time.monotonic() < deadline:
            rc, out = vm_pair.run("a", ["cat", f"{workdir}/token"], timeout=30)
            token = (out.decode() if isinstance(out, bytes) else out).strip()
            if rc == 0 and len(token) == 32:
                break
            time.sleep(0.5)
        assert len(token) == 32, f"owner did not publish a token: {token!r}"
        poke = last(run_ok(vm_pair, "b", [PY, str(PROGRAMS / "vm_region.py"), "poke", token]))
    finally:
        vm_pair.run("a", ["touch", f"{workdir}/done"], timeout=30)
        rc, out = vm_pair.wait("a", owner, timeout=60)
    result = last(out)
    assert poke["found_bar"] and poke["wrote"], poke
    assert poke["device_mapping_writable"] is False, poke
    assert poke["visible_change"] is False, poke
    assert result["unchanged"] is True, (poke, out)
    assert result["geometry"] == "guest", out


def test_guest_over_its_quota_falls_back_to_tcp_with_the_reason(vm_pair: Any) -> None:
    port = 18807
    srv = Server(vm_pair, "a", [PY, str(EXAMPLES / "echo_server.py"), "--host", "0.0.0.0",
                                "--port", str(port)], port)
    try:
        out = run_ok(vm_pair, "b", [PY, str(PROGRAMS / "vm_region.py"), "hog", ADDR["a"],
                                    str(port)], timeout=180)
    finally:
        srv.stop()
    result = last(out)
    assert result["refusal"], out
    assert result["echo_ok"] is True and result["mode"] == "tcp", out
    assert result["reason"] == "QUOTA", out


def _regions_of(status: dict[str, Any], guest: str) -> list[Any]:
    return [r for r in status.get("regions", []) if r.get("owner") == guest]


def test_guest_killed_mid_transfer(vm_pair: Any) -> None:
    """Last: guest a is killed while it streams to b; b's connection fails within 2 s with every
    byte it received intact, and the host keeps no region of a once b let go."""
    port = 18808
    progress = "/tmp/vm-kill-progress"
    Server(vm_pair, "a", [PY, str(PROGRAMS / "vm_transfer.py"), "serve", "0.0.0.0", str(port)],
           port)
    vm_pair.run("b", ["rm", "-f", progress], timeout=30)
    client = vm_pair.spawn("b", [PY, str(PROGRAMS / "vm_transfer.py"), "client", ADDR["a"],
                                 str(port), "stream", progress])
    deadline = time.monotonic() + 120
    got = 0
    while time.monotonic() < deadline:
        rc, out = vm_pair.run("b", ["cat", progress], timeout=30)
        text = (out.decode() if isinstance(out, bytes) else out).strip()
        got = int(text) if rc == 0 and text.isdigit() else 0
        if got >= 32 << 20:
            break
        time.sleep(0.3)
    assert got >= 32 << 20, f"the stream did not get going ({got} bytes)"
    assert _regions_of(vm_pair.host_status(), "a"), vm_pair.host_status()
    killed = time.monotonic()
    vm_pair.kill_guest("a")
    rc, out = vm_pair.wait("b", client, timeout=30)
    took = time.monotonic() - killed
    result = last(out)
    assert rc == 0 and result["ok"] is True, out            # every byte received was right
    assert result["mode"] == "ism" and result["received"] >= got, out
    assert result["error"] is not None, out
    assert result["since_last_byte_s"] <= 2.0, out
    assert took <= 2.0 + 1.5, f"b's client ended {took:.2f} s after the kill"   # + harness polling
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _regions_of(vm_pair.host_status(), "a"):
        time.sleep(0.2)
    assert not _regions_of(vm_pair.host_status(), "a"), vm_pair.host_status()
