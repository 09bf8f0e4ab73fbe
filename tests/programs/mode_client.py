"""``python mode_client.py PORT``: an smcish client echoes 4 bytes through 127.0.0.1:PORT and
prints the connection's mode and fallback reason (``ism None``, ``tcp NO_DEVICE``, ...).
For tests/test_doctor.py."""

import asyncio
import sys

import smcish


async def main() -> None:
    reader, writer = await smcish.open_connection("127.0.0.1", int(sys.argv[1]))
    writer.write(b"ping")
    await writer.drain()
    assert await reader.readexactly(4) == b"ping"
    info = writer.get_extra_info("smcish")
    print(info.mode, info.reason.name if info.reason else None, flush=True)
    writer.close()


asyncio.run(main())
