"""Drop-in asyncio streams: open_connection and start_server over smcish."""

from __future__ import annotations

import asyncio

from .loop import create_connection, create_server

_DEFAULT_LIMIT = 2 ** 16


async def open_connection(host=None, port=None, *, limit=_DEFAULT_LIMIT, **kwds):
    """Like ``asyncio.open_connection``; shared memory when the server is an smcish listener.

    Accepts the smcish keywords of ``create_connection`` (config, negotiate, device, ring_size,
    poll_us) and everything ``loop.create_connection`` accepts.

    Returns:
        ``(StreamReader, StreamWriter)``, the stock asyncio classes.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, **kwds)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def start_server(client_connected_cb, host=None, port=None, *, limit=_DEFAULT_LIMIT, **kwds):
    """Like ``asyncio.start_server``; returns the loop's own ``Server``."""
    loop = asyncio.get_running_loop()

    def factory():
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, **kwds)
