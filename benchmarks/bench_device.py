"""Device costs: alloc (pool / fresh), cross-process attach round trip, lookup, claim.

Run from the repo: python benchmarks/bench_device.py (uses the test helpers in tests/device_helpers.py).
"""
import os
import shutil
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
sys.path.insert(0, _ROOT)
from device_helpers import Agent, Ismd, child_env, short_tmpdir  # noqa: E402
from ism_backend.client import DaemonDevice  # noqa: E402
from ism_backend.embedded import EmbeddedDevice  # noqa: E402

SIZE = 512 + 65536


def per_call(fn, n):
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(samples)


def bench(dev, fresh_dev, agent, label):
    region = dev.alloc(SIZE)
    dev.free(region)
    out = {}
    out["alloc+free (pool)"] = per_call(lambda: dev.free(dev.alloc(SIZE)), 500)
    out["alloc+free (fresh memfd)"] = per_call(lambda: fresh_dev.free(fresh_dev.alloc(SIZE)), 300)
    n = 200
    infos = agent.call("alloc_many", size=SIZE, n=5 * n)
    it = iter(infos)
    views = []

    def attach():
        token, ep = next(it)
        views.append(dev.attach(bytes.fromhex(token), bytes.fromhex(ep)))
    out["attach (cross-process)"] = per_call(attach, n)
    it2 = iter(views)
    out["detach"] = per_call(lambda: dev.detach(next(it2)), n)
    h = dev.advertise("0.0.0.0", 5555)
    out["lookup hit"] = per_call(lambda: dev.lookup("127.0.0.1", 5555), 2000)
    out["lookup miss"] = per_call(lambda: dev.lookup("127.0.0.1", 5556), 2000)
    dev.withdraw(h)
    out["claim(client)+release"] = per_call(
        lambda: dev.release_claim(dev.claim(40000, "127.0.0.1", 5555, "client")), 500)
    out["claim(server) seeing client"] = 0.0
    c = dev.claim(40001, "127.0.0.1", 5555, "client")
    out["claim(server) seeing client"] = per_call(
        lambda: dev.claim(40001, "127.0.0.1", 5555, "server"), 1000)
    dev.release_claim(c)

    def cycle():
        r = dev.alloc(SIZE)
        v = dev.attach(r.token, dev.endpoint_id)
        dev.detach(v)
        dev.free(r)
    out["alloc+attach+detach+free (same process)"] = per_call(cycle, 300)
    print(f"== {label}")
    for k, v in out.items():
        print(f"  {k:45s} {v:9.1f} us")


def main():
    rt = short_tmpdir()
    try:
        env = child_env(SMCISH_RUNTIME_DIR=rt, SMCISH_DEVICE="embedded")
        dev = EmbeddedDevice(rt)
        fresh = EmbeddedDevice(rt, pool_per_size=0)
        with Agent(env=env) as agent:
            bench(dev, fresh, agent, f"embedded (runtime dir {rt})")
        dev.close()
        fresh.close()
        daemon = Ismd("--total-memory", "4G", "--quota", "4G")
        try:
            dev = DaemonDevice(daemon.path)
            fresh = DaemonDevice(daemon.path, pool_per_size=0)
            with Agent(env=child_env(SMCISH_DEVICE=daemon.spec)) as agent:
                bench(dev, fresh, agent, "ismd")
            dev.close()
            fresh.close()
        finally:
            daemon.stop()
            shutil.rmtree(daemon.dir, ignore_errors=True)
    finally:
        shutil.rmtree(rt, ignore_errors=True)


if __name__ == "__main__":
    main()
