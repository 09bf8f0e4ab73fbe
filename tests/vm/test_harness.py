"""The VM harness itself (ism_backend/vmharness.py): two guests boot and run commands, reach each
other over their private link only, see ivshmem regions hot-plugged through QMP into the
pcie-root-ports, and a readonly=on region drops a guest's writes; teardown leaves nothing behind.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import signal
import sys
import time
from typing import Any

import pytest

import ism_backend
from ism_backend.vmharness import IPS, VmPair

pytestmark = pytest.mark.vm

PY = sys.executable
REGION = 4 << 20

# Runs in a guest: find the ivshmem region whose header carries the token (polling, bounded),
# then: "write OFF TEXT" (and read it back), "read OFF LEN", or "absent" (until no device has
# it). Prints one JSON line.
FIND = r"""
import glob, json, mmap, os, sys, time
token, op, args = sys.argv[1].encode(), sys.argv[2], sys.argv[3:]
def regions():
    for d in sorted(glob.glob("/sys/bus/pci/devices/*")):
        try:
            with open(d + "/vendor") as f, open(d + "/device") as g:
                if (f.read().strip(), g.read().strip()) != ("0x1af4", "0x1110"):
                    continue
            with open(d + "/enable", "w") as f:
                f.write("1")
            fd = os.open(d + "/resource2", os.O_RDWR)
        except OSError:
            continue
        m = mmap.mmap(fd, os.fstat(fd).st_size)
        os.close(fd)
        if m[:8] == b"ISMREG1\0" and m[8:8 + len(token)] == token:
            yield d, m
        else:
            m.close()
t0 = time.monotonic()
while time.monotonic() - t0 < 30:
    found = list(regions())
    if op == "absent":
        if not found:
            print(json.dumps({"absent": True, "after": time.monotonic() - t0}))
            sys.exit(0)
    elif found:
        d, m = found[0]
        off = int(args[0])
        if op == "write":
            m[off:off + len(args[1])] = args[1].encode()
            data = m[off:off + len(args[1])]
        else:
            data = m[off:off + int(args[1])]
        print(json.dumps({"bdf": os.path.basename(d), "data": data.decode("latin-1"),
                          "after": time.monotonic() - t0}))
        sys.exit(0)
    for _, m in found:
        m.close()
    time.sleep(0.1)
