"""Device costs, embedded and ismd: regions (alloc/free, attach/detach), socket-bound discovery
(advertise/withdraw, find_listener, the kernel oracle), and peer messaging round trips.

Run from the repo: ``python benchmarks/bench_device.py [--quick]`` (uses the test helpers in
tests/device_helpers.py: the peer is a real separate process). Each figure is the median of 5
runs of n calls, in microseconds per call; docs/device.md section 8 records a run.
"""

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
sys.path.insert(0, _ROOT)
from device_helpers import Agent, Ismd, child_env, short_tmpdir  # type: ignore[import-not-found]  # noqa: E402
from ism_backend import sockets  # noqa: E402
from ism_backend.client import DaemonDevice  # noqa: E402
from ism_backend.contract import PeerInfo  # noqa: E402
from ism_backend.embedded import EmbeddedDevice  # noqa: E402

SIZE = 512 + 65536
HUB = bytes(range(16))
GROUP = b"G" * 16


def per_call(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


class Echo:
    def handle(self, peer: PeerInfo, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {}


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def bench_oracle(scale: float) -> dict[str, float]:
    lsock = listener()
    port = lsock.getsockname()[1]
    diag = sockets.diag()
    n = int(5000 * scale)
    out = {
        "Diag.lookup hit (LISTEN)": per_call(
            lambda: diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 40000)), n),
        "Diag.lookup miss": per_call(
            lambda: diag.lookup(socket.AF_INET, ("127.0.0.1", 1), ("127.0.0.1", 40000)), n),
        "Diag.is_local": per_call(lambda: diag.is_local("127.0.0.1"), n),
        "route_source (UDP connect probe)": per_call(
            lambda: sockets.route_source(socket.AF_INET, "127.0.0.1"), n // 5),
    }
    lsock.close()
    return out


Device = EmbeddedDevice | DaemonDevice


def bench(dev: Device, fresh_dev: Device, agent: Any, scale: float) -> dict[str, float]:
    region = dev.alloc(SIZE)
    dev.free(region)
    out: dict[str, float] = {}
    out["alloc+free (pool)"] = per_call(lambda: dev.free(dev.alloc(SIZE)), int(500 * scale))
    out["alloc+free (fresh memfd)"] = per_call(lambda: fresh_dev.free(fresh_dev.alloc(SIZE)),
                                               int(300 * scale))
    n = int(200 * scale)
    infos = iter(agent.call("alloc_many", size=SIZE, n=5 * n))
    views = []

    def attach() -> None:
        token, ep = next(infos)
        views.append(dev.attach(bytes.fromhex(token), bytes.fromhex(ep)))

    out["attach (owner in another process)"] = per_call(attach, n)
    it = iter(views)
    out["detach"] = per_call(lambda: dev.detach(next(it)), n)

    def own_cycle() -> None:
        r = dev.alloc(SIZE)
        v = dev.attach(r.token, dev.endpoint_id)
        dev.detach(v)
        dev.free(r)

    out["alloc+attach+detach+free (own region)"] = per_call(own_cycle, int(300 * scale))

    lsock = listener()
    inode = sockets.socket_inode(lsock)
    out["advertise+withdraw"] = per_call(lambda: dev.withdraw(dev.advertise(lsock, HUB)),
                                         int(300 * scale))
    handle = dev.advertise(lsock, HUB)
    out["find_listener hit"] = per_call(lambda: dev.find_listener(inode), int(2000 * scale))
    out["find_listener miss"] = per_call(lambda: dev.find_listener(inode + 7919),
                                         int(2000 * scale))
    dev.withdraw(handle)
    lsock.close()

    peer_ep = bytes.fromhex(agent.call("open")["endpoint"])
    agent.call("set_handler", mode="echo")
    # the channel exists from here on
    dev.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
    out["peer_request round trip (group_close)"] = per_call(
        lambda: dev.peer_request(peer_ep, "group_close", group_id=GROUP, side="server"),
        int(500 * scale))
    dev.set_endpoint_handler(Echo())
    out["peer_request to ourselves"] = per_call(
        lambda: dev.peer_request(dev.endpoint_id, "group_close", group_id=GROUP, side="server"),
        int(500 * scale))
    out["peer_alive"] = per_call(lambda: dev.peer_alive(peer_ep), int(2000 * scale))

    def first_contact() -> None:
        other: Device = type(dev)(dev.dir) if isinstance(dev, EmbeddedDevice) else DaemonDevice(dev.path)
        try:
            other.peer_request(peer_ep, "group_close", group_id=GROUP, side="server")
        finally:
            other.close()

    out["open device + first peer_request + close"] = per_call(first_contact,
                                                               max(5, int(30 * scale)))
    return out


def report(label: str, results: dict[str, float]) -> None:
    print(f"== {label}")
    for name, value in results.items():
        print(f"  {name:45s} {value:9.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the iterations")
    scale = 0.1 if parser.parse_args().quick else 1.0
    report("kernel oracle (this thread's Diag)", bench_oracle(scale))
    rt = short_tmpdir()
    try:
        env = child_env(SMCISH_RUNTIME_DIR=rt, SMCISH_DEVICE="embedded")
        dev: Device = EmbeddedDevice(rt)
        fresh: Device = EmbeddedDevice(rt, pool_per_size=0)
        with Agent(env=env) as agent:
            report(f"embedded (runtime dir {rt})", bench(dev, fresh, agent, scale))
        dev.close()
        fresh.close()
        daemon = Ismd("--total-memory", "4G", "--quota", "4G")
        try:
            dev = DaemonDevice(daemon.path)
            fresh = DaemonDevice(daemon.path, pool_per_size=0)
            with Agent(env=child_env(SMCISH_DEVICE=daemon.spec)) as agent:
                report("ismd", bench(dev, fresh, agent, scale))
            dev.close()
            fresh.close()
        finally:
            daemon.stop()
            shutil.rmtree(daemon.dir, ignore_errors=True)
    finally:
        shutil.rmtree(rt, ignore_errors=True)


if __name__ == "__main__":
    main()
