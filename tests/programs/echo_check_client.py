"""``python echo_check_client.py PORT``: an smcish client sends 100,000 random bytes to the echo
server on 127.0.0.1:PORT, reads them back, and prints ``{"mode": ..., "echo": <equal>}``.
For tests/hardening/test_fuzz_setup_live.py (a fresh client after the fuzzing).
"""

import asyncio
import json
import os
import sys

import smcish


async def main():
    r, w = await smcish.open_connection("127.0.0.1", int(sys.argv[1]))
    data = os.urandom(100_000)
    w.write(data)
    got = await asyncio.wait_for(r.readexactly(len(data)), 10)
    mode = w.get_extra_info("smcish").mode
    w.close()
    await w.wait_closed()
    print(json.dumps({"mode": mode, "echo": got == data}))
asyncio.run(main())
