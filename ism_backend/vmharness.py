"""Two QEMU guests for the tests of smcish between virtual machines (docs/vm.md): the harness.

``VmPair`` boots two guests, "a" and "b", with virtme-ng (``vng``: the Debian kernel under QEMU,
the host's root file system shared read-only, /tmp and a few other directories as guest-private
overlays), TCG by default. The guests are joined by nothing but a ``-netdev dgram`` link between
the two QEMU processes (Unix datagram sockets in the pair's work directory: no host network, not
even loopback), virtio-net with fixed MACs, 10.77.0.1/24 (a) and 10.77.0.2/24 (b). Each guest has:

- ``<work>/<g>.qmp``: a QMP socket for ismd's guest mode (``python -m ism_backend.vmhost``), and
  ``<work>/<g>.hqmp``: a second one for the harness (``VmPair.qmp``); QEMU serves one client per
  monitor, so the two never share one;
- a virtio-serial controller ``vser0`` with two ports: ``org.smcish.ism.0`` (chardev socket
  ``<work>/<g>.chan``, connected by vmhost) and ``org.smcish.harness.0`` (``<work>/<g>.hctl``,
  connected by the harness);
- ``pcie-root-port`` devices ``ismrp0`` .. ``ismrp<ports-1>`` (pref64-reserve=256M, io-reserve=0)
  for ivshmem hot-plug: q35 refuses hot-plug on ``pcie.0``, and a default root port has no room
  for a 64-bit prefetchable BAR.

In each guest vng runs ``guest-main`` of this module with the host's ``sys.executable`` (as
``python .../ism_backend/vmharness.py guest-main``: the file, so that the package's __init__ is
not imported there; ``python -m ism_backend.vmharness guest-main`` works too). The guest sees the
host's interpreter, venv and package at the same paths (the venv of ``scripts/wheel.py test``
lives in the host's /tmp, which the guest overlays). guest-main brings the network up (modprobe
virtio_net, the NIC found by its MAC, ``ip``), optionally starts the agent
(``python -m ism_backend.vmguest``, log in the guest's ``/tmp/vmharness-agent.log``), then serves
the harness port with ``vmlink.Link`` framing. Requests (host -> guest):

- ``ping`` -> ``name``, ``uptime``, ``started`` (guest uptime when guest-main began), ``net``,
  ``net_error``, ``agent``, ``python``
- ``run {cmd (list of str), env ({str: str}, added to guest-main's), seconds (the timeout),
  cwd (str or null)}`` -> ``rc``, ``out`` (base64 of stdout+stderr: its last ``OUT_LIMIT``
  bytes), ``timed_out``, ``dropped`` (bytes of output cut off)
- ``spawn {cmd, env, cwd}`` -> ``handle`` (a background command)
- ``wait {handle, seconds}`` -> ``done``, ``rc`` (null while it runs), ``out``, ``dropped``
- ``kill {handle, signal}`` -> {} (signals the spawned command's process group)
- ``agent`` -> ``state``, ``log`` (base64, the tail of the agent's log)
- ``poweroff`` -> {} (then the guest powers off)

(The timeouts travel as ``seconds``: ``Link.call`` takes ``timeout`` as its own argument.) A
command that outlives its timeout is killed (its process group, SIGKILL) and reported with
``rc`` -9 and ``timed_out``. Output is capped at ``OUT_LIMIT`` bytes (the tail; a frame is at most
1 MiB and base64 costs a third more).

Host side: ``VmPair`` (a context manager) boots the ``vmlinux`` extracted from the kernel image
(QEMU's PVH entry: no decompression under TCG, ~3 s a boot), with ``modprobe.blacklist=`` for
the emulated hardware nobody uses (udev's coldplug of it costs ~4 s), starts both vng processes
in sessions of their own, optionally vmhost, connects the harness ports and waits for each
guest's ``ping`` (bounded by ``boot_timeout``), and with vmhost and the agents until vmhost's
status shows every agent's hello. ``close()`` powers the guests off, then SIGTERM/SIGKILL of the
process groups it created, SIGTERM to vmhost, and removes its work directory; every wait is
bounded. A watchdog process (``_WATCHDOG``) does the killing and removing if the harness itself
dies without ``close()`` (SIGKILL, a test-run timeout).

CLI::

    python -m ism_backend.vmharness check             # can VMs run here? (and why not)
    python -m ism_backend.vmharness probe-kvm         # does KVM boot a kernel here?
    python -m ism_backend.vmharness up [--host --agent]   # boot, serve `exec`, until Ctrl-C
    python -m ism_backend.vmharness exec --work DIR a -- CMD...   # a command in a running `up`
    python -m ism_backend.vmharness run --a 'CMD' --b 'CMD'       # boot, run both, tear down

Requirements (``VmPair.available()``): qemu-system-x86_64, a kernel in /boot, ``vng`` (pip
``virtme-ng``) on PATH or next to ``sys.executable``, a statically linked busybox (Debian:
busybox-static; vng builds an initramfs with it), a writable /dev/shm, and the interpreter and
this package somewhere the guest sees (not under /run, /dev/shm, /var/tmp, ...).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import errno
import glob
import importlib.util
import json
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

if not __package__:
    # Run as a file (``python .../ism_backend/vmharness.py guest-main``: how vng starts it in a
    # guest): the package without its __init__, which imports the whole device (~2 s of a
    # guest's boot under TCG over 9p). Only errors and vmlink are imported from it.
    import types

    _package = types.ModuleType("ism_backend")
    _package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules.setdefault("ism_backend", _package)
    __package__ = "ism_backend"

from .errors import DeviceGone, DeviceProtocolError, IsmError, UnknownToken
from .vmlink import Link, LinkClosed, b64, unb64

__all__ = [
    "GUESTS", "HARNESS_PORT", "ISM_PORT", "OUT_LIMIT", "Qmp", "VmError", "VmPair", "available",
    "kvm_works", "main",
]

GUESTS = ("a", "b")
HARNESS_PORT = "org.smcish.harness.0"
ISM_PORT = "org.smcish.ism.0"
IPS = {"a": "10.77.0.1", "b": "10.77.0.2"}
PREFIX_LEN = 24
MACS = {"a": "52:54:00:77:00:01", "b": "52:54:00:77:00:02"}
#: Output kept per command (its tail): base64 of it plus the frame's JSON stays under 1 MiB.
OUT_LIMIT = 720 << 10
#: Where the guest does not see the host's files (vng mounts fresh tmpfs/devtmpfs/... there).
GUEST_HIDDEN = ("/run", "/dev", "/proc", "/sys", "/var/log", "/var/tmp", "/var/cache",
                "/var/lib/apt", "/var/lib/private")
AGENT_LOG = "/tmp/vmharness-agent.log"
AGENT_MODULE = "ism_backend.vmguest"
HOST_MODULE = "ism_backend.vmhost"
#: Extra seconds a host-side call waits beyond the command's own timeout (TCG is slow).
CALL_MARGIN = 30.0
QEMU = "qemu-system-x86_64"
#: The kernel command line holds vng's own arguments and our script (base64): x86 allows 2048.
MAX_SCRIPT = 800
#: Modules udev's coldplug would load in a guest for emulated hardware nobody uses here (KVM
#: for the -cpu max's SVM, AHCI/CD-ROM, crypto, i2c, watchdogs, ...): ~4 s of each boot under
#: TCG. Passed as modprobe.blacklist=.
BLACKLIST = ("kvm_amd,kvm_intel,kvm,ahci,sr_mod,sg,i2c_i801,lpc_ich,iTCO_wdt,i6300esb,pcspkr,"
             "psmouse,serio_raw,evdev,aesni_intel,ghash_clmulni_intel,sha512_ssse3,sha256_ssse3,"
             "sha1_ssse3,crc32_pclmul,crct10dif_pclmul,ccp,intel_pmc_bxt,button,powernow_k8,"
             "acpi_cpufreq,qemu_fw_cfg")


class VmError(RuntimeError):
    """The harness could not boot, reach or drive a guest (the message says which and why)."""


def _say(msg: str) -> None:
    print(f"[vmharness] {msg}", file=sys.stderr, flush=True)


# ============================================================================ requirements

def _is_static_elf(path: str) -> bool:
    """True if ``path`` is an ELF64 executable without a PT_INTERP (statically linked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:               # PT_INTERP: dynamically linked
            return False
    return True


def find_busybox() -> str | None:
    """A statically linked busybox, searched as vng searches it (PATH, then /usr/local, /usr, /)."""
    for name in ("busybox-static", "busybox.static", "busybox"):
        candidates = [shutil.which(name)]
        candidates += [os.path.join(d, sub, name) for d in ("/usr/local", "/usr", "/")
                       for sub in ("bin", "sbin")]
        for path in candidates:
            if path and os.path.isfile(path):
                if _is_static_elf(path):
                    return path
                break                  # vng takes the first one it finds
    return None


def find_vng() -> str | None:
    """``vng``: on PATH, or next to this interpreter (a venv's bin)."""
    found = shutil.which("vng")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "vng")
    return beside if os.access(beside, os.X_OK) else None


