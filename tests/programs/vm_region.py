"""Read-only enforcement between guests (tests/vm). Runs as root in a guest; JSON on stdout.

    python vm_region.py own DIR      allocate a region, fill it, write its token to DIR/token,
                                     wait for DIR/done (60 s bound), report whether it changed
    python vm_region.py poke TOKEN   attach it through the device (the host plugs it read-only
                                     here), then try to write it: through the device's mapping,
                                     and as root through a writable mapping of the PCI BAR itself
    python vm_region.py hog HOST PORT  hold regions until the device refuses (quota or ports),
                                     then connect to an smcish echo server: report its path
"""

import glob
import json
import mmap
import os
import sys
import time

import ism_backend

SIZE = (1 << 20) - 4096
HEADER = 4096
MAGIC = b"ISMREG1\0"


def fill(n):
    return bytes((i * 7 + 3) & 0xFF for i in range(256)) * (n // 256) + b"\x5a" * (n % 256)


def own(directory):
    device = ism_backend.get_device()
    region = device.alloc(SIZE)
    expect = fill(SIZE)
    region.mem[:SIZE] = expect
    with open(os.path.join(directory, "token.tmp"), "w") as fh:
        fh.write(region.token.hex())
    os.replace(os.path.join(directory, "token.tmp"), os.path.join(directory, "token"))
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(directory, "done")) and time.monotonic() < deadline:
        time.sleep(0.05)
    unchanged = bytes(region.mem[:SIZE]) == expect
    print(json.dumps({"unchanged": unchanged, "device": device.kind,
                      "geometry": getattr(device, "geometry", None)}), flush=True)
    device.free(region)
    return 0 if unchanged else 1


def bar_of(token):
    for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
        try:
            with open(dev + "/vendor") as v, open(dev + "/device") as d:
                if (v.read().strip(), d.read().strip()) != ("0x1af4", "0x1110"):
                    continue
            fd = os.open(dev + "/resource2", os.O_RDONLY)
        except OSError:
            continue
        try:
            with mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                if m[:8] == MAGIC and m[8:24] == token:
                    return dev + "/resource2"
        finally:
            os.close(fd)
    return None


def poke(token_hex):
    token = bytes.fromhex(token_hex)
    device = ism_backend.get_device()
    region = device.attach(token, bytes(16))
    before = bytes(region.mem[:4096])
    try:
        region.mem[:16] = b"\xff" * 16
        device_mapping_writable = True
    except TypeError:
        device_mapping_writable = False
    path = bar_of(token)
    wrote = False
    if path is not None:
        fd = os.open(path, os.O_RDWR)       # root in this guest: the kernel lets us
        try:
            with mmap.mmap(fd, HEADER + 4096, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[HEADER:HEADER + 4096] = b"\xee" * 4096
                wrote = True
        finally:
            os.close(fd)
    after = bytes(region.mem[:4096])
    print(json.dumps({"found_bar": path is not None, "wrote": wrote,
                      "device_mapping_writable": device_mapping_writable,
                      "visible_change": after != before}), flush=True)
    device.detach(region)
    return 0


def hog(host, port):
    import asyncio

    import smcish

    device = ism_backend.get_device()
    held, refusal = [], None
    for _ in range(64):
        try:
            held.append(device.alloc((4 << 20) - 4096))
        except ism_backend.QuotaExceeded as exc:
            refusal = str(exc)
            break

    async def connect():
        reader, writer = await smcish.open_connection(host, port)
        info = writer.get_extra_info("smcish")
        writer.write(b"x" * 1000)
        echoed = await reader.readexactly(1000)
        writer.close()
        await writer.wait_closed()
        return info.mode, getattr(info.reason, "name", None), echoed == b"x" * 1000

    mode, reason, ok = asyncio.run(connect())
    print(json.dumps({"held": len(held), "refusal": refusal, "mode": mode, "reason": reason,
                      "echo_ok": ok}), flush=True)
    for region in held:
        device.free(region)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "own":
        sys.exit(own(sys.argv[2]))
    if sys.argv[1] == "hog":
        sys.exit(hog(sys.argv[2], int(sys.argv[3])))
    sys.exit(poke(sys.argv[2]))
