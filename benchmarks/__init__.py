"""smcish benchmarks: smcish against asyncio TCP and Unix sockets, on both loops; run `python -m benchmarks`."""
