"""An unchanged asyncio STARTTLS client (no smcish import): greet, EHLO, STARTTLS, upgrade,
a few commands and a checksummed DATA body over TLS, QUIT; prints one JSON line.

usage: starttls_client.py asyncio|uvloop HOST PORT CAFILE
"""

import asyncio
import hashlib
import json
import ssl
import sys


def mode(writer):
    # What smcish answers (None on a plain asyncio transport or the loop's own TLS transport).
    info = writer.get_extra_info("smcish")
    return None if info is None else info.mode


async def reply(reader):
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise EOFError(f"EOF after {lines!r}")
        lines.append(line)
        if line[3:4] == b" ":
            return lines


async def main(host, port, cafile):
    out = {}
    reader, writer = await asyncio.open_connection(host, port)
    out["before"] = mode(writer)
    assert (await reply(reader))[0].startswith(b"220 ")
    writer.write(b"EHLO client\r\n")
    assert b"250 STARTTLS\r\n" in await reply(reader)
    writer.write(b"STARTTLS\r\n")
    assert (await reply(reader))[0].startswith(b"220 ")
    ctx = ssl.create_default_context(cafile=cafile)
    await writer.start_tls(ctx, server_hostname="localhost")
    out["after"] = mode(writer)
    out["cipher"] = writer.get_extra_info("cipher")
    out["version"] = writer.get_extra_info("ssl_object").version()
    out["peer_cn"] = dict(x[0] for x in writer.get_extra_info("peercert")["subject"]).get("commonName")
    writer.write(b"EHLO client\r\n")
    await reply(reader)
    writer.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert await reply(reader) == [b"250 OK\r\n"]
    assert await reply(reader) == [b"250 OK\r\n"]
    writer.write(b"DATA\r\n")
    assert (await reply(reader))[0].startswith(b"354")
    digest = hashlib.sha256()
    for i in range(2000):
        line = b"line %06d " % i + b"x" * 60 + b"\r\n"
        digest.update(line)
        writer.write(line)
    writer.write(b".\r\n")
    await writer.drain()
    out["queued_ok"] = (await reply(reader)) == [b"250 queued " + digest.hexdigest().encode() + b"\r\n"]
    writer.write(b"QUIT\r\n")
    out["quit"] = (await reply(reader))[0].decode().strip()
    writer.close()
    await writer.wait_closed()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    loop_kind, host, port, cafile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main(host, port, cafile))
    else:
        asyncio.run(main(host, port, cafile))