def find_kernel() -> str | None:
    """The newest readable /boot/vmlinuz-* (Debian: linux-image-amd64)."""
    kernels = [k for k in glob.glob("/boot/vmlinuz-*") if os.access(k, os.R_OK)]
    if not kernels:
        return None

    def version(path: str) -> list[int]:
        return [int(n) for n in "".join(c if c.isdigit() else " " for c in path).split()]

    return max(kernels, key=version)


def extract_vmlinux(kernel: str, dest: str) -> bool:
    """Write the ELF ``vmlinux`` inside bzImage ``kernel`` (xz or gzip payload) to ``dest``.

    QEMU boots it through its PVH entry point (CONFIG_PVH), which skips the kernel's
    self-decompression: ~3 s of every boot under TCG. False if the payload is in another
    format or is not an ELF image (then boot ``kernel`` itself)."""
    import lzma
    import zlib

    try:
        with open(kernel, "rb") as f:
            image = f.read()
        at = image.find(b"\xfd7zXZ\x00")
        if at >= 0:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[at:])
        else:
            at = image.find(b"\x1f\x8b\x08\x00")
            if at < 0:
                return False
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(image[at:])
    except (OSError, lzma.LZMAError, zlib.error, MemoryError):
        return False
    if elf[:4] != b"\x7fELF" or b"Xen" not in elf:     # PVH: a Xen ELF note
        return False
    with open(dest, "wb") as f:
        f.write(elf)
    return True


def hidden_in_guest(path: str) -> bool:
    """True if the guest does not see ``path`` as the host does."""
    real = os.path.realpath(path)
    return any(real == h or real.startswith(h + "/") for h in GUEST_HIDDEN)


