#!/usr/bin/env python3
"""An ordinary asyncio redis-py program. It knows nothing of smcish, on purpose.

    python examples/redis_client.py --port 6379                  # plain
    python -m smcish run examples/redis_client.py --port 6379    # the same program, transparent mode

Under ``python -m smcish run`` every asyncio loop the program creates has smcish installed, like
``smc_run`` does for a C program. redis-server is not an smcish listener, so each connection stays
plain TCP from its first byte (reason ``PEER_NOT_ADVERTISED``): the server sees exactly the bytes
it would have seen without smcish. Were the server an smcish listener on the same device, the same
unchanged program would talk to it through shared memory.

Prints one JSON line with what it checked; exit status 1 if anything differed.
"""

import argparse
import asyncio
import json
import sys

import redis.asyncio as redis


async def main(host: str, port: int, prefix: str) -> int:
    r = redis.Redis(host=host, port=port)
    checks = {}
    try:
        checks["ping"] = await r.ping()
        await r.set(f"{prefix}:greeting", "hello")
        checks["get"] = await r.get(f"{prefix}:greeting") == b"hello"
        big = bytes(range(256)) * 4096 * 3                   # 3 MiB: many TCP segments each way
        await r.set(f"{prefix}:big", big)
        checks["big"] = await r.get(f"{prefix}:big") == big
        async with r.pipeline(transaction=True) as pipe:
            for _ in range(100):
                pipe.incr(f"{prefix}:counter")
            results = await pipe.execute()
        checks["pipeline"] = results == list(range(1, 101))
        await r.hset(f"{prefix}:hash", mapping={"a": "1", "b": "2"})
        checks["hash"] = await r.hgetall(f"{prefix}:hash") == {b"a": b"1", b"b": b"2"}
        await r.rpush(f"{prefix}:list", *range(10))
        checks["list"] = await r.lrange(f"{prefix}:list", 0, -1) == [str(i).encode() for i in range(10)]
        # Pub/sub: a second connection, server-pushed messages.
        pubsub = r.pubsub()
        await pubsub.subscribe(f"{prefix}:chan")
        await pubsub.get_message(timeout=1.0)                # the subscribe confirmation
        await r.publish(f"{prefix}:chan", "news")
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
        checks["pubsub"] = message is not None and message["data"] == b"news"
        await pubsub.aclose()
        await r.delete(f"{prefix}:greeting", f"{prefix}:big", f"{prefix}:counter",
                       f"{prefix}:hash", f"{prefix}:list")
    finally:
        await r.aclose()
    ok = all(checks.values())
    print(json.dumps({"ok": ok, "checks": checks}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="an unchanged asyncio redis-py program")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--prefix", default="example")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.host, args.port, args.prefix)))
