"""loop.sendfile of a 256 MiB file: smcish's pread-into-the-ring against Python chunk loops and sendfile(2).

    python -m benchmarks.sendfile                          # every configuration, 3 timed rounds
    python -m benchmarks.sendfile --size 32M --rounds 1    # a quick look
    python -m benchmarks.sendfile --out results.json       # default: bench-results/sendfile-<UTC time>.json

A file of random bytes (256 MiB by default) is written once to a temporary directory (so its pages are
in the page cache) and sent whole, per measurement, over one fresh connection from a sender process to a
receiver process, which counts the bytes in an ``asyncio.BufferedProtocol`` (reused 256 KiB buffer).
The receiver greets first (as a client sends its request), then the sender writes an 8-byte header
(as an HTTP server writes its headers), then:

- ``smcish-sendfile`` (asyncio, uvloop): ``loop.sendfile()`` on a shared-memory connection, which smcish
  turns into ``pread(2)`` straight into the ring, in C;
- ``smcish-chunks`` (asyncio, uvloop), ``tcp-chunks`` (asyncio, uvloop): a Python chunk loop, what asyncio's
  ``sendfile`` fallback does but with 256 KiB chunks: ``file.read(256 KiB)`` in the loop's default executor,
  wait while the transport is paused (drain-equivalent), ``transport.write`` the chunk (a fresh ``bytes``
  per chunk: uvloop does not snapshot a reused ``readinto`` buffer it could not send at once);
- ``smcish-stdlib-fallback`` (asyncio): asyncio's own fallback, ``loop._sendfile_fallback(transport, f, 0,
  None)``, as is (Python 3.11 reads 16 KiB per executor call there, hard-coded);
- ``tcp-sendfile`` (asyncio): ``loop.sendfile()`` on plain TCP, the kernel's ``sendfile(2)``;
- ``smcish-fallback-sendfile`` (asyncio): smcish forced to TCP (``device="none"`` on both sides); its
  ``loop.sendfile()`` must be the loop's own on the TCP transport, i.e. ``sendfile(2)``.
(uvloop has no ``loop.sendfile`` for TCP, hence no ``tcp-sendfile`` there.)

Round 0 is a verification round (not in the figures): the receiver hashes every byte and its sha256 must
equal the file's. In the timed rounds the receiver compares the first, middle and last byte of every
buffer with the file (mapped read-only) and the count with the file size; any difference, or a
connection in the wrong mode, fails the run. The sender counts its own ``os.sendfile`` calls, so the
table shows which configurations used the kernel's sendfile. Time runs from just before the header is
written to the receiver's report (sent after EOF); CPU is user+sys of both processes over that span
(``getrusage`` in each; the receiver's from connection_made to EOF), per GiB. Rounds are interleaved
(the order rotating between rounds); figures are the median [min-max] over the timed rounds.

Short returns: ``loop.sendfile()`` is called once for the whole file; if it returns fewer bytes than the
file holds, the sender calls it again from there (``offset=sent``) and counts a short return (column
``short``: short returns / transfers, the verification round included), unless ``--strict``, which fails
the run instead. Neither asyncio's nor smcish's sendfile should return short for a regular file (an
early smcish version could: it took an empty read with room in the ring *after* the read as the end of
the file); the column checks that.

Alignment: the sender writes ``--header-size`` bytes (default 8) before the file, so on shared memory
the file's bytes land in the ring 8 bytes ahead of their page-cache offset. On the AMD EPYC guest this
was written on, the kernel's copy (and glibc's memcpy) runs about 4x slower when the destination is 1
to 31 bytes ahead of the source modulo 4096 (2.5 GB/s against 12-15 GB/s at any other distance);
``Ring.write_from_fd`` reads such segments through a bounce buffer placed outside that window (about
9 GB/s), so the header size no longer matters much; ``--header-size`` stays to check that.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import IO, Any

from .zerocopy import (
    GREETING,
    Json,
    Peer,
    SenderProtocol,
    check_mode,
    connect,
    cpu_now,
    default_out,
    emit,
    environment,
    fmt,
    loop_factory,
    mode_of,
    parse_size,
    size_name,
    summary,
    write_json,
)

CHUNK = 256 * 1024              # the Python chunk loops' read size
RECV_BUFFER = 256 * 1024
HEADER_SIZE = 8                 # default --header-size: b"SF" + verify flag + padding
TIMEOUT = 300                   # seconds a measurement may take before it fails
CONFIGS = [                     # (name, loop, transport, method, expected mode, smcish kwargs)
    ("smcish-sendfile", "asyncio", "smcish", "sendfile", "ism", {}),
    ("smcish-sendfile", "uvloop", "smcish", "sendfile", "ism", {}),
    ("smcish-chunks", "asyncio", "smcish", "chunks", "ism", {}),
    ("smcish-chunks", "uvloop", "smcish", "chunks", "ism", {}),
    ("smcish-stdlib-fallback", "asyncio", "smcish", "stdlib-fallback", "ism", {}),
    ("tcp-sendfile", "asyncio", "tcp", "sendfile", "plain", {}),
    ("tcp-chunks", "asyncio", "tcp", "chunks", "plain", {}),
    ("tcp-chunks", "uvloop", "tcp", "chunks", "plain", {}),
    ("smcish-fallback-sendfile", "asyncio", "smcish", "sendfile", "tcp", {"device": "none"}),
]


# --- receiver -----------------------------------------------------------------------------------------------

class FileReceiver(asyncio.BufferedProtocol):
    def __init__(self, file_map: mmap.mmap, header_size: int) -> None:
        self.file = file_map
        self.header_size = header_size
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.header = bytearray()
        self.sha: Any = None  # a hashlib.sha256() when the header asks for verification
        self.offset = self.checks = self.mismatches = 0
        self.first_bad: int | None = None
        self.transport: Any = None  # from connection_made
        self.cpu0 = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.cpu0 = cpu_now()
        transport.write(GREETING)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        start = 0
        if len(self.header) < self.header_size:
            start = min(nbytes, self.header_size - len(self.header))
            self.header += self.view[:start]
            if len(self.header) == self.header_size:
                if self.header[:2] != b"SF":
                    raise ValueError(f"bad header {bytes(self.header)!r}")
                if self.header[2]:
                    self.sha = hashlib.sha256()
            if start == nbytes:
                return
        n = nbytes - start
        if self.sha is not None:
            self.sha.update(self.view[start:nbytes])
        buf, file, offset, last, mid = self.buf, self.file, self.offset, nbytes - 1, start + (n >> 1)
        if offset + n > len(file) or not (buf[start] == file[offset] and buf[mid] == file[offset + (n >> 1)]
                                          and buf[last] == file[offset + n - 1]):
            self.mismatches += 1
            if self.first_bad is None:
                self.first_bad = offset
        self.checks += 1
        self.offset = offset + n

    def eof_received(self) -> bool:
        cpu = cpu_now() - self.cpu0
        self.transport.write(json.dumps({
            "bytes": self.offset, "checks": self.checks, "mismatches": self.mismatches,
            "first_bad": self.first_bad, "sha256": self.sha.hexdigest() if self.sha is not None else None,
            "cpu": cpu,
            "mode": mode_of(self.transport)}).encode() + b"\n")
        return False


async def _receive(spec: Json) -> None:
    loop = asyncio.get_running_loop()
    with open(spec["path"], "rb") as f:
        file_map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    factory = lambda: FileReceiver(file_map, spec["header_size"])  # noqa: E731
    if spec["transport"] == "tcp":
        server = await loop.create_server(factory, "127.0.0.1", 0)
    else:
        import smcish
        server = await smcish.create_server(factory, "127.0.0.1", 0, **spec["smcish"])
    emit({"ready": True, "port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


# --- sender -------------------------------------------------------------------------------------------------

_sendfile_calls = [0, 0]        # os.sendfile calls and bytes in this process


def _count_os_sendfile() -> None:
    real = os.sendfile

    def counting(*args: Any, **kwargs: Any) -> int:
        n = real(*args, **kwargs)
        _sendfile_calls[0] += 1
        _sendfile_calls[1] += n
        return n

    os.sendfile = counting


async def _chunk_loop(transport: Any, proto: SenderProtocol, f: IO[bytes]) -> int:
    """asyncio's sendfile fallback with 256 KiB chunks: executor read, drain-equivalent wait, write.

    A fresh bytes object per chunk (``f.read``), not ``readinto`` a reused buffer as asyncio's fallback:
    uvloop's transports keep a reference to a mutable buffer they could not send at once (no snapshot),
    so reusing it corrupts the stream (the verification round caught exactly that on uvloop TCP).
    """
    loop = asyncio.get_running_loop()
    total = 0
    while True:
        chunk = await loop.run_in_executor(None, f.read, CHUNK)
        if not chunk:
            return total
        await proto.wait_writable()
        if transport.is_closing():
            raise ConnectionError("connection closed by peer")
        transport.write(chunk)
        total += len(chunk)


async def _measure(spec: Json, verify: bool) -> Json:
    loop = asyncio.get_running_loop()
    transport, proto = await connect(spec, spec["port"])
    check_mode(spec, transport, "sender")
    await proto.greeting             # as a server answering a request: the connection is set up on both sides
    calls0 = list(_sendfile_calls)
    short = 0
    with open(spec["path"], "rb") as f:
        cpu0, t0 = cpu_now(), time.perf_counter()
        try:
            transport.write(b"SF" + bytes([verify]) + bytes(spec["header_size"] - 3))
            method = spec["method"]
            if method == "sendfile":
                sent = await loop.sendfile(transport, f, 0, None, fallback=False)
                # see "short returns" in the docstring
                while 0 < sent < spec["size"] and not spec["strict"]:
                    short += 1
                    n = await loop.sendfile(transport, f, sent, None, fallback=False)
                    if not n:
                        break
                    sent += n
            elif method == "stdlib-fallback":
                sent = await loop._sendfile_fallback(transport, f, 0, None)  # type: ignore[attr-defined]
            else:
                sent = await _chunk_loop(transport, proto, f)
            transport.write_eof()
            report = await proto.reply
            seconds = time.perf_counter() - t0
            cpu = cpu_now() - cpu0
        finally:
            transport.close()
    await proto.lost
    check_mode(spec, transport, "receiver", report["mode"])
    size = spec["size"]
    if sent != size or report["bytes"] != size or report["mismatches"]:
        raise RuntimeError(f"sent {sent} of {size} bytes; receiver saw {report['bytes']} with "
                           f"{report['mismatches']} mismatching buffers (first at offset "
                           f"{report['first_bad']})")
    if verify and report["sha256"] != spec["sha256"]:
        raise RuntimeError(f"receiver's sha256 {report['sha256']} differs from the file's {spec['sha256']}")
    return {"bytes": sent, "seconds": seconds, "cpu_sender": cpu, "cpu_receiver": report["cpu"],
            "receiver_checks": report["checks"], "sha256_ok": True if verify else None,
            "short_returns": short, "os_sendfile_calls": _sendfile_calls[0] - calls0[0],
            "os_sendfile_bytes": _sendfile_calls[1] - calls0[1]}


def _child(spec: Json) -> None:
    with asyncio.Runner(loop_factory=loop_factory(spec["loop"])) as runner:
        if spec["role"] == "receiver":
            runner.run(_receive(spec))
            return
        _count_os_sendfile()
        emit({"ready": True, "pid": os.getpid()})
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                result = runner.run(asyncio.wait_for(_measure(spec, cmd["verify"]), TIMEOUT))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the run
                emit({"ok": False, "error": "".join(traceback.format_exception(exc))})
            else:
                emit({"ok": True, "result": result})


# --- parent -------------------------------------------------------------------------------------------------

def _make_file(directory: str, size: int) -> tuple[str, str]:
    path = os.path.join(directory, "sendfile-bench.bin")
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            sha.update(block)
            f.write(block)
            left -= len(block)
    with open(path, "rb") as f:              # the page cache holds it now; read it once more to be sure
        while f.read(8 << 20):
            pass
    return path, sha.hexdigest()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sendfile", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M", help="file size (default 256M)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, after the verification round")
    ap.add_argument("--configs", help="comma-separated NAME/LOOP (default: all): "
                                      + ",".join(f"{c[0]}/{c[1]}" for c in CONFIGS))
    ap.add_argument("--dir",
                    help="where the file goes (default: a new temporary directory, removed afterwards)")
    ap.add_argument("--out", help="JSON file (default bench-results/sendfile-<UTC time>.json)")
    ap.add_argument("--strict", action="store_true", help="a short return of loop.sendfile fails the run")
    ap.add_argument("--header-size", type=int, default=HEADER_SIZE,
                    help="bytes the sender writes before the file (default 8, at least 3); see \"Alignment\"")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    if args.header_size < 3:
        ap.error("--header-size must be at least 3")
    chosen = CONFIGS
    if args.configs:
        wanted = args.configs.split(",")
        chosen = [c for c in CONFIGS if f"{c[0]}/{c[1]}" in wanted]
        if len(chosen) != len(wanted):
            ap.error(f"unknown configuration in {args.configs!r}")
    out = args.out or default_out("sendfile")
    tmpdir = tempfile.mkdtemp(prefix="smcish-sendfile-", dir=args.dir)
    data: Json = {"benchmark": "sendfile", "argv": sys.argv, "environment": environment(),
            "settings": {"file_size": size, "rounds": args.rounds, "strict": args.strict, "chunk": CHUNK,
                         "header_size": args.header_size,
                         "recv_buffer": RECV_BUFFER,
                         "configs": [{"name": c[0], "loop": c[1], "transport": c[2], "method": c[3],
                                      "mode": c[4], "smcish": c[5]} for c in chosen]},
            "measurements": []}
    peers: dict[tuple[str, str], tuple[Peer, Peer | None]] = {}
    try:
        t = time.perf_counter()
        path, digest = _make_file(tmpdir, size)
        print(f"file: {size_name(size)} at {path} in {time.perf_counter() - t:.1f} s, "
              f"sha256 {digest[:16]}...", file=sys.stderr)
        data["settings"]["sha256"] = digest
        for name, loop, transport, method, mode, kwargs in chosen:
            spec = {"loop": loop, "transport": transport, "method": method, "expect_mode": mode,
                    "smcish": kwargs, "path": path, "size": size, "sha256": digest, "strict": args.strict,
                    "header_size": args.header_size}
            recv = Peer("benchmarks.sendfile", {**spec, "role": "receiver"})
            peers[name, loop] = (recv, None)
            peers[name, loop] = (recv, Peer("benchmarks.sendfile",
                                            {**spec, "role": "sender", "port": recv.ready["port"]}))
        keys = list(peers)
        for rnd in range(args.rounds + 1):
            shift = rnd % len(keys)
            for key in keys[shift:] + keys[:shift]:
                sending = peers[key][1]
                assert sending is not None  # started with its receiver above
                r = sending.ask({"verify": rnd == 0}, TIMEOUT + 60)["result"]  # the sender: TIMEOUT at most
                r.update(round=rnd, config=key[0], loop=key[1], timed=rnd > 0)
                data["measurements"].append(r)
                print(f"  {'verify' if rnd == 0 else f'round {rnd}':8} {key[1]:8} {key[0]:25} "
                      f"{r['bytes'] / r['seconds'] / 1e6:8.0f} MB/s "
                      f"{(r['cpu_sender'] + r['cpu_receiver']) / (r['bytes'] / (1 << 30)):6.2f} CPU s/GiB",
                      file=sys.stderr, flush=True)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        data["error"] = str(exc)
        write_json(out, data)
        return 1
    finally:
        for receiving, sending in peers.values():
            for child in (sending, receiving):
                if child is not None:
                    child.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
    data["environment"]["loadavg_end"] = os.getloadavg()
    data["summary"] = _summarise(data["measurements"], keys)
    write_json(out, data)
    _print(data["summary"], keys, args, size)
    print(f"\nJSON: {out}")
    return 0


def _summarise(ms: list[Json], keys: list[tuple[str, str]]) -> Json:
    out: Json = {}
    for name, loop in keys:
        rows = [m for m in ms if m["timed"] and m["config"] == name and m["loop"] == loop]
        if not rows:
            continue
        out[f"{name}/{loop}"] = {
            "mb_s": summary([m["bytes"] / m["seconds"] / 1e6 for m in rows]),
            "cpu_s_per_gib": summary([(m["cpu_sender"] + m["cpu_receiver"]) / (m["bytes"] / (1 << 30))
                                      for m in rows]),
            "cpu_sender_s_per_gib": summary([m["cpu_sender"] / (m["bytes"] / (1 << 30)) for m in rows]),
            "cpu_receiver_s_per_gib": summary([m["cpu_receiver"] / (m["bytes"] / (1 << 30)) for m in rows]),
            "os_sendfile_bytes": statistics.median(m["os_sendfile_bytes"] for m in rows),
            "bytes_per_receive": statistics.median(m["bytes"] / max(1, m["receiver_checks"]) for m in rows),
            # every transfer of the configuration, the verification round included: [short returns, transfers]
            "short_returns": [sum(m["short_returns"] for m in ms
                                  if m["config"] == name and m["loop"] == loop),
                              sum(1 for m in ms if m["config"] == name and m["loop"] == loop)],
        }
    return out


def _print(s: Json, keys: list[tuple[str, str]], args: argparse.Namespace, size: int) -> None:
    print(f"\nloop.sendfile of a {size_name(size)} file (page cache warm), after a {args.header_size}-byte "
          "header: "
          f"{args.rounds} interleaved timed rounds after a sha256-verified one; median [min-max].\n"
          f"MB/s = 10^6 B/s; CPU = user+sys seconds per GiB (sender + receiver).")
    print(f"{'loop':8} {'config':25} {'MB/s':>20} {'CPU s/GiB':>18} {'sender':>7} {'recv':>6} {'B/recv':>8} "
          f"{'sendfile(2) %':>14} {'short':>8}")
    for name, loop in sorted(keys, key=lambda k: (k[1], keys.index(k))):
        e = s.get(f"{name}/{loop}")
        if e is None:
            continue
        print(f"{loop:8} {name:25} {fmt(e['mb_s']):>20} {fmt(e['cpu_s_per_gib'], 2):>18} "
              f"{e['cpu_sender_s_per_gib']['median']:7.2f} {e['cpu_receiver_s_per_gib']['median']:6.2f} "
              f"{e['bytes_per_receive'] / 1024:7.0f}K {100 * e['os_sendfile_bytes'] / size:13.0f}% "
              f"{'{}/{}'.format(*e['short_returns']):>8}")


if __name__ == "__main__":
    sys.exit(main())