print(json.dumps({"timeout": True}))
sys.exit(1)
"""


def ok(pair: VmPair, guest: str, cmd: list[str] | str, timeout: float = 60,
       env: dict[str, str] | None = None) -> str:
    rc, out = pair.run(guest, cmd, timeout=timeout, env=env)
    assert rc == 0, f"guest {guest}: {cmd} exited {rc}:\n{out[-4000:]}"
    return out


def last_json(out: str) -> dict[str, Any]:
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, out
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_both_guests_boot_and_run_commands(vm_pair: VmPair) -> None:
    probe = [PY, "-c", "import sys, ism_backend; print(sys.executable); "
             "print(ism_backend.__file__); print(open('/proc/sys/kernel/hostname').read())"]
    (rc_a, out_a), (rc_b, out_b) = vm_pair.run_both(probe, probe, timeout=60)
    assert (rc_a, rc_b) == (0, 0), (out_a, out_b)
    for name, out in (("a", out_a), ("b", out_b)):
        exe, package, host = out.splitlines()[:3]
        assert exe == PY
        # the guest imports the very package (venv, or checkout) the host runs
        assert package == ism_backend.__file__
        assert host == f"ism-{name}"
    for name in ("a", "b"):
        addrs = ok(vm_pair, name, ["ip", "-o", "-4", "addr", "show"])
        assert f"{IPS[name]}/24" in addrs
        # lo and one NIC (the pair's link): nothing else leads anywhere
        links = ok(vm_pair, name, ["ip", "-o", "link", "show"])
        names = sorted(line.split(":")[1].strip() for line in links.splitlines())
        assert len(names) == 2 and "lo" in names, links


def test_run_status_output_env_timeout_and_background(vm_pair: VmPair) -> None:
    rc, out = vm_pair.run("a", "echo out; echo err >&2; echo $SMCISH_VMTEST; exit 3",
                          timeout=30, env={"SMCISH_VMTEST": "from-host"})
    assert rc == 3 and out.split() == ["out", "err", "from-host"], (rc, out)
    rc, out = vm_pair.run("a", ["/nonexistent/command"], timeout=30)
    assert rc == 127 and "cannot run" in out, (rc, out)
    t = time.monotonic()
    rc, out = vm_pair.run("b", ["sleep", "30"], timeout=1)
    assert rc == -9 and "timed out" in out and time.monotonic() - t < 15, (rc, out)
    big = 3 << 20                  # more than a frame: the tail comes back, the rest is counted
    rc, out = vm_pair.run("a", [PY, "-c", f"import sys; sys.stdout.write('x' * {big} + 'END')"],
                          timeout=60)
    assert rc == 0 and out.endswith("xEND") and "dropped" in out.splitlines()[0], out[:200]
    handle = vm_pair.spawn("b", ["sh", "-c", "echo started; exec sleep 60"])
    assert vm_pair.wait("b", handle, timeout=1)[0] is None          # still running
    vm_pair.kill("b", handle, signal.SIGTERM)
    rc2, out2 = vm_pair.wait("b", handle, timeout=20)
    assert rc2 == -signal.SIGTERM and "started" in out2, (rc2, out2)


def test_guests_reach_each_other_over_tcp(vm_pair: VmPair) -> None:
    port = 40000 + secrets.randbelow(20000)
    server = vm_pair.spawn("a", [PY, "-c", (
        "import socket; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('{IPS['a']}', {port})); s.listen(); s.settimeout(60); c, peer = s.accept(); "
        "data = c.recv(100); c.sendall(data.upper()); print('peer', peer[0], data.decode())")])
    client = (
        "import socket, sys, time\n"
        "t = time.monotonic()\n"
        "while True:\n"
        "    try:\n"
        f"        s = socket.create_connection(('{IPS['a']}', {port}), timeout=5); break\n"
        "    except OSError:\n"
        "        if time.monotonic() - t > 40: raise\n"
        "        time.sleep(0.2)\n"
        "s.sendall(b'hello from b'); print(s.recv(100).decode())\n")
    out = ok(vm_pair, "b", [PY, "-c", client], timeout=90)
    assert "HELLO FROM B" in out
    rc, out = vm_pair.wait("a", server, timeout=30)
    assert rc == 0 and f"peer {IPS['b']} hello from b" in out, (rc, out)


def _region(token: str) -> str:
    path = f"/dev/shm/vmharness-test-{os.getpid()}-{token}"
    with open(path, "wb") as f:
        f.truncate(REGION)
        f.write(b"ISMREG1\0" + token.encode())
    return path


def _plug(pair: VmPair, guest: str, path: str, port: str, readonly: bool) -> None:
    t = time.monotonic()
    pair.qmp(guest, "object-add", **{"qom-type": "memory-backend-file", "id": "vmtestm",
                                     "mem-path": path, "size": REGION, "share": True,
                                     "readonly": readonly})
    pair.qmp(guest, "device_add", driver="ivshmem-plain", memdev="vmtestm", bus=port,
             id="vmtestd")
    print(f"[hotplug] {guest}: object-add + device_add in {(time.monotonic() - t) * 1e3:.1f} ms")


def _unplug(pair: VmPair, guest: str) -> None:
    try:
        pair.qmp(guest, "device_del", id="vmtestd")
        pair.qmp_event(guest, "DEVICE_DELETED", timeout=20, data={"device": "vmtestd"})
    finally:
        pair.qmp(guest, "object-del", id="vmtestm")


def test_ivshmem_hotplug_seen_and_readonly_drops_writes(vm_pair: VmPair) -> None:
    token = secrets.token_hex(8)
    path = _region(token)
    port = f"ismrp{vm_pair.ports - 1}"       # the last root port: the first ones are vmhost's
    plugged: list[str] = []
    try:
        _plug(vm_pair, "a", path, port, readonly=False)
        plugged.append("a")
        seen = last_json(ok(vm_pair, "a", [PY, "-c", FIND, token, "write", "64", "hello-from-a"]))
        assert seen["data"] == "hello-from-a", seen
        with open(path, "rb") as f:
            host = mmap.mmap(f.fileno(), REGION, prot=mmap.PROT_READ)
        assert host[64:76] == b"hello-from-a"              # the guest wrote the host's file

        _plug(vm_pair, "b", path, port, readonly=True)
        plugged.append("b")
        got = last_json(ok(vm_pair, "b", [PY, "-c", FIND, token, "read", "64", "12"]))
        assert got["data"] == "hello-from-a", got
        tried = last_json(ok(vm_pair, "b", [PY, "-c", FIND, token, "write", "128", "b-was-here"]))
        assert tried["data"] == "\0" * 10, tried           # readonly=on: the write is dropped
        assert host[128:138] == b"\0" * 10 and host[64:76] == b"hello-from-a"
        host.close()
    finally:
        errors = []
        for guest in plugged:
            try:
                _unplug(vm_pair, guest)
            except Exception as exc:
                errors.append(f"{guest}: {exc}")
        os.unlink(path)
        assert not errors, errors
    for guest in plugged:
        gone = last_json(ok(vm_pair, guest, [PY, "-c", FIND, token, "absent"]))
        assert gone["absent"], gone


def test_teardown_leaves_no_qemu_even_mid_boot() -> None:
    """A second pair, torn down while booting: kill_guest takes one QEMU only, close() the rest
    (the session pair's own teardown is checked by the vm_pair fixture)."""
    ok_, why = VmPair.available()
    if not ok_:
        pytest.skip(f"cannot boot VMs here: {why}")
    pair = VmPair(boot_timeout=60)
    try:
        pair.start(wait=False)
        pids = pair.qemu_pids()
        assert all(pids.values()), pids
        pair.kill_guest("b")
        assert not os.path.exists(f"/proc/{pids['b']}") or _zombie(pids["b"])
        assert pair.qemu_pids()["a"] == pids["a"]          # the other guest stays
        work = pair.work
    finally:
        pair.close()
    assert pair.leftovers() == []
    assert not os.path.exists(work)


def _zombie(pid: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
