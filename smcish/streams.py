"""Drop-in asyncio streams: open_connection and start_server over smcish."""

from __future__ import annotations

import asyncio

from . import _buffers
from .loop import create_connection, create_server

_DEFAULT_LIMIT = 2 ** 16
_MAX_FEED = 1 << 20          # bytes moved from the ring into the reader per call
_SMALL_FEED = 2048           # up to this size, append a bytes object instead


class SmcStreamReaderProtocol(asyncio.StreamReaderProtocol):
    """The stock StreamReaderProtocol, plus a one-copy feed used on the shared-memory path.

    In ISM mode SmcTransport calls ``_smc_feed(ring, avail)``: bytes go from the ring straight into
    the reader's ``_buffer`` (the same bytearray the stock StreamReader keeps, so code that peeks
    at ``reader._buffer`` still works), with the stock ``feed_data`` wake-up and flow control. On a
    TCP fallback the transport calls ``data_received`` as usual: nothing changes there.
    """

    def _smc_feed(self, ring, avail: int) -> int:
        """Move up to ``avail`` bytes from the ring into the reader; returns how many."""
        reader = self._stream_reader
        if reader is None:                 # the reader was garbage-collected: discard, as stock
            return len(ring.read(avail))
        if reader._eof:                    # as StreamReader.feed_data (after the kernel's recv)
            ring.read(avail)
            raise AssertionError("feed_data after feed_eof")
        buf = reader._buffer
        if avail <= _SMALL_FEED:           # small messages: an append costs less than the set-up
            buf += ring.read(avail)
            got = avail
        else:
            old = len(buf)
            n = avail if avail < _MAX_FEED else _MAX_FEED
            _buffers.grow(buf, n)
            view = memoryview(buf)[old:]
            try:
                got = ring.read_into(view)
            finally:
                view.release()
            if got != n:
                del buf[old + got:]
        reader._wakeup_waiter()
        if (reader._transport is not None and not reader._paused
                and len(buf) > 2 * reader._limit):
            try:
                reader._transport.pause_reading()
            except NotImplementedError:
                reader._transport = None
            else:
                reader._paused = True
        return got


async def open_connection(host=None, port=None, *, limit=_DEFAULT_LIMIT, **kwds):
    """Like ``asyncio.open_connection``; shared memory when the server is an smcish listener.

    Accepts the smcish keywords of ``create_connection`` (config, negotiate, device, ring_size,
    poll_us) and everything ``loop.create_connection`` accepts.

    Returns:
        ``(StreamReader, StreamWriter)``, the stock asyncio classes.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = SmcStreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, **kwds)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def start_server(client_connected_cb, host=None, port=None, *, limit=_DEFAULT_LIMIT, **kwds):
    """Like ``asyncio.start_server``; returns the loop's own ``Server``."""
    loop = asyncio.get_running_loop()

    def factory():
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return SmcStreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, **kwds)
