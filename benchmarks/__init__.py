"""smcish benchmarks: smcish against asyncio TCP and Unix sockets, on both loops.

Run `python -m benchmarks`.
"""