def available() -> tuple[bool, str]:
    """Whether VMs can be booted here: (True, "") or (False, the reason, with what to install)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False, f"needs Linux on x86_64 (this is {sys.platform} {platform.machine()})"
    if not shutil.which(QEMU):
        return False, f"{QEMU} not found (Debian: apt-get install qemu-system-x86)"
    if find_kernel() is None:
        return False, "no readable kernel /boot/vmlinuz-* (Debian: apt-get install linux-image-amd64)"
    if find_vng() is None:
        return False, "vng not found on PATH nor next to sys.executable (pip install virtme-ng)"
    if find_busybox() is None:
        return False, ("no statically linked busybox: vng needs one for its initramfs "
                       "(Debian: apt-get install busybox-static)")
    if not (os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK)):
        return False, "/dev/shm is not a writable directory (regions live there)"
    package = os.path.dirname(os.path.abspath(__file__))
    for what, path in (("the interpreter", sys.executable), ("its prefix", sys.prefix),
                       ("ism_backend", package)):
        if hidden_in_guest(path):
            return False, (f"{what} ({path}) lies under a directory the guest does not share "
                           f"with the host ({', '.join(GUEST_HIDDEN)})")
    return True, ""


_KVM_CACHE: dict[str, tuple[bool, str]] = {}


def kvm_works(kernel: str | None = None, timeout: float = 10.0) -> tuple[bool, str]:
    """Whether KVM really runs a guest here: boots ``kernel`` with ``-accel kvm -cpu host`` (as
    vng does) and no root file system, and waits (bounded) for the kernel's own panic message.

    /dev/kvm may exist and still be useless (PVM, no nested virtualization): QEMU then aborts
    at once, or the kernel crawls or dies before init. Cached per kernel for the process."""
    kernel = kernel or find_kernel()
    if kernel is None:
        return False, "no kernel"
    if kernel in _KVM_CACHE:
        return _KVM_CACHE[kernel]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        result = (False, "/dev/kvm missing or not accessible")
    elif not shutil.which(QEMU):
        result = (False, f"{QEMU} not found")
    else:
        result = _probe_kvm(kernel, timeout)
    _KVM_CACHE[kernel] = result
    return result


def _probe_kvm(kernel: str, timeout: float) -> tuple[bool, str]:
    cmd = [QEMU, "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256M", "-smp", "1",
           "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", kernel,
           "-append", "console=ttyS0 panic=-1 root=/dev/vmharness-none"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen = (seen + chunk)[-65536:]
                if b"Kernel panic" in seen or b"VFS:" in seen:
                    return True, "KVM booted the kernel to its root-fs panic"
        last = seen.decode(errors="replace").strip().splitlines()[-2:]
        if proc.poll() is not None:
            return False, f"QEMU with KVM exited {proc.returncode}: {' | '.join(last)}"
        return False, f"no kernel panic within {timeout:.0f} s under KVM (too slow or stuck)"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        proc.stdout.close()


# ============================================================================ guest side

def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def _gprint(msg: str) -> None:
    print(f"vmharness-guest[{_uptime():.2f}]: {msg}", flush=True)


class _Child:
    """A command in the guest: its own session, stdout+stderr into a bounded tail buffer."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: str | None) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        self._buf = bytearray()
        self.dropped = 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name="child-out")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except OSError:
                    break
                if not chunk:
                    break
                with self._lock:
                    self._buf += chunk
                    if len(self._buf) > 2 * OUT_LIMIT:
                        cut = len(self._buf) - OUT_LIMIT
                        del self._buf[:cut]
                        self.dropped += cut
        finally:
            self.proc.stdout.close()           # the reader owns the pipe

    def output(self) -> tuple[bytes, int]:
        """(the last OUT_LIMIT bytes, bytes dropped before them)."""
        with self._lock:
            extra = max(0, len(self._buf) - OUT_LIMIT)
            return bytes(self._buf[extra:]), self.dropped + extra

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float) -> int | None:
        """The exit status, or None if still running after ``timeout``; then the output is
        complete (the reader is joined, bounded: an escaped grandchild may hold the pipe)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        return rc


class GuestMain:
    """The harness inside one guest: network, agent, the harness port."""

    def __init__(self, name: str, ip: str, mac: str, agent: bool, agent_args: list[str]) -> None:
        self.name, self.ip, self.mac = name, ip, mac
        self.started = _uptime()
        self.net = ""
        self.net_error = ""
        self.agent_wanted = agent
        self.agent_args = agent_args
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_state = "off"
        self.children: dict[int, _Child] = {}
        self.next_handle = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    # --- setup ---

    def _sh(self, cmd: list[str], timeout: float = 30.0) -> str:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: "
                               f"{(proc.stderr or proc.stdout).strip()}")
        return proc.stdout

    def setup_network(self) -> None:
        ip_cmd = [shutil.which("ip") or "/sbin/ip"]
        if not os.path.exists(ip_cmd[0]):
            ip_cmd = ["busybox", "ip"]
        try:
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                self._sh(["modprobe", "virtio_net"])
            iface = ""
            deadline = time.monotonic() + 20
            while not iface and time.monotonic() < deadline:
                for path in glob.glob("/sys/class/net/*/address"):
                    with open(path) as f:
                        if f.read().strip().lower() == self.mac.lower():
                            iface = os.path.basename(os.path.dirname(path))
                if not iface:
                    time.sleep(0.1)
            if not iface:
                raise RuntimeError(f"no network interface with MAC {self.mac} after 20 s")
            self._sh([*ip_cmd, "link", "set", "lo", "up"])
            self._sh([*ip_cmd, "addr", "add", self.ip, "dev", iface])
            self._sh([*ip_cmd, "link", "set", iface, "up"])
            self.net = f"{iface} {self.ip}"
            _gprint(f"network: {self.net}")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.net_error = str(exc)
            _gprint(f"network setup FAILED: {exc}")

    def start_agent(self) -> None:
        if not self.agent_wanted:
            return
        if importlib.util.find_spec(AGENT_MODULE) is None:
            self.agent_state = f"missing: {AGENT_MODULE} is not importable by {sys.executable}"
            _gprint(f"agent not started: {self.agent_state}")
            return
        cmd = [sys.executable, "-m", AGENT_MODULE, *self.agent_args]
        with open(AGENT_LOG, "ab") as log:
            self.agent = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.agent_state = f"running (pid {self.agent.pid})"
        _gprint(f"agent started: {shlex.join(cmd)} (log {AGENT_LOG})")
        threading.Thread(target=self._watch_agent, daemon=True, name="agent-watch").start()

    def _watch_agent(self) -> None:
        assert self.agent is not None
        rc = self.agent.wait()
        self.agent_state = f"exited {rc}"
        if not self.stopping.is_set():
            _gprint(f"agent exited {rc}; its log ({AGENT_LOG}):\n{_tail_text(AGENT_LOG, 8000)}")

    # --- the harness port ---

    @staticmethod
    def find_port(name: str, timeout: float = 30.0) -> str:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(["modprobe", "virtio_console"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + timeout
        while True:
            for path in glob.glob("/sys/class/virtio-ports/*/name"):
                try:
                    with open(path) as f:
                        if f.read().strip() == name:
                            return "/dev/" + os.path.basename(os.path.dirname(path))
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no virtio port named {name} after {timeout:.0f} s")
            time.sleep(0.1)

    def serve(self) -> None:
        dev = self.find_port(HARNESS_PORT)
        _gprint(f"serving {HARNESS_PORT} on {dev}")
        while not self.stopping.is_set():
            try:
                fd = os.open(dev, os.O_RDWR)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                time.sleep(0.1)
                continue
            # A port whose host side is not connected polls POLLHUP and reads EOF at once:
            # wait for the host before starting a link.
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP)
            while not self.stopping.is_set():
                events = poller.poll(1000)
                if not any(ev & select.POLLHUP for _, ev in events):
                    break                          # connected: data, or nothing sent yet
                time.sleep(0.05)
            if self.stopping.is_set():
                os.close(fd)
                break
            ended = threading.Event()
            link = Link(fd, self.handle, self.notified, on_close=_setter(ended),
                        name=f"harness-{self.name}", workers=16)
            link.start()
            while not ended.wait(0.5) and not self.stopping.is_set():
                pass
            link.close()

    # --- requests ---

    def notified(self, link: Link, op: str, fields: dict[str, Any]) -> None:
        """The host sends no notifications; ignored."""

    def handle(self, link: Link, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        if op == "ping":
            return {"name": self.name, "uptime": _uptime(), "started": self.started,
                    "net": self.net, "net_error": self.net_error, "agent": self.agent_state,
                    "python": sys.executable}
        if op == "run":
            cmd, env, cwd = self._command(msg)
            timeout = _number(msg, "seconds")
            try:
                child = _Child(cmd, env, cwd)
            except OSError as exc:              # as a shell reports a command it cannot run
                text = f"vmharness: cannot run {cmd[0]}: {exc.strerror or exc}\n"
                return {"rc": 127, "out": b64(text.encode()), "timed_out": False, "dropped": 0}
            rc = child.finish(timeout)
            timed_out = rc is None
            if rc is None:
                child.signal(signal.SIGKILL)
                rc = child.finish(10)
            out, dropped = child.output()
            if timed_out:
                out += f"\n[vmharness] timed out after {timeout:g} s: killed\n".encode()
            return {"rc": -9 if rc is None else rc, "out": b64(out), "timed_out": timed_out,
                    "dropped": dropped}
        if op == "spawn":
            cmd, env, cwd = self._command(msg)
            try:
                child = _Child(cmd, env, cwd)
            except OSError as exc:
                raise IsmError(f"cannot start {cmd[0]}: {exc.strerror or exc}") from None
            with self.lock:
                self.next_handle += 1
                self.children[self.next_handle] = child
                return {"handle": self.next_handle}
        if op == "wait":
            handle = self._handle(msg)
            with self.lock:
                waited = self.children.get(handle)
            if waited is None:
                raise UnknownToken(f"no spawned command {handle} (already waited for?)")
            rc = waited.finish(_number(msg, "seconds"))
            out, dropped = waited.output()
            if rc is not None:
                with self.lock:
                    self.children.pop(handle, None)
            return {"done": rc is not None, "rc": rc, "out": b64(out), "dropped": dropped}
        if op == "kill":
            handle = self._handle(msg)
            sig = msg.get("signal", int(signal.SIGTERM))
            if type(sig) is not int or not 1 <= sig <= 64:
                raise DeviceProtocolError("signal must be an integer in [1, 64]")
            with self.lock:
                target = self.children.get(handle)
            if target is None:
                raise UnknownToken(f"no spawned command {handle}")
            target.signal(sig)
            return {}
        if op == "agent":
            return {"state": self.agent_state,
                    "log": b64(_tail_text(AGENT_LOG, 64 << 10).encode())}
        if op == "poweroff":
            threading.Thread(target=self.poweroff, daemon=True, name="poweroff").start()
            return {}
        raise DeviceProtocolError(f"unknown request {op!r}")

    def _command(self, msg: dict[str, Any]) -> tuple[list[str], dict[str, str], str | None]:
        cmd = msg.get("cmd")
        if (not isinstance(cmd, list) or not cmd
                or not all(isinstance(a, str) and "\0" not in a for a in cmd)):
            raise DeviceProtocolError("cmd must be a non-empty list of strings")
        extra = msg.get("env") or {}
        if not isinstance(extra, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise DeviceProtocolError("env must map strings to strings")
        cwd = msg.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise DeviceProtocolError("cwd must be a string or null")
        env = dict(os.environ)
        env.update(extra)
        return cmd, env, cwd

    @staticmethod
    def _handle(msg: dict[str, Any]) -> int:
        handle = msg.get("handle")
        if type(handle) is not int:
            raise DeviceProtocolError("handle must be an integer")
        return handle

    def poweroff(self) -> None:
        """Stop what was started, flush, power off (sysrq; exiting the vng script as fallback)."""
        time.sleep(0.2)               # let the reply go out
        self.stopping.set()
        with self.lock:
            children = list(self.children.values())
        for child in children:
            child.signal(signal.SIGKILL)
        if self.agent is not None and self.agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.agent.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(3)
        os.sync()
        _gprint("powering off")
        try:
            with open("/proc/sys/kernel/sysrq", "w") as f:
                f.write("1")
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("o")
        except OSError as exc:
            _gprint(f"sysrq poweroff failed ({exc}); exiting the vng script instead")
        time.sleep(3)
        os._exit(0)


def _setter(event: threading.Event) -> Callable[[Link], None]:
    return lambda _link: event.set()


def _number(msg: dict[str, Any], name: str) -> float:
    value = msg.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 86400:
        raise DeviceProtocolError(f"{name} must be a number of seconds in [0, 86400]")
    return float(value)


def _tail_text(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"


def guest_main(argv: Sequence[str]) -> int:
    """``python -m ism_backend.vmharness guest-main``: run by vng inside each guest."""
    ap = argparse.ArgumentParser(prog="vmharness guest-main")
    ap.add_argument("--name", required=True)
    ap.add_argument("--ip", required=True, help="address/prefix, e.g. 10.77.0.1/24")
    ap.add_argument("--mac", required=True)
    ap.add_argument("--agent", action="store_true",
                    help=f"start {AGENT_MODULE} (also: VMHARNESS_AGENT=1)")
    ap.add_argument("--agent-arg", action="append", default=[])
    args = ap.parse_args(argv)
    agent = args.agent or os.environ.get("VMHARNESS_AGENT") == "1"
    main = GuestMain(args.name, args.ip, args.mac, agent, args.agent_arg)
    _gprint(f"guest-main {args.name} up ({sys.executable}, cwd {os.getcwd()})")
    main.setup_network()
    main.start_agent()
    try:
        main.serve()
    except Exception as exc:  # noqa: BLE001 - reported on the console, then the guest exits
        _gprint(f"harness port failed: {exc!r}")
        return 1
    return 0


# ============================================================================ host side: QMP

class Qmp:
    """A QMP client on a Unix socket; every read bounded. Events are kept for ``wait_event``."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(path)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise VmError(f"QMP {path}: cannot connect ({exc})") from None
                time.sleep(0.1)
        self.path = path
        self.sock = sock
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.broken = False
        self._read(deadline)               # the greeting
        self.cmd("qmp_capabilities")

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VmError(f"QMP {self.path}: no answer in time")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:
                raise VmError(f"QMP {self.path}: {exc}") from None
            if not data:
                raise VmError(f"QMP {self.path}: closed (QEMU gone?)")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise VmError(f"QMP {self.path}: not a JSON object: {line[:200]!r}")
        return obj

    def _event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        del self.events[:-1000]            # nobody waits for old ones

    def cmd(self, name: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Execute ``name``; its ``return``. Raises VmError with QEMU's error; after a timeout
        or a broken stream the client is ``broken`` (a late reply would pair with the next
        command): make a new one."""
        deadline = time.monotonic() + timeout
        with self.lock:
            if self.broken:
                raise VmError(f"QMP {self.path}: this client is broken: connect again")
            msg: dict[str, Any] = {"execute": name}
            if arguments:
                msg["arguments"] = arguments
            try:
                self.sock.sendall(json.dumps(msg).encode() + b"\n")
                while True:
                    reply = self._read(deadline)
                    if "event" in reply:
                        self._event(reply)
                    elif "error" in reply:
                        err = reply["error"]
                        raise VmError(f"QMP {name}: {err.get('class')}: {err.get('desc')}")
                    elif "return" in reply:
                        return reply["return"]
            except OSError as exc:
                self.broken = True
                self.close()
                raise VmError(f"QMP {self.path}: {exc}") from None
            except VmError as exc:
                if not str(exc).startswith(f"QMP {name}:"):
                    self.broken = True
                    self.close()
                raise

    def wait_event(self, name: str, timeout: float = 10.0,
                   data: dict[str, Any] | None = None) -> dict[str, Any]:
        """The next event ``name`` (whose data includes ``data``), bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for ev in self.events:
                    if ev.get("event") == name and all(
                            ev.get("data", {}).get(k) == v for k, v in (data or {}).items()):
                        self.events.remove(ev)
                        return ev
                try:
                    self._event(self._read(deadline))
                except VmError:
                    if time.monotonic() >= deadline:
                        raise VmError(f"QMP {self.path}: no {name} event within "
                                      f"{timeout:g} s") from None
                    raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ============================================================================ host side: watchdog

#: A process of its own (its own session) that outlives the harness: it reads ``+PGID`` lines
#: (process groups the harness created) and ``dPATH`` lines (directories it made) from a pipe
#: only the harness can write; ``q`` means the harness cleaned up itself. EOF without ``q`` (the
#: harness died, even by SIGKILL): SIGTERM to every group, SIGKILL two seconds later, then the
#: directories are removed. So no QEMU outlives a killed test run.
_WATCHDOG = """
import os, shutil, signal, sys, time
groups, dirs, buf = set(), [], b""
while True:
    data = os.read(0, 4096)
    if not data:
        break
    buf += data
    *lines, buf = buf.split(b"\\n")
    for line in lines:
        if line == b"q":
            sys.exit(0)
        if line.startswith(b"+"):
            groups.add(int(line[1:]))
        if line.startswith(b"d"):
            dirs.append(line[1:].decode())
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    time.sleep(2)
for path in dirs:
    shutil.rmtree(path, ignore_errors=True)
"""


class _Watchdog:
    """The harness side of ``_WATCHDOG``."""

    def __init__(self) -> None:
        read_end, self.fd = os.pipe()          # both close-on-exec: children never hold them
        try:
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG],
                                         stdin=read_end, stdout=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            os.close(read_end)

    def watch(self, pgid: int) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, f"+{pgid}\n".encode())

    def remove(self, path: str) -> None:
        if "\n" not in path:
            with contextlib.suppress(OSError):
                os.write(self.fd, f"d{path}\n".encode())

    def release(self) -> None:
        """The harness cleaned up: the watchdog exits without killing anything."""
        with contextlib.suppress(OSError):
            os.write(self.fd, b"q\n")
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# ============================================================================ host side: the pair

