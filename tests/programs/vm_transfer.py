"""Checksummed transfers between two guests (tests/vm). JSON lines on stdout.

    python vm_transfer.py serve HOST PORT              (prints {"event": "listening"} first)
    python vm_transfer.py client HOST PORT checksum SIZE
    python vm_transfer.py client HOST PORT stream PROGRESS_FILE

``checksum``: the client sends SIZE bytes of the pattern (tests/programs/stream_pattern.py) and
half-closes; the server answers the SHA-256 of what it read, then SIZE bytes of the pattern from
another offset, and closes; the client checks both. ``stream``: the server sends the pattern
until the connection breaks; the client checks every byte, writes how many it has to
PROGRESS_FILE about every 0.1 s, and when the connection fails reports how long after its last
byte (exit 0 if every byte it got was right).
"""

import asyncio
import hashlib
import json
import os
import sys
import time

from stream_pattern import pattern_at

import smcish

CHUNK = 1 << 20
BACK_OFFSET = 7


def emit(**fields):
    print(json.dumps(fields), flush=True)


def reason_of(info):
    return getattr(info.reason, "name", None) if info is not None else None


async def serve(host, port):
    async def handle(reader, writer):
        info = writer.get_extra_info("smcish")
        first = await reader.read(1)
        try:
            if first == b"C":
                digest = hashlib.sha256()
                size = 0
                while data := await reader.read(CHUNK):
                    digest.update(data)
                    size += len(data)
                writer.write(digest.digest())
                sent = 0
                while sent < size:
                    n = min(CHUNK, size - sent)
                    writer.write(pattern_at(BACK_OFFSET + sent, n))
                    await writer.drain()
                    sent += n
                emit(event="checksum", mode=info.mode, reason=reason_of(info), bytes=size)
            elif first == b"S":
                sent = 0
                while True:
                    writer.write(pattern_at(sent, CHUNK))
                    await writer.drain()
                    sent += CHUNK
        except ConnectionError as exc:
            emit(event="error", error=repr(exc))
        finally:
            writer.close()

    server = await smcish.start_server(handle, host, port)
    emit(event="listening", port=server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


async def client_checksum(host, port, size):
    reader, writer = await smcish.open_connection(host, port)
    info = writer.get_extra_info("smcish")
    start = time.perf_counter()
    writer.write(b"C")
    expect = hashlib.sha256()
    sent = 0

    async def send():
        nonlocal sent
        while sent < size:
            n = min(CHUNK, size - sent)
            data = pattern_at(sent, n)
            expect.update(data)
            writer.write(data)
            await writer.drain()
            sent += n
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    their = await reader.readexactly(32)
    await sender
    back = hashlib.sha256()
    got = 0
    while data := await reader.read(CHUNK):
        back.update(data)
        got += len(data)
    seconds = time.perf_counter() - start
    want_back = hashlib.sha256()
    for off in range(0, size, CHUNK):
        want_back.update(pattern_at(BACK_OFFSET + off, min(CHUNK, size - off)))
    writer.close()
    await writer.wait_closed()
    ok = their == expect.digest() and got == size and back.digest() == want_back.digest()
    emit(mode=info.mode, reason=reason_of(info), ok=ok, sent_ok=their == expect.digest(),
         received_ok=back.digest() == want_back.digest(), bytes=size, received=got,
         seconds=round(seconds, 3), mb_s=round(2 * size / seconds / 1e6, 1))
    return 0 if ok else 1


async def client_stream(host, port, progress):
    reader, writer = await smcish.open_connection(host, port)
    info = writer.get_extra_info("smcish")
    writer.write(b"S")
    got = 0
    ok = True
    last = time.monotonic()
    reported = 0.0
    error = None
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                error = "EOF"
                break
            last = time.monotonic()
            if data != pattern_at(got, len(data)):
                ok = False
                error = "corrupt"
                break
            got += len(data)
            if last - reported > 0.1:
                reported = last
                with open(progress + ".tmp", "w") as fh:
                    fh.write(str(got))
                os.replace(progress + ".tmp", progress)
    except (ConnectionError, OSError) as exc:
        error = repr(exc)
    since = time.monotonic() - last
    writer.close()
    emit(mode=info.mode, reason=reason_of(info), ok=ok, received=got, error=error,
         since_last_byte_s=round(since, 3))
    return 0 if ok else 1


def main():
    role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "serve":
        asyncio.run(serve(host, port))
        return 0
    if sys.argv[4] == "checksum":
        return asyncio.run(client_checksum(host, port, int(sys.argv[5])))
    return asyncio.run(client_stream(host, port, sys.argv[5]))


if __name__ == "__main__":
    sys.exit(main())
