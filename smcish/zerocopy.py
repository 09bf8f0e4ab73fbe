"""Zero-copy sending and receiving on smcish connections (docs/design.md section 7.3).

Sending: ``view = transport.reserve(n)`` gives a writable memoryview of 1..n bytes; fill a prefix
of it (``numpy.copyto``, ``file.readinto``, ``pickle`` protocol 5 buffers, a frame encoder) and
``transport.commit(k)`` sends the first k bytes. On a shared-memory connection the view is ring
space (the bytes are written once, by you); when the ring is full, on a connection set-up that is
not confirmed yet, and on TCP, the view is a private buffer and ``commit`` writes it (one copy).

Receiving: a ``ZeroCopyProtocol`` gets ``view_received(view)`` with a read-only memoryview of
ring memory. The view stays valid, and no further data is delivered, until the protocol calls
``self.release_view()``: then its bytes are consumed and the next view comes. On TCP the same calls
work over the received bytes (copies).

A peer can only ever write its own side of the ring, but a hostile peer may change the bytes
under a view after publishing them: validate what you parse, as you would on a socket, and do
not re-read a view expecting the same bytes twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["ZeroCopyProtocol", "send_buffer"]


class ZeroCopyProtocol(asyncio.Protocol):
    """A Protocol that receives read-only views of ring memory instead of ``bytes``.

    Override ``view_received`` (and ``view_eof_received`` for the end of the stream).
    ``self.transport`` is the connection's transport, set before ``connection_made``. Every
    received byte is in exactly one view, in order; one view is outstanding at a time. A view
    ends where the ring wraps, so a message may span two views: keep (copy) a partial message.
    """

    transport: Any = None
    _zc_ring: Any = None            # ism: the ring the outstanding view is in
    _zc_view: Any = None            # the outstanding view (None: none)
    _zc_backlog: Any = None         # tcp: bytes received while a view was held
    _zc_held = False                # reading paused for a view kept past view_received
    _zc_eof = False                 # EOF came while bytes were held

    def view_received(self, view: memoryview) -> None:
        """Called with a read-only view of received bytes; call ``release_view()`` when done
        with it (inside this call, or later: nothing more is delivered until then)."""
        raise NotImplementedError

    def view_eof_received(self) -> Any:
        """``eof_received``, called once every byte before the EOF was delivered and released.
        Return true to keep the connection half-open, as ``eof_received``."""
        return None

    def release_view(self) -> None:
        """Done with the outstanding view: its bytes are consumed (the peer may reuse the ring
        space) and the view is invalid from now on.

        A view kept past ``view_received`` pauses reading; releasing it resumes reading (call
        ``transport.pause_reading()`` after ``release_view()`` to stay paused)."""
        view = self._zc_view
        if view is None:
            raise RuntimeError("no view is outstanding")
        self._zc_view = None
        size = len(view)
        try:
            view.release()
        except BufferError:
            pass                    # exported further (numpy...): the mapping stays alive
        ring, self._zc_ring = self._zc_ring, None
        if ring is not None and not ring.closed:
            try:
                ring.consume(size)
            except ValueError:
                pass                # the connection ended meanwhile
        if self._zc_held:
            self._zc_held = False
            if ring is None:
                self._zc_drain()
            transport = self.transport
            if self._zc_view is None and transport is not None and not transport.is_closing():
                transport.resume_reading()

    # ------------------------------------------------------------ shared memory
    def _smc_feed(self, ring: Any, avail: int) -> int:
        """SmcTransport's delivery hook (ism): hand out a view of the ring, no copy."""
        if self._zc_view is not None:       # resume_reading() while a view is held
            self._zc_held = True
            self.transport.pause_reading()
            return 0
        view = ring.peek(avail)
        self._zc_ring = ring
        self._zc_view = view
        n = len(view)
        self.view_received(view)
        if self._zc_view is not None:       # kept: no more deliveries until release_view()
            self._zc_held = True
            self.transport.pause_reading()
            return 0
        return n

    # ------------------------------------------------------------ TCP (and anything else)
    def data_received(self, data: bytes) -> None:
        if self._zc_backlog is None:
            self._zc_backlog = []
        self._zc_backlog.append(data)
        if self._zc_view is None:
            self._zc_drain()

    def _zc_drain(self) -> None:
        backlog = self._zc_backlog
        while backlog and self._zc_view is None:
            data = backlog[0] if len(backlog) == 1 else b"".join(backlog)
            backlog.clear()
            self._zc_view = memoryview(data).toreadonly()
            self.view_received(self._zc_view)
        if self._zc_view is not None:
            if not self._zc_held:
                self._zc_held = True
                if self.transport is not None:
                    self.transport.pause_reading()
        elif self._zc_eof:
            self._zc_eof = False
            if not self.view_eof_received() and self.transport is not None:
                self.transport.close()

    def eof_received(self) -> Any:
        if self._zc_view is not None or self._zc_backlog:
            self._zc_eof = True     # reported once the held bytes are released
            return True
        return self.view_eof_received()


async def send_buffer(writer: Any, data: Any) -> None:
    """Send a bytes-like object (a pickle protocol 5 ``PickleBuffer``, a numpy array...) through
    ``writer.transport.reserve/commit``: one copy, from ``data`` straight into ring space
    (waiting for ring space with ``transport.wait_reservable()``), with the writer's flow
    control (``await writer.drain()`` whenever the transport buffers).

    Args:
        writer: an ``asyncio.StreamWriter`` on an smcish connection (any mode).
        data: anything exporting a contiguous buffer.
    """
    transport = writer.transport
    src = memoryview(data).cast("B")
    if not hasattr(transport, "reserve"):     # not an smcish transport (TLS on top, ...)
        writer.write(src)
        await writer.drain()
        return
    pos = 0
    while pos < len(src):
        await transport.wait_reservable()       # ring space rather than a private buffer
        view = transport.reserve(len(src) - pos)
        n = len(view)
        view[:] = src[pos:pos + n]
        transport.commit(n)
        pos += n
        await writer.drain()      # raises if the connection was lost; waits if paused
