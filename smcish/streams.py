"""Drop-in asyncio streams: open_connection and start_server over smcish."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

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

    if TYPE_CHECKING:       # the stock class's private parts we use (typeshed does not list them)
        _transport: Any

        @property
        def _stream_reader(self) -> SmcStreamReader | None: ...

    def _smc_feed(self, ring: Any, avail: int) -> int:
        """Move up to ``avail`` bytes from the ring into the reader; returns how many."""
        reader = self._stream_reader
        if reader is None:                 # the reader was garbage-collected: discard, as stock
            return len(ring.read(avail))
        if getattr(reader, "_smc_want", False) and reader._waiter is not None and not reader._eof:
            # A read() waits with an empty buffer: it takes the bytes from the ring itself (one
            # copy, ring -> its result). Reading pauses meanwhile: the ring holds the data.
            reader._smc_ring = ring
            reader._smc_owner = self
            if not reader._paused:
                reader._paused = True
                self._transport.pause_reading()
            reader._wakeup_waiter()
            return 0
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


class SmcStreamReader(asyncio.StreamReader):
    """The stock StreamReader, with a ``read(n)`` that copies once where 3.11's copies twice, and
    on shared memory takes bytes straight from the ring when its buffer is empty (one copy
    instead of three). Every other method and every semantic is the stock one."""

    _smc_want = False        # read() waits for data it will take from the ring itself
    _smc_ring: Any = None    # the ring of the connection (set by the feed when it handed over)
    _smc_owner: Any = None   # the protocol that set it (still the transport's protocol?)

    if TYPE_CHECKING:       # the stock class's private parts we use (typeshed does not list them)
        _buffer: bytearray
        _eof: bool
        _exception: BaseException | None
        _limit: int
        _paused: bool
        _transport: Any
        _waiter: asyncio.Future[None] | None

        async def _wait_for_data(self, func_name: str) -> None: ...
        def _maybe_resume_transport(self) -> None: ...
        def _wakeup_waiter(self) -> None: ...

    async def read(self, n: int = -1) -> bytes:
        if self._exception is not None:
            raise self._exception
        if n == 0:
            return b""
        if n < 0:
            return await super().read(n)
        if not self._buffer and not self._eof:
            ring = self._smc_ring
            if ring is not None:
                data = self._smc_take(ring, n)
                if data:
                    return data
            self._smc_want = True
            try:
                await self._wait_for_data("read")
            finally:
                self._smc_want = False
            if not self._buffer and not self._eof and self._smc_ring is not None:
                data = self._smc_take(self._smc_ring, n)
                if data:
                    return data
                if self._exception is not None:
                    raise self._exception
        data = bytes(memoryview(self._buffer)[:n])
        del self._buffer[:n]
        self._maybe_resume_transport()
        return data

    def _smc_take(self, ring: Any, n: int) -> bytes:
        """Up to ``n`` bytes straight from the ring, if our protocol still owns the transport
        (not after start_tls or a protocol switch) and the ring has some."""
        transport = self._transport
        if (transport is None or transport.get_protocol() is not self._smc_owner
                or ring.closed):
            self._smc_ring = None
            return b""
        try:
            avail = ring.readable()
            if not avail:
                return b""
            data: bytes = ring.read(avail if avail < n else n)
            if avail <= n and self._paused:
                # Drained: reading resumes, so EOF and what comes next are seen as with the
                # stock reader (the next read() waiting takes the next bytes from the ring again).
                self._paused = False
                transport.resume_reading()
        except Exception as exc:
            transport._fatal_error(exc, "smcish: peer corrupted the shared ring")
            self.set_exception(exc)       # and this read raises (not b"", which would look like EOF)
            raise
        return data


async def open_connection(host: Any = None, port: Any = None, *, limit: int = _DEFAULT_LIMIT,
                          **kwds: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like ``asyncio.open_connection``; shared memory when the server is an smcish listener.

    Accepts the smcish keywords of ``create_connection`` (config, negotiate, device, ring_size,
    poll_us) and everything ``loop.create_connection`` accepts.

    Returns:
        ``(StreamReader, StreamWriter)``: the stock ``StreamWriter`` and ``SmcStreamReader``, a
        ``StreamReader`` subclass that overrides only ``read(n)`` (one copy, straight from the
        ring when its buffer is empty); every semantic is the stock one (docs/parity.md).
    """
    loop = asyncio.get_running_loop()
    reader = SmcStreamReader(limit=limit, loop=loop)
    protocol = SmcStreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, **kwds)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"]


async def start_server(client_connected_cb: ClientConnected, host: Any = None, port: Any = None, *,
                       limit: int = _DEFAULT_LIMIT, **kwds: Any) -> asyncio.Server:
    """Like ``asyncio.start_server``; returns the loop's own ``Server``."""
    loop = asyncio.get_running_loop()

    def factory() -> SmcStreamReaderProtocol:
        reader = SmcStreamReader(limit=limit, loop=loop)
        return SmcStreamReaderProtocol(reader, client_connected_cb, loop=loop)

    server: asyncio.Server = await create_server(factory, host, port, **kwds)
    return server