class _Guest:
    """Host-side state of one guest."""

    def __init__(self, name: str, work: str) -> None:
        self.name = name
        self.paths = {k: os.path.join(work, f"{name}.{k}")
                      for k in ("qmp", "hqmp", "chan", "hctl", "net", "pid", "log")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: Link | None = None
        self.qmp: Qmp | None = None
        self.qmp_lock = threading.Lock()
        self.killed = False
        self.qemu_seen = 0
        self.t_launch = 0.0
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    def qemu_pid(self) -> int | None:
        """QEMU's pid (its -pidfile), if that process is still QEMU running for this guest."""
        try:
            with open(self.paths["pid"]) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            return None
        return pid if self.paths["pid"].encode() in cmdline else None


class VmPair:
    """Two guests "a" and "b" (see the module docstring). Use as a context manager, or call
    ``start()`` and ``close()``.

    Args:
        kernel: the guest kernel (default: the newest /boot/vmlinuz-*).
        accel: "tcg" (default), "kvm", or "auto" (KVM only if ``kvm_works()``, else TCG).
        memory, cpus: per guest.
        ports: pcie-root-ports ismrp0.. per guest (one per concurrently plugged region).
        port_reserve: each port's pref64-reserve, bytes: the largest BAR it takes (a 512M BAR
            does not fit the default 256M: "can't assign; no space" in the guest).
        boot_timeout: seconds from launch to each guest's first answer.
        start_host: start ``python -m ism_backend.vmhost`` for the pair.
        quota: vmhost's ``--quota`` (bytes).
        host_args: more arguments for vmhost.
        agent: start ``python -m ism_backend.vmguest`` in each guest (``agent_args`` for it).
        guest_env: more environment for guest-main (and so for every guest command).
        keep: leave the work directory (logs, sockets) behind.
        uncompressed: boot the vmlinux extracted from ``kernel`` (see ``extract_vmlinux``).
        verbose: the guests' kernel console into their logs (vng --verbose).
    """

    def __init__(self, *, kernel: str | None = None, accel: str = "tcg", memory: str = "512M",
                 cpus: int = 1, ports: int = 12, port_reserve: int = 256 << 20,
                 boot_timeout: float = 120.0,
                 start_host: bool = False, quota: int = 256 << 20,
                 host_args: Sequence[str] = (), agent: bool = False,
                 agent_args: Sequence[str] = (), guest_env: dict[str, str] | None = None,
                 keep: bool = False, uncompressed: bool = True, verbose: bool = False) -> None:
        if accel not in ("tcg", "kvm", "auto"):
            raise ValueError("accel must be tcg, kvm or auto")
        self.kernel = kernel
        self.accel = accel
        self.memory = memory
        self.cpus = cpus
        self.ports = ports
        self.port_reserve = port_reserve
        self.boot_timeout = boot_timeout
        self.start_host = start_host
        self.quota = quota
        self.host_args = list(host_args)
        self.agent = agent
        self.agent_args = list(agent_args)
        self.guest_env = dict(guest_env or {})
        self.keep = keep
        self.uncompressed = uncompressed
        self.verbose = verbose
        self.boot_kernel = ""
        self.work = ""
        self.region_dir = ""
        self.guests: dict[str, _Guest] = {}
        self.host: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}
        self.accel_used = ""
        self.closed = False
        self._t0 = 0.0
        self._watchdog: _Watchdog | None = None

    # --- availability ---

    @staticmethod
    def available() -> tuple[bool, str]:
        """(True, "") if VMs can be booted here, else (False, why): see ``available()``."""
        return available()

    # --- starting ---

    def __enter__(self) -> VmPair:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def start(self, wait: bool = True) -> VmPair:
        """Launch both guests (and vmhost); with ``wait``, until both answer ``ping``."""
        ok, why = available()
        if not ok:
            raise VmError(f"cannot boot VMs here: {why}")
        self._t0 = time.monotonic()
        parent = tempfile.gettempdir()
        if len(parent) > 60 or hidden_in_guest(parent):
            parent = "/tmp"
        self.work = tempfile.mkdtemp(prefix="vmharness-", dir=parent)
        self.guests = {g: _Guest(g, self.work) for g in GUESTS}
        try:
            self._watchdog = _Watchdog()
            if not self.keep:
                self._watchdog.remove(self.work)
            self.kernel = self.kernel or find_kernel()
            assert self.kernel is not None
            self.boot_kernel = self.kernel
            vmlinux = os.path.join(self.work, "vmlinux")
            if self.uncompressed and extract_vmlinux(self.kernel, vmlinux):
                self.boot_kernel = vmlinux
            self.timings["kernel_s"] = round(time.monotonic() - self._t0, 2)
            self.accel_used = self._resolve_accel()
            for g in GUESTS:
                self._launch(g)
            self._wait_qemu()
            if self.start_host:
                self._launch_host()
            if wait:
                self.wait_ready()
        except BaseException:
            self.close(_failed=True)
            raise
        return self

    def _resolve_accel(self) -> str:
        if self.accel != "auto":
            return self.accel
        t = time.monotonic()
        works, why = kvm_works(self.kernel)
        self.timings["kvm_probe_s"] = round(time.monotonic() - t, 2)
        _say(f"accel auto: {'KVM' if works else 'TCG'} ({why})")
        return "kvm" if works else "tcg"

    def qemu_opts(self, name: str) -> list[str]:
        """The QEMU options vng adds for guest ``name``."""
        p = self.guests[name].paths
        other = self.guests[GUESTS[1 - GUESTS.index(name)]].paths
        opts = [
            "-pidfile", p["pid"],
            "-qmp", f"unix:{p['qmp']},server=on,wait=off",
            "-qmp", f"unix:{p['hqmp']},server=on,wait=off",
            "-netdev", (f"dgram,id=ismnet0,local.type=unix,local.path={p['net']},"
                        f"remote.type=unix,remote.path={other['net']}"),
            "-device", f"virtio-net-pci,netdev=ismnet0,mac={MACS[name]},romfile=",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=ismchan,path={p['chan']},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=ismchan,name={ISM_PORT}",
            "-chardev", f"socket,id=harnesschan,path={p['hctl']},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=harnesschan,name={HARNESS_PORT}",
        ]
        for n in range(self.ports):
            opts += ["-device", (f"pcie-root-port,id=ismrp{n},chassis={n + 10},slot={n + 10},"
                                 f"pref64-reserve={self.port_reserve},io-reserve=0")]
        for opt in opts:
            if any(c.isspace() or c in "'\"\\$`" for c in opt):
                raise VmError(f"vng passes QEMU options through a shell: {opt!r} cannot go")
        return opts

    def guest_script(self, name: str) -> str:
        """The shell command vng runs in guest ``name``."""
        env = {"PATH": os.path.dirname(sys.executable) + ":/usr/sbin:/usr/bin:/sbin:/bin",
               "PYTHONDONTWRITEBYTECODE": "1"}
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "SMCISH_TEST_INSTALLED", "LANG"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        env.update(self.guest_env)
        argv = [sys.executable, os.path.abspath(__file__), "guest-main", "--name", name,
                "--ip", f"{IPS[name]}/{PREFIX_LEN}", "--mac", MACS[name]]
        if self.agent:
            argv.append("--agent")
            argv += [f"--agent-arg={a}" for a in self.agent_args]
        script = (f"cd {shlex.quote(self._cwd())} && exec env "
                  + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " "
                  + shlex.join(argv))
        if len(base64.b64encode(script.encode())) > MAX_SCRIPT:
            raise VmError(f"the guest command is too long for the kernel command line "
                          f"({len(script)} characters): {script}")
        return script

    @staticmethod
    def _cwd() -> str:
        cwd = os.getcwd()
        return "/" if hidden_in_guest(cwd) else cwd

    def vng_command(self, name: str) -> list[str]:
        vng = find_vng()
        assert vng is not None and self.boot_kernel
        # root in the guest whoever runs the harness: modprobe, ip, PCI sysfs, sysrq
        cmd = [vng, "--run", self.boot_kernel, "--disable-microvm", "--memory", self.memory,
               "--cpus", str(self.cpus), "--name", f"ism-{name}", "--user", "root"]
        if self.accel_used == "tcg":
            cmd.append("--disable-kvm")
        if self.verbose:
            cmd.append("--verbose")
        cmd += ["--append", f"modprobe.blacklist={BLACKLIST}"]
        cmd.append("--qemu-opts=" + " ".join(self.qemu_opts(name)))
        return cmd + ["--", self.guest_script(name)]

    def _launch(self, name: str) -> None:
        guest = self.guests[name]
        cmd = self.vng_command(name)
        vng_dir = os.path.dirname(cmd[0])          # virtme-run, which vng runs through a shell
        env = dict(os.environ)
        env["PATH"] = vng_dir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        with open(guest.paths["log"], "wb") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            guest.t_launch = time.monotonic()
            guest.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, cwd=self._cwd(),
                                          start_new_session=True)
        if self._watchdog is not None:
            self._watchdog.watch(guest.proc.pid)

    def _wait_qemu(self, timeout: float = 60.0) -> None:
        """Until each QEMU runs and has made its sockets (vng builds an initramfs first)."""
        deadline = time.monotonic() + timeout
        for guest in self.guests.values():
            while True:
                assert guest.proc is not None
                pid = guest.qemu_pid()
                if pid is not None and all(
                        os.path.exists(guest.paths[k]) for k in ("qmp", "chan", "hctl")):
                    guest.qemu_seen = pid
                    guest.timings["qemu_s"] = round(time.monotonic() - guest.t_launch, 2)
                    break
                if guest.proc.poll() is not None:
                    raise VmError(f"guest {guest.name}: vng exited {guest.proc.returncode} "
                                  f"before QEMU was up:\n{self.log(guest.name)}")
                if time.monotonic() > deadline:
                    raise VmError(f"guest {guest.name}: QEMU not up after {timeout:.0f} s:\n"
                                  f"{self.log(guest.name)}")
                time.sleep(0.05)

    def _launch_host(self) -> None:
        self.region_dir = tempfile.mkdtemp(prefix="vmharness-regions-", dir="/dev/shm")
        if self._watchdog is not None:
            self._watchdog.remove(self.region_dir)
        cmd = [sys.executable, "-m", HOST_MODULE]
        for g in self.guests.values():
            cmd += ["--guest", f"{g.name},qmp={g.paths['qmp']},chan={g.paths['chan']}"]
        cmd += ["--dir", self.region_dir, "--quota", str(self.quota), "--ports", str(self.ports),
                "--port-reserve", str(self.port_reserve), "--status-socket", self.status_socket,
                *self.host_args]
        log_path = os.path.join(self.work, "vmhost.log")
        with open(log_path, "wb") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            self.host = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if self._watchdog is not None:
            self._watchdog.watch(self.host.pid)

    @property
    def status_socket(self) -> str:
        return os.path.join(self.work, "vmhost.status")

    def wait_ready(self, timeout: float | None = None) -> None:
        """Connect both harness ports and wait for each guest's ``ping`` (in parallel)."""
        bound = self.boot_timeout if timeout is None else timeout
        with concurrent.futures.ThreadPoolExecutor(len(self.guests)) as pool:
            futures = {g: pool.submit(self._connect, g, bound) for g in self.guests}
            errors = []
            for fut in futures.values():
                try:
                    fut.result()
                except VmError as exc:
                    errors.append(str(exc))
        if errors:
            raise VmError("\n\n".join(errors))
        for g, guest in self.guests.items():
            if guest.info.get("net_error"):
                raise VmError(f"guest {g}: network setup failed: {guest.info['net_error']}\n"
                              f"{self.log(g)}")
        if self.host is not None and self.host.poll() is not None:
            raise VmError(f"vmhost exited {self.host.returncode}:\n{self.host_log()}")
        if self.host is not None and self.agent:
            self._wait_agents(self._t0 + bound + 60.0)
        self.timings["ready_s"] = round(time.monotonic() - self._t0, 2)

    def _wait_agents(self, deadline: float) -> None:
        """Until vmhost's status says every guest's agent said hello (if it says so at all)."""
        while True:
            status = self.host_status()
            guests = status.get("guests") if isinstance(status, dict) else None
            if not isinstance(guests, list) or not all(
                    isinstance(g, dict) and "hello" in g for g in guests):
                return                       # a status without that information: no wait
            waiting = [str(g.get("name")) for g in guests if not g["hello"]]
            if not waiting:
                self.timings["agents_s"] = round(time.monotonic() - self._t0, 2)
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- agent in {n}: {self.agent_status(n)}" for n in waiting
                                  if n in self.guests)
                raise VmError(f"the agents of {', '.join(waiting)} did not say hello to vmhost "
                              f"in time:\n{logs}\n--- vmhost:\n{self.host_log(4000)}")
            if self.host is not None and self.host.poll() is not None:
                raise VmError(f"vmhost exited {self.host.returncode}:\n{self.host_log()}")
            time.sleep(0.2)

    def _connect(self, name: str, bound: float) -> None:
        guest = self.guests[name]
        deadline = guest.t_launch + bound
        while guest.link is None:
            self._check_alive(guest)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(guest.paths["hctl"])
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise VmError(f"guest {name}: harness socket not connectable in "
                                  f"{bound:.0f} s:\n{self.log(name)}") from None
                time.sleep(0.1)
                continue
            guest.link = Link(sock.detach(), _refuse, _ignore, name=f"harness-host-{name}")
            guest.link.start()
        while True:
            self._check_alive(guest)
            left = deadline - time.monotonic()
            if left <= 0:
                raise VmError(f"guest {name}: no answer to ping within {bound:.0f} s of its "
                              f"launch:\n{self.log(name)}")
            try:
                guest.info = guest.link.call("ping", min(2.0, left))
                break
            except LinkClosed as exc:
                raise VmError(f"guest {name}: harness link closed ({exc}):\n"
                              f"{self.log(name)}") from None
            except DeviceGone:
                continue
        guest.timings["first_command_s"] = round(time.monotonic() - guest.t_launch, 2)
        guest.timings["guest_main_uptime_s"] = round(float(guest.info.get("started", -1)), 2)

    def _check_alive(self, guest: _Guest) -> None:
        assert guest.proc is not None
        if guest.proc.poll() is not None:
            raise VmError(f"guest {guest.name}: vng exited {guest.proc.returncode}:\n"
                          f"{self.log(guest.name)}")

    # --- logs and state ---

    def log(self, name: str, limit: int = 12000) -> str:
        """The tail of guest ``name``'s vng/console/guest-main output."""
        if name not in self.guests:
            return ""
        return _tail_text(self.guests[name].paths["log"], limit)

    def host_log(self, limit: int = 12000) -> str:
        return _tail_text(os.path.join(self.work, "vmhost.log"), limit)

    def paths(self, name: str) -> dict[str, str]:
        """The guest's sockets and files: qmp (vmhost's), hqmp (the harness's), chan, hctl,
        net, pid, log."""
        return dict(self.guests[name].paths)

    def ip(self, name: str) -> str:
        return IPS[name]

    def boot_report(self) -> str:
        """Boot timings, one line per guest."""
        lines = [f"accel {self.accel_used or self.accel}, kernel {self.boot_kernel} "
                 f"(prepared in {self.timings.get('kernel_s', '?')} s)"]
        for g, guest in self.guests.items():
            t = guest.timings
            lines.append(f"guest {g}: QEMU up after {t.get('qemu_s', '?')} s, first command "
                         f"after {t.get('first_command_s', '?')} s (guest-main started at guest "
                         f"uptime {t.get('guest_main_uptime_s', '?')} s)")
        if "agents_s" in self.timings:
            lines.append(f"agents linked to vmhost after {self.timings['agents_s']} s")
        if "ready_s" in self.timings:
            lines.append(f"both ready after {self.timings['ready_s']} s")
        return "\n".join(lines)

    # --- driving the guests ---

    def _link(self, name: str) -> Link:
        if self.closed:
            raise VmError("the pair is closed")
        guest = self.guests.get(name)
        if guest is None:
            raise VmError(f"no guest {name!r} (guests: {', '.join(self.guests)})")
        if guest.killed or guest.link is None or guest.link.closed:
            raise VmError(f"guest {name} is not reachable"
                          + (" (killed)" if guest.killed else ""))
        return guest.link

    def _call(self, name: str, op: str, call_timeout: float, /,
              **fields: Any) -> dict[str, Any]:
        try:
            return self._link(name).call(op, call_timeout, **fields)
        except IsmError as exc:
            guest = self.guests[name]
            alive = guest.qemu_pid() is not None
            raise VmError(f"guest {name}: {op} failed: {type(exc).__name__}: {exc}"
                          + ("" if alive else f" (its QEMU is gone)\n{self.log(name, 4000)}")
                          ) from None

    @staticmethod
    def _argv(cmd: str | Sequence[str]) -> list[str]:
        return ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]

    def run(self, name: str, cmd: str | Sequence[str], timeout: float = 60.0,
            env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[int, str]:
        """Run ``cmd`` (a list, or a string for ``sh -c``) in guest ``name``; (exit status,
        stdout+stderr). A command still running after ``timeout`` is killed: rc -9."""
        reply = self._call(name, "run", timeout + CALL_MARGIN, cmd=self._argv(cmd),
                           env=env or {}, seconds=timeout, cwd=cwd)
        return int(reply["rc"]), _text(reply)

    def run_both(self, cmd_a: str | Sequence[str], cmd_b: str | Sequence[str],
                 timeout: float = 60.0, env: dict[str, str] | None = None
                 ) -> tuple[tuple[int, str], tuple[int, str]]:
        """``cmd_a`` in a and ``cmd_b`` in b at the same time; both results."""
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fa = pool.submit(self.run, "a", cmd_a, timeout, env)
            fb = pool.submit(self.run, "b", cmd_b, timeout, env)
            return fa.result(), fb.result()

    def spawn(self, name: str, cmd: str | Sequence[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> int:
        """Start ``cmd`` in the background in guest ``name``; a handle for ``wait``/``kill``."""
        reply = self._call(name, "spawn", CALL_MARGIN, cmd=self._argv(cmd), env=env or {},
                           cwd=cwd)
        return int(reply["handle"])

    def wait(self, name: str, handle: int, timeout: float = 60.0) -> tuple[int | None, str]:
        """(exit status, output) of a spawned command; status None if it still runs after
        ``timeout`` (it may be waited for again; once finished, the handle is forgotten)."""
        reply = self._call(name, "wait", timeout + CALL_MARGIN, handle=handle, seconds=timeout)
        rc = reply.get("rc")
        return (None if rc is None else int(rc)), _text(reply)

    def kill(self, name: str, handle: int, sig: int = signal.SIGTERM) -> None:
        """Signal a spawned command's process group."""
        self._call(name, "kill", CALL_MARGIN, handle=handle, signal=int(sig))

    def agent_status(self, name: str) -> tuple[str, str]:
        """(the agent's state, the tail of its log) in guest ``name``."""
        reply = self._call(name, "agent", CALL_MARGIN)
        return str(reply["state"]), unb64(reply["log"]).decode(errors="replace")

    def qmp(self, name: str, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """A QMP command on guest ``name``'s harness monitor; its return value."""
        return self._qmp(name).cmd(command, timeout, **arguments)

    def _qmp(self, name: str) -> Qmp:
        guest = self.guests[name]
        with guest.qmp_lock:
            if guest.qmp is None or guest.qmp.broken:
                guest.qmp = Qmp(guest.paths["hqmp"])
            return guest.qmp

    def qmp_event(self, name: str, event: str, timeout: float = 10.0,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait (bounded) for a QMP event on guest ``name``'s harness monitor."""
        return self._qmp(name).wait_event(event, timeout, data)

    def host_status(self, timeout: float = 10.0) -> Any:
        """vmhost's status: the JSON it writes on its status socket (read to EOF, bounded)."""
        if self.host is None:
            raise VmError("vmhost was not started (start_host=True)")
        deadline = time.monotonic() + timeout
        data = b""
        while True:                        # vmhost makes the socket once it runs: retry a while
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.status_socket)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline or self.host.poll() is not None:
                    raise VmError(f"vmhost status socket {self.status_socket}: {exc}\n"
                                  f"{self.host_log(4000)}") from None
                time.sleep(0.1)
        try:
            while time.monotonic() < deadline:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise VmError(f"vmhost status socket {self.status_socket}: {exc}\n"
                          f"{self.host_log(4000)}") from None
        finally:
            sock.close()
        try:
            return json.loads(data)
        except ValueError:
            raise VmError(f"vmhost status is not JSON: {data[:400]!r}") from None

    def kill_guest(self, name: str, timeout: float = 15.0) -> None:
        """SIGKILL guest ``name``'s QEMU (the other guest and vmhost stay); bounded wait for it."""
        guest = self.guests[name]
        guest.killed = True
        pid = guest.qemu_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if guest.proc is not None:
            try:
                guest.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(guest.proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    guest.proc.wait(5)
        if guest.link is not None:
            guest.link.close()
        if guest.qmp is not None:
            guest.qmp.close()
            guest.qmp = None

    # --- teardown ---

    def close(self, _failed: bool = False) -> None:
        """Tear down everything started: power the guests off (bounded), then SIGTERM/SIGKILL
        what is left of their process groups, vmhost by SIGTERM (SIGKILL after 5 s), the
        region and work directories (the latter kept with ``keep``). Idempotent."""
        if self.closed:
            return
        self.closed = True
        live = [g for g in self.guests.values()
                if g.proc is not None and g.proc.poll() is None and not g.killed]
        told = []
        for guest in live:
            if guest.link is not None and not guest.link.closed:
                with contextlib.suppress(IsmError):
                    guest.link.call("poweroff", 5.0)
                    told.append(guest)
        deadline = time.monotonic() + 20.0
        for guest in told:
            assert guest.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                guest.proc.wait(max(0.1, deadline - time.monotonic()))
        for guest in self.guests.values():
            if guest.proc is not None:
                _stop_group(guest.proc)
            pid = guest.qemu_pid()          # QEMU outside the group (should never happen)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if guest.link is not None:
                guest.link.close()
            if guest.qmp is not None:
                guest.qmp.close()
        if self.host is not None:
            _stop_group(self.host)
        if self._watchdog is not None:
            self._watchdog.release()
        if self.region_dir:
            shutil.rmtree(self.region_dir, ignore_errors=True)
        if self.work:
            if self.keep or _failed:
                _say(f"work directory kept: {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)

    def qemu_pids(self) -> dict[str, int | None]:
        """Each guest's QEMU pid, None once it is gone."""
        return {g: guest.qemu_pid() for g, guest in self.guests.items()}

    def leftovers(self, timeout: float = 10.0) -> list[int]:
        """Processes of this pair still alive (after ``close()``: should be none): the QEMUs
        and vng processes it started, vmhost, anything naming its work directory. Polls until
        there are none or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            pids = {g.qemu_seen for g in self.guests.values() if g.qemu_seen}
            pids |= {g.proc.pid for g in self.guests.values() if g.proc is not None}
            if self.host is not None:
                pids.add(self.host.pid)
            alive = {pid for pid in pids if _running(pid)}
            if self.work:
                needle = self.work.encode()
                for entry in os.listdir("/proc"):
                    if entry.isdigit():
                        try:
                            with open(f"/proc/{entry}/cmdline", "rb") as f:
                                if needle in f.read() and _running(int(entry)):
                                    alive.add(int(entry))
                        except OSError:
                            pass
            if not alive or time.monotonic() > deadline:
                return sorted(alive)
            time.sleep(0.1)


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)       # the session/group created for it (start_new_session)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group started for ``proc``, SIGKILL after ``grace``; bounded."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is None or _group_alive(proc.pid):
            _killpg(proc, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.05)
                if proc.poll() is not None and not _group_alive(proc.pid):
                    return
                time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)


def _text(reply: dict[str, Any]) -> str:
    out = unb64(reply.get("out", ""), limit=OUT_LIMIT + 4096).decode(errors="replace")
    dropped = reply.get("dropped", 0)
    if dropped:
        out = f"[vmharness: first {dropped} bytes of output dropped]\n" + out
    return out


def _refuse(link: Link, op: str, msg: dict[str, Any]) -> dict[str, Any]:
    raise DeviceProtocolError(f"the harness host answers no requests ({op})")


def _ignore(link: Link, op: str, msg: dict[str, Any]) -> None:
    pass


# ============================================================================ CLI

def _pair_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--accel", choices=("tcg", "kvm", "auto"), default="tcg")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--ports", type=int, default=12)
    ap.add_argument("--boot-timeout", type=float, default=120.0)
    ap.add_argument("--kernel")
    ap.add_argument("--host", action="store_true", help=f"start {HOST_MODULE}")
    ap.add_argument("--agent", action="store_true", help=f"start {AGENT_MODULE} in the guests")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--verbose", action="store_true", help="kernel console into the logs")


def _make_pair(args: argparse.Namespace) -> VmPair:
    return VmPair(kernel=args.kernel, accel=args.accel, memory=args.memory, cpus=args.cpus,
                  ports=args.ports, boot_timeout=args.boot_timeout, start_host=args.host,
                  agent=args.agent, keep=args.keep, verbose=args.verbose)


@contextlib.contextmanager
def _ctl_server(pair: VmPair) -> Iterator[str]:
    """A Unix socket in the work dir forwarding ``run`` requests (``exec`` subcommand)."""
    path = os.path.join(pair.work, "ctl")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    stop = threading.Event()

    def handle(link: Link, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        if op != "run":
            raise DeviceProtocolError(f"unknown request {op!r}")
        guest, cmd, timeout = msg.get("guest"), msg.get("cmd"), msg.get("seconds", 60)
        if (not isinstance(guest, str) or not isinstance(cmd, list)
                or not all(isinstance(a, str) for a in cmd)
                or type(timeout) not in (int, float)):
            raise DeviceProtocolError("run needs guest (str), cmd (list of str), seconds")
        try:
            rc, out = pair.run(guest, cmd, float(timeout))
        except VmError as exc:
            raise DeviceGone(str(exc)) from None
        return {"rc": rc, "out": b64(out.encode()[-OUT_LIMIT:])}

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            Link(conn.detach(), handle, _ignore, name="ctl").start()

    threading.Thread(target=accept, daemon=True, name="ctl-accept").start()
    try:
        yield path
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)
        server.close()


def _cmd_up(args: argparse.Namespace) -> int:
    pair = _make_pair(args)
    with pair:
        _say(pair.boot_report())
        with _ctl_server(pair):
            me = f"{sys.executable} -m ism_backend.vmharness"
            _say(f"work directory {pair.work}\n"
                 f"  run a command:  {me} exec --work {pair.work} a -- uname -a\n"
                 f"  guests: a {IPS['a']}, b {IPS['b']}; QMP (free unless --host): "
                 f"{pair.paths('a')['qmp']}, {pair.paths('b')['qmp']}\n"
                 f"  logs: {pair.paths('a')['log']}, {pair.paths('b')['log']}\n"
                 "Ctrl-C (or SIGTERM) tears everything down.")
            # The signals only wake the loop below (through the wake-up fd): a handler that
            # took a lock (Event.set) could deadlock against the code it interrupted.
            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            old_wakeup = signal.set_wakeup_fd(wake_w)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, lambda _signum, _frame: None)
            try:
                while not select.select([wake_r], [], [], 0.5)[0]:
                    if not all(g.proc is not None and g.proc.poll() is None
                               for g in pair.guests.values()):
                        _say("a guest exited")
                        break
            finally:
                signal.set_wakeup_fd(old_wakeup)
                os.close(wake_r)
                os.close(wake_w)
            _say("tearing down")
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.path.join(args.work, "ctl"))
    link = Link(sock.detach(), _refuse, _ignore, name="exec")
    link.start()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        reply = link.call("run", args.timeout + CALL_MARGIN, guest=args.guest, cmd=cmd,
                          seconds=args.timeout)
    except IsmError as exc:
        _say(f"failed: {exc}")
        return 2
    finally:
        link.close()
    sys.stdout.write(unb64(reply["out"]).decode(errors="replace"))
    return int(reply["rc"]) & 0xFF


def _cmd_run(args: argparse.Namespace) -> int:
    pair = _make_pair(args)
    t0 = time.monotonic()
    with pair:
        _say(pair.boot_report())
        t = time.monotonic()
        (rc_a, out_a), (rc_b, out_b) = pair.run_both(args.a, args.b, args.timeout)
        ran = time.monotonic() - t
        for g, rc, out in (("a", rc_a, out_a), ("b", rc_b, out_b)):
            print(f"===== guest {g}: exit {rc}\n{out}", end="" if out.endswith("\n") else "\n")
    _say(f"commands took {ran:.2f} s; total with boot and teardown {time.monotonic() - t0:.2f} s")
    return 0 if rc_a == 0 and rc_b == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["guest-main"]:
        return guest_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m ism_backend.vmharness",
                                 description="Two QEMU guests for smcish between VMs.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="can VMs be booted here?")
    probe = sub.add_parser("probe-kvm", help="does KVM boot a kernel here?")
    probe.add_argument("--timeout", type=float, default=10.0)
    up = sub.add_parser("up", help="boot, serve exec, wait for Ctrl-C")
    _pair_args(up)
    run = sub.add_parser("run", help="boot, run --a and --b, tear down")
    _pair_args(run)
    run.add_argument("--a", required=True, help="shell command for guest a")
    run.add_argument("--b", required=True, help="shell command for guest b")
    run.add_argument("--timeout", type=float, default=120.0)
    ex = sub.add_parser("exec", help="a command in a guest of a running `up`")
    ex.add_argument("--work", required=True)
    ex.add_argument("--timeout", type=float, default=120.0)
    ex.add_argument("guest", choices=GUESTS)
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("guest-main", help="(inside a guest; started by vng)")
    args = ap.parse_args(argv)
    if args.command == "check":
        ok, why = available()
        print("ok" if ok else f"unavailable: {why}")
        return 0 if ok else 1
    if args.command == "probe-kvm":
        t = time.monotonic()
        works, why = kvm_works(timeout=args.timeout)
        print(f"KVM {'works' if works else 'does not work'}: {why} "
              f"({time.monotonic() - t:.2f} s)")
        return 0 if works else 1
    try:
        if args.command == "up":
            return _cmd_up(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "exec":
            return _cmd_exec(args)
    except VmError as exc:
        _say(f"error: {exc}")
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
