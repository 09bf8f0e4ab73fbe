"""The handshake protocol: runs the CLC exchange on the loop's TCP transport, then hands over.

Modelled on asyncio's sslproto: this protocol sits on the TCP transport; the application gets an
SmcTransport. After CONFIRM it stays on the TCP transport as the control/liveness channel; after a
fallback the application protocol is attached to the TCP transport directly.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import ism_backend

from . import clc
from . import ring as _ring
from . import stats as _stats
from .errors import HandshakeError
from .transport import SmcInfo, SmcTransport, device_pool, release_regions

log = logging.getLogger("smcish")
R = clc.DeclineReason


def deliver(protocol, data: bytes) -> None:
    """Hand bytes to any Protocol or BufferedProtocol (used to replay handshake-time bytes)."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = protocol.get_buffer(len(view))
            n = min(len(buf), len(view))
            if not n:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)


def _error_reason(exc: Exception, default):
    if isinstance(exc, ism_backend.QuotaExceeded):
        return R.QUOTA
    if isinstance(exc, ism_backend.NoDevice):
        return R.NO_DEVICE
    return default


class HandshakeProtocol(asyncio.Protocol):
    """One side of the handshake on one TCP connection.

    Args:
        loop: the running loop.
        role: ``"client"`` or ``"server"``.
        app_factory: the application's protocol factory.
        config: a ``Config``.
        device: the ISM device, or None when this connection must stay TCP.
        skip_reason: if set, do not negotiate; fall back at once with this reason.
        waiter: client side: a future resolved with ``(transport, protocol)``.
        claim: client side: the device claim registered for this connection (released here).
    """

    def __init__(self, loop, role, app_factory, config, device, *, skip_reason=None,
                 waiter=None, claim=None):
        self._loop = loop
        self._role = role
        self._app_factory = app_factory
        self._config = config
        self._device = device
        self._skip_reason = skip_reason
        self._waiter = waiter
        self._claim = claim
        self._tcp = None
        self._smc = None
        self._app = None
        self._clc = None
        self._timer = None
        # A server waiting for a client's first bytes has no deadline (a plain client may take its
        # time, as with TCP), unless the device says this client claimed the connection.
        self._client_claimed = False
        self._my_region = None
        self._peer_region = None
        self._ring = None
        self._done = False             # decided: ism, tcp or aborted
        self._established = False

    # ------------------------------------------------------------ TCP events
    def connection_made(self, transport) -> None:
        self._tcp = transport
        self._smc = SmcTransport(self._loop, transport, SmcInfo(self._role))
        if self._skip_reason is not None:        # no negotiation: straight to plain TCP
            self._fall_back(self._skip_reason, b"")
            return
        now = self._loop.time()
        self._clc = clc.ClcConnection(self._role, now, timeout=self._config.handshake_timeout)
        if self._role == "server":
            self._clc.wait_proposal(now)
            # Did this client claim the connection on our device (so it will propose)? If not, it
            # is a plain client: the application gets the TCP connection at once, no delay.
            if self._client_will_propose():
                self._client_claimed = True
                self._arm_timer()          # the application's connection_made waits for the outcome
            else:
                self._clc.fallback_now(R.PEER_NOT_SMCISH)
                self._process()
            return
        device = self._device
        try:
            self._my_region = device.alloc(_ring.region_size(self._config.ring_size))
        except Exception as exc:
            self._fall_back(_error_reason(exc, R.NO_MEMORY), b"")
            return
        proposal = clc.Proposal(
            min_version=clc.PROTOCOL_VERSION, max_version=clc.PROTOCOL_VERSION, flags=0,
            gid=device.gid, endpoint_id=device.endpoint_id, token=self._my_region.token,
            capacity_log2=self._config.ring_size.bit_length() - 1)
        transport.write(self._clc.propose(proposal, now))
        self._process()

    def data_received(self, data: bytes) -> None:
        if self._clc is None:
            return
        self._clc.receive_data(data, self._loop.time())
        self._process()

    def eof_received(self):
        if self._established:
            self._smc._tcp_eof()
            return True
        if self._done or self._clc is None:
            return True
        self._clc.receive_eof(self._loop.time())
        self._process()
        if self._smc._info.mode == "tcp" and self._app is not None:
            # The application protocol is now the TCP transport's: it decides half-close.
            return self._app.eof_received()
        return True

    def connection_lost(self, exc) -> None:
        self._cancel_timer()
        if self._established:
            self._smc._tcp_lost(exc)
            return
        if self._done:
            return
        self._done = True
        self._release()
        error = exc or ConnectionResetError("connection lost during the smcish handshake")
        self._fail(error)

    # ------------------------------------------------------------ server decision
    def _client_will_propose(self) -> bool:
        """Atomically: did the client claim this connection, or do we claim it as plain TCP?"""
        sock = self._tcp.get_extra_info("sockname")
        peer = self._tcp.get_extra_info("peername")
        try:
            return self._device.claim(peer[1], sock[0], sock[1], "server") is None
        except Exception as exc:
            log.debug("smcish: claim failed, staying TCP: %r", exc)
            return False

    # ------------------------------------------------------------ codec events
    def _process(self) -> None:
        clc_conn = self._clc
        while True:
            event = clc_conn.next_event()
            if event is None:
                break
            handler = self._handlers.get(type(event))
            handler(self, event)
        out = clc_conn.data_to_send()
        if out and not self._tcp.is_closing():
            self._tcp.write(out)
        if not self._done:
            self._arm_timer()
        else:
            self._cancel_timer()

    def _on_proposal(self, event) -> None:
        proposal = event.proposal
        device = self._device
        if proposal.gid != device.gid:
            self._tcp.write(self._clc.decline(R.GID_MISMATCH, self._loop.time()))
            return
        if not proposal.min_version <= clc.PROTOCOL_VERSION <= proposal.max_version:
            self._tcp.write(self._clc.decline(R.VERSION_MISMATCH, self._loop.time()))
            return
        self._attach(proposal.token, proposal.endpoint_id, 1 << proposal.capacity_log2,
                     functools.partial(self._accept_proposal, event.version))

    def _accept_proposal(self, version: int, peer_capacity: int) -> None:
        device = self._device
        now = self._loop.time()
        try:
            self._my_region = device.alloc(_ring.region_size(self._config.ring_size))
        except Exception as exc:
            self._release()
            self._tcp.write(self._clc.decline(_error_reason(exc, R.NO_MEMORY), now))
            return
        try:
            self._ring = _ring.Ring(self._my_region.mem, self._peer_region.mem,
                                    self._config.ring_size, peer_capacity,
                                    self._peer_region.doorbell_fd)
        except Exception as exc:
            log.debug("smcish: ring set-up failed: %r", exc)
            self._release()
            self._tcp.write(self._clc.decline(R.ATTACH_FAILED, now))
            return
        accept = clc.Accept(version=version, flags=0, gid=device.gid,
                            endpoint_id=device.endpoint_id, token=self._my_region.token,
                            capacity_log2=self._config.ring_size.bit_length() - 1)
        out = self._clc.accept(accept, now)
        if out:
            self._tcp.write(out)

    def _on_accept(self, event) -> None:
        accept = event.accept
        if accept.gid != self._device.gid:
            self._tcp.write(self._clc.decline(R.GID_MISMATCH, self._loop.time()))
            return
        self._attach(accept.token, accept.endpoint_id, 1 << accept.capacity_log2,
                     self._confirm_accept)

    def _confirm_accept(self, peer_capacity: int) -> None:
        try:
            self._ring = _ring.Ring(self._my_region.mem, self._peer_region.mem,
                                    self._config.ring_size, peer_capacity,
                                    self._peer_region.doorbell_fd)
        except Exception as exc:
            log.debug("smcish: ring set-up failed: %r", exc)
            self._release()
            self._tcp.write(self._clc.decline(R.ATTACH_FAILED, self._loop.time()))
            return
        self._tcp.write(self._clc.confirm(self._loop.time()))

    def _attach(self, token: bytes, endpoint_id: bytes, peer_capacity: int, then) -> None:
        """Attach the peer's region in a device thread: attaching waits on the peer's device
        endpoint, and a peer that stalls there must not freeze this loop. ``then(peer_capacity)``
        continues the handshake on the loop (the codec's decision timer still runs meanwhile)."""
        future = self._loop.run_in_executor(device_pool(), self._device.attach, token, endpoint_id)
        future.add_done_callback(functools.partial(self._attached, peer_capacity, then))

    def _attached(self, peer_capacity: int, then, future) -> None:
        region = error = None
        if future.cancelled():
            error = ConnectionError("attach cancelled")
        elif future.exception() is not None:
            error = future.exception()
        else:
            region = future.result()
            if region.size < _ring.region_size(peer_capacity):
                error = ValueError("peer region smaller than the ring it announced")
        waiting = clc.State.PROPOSAL_RECEIVED if self._role == "server" else clc.State.ACCEPT_RECEIVED
        if self._done or self._clc.state is not waiting:
            # The connection ended, or the decision timer fired, while we attached.
            if region is not None:
                release_regions(self._device, None, region)
            return
        if error is not None:
            log.debug("smcish: attach failed: %r", error)
            if region is not None:
                release_regions(self._device, None, region)
            self._release()
            self._tcp.write(self._clc.decline(_error_reason(error, R.ATTACH_FAILED),
                                              self._loop.time()))
        else:
            self._peer_region = region
            then(peer_capacity)
        self._process()

    def _on_established(self, event) -> None:
        self._done = True
        self._established = True
        self._release_claim()
        smc = self._smc
        info = smc._info
        info.device = self._device.gid.hex()
        info.ring_size = self._ring.tx_capacity
        info.peer_ring_size = self._ring.rx_capacity
        if self._app is None:
            self._app = self._app_factory()
            smc.set_protocol(self._app)
            smc._become_ism(self._ring, self._device, self._my_region, self._peer_region,
                            self._config.poll_us)
            self._app.connection_made(smc)
        else:
            smc._become_ism(self._ring, self._device, self._my_region, self._peer_region,
                            self._config.poll_us)
        self._ring = self._my_region = self._peer_region = None
        self._resolve()

    def _on_fell_back(self, event) -> None:
        self._release()
        self._fall_back(event.reason, event.data, by_peer=event.by_peer)

    def _on_aborted(self, event) -> None:
        self._done = True
        self._release()
        _stats.count("handshake_aborts")
        exc = HandshakeError(event.reason, f"smcish handshake aborted: {event.message}")
        self._fail(exc)
        self._tcp.abort()

    _handlers = {
        clc.ProposalReceived: _on_proposal,
        clc.AcceptReceived: _on_accept,
        clc.Established: _on_established,
        clc.FellBack: _on_fell_back,
        clc.Aborted: _on_aborted,
    }

    # ------------------------------------------------------------ outcomes
    def _fall_back(self, reason, data: bytes, by_peer: bool = False) -> None:
        self._done = True
        self._release_claim()
        _stats.count_fallback(reason)
        smc = self._smc
        if self._app is None:
            self._app = self._app_factory()
            smc.set_protocol(self._app)
            smc._become_tcp(reason, by_peer)
            self._app.connection_made(smc)
        else:
            smc._become_tcp(reason, by_peer)
        if data:
            deliver(self._app, data)
        self._resolve()

    def _resolve(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((self._smc, self._app))

    def _fail(self, exc) -> None:
        self._release_claim()
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_exception(exc)
        elif self._app is not None and self._smc is not None:
            self._smc._force_close(exc)

    def _release(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
        mine, peer = self._my_region, self._peer_region
        self._my_region = self._peer_region = None
        if self._device is not None and (mine is not None or peer is not None):
            release_regions(self._device, mine, peer)

    def _release_claim(self) -> None:
        claim, self._claim = self._claim, None
        if claim is not None:
            try:
                self._device.release_claim(claim)
            except Exception as exc:
                log.debug("smcish: releasing claim failed: %r", exc)

    # ------------------------------------------------------------ timer
    def _arm_timer(self) -> None:
        if (self._role == "server" and not self._client_claimed
                and self._clc.state is clc.State.WAIT_PROPOSAL):
            return
        deadline = self._clc.get_timer()
        if deadline is None:
            self._cancel_timer()
            return
        if self._timer is not None:
            if self._timer.when() == deadline:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._done:
            return
        out = self._clc.handle_timer(self._loop.time())
        if out and not self._tcp.is_closing():
            self._tcp.write(out)
        self._process()
