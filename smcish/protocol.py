"""Connection set-up through a link group, and the protocol that sits on the loop's TCP transport.

Modelled on asyncio's sslproto: ``HandshakeProtocol`` sits on the TCP transport and hands the
application an ``SmcTransport`` once the set-up decided; after that it stays on the TCP transport
as the liveness channel (ISM) or gets out of the way (TCP fallback: the application protocol is
attached to the TCP transport directly). ``ClientSetup`` is the client's half before the TCP
transport exists: it claims a slot before ``connect()`` and waits for the server's decision.
The rules and the state machine are in ``clc.py``; no byte of the set-up ever goes on TCP. The
handshake protocol's own life (``HandshakeState``) is a state machine too, moved only by
``HandshakeProtocol._set_state`` (docs/design.md 4.1).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
from typing import Any

from . import clc
from . import ring as _ring
from . import stats as _stats
from .errors import HandshakeError
from .linkgroup import Hub, LinkGroup, addr_bytes, device_pool, in_pool
from .tls import TlsFactory
from .transport import SmcInfo, SmcTransport, transition_table

log = logging.getLogger("smcish")
R = clc.DeclineReason
_MAX_HELD = 256 * 1024          # TCP bytes a server holds while it waits for the client's final word
_CLAIM_PHASES = (clc.PHASE_CLAIMED, clc.PHASE_OPTIMISTIC)


def deliver(protocol: Any, data: bytes) -> None:
    """Hand bytes to any Protocol or BufferedProtocol (used to replay bytes held during set-up)."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf: Any = protocol.get_buffer(len(view))    # (typed as any buffer: len() and [:n] work)
            n = min(len(buf), len(view))
            if not n:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)


def _log2(n: int) -> int:
    return n.bit_length() - 1


# --------------------------------------------------------------------------- client side

class ClientSetup:
    """The client's claim in a slot of ``group``, from before ``connect()`` to its final word.

    Use: ``reason = await setup.start(sock, family, server_addr)`` (None: claimed), connect the
    socket, ``setup.connected()``, then ``await setup.wait()``; ``setup.abandon(reason)`` if the
    connect fails. Afterwards ``setup.mode`` is ``"ism"`` (``ring``, ``block`` are handed to the
    transport; ``pending`` while an optimistic claim is not answered yet) or ``"tcp"``
    (``reason``, ``by_peer``).

    An optimistic claim (the default) is handed over at once: the transport sends through a
    send-only ring, and this object, kept as ``transport._setup``, attaches the server's ring
    when ACCEPTED comes or makes the transport resend everything over TCP if the server declines
    or never answers (docs/design.md 3.3).
    """

    def __init__(self, loop: Any, hub: Hub, group: LinkGroup, config: Any, remote: bool = False,
                 hold: bool = False) -> None:
        self.loop = loop
        # hold: a claim made by a patched sock_connect; the final word waits until the socket is
        # handed to create_connection(sock=) (release_hold), or the timer makes it TCP. Such a
        # claim is never optimistic: the caller may use its socket directly.
        self.hold = hold
        self.optimistic = not hold
        self.hub = hub
        self.group = group
        self.config = config
        self.remote = remote             # ismd cross-namespace claim (released at ismd afterwards)
        self.machine = clc.SetupMachine("client", loop.time(), config.handshake_timeout)
        self.slot = -1
        self._smc_gen = 0
        self.block: Any = None
        self.extent: Any = None
        self.ring: Any = None
        self.mode: str | None = None
        self.pending = False             # handed over optimistic, not answered yet
        self.reason: R | None = None
        self.by_peer = False
        self.transport: Any = None       # the SmcTransport holding us while pending
        self.error: BaseException | None = None   # mode "failed": what the application gets
        self._port = 0
        self._ino = 0
        self._claimed = False
        self._connected = False
        self._withdrew = False           # we published WITHDRAWING: the server may wait for us
        self._timer: Any = None
        self._future = loop.create_future()
        self._poll_us = config.poll_us

    async def start(self, sock: Any, family: int, server: tuple[Any, ...]) -> R | None:
        """Publish the claim for ``sock`` (bound, not connected). Returns a reason if impossible."""
        group = self.group
        got = group.take_slot()
        if got is None:
            return R.NO_MEMORY
        self.slot, self._smc_gen = got
        block = group.alloc_block(self.config.ring_size)
        if block is None:
            block = await group.alloc_block_growing(self.config.ring_size,
                                                    self.config.handshake_timeout)
        if block is None or group.dying:
            if block is not None:
                group.free_block(block[0])
            group.slot_done(self.slot, self._smc_gen)
            return R.NO_MEMORY
        self.block, self.extent = block
        local = sock.getsockname()
        self._port = local[1]
        self._ino = os.fstat(sock.fileno()).st_ino
        gen = self._smc_gen
        group.gens[self.slot] = gen
        group.group.reset_slot(self.slot)
        if self.optimistic:
            # Send-only until the server answers: nothing of the server's slot is read before.
            self.ring = _ring.Ring.in_slot(group.group, self.slot, self.extent, self.block.off,
                                           self.block.size, 0, 0, None)
        group.group.publish_setup(self.slot, _ring.Setup(
            gen=gen, phase=clc.PHASE_OPTIMISTIC if self.optimistic else clc.PHASE_CLAIMED,
            reason=0, family=family, ring0_off=self.block.off, ring0_ext=self.block.ext,
            ring0_log2=_log2(self.block.size), sock_ino=self._ino, cport=local[1],
            sport=server[1], caddr=addr_bytes(local[0]), saddr=addr_bytes(server[0])))
        if not group.group.post_claim(self._port, self.slot):
            if self.ring is not None:
                self.ring.close()
                self.ring = None
            group.free_block(self.block)
            self.block = None
            group.slot_done(self.slot, gen)
            return R.NO_MEMORY
        self._claimed = True
        group.bind(self.slot, self, self._poll_us)
        self.machine.claim(gen, self.loop.time(), optimistic=self.optimistic)
        if not self.optimistic:
            self._arm()     # (an optimistic claim's timer starts at connected(): the connect
        return None         # itself is bounded, and a failed one abandons the claim)

    def connected(self) -> None:
        """The TCP connection is up. An optimistic claim is handed over now."""
        self._connected = True
        self.machine.connected(self.loop.time())
        self._arm()
        if not self.optimistic:
            # The server may have decided while we connected (an optimistic claim handles the
            # decision whenever its notification comes: nothing waits for it here).
            self._smc_notify()
        if self.optimistic and self.mode is None:
            self.mode = "ism"
            self.pending = True
            if not self._future.done():
                self._future.set_result(None)

    def release_hold(self) -> None:
        """The socket was handed to create_connection(sock=): give the final word now."""
        self.hold = False
        if self.machine.state is clc.SetupState.ACCEPTED_SEEN and self.ring is not None:
            self.machine.confirm(self.loop.time())
        self._process()

    async def wait(self) -> None:
        await self._future

    def abandon(self, reason: R) -> None:
        """The TCP connection failed or was cancelled before a decision."""
        self.machine.abandon(reason, self.loop.time())
        self._process()

    def withdraw(self, reason: R) -> None:
        """Optimistic and pending: the server is not answering as ours (TCP bytes or EOF from it,
        or time): withdraw; the server's record, read after a fence, settles ISM or TCP."""
        if self.machine.state is clc.SetupState.OPTIMISTIC:
            self._withdrew = True
        self.machine.withdraw(reason, self.loop.time())
        self._process()

    def discard(self) -> None:
        """After an ISM decision, the connection could not be handed to the application after
        all (the loop refused the socket): abort our side, so the server's side fails too."""
        if self.mode != "ism" or self.ring is None:
            return
        ring, self.ring = self.ring, None
        try:
            ring.set_abort()
        except (_ring.RingCorrupted, ValueError):
            pass
        ring.close()
        if self.block is not None:
            self.group.free_block(self.block)
            self.block = None
        self.group.slot_done(self.slot, self._smc_gen, quarantine=True)

    # ------------------------------------------------------------------ group callbacks
    def _smc_notify(self) -> None:
        machine = self.machine
        if machine.done or machine.state is clc.SetupState.ACCEPTED_SEEN:
            return
        snap = self.group.group.read_peer_setup(self.slot)
        machine.observe(snap.gen, snap.phase, snap.reason, self.loop.time())
        self._process(snap)

    def _smc_group_failed(self, exc: BaseException) -> None:
        if self.transport is not None:
            self.transport._smc_group_failed(exc)
        elif not self.machine.done:
            self.abandon(R.ATTACH_FAILED)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.machine.done:
            if self.machine.state is clc.SetupState.OPTIMISTIC:
                self._withdrew = True
            self.machine.handle_timer(self.loop.time())
            self._process()

    # ------------------------------------------------------------------ internals
    def _process(self, snap: Any = None) -> None:
        machine = self.machine
        group = self.group
        S = clc.SetupState
        while True:
            write = machine.take_write()
            if write is not None and not group.destroyed:
                # (the C side fences after the store: our next read of the server's record is
                # ordered after it, which the withdrawal below relies on)
                group.group.set_phase(self.slot, self._smc_gen, write[0], write[1])
                if not (self.optimistic and write[0] == clc.PHASE_FINAL_ISM
                        and machine.state is S.ESTABLISHED and not self._withdrew):
                    # A server that accepted an optimistic claim is established already: the
                    # FINAL_ISM is bookkeeping, not worth waking it for. Everything else is
                    # an answer it may be waiting for.
                    group.notify_or_fail(self.slot)
            if machine.state is S.WITHDRAWING:
                snap = group.group.read_peer_setup(self.slot)
                machine.settle(snap.gen, snap.phase, snap.reason, self.loop.time())
                continue
            if machine.state is S.ACCEPTED_SEEN and (self.ring is None or not self.ring.rx_attached):
                if not self._attach(snap or group.group.read_peer_setup(self.slot)):
                    return
                continue
            break
        while True:
            event = machine.next_event()
            if event is None:
                break
            if isinstance(event, clc.Established):
                self.mode = "ism"
                self._finish()
            elif isinstance(event, clc.FellBack):
                self.mode = "tcp"
                self.reason = event.reason
                self.by_peer = event.by_peer
                self._finish()
        if not machine.done:
            self._arm()

    def _attach(self, snap: Any) -> bool:
        """ACCEPTED: build (classic) or complete (optimistic) our ring with the server's block."""
        try:
            if self.ring is None:
                self.ring = _ring.Ring.in_slot(self.group.group, self.slot, self.extent,
                                               self.block.off, self.block.size, snap.ring0_ext,
                                               snap.ring0_off, snap.ring0_log2)
            else:
                self.ring.attach_rx(snap.ring0_ext, snap.ring0_off, snap.ring0_log2)
        except (_ring.RingCorrupted, ValueError) as exc:
            log.debug("smcish: the server's ring block is unusable: %r", exc)
            if self.optimistic:
                # The server is established and may have read what we sent: no way back to TCP.
                self.mode = "failed"
                self.reason = R.PROTOCOL_ERROR
                self.error = ConnectionResetError(
                    f"smcish: the server announced an unusable ring block: {exc}")
                self._finish()
                return False
            self.machine.decline(R.PROTOCOL_ERROR, self.loop.time())
            return True
        if not self.hold:
            self.machine.confirm(self.loop.time())
        return True

    def _arm(self) -> None:
        deadline = self.machine.deadline
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        group = self.group
        if self._claimed:
            self._claimed = False
            if not group.destroyed:
                group.group.clear_claim(self._port, self.slot)
        if self.remote:
            in_pool(self.hub.device.release_remote_claim, self._ino)
        self.pending = False
        transport = self.transport
        self.transport = None
        if self.mode == "ism":
            if transport is not None:
                transport._setup_established()
        elif self.mode in ("tcp", "failed"):
            sent = b""
            if self.ring is not None:
                if transport is not None and self.mode == "tcp":
                    # Everything we published is still in our ring (the server never consumed:
                    # it did not accept): the transport resends it over TCP.
                    sent = self._published()
                self.ring.close()
                self.ring = None
            # The server may still look at this slot and our block if it never answered (it
            # may be accepting right now, only to find our withdrawal), or if it accepted with
            # a block we could not use ("failed"): quarantine both.
            quarantine = (self._connected and not self.by_peer) or self.mode == "failed"
            if self.block is not None:
                if quarantine:
                    group.free_block_later(self.block)
                else:
                    group.free_block(self.block)
                self.block = None
            group.slot_done(self.slot, self._smc_gen, quarantine=quarantine)
            if transport is not None:
                if self.mode == "tcp":
                    transport._migrate(self.reason, self.by_peer, sent)
                else:
                    transport._setup_failed(self.error)
        if not self._future.done():
            self._future.set_result(None)

    def _published(self) -> bytes:
        """The bytes our send-only ring holds (positions 0..prod of its only block)."""
        n = self.ring.tx_bytes
        if not n:
            return b""
        mem = self.group.my_exts[self.block.ext][0].mem
        return bytes(mem[self.block.off:self.block.off + n])


# --------------------------------------------------------------------------- the protocol

class HandshakeState(enum.Enum):
    """The life of a ``HandshakeProtocol``; ``_TRANSITIONS`` lists the moves (docs/design.md 4.1).

    Only the handshake's own life: while DECIDING, the set-up's progress is the server's
    ``SetupMachine.state`` (clc.py), not repeated here; a client's set-up (``ClientSetup``) is
    decided, or handed over optimistic, before its TCP transport exists.
    """

    __hash__ = object.__hash__    # members are singletons: identity hash, in C (as clc.SetupState)

    NEW = "new"
    DECIDING = "deciding"
    ESTABLISHED = "established"
    FELL_BACK = "fell-back"
    FAILED = "failed"


_H = HandshakeState
_NEW, _DECIDING, _ESTABLISHED, _FELL_BACK, _FAILED = (
    _H.NEW, _H.DECIDING, _H.ESTABLISHED, _H.FELL_BACK, _H.FAILED)

# The whitelist: state -> the states it may become. ``HandshakeProtocol._set_state`` refuses the rest.
_TRANSITIONS: dict[HandshakeState, frozenset[HandshakeState]] = {
    _NEW: frozenset({_DECIDING, _ESTABLISHED, _FELL_BACK}),
    _DECIDING: frozenset({_ESTABLISHED, _FELL_BACK, _FAILED}),
    _ESTABLISHED: frozenset(),
    _FELL_BACK: frozenset(),
    _FAILED: frozenset(),
}

_MEANINGS: dict[HandshakeState, str] = {
    _NEW: "created by the loop for a TCP connection, `connection_made` not called yet",
    _DECIDING: "server: a claim names this connection; its `SetupMachine` (clc.py) verifies, "
               "accepts or declines, and waits for the client's final word; TCP bytes are held",
    _ESTABLISHED: "shared memory (an optimistic client's too): the application has its "
                  "`SmcTransport`; we stay on TCP as the liveness channel and forward its events",
    _FELL_BACK: "plain TCP: the application protocol is on the TCP transport, we are out of the way",
    _FAILED: "the set-up was aborted, or the TCP connection was lost before a decision",
}


def state_table() -> str:
    """The handshake protocol's table as docs/design.md 4.1 holds it (a test checks)."""
    return transition_table(_TRANSITIONS, {"Meaning": _MEANINGS})


class HandshakeProtocol(asyncio.Protocol):
    """One side of one connection on the loop's TCP transport.

    Args:
        loop: the running loop.
        role: ``"client"`` or ``"server"``.
        app_factory: the application's protocol factory.
        config: a ``Config``.
        hub: the server's hub (None: the connection stays TCP).
        setup: client: the finished ``ClientSetup`` (None: TCP with ``skip_reason``).
        skip_reason: go TCP at once with this reason.
        waiter: client: a future resolved with ``(transport, protocol)``.
    """

    def __init__(self, loop: Any, role: str, app_factory: Any, config: Any, *, hub: Hub | None = None,
                 setup: ClientSetup | None = None, skip_reason: R | None = None,
                 waiter: Any = None) -> None:
        self._loop = loop
        self._role = role
        self._app_factory = app_factory
        self._config = config
        self._hub = hub
        self._setup = setup
        self._skip_reason = skip_reason
        self._waiter = waiter
        self._tcp: Any = None
        self._smc: Any = None
        self._app: Any = None
        self._state = _NEW                # the life: see _TRANSITIONS, moved only by _set_state()
        # server set-up state
        self._machine: clc.SetupMachine | None = None
        self._group: LinkGroup | None = None
        self._slot = -1
        self._smc_gen = 0
        self._claim: Any = None
        self._block: Any = None
        self._extent: Any = None
        self._ring: Any = None
        self._held = bytearray()
        self._held_paused = False        # reading paused: _MAX_HELD bytes held before the outcome
        self._eof = False
        self._timer: Any = None
        self._poll_us = config.poll_us

    def _set_state(self, new: HandshakeState) -> None:
        """The one place the handshake's life moves; refuses a move ``_TRANSITIONS`` does not list."""
        old = self._state
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"HandshakeProtocol cannot go from {old.name} to {new.name}")
        self._state = new

    # ------------------------------------------------------------ TCP events
    def connection_made(self, transport: Any) -> None:
        self._tcp = transport
        self._smc = SmcTransport(self._loop, transport, SmcInfo(self._role))
        if self._role == "client":
            setup = self._setup
            if setup is None:
                self._fall_back(self._skip_reason or R.INTERNAL, b"")
            elif setup.mode == "ism":
                self._establish(setup.ring, setup.group, setup.slot, setup._smc_gen, setup.block,
                                setup if setup.pending else None)
            else:
                self._fall_back(setup.reason or R.INTERNAL, b"", setup.by_peer)
            return
        if self._skip_reason is not None:
            self._fall_back(self._skip_reason, b"")
            return
        self._server_start()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _ESTABLISHED:
            setup = self._smc._setup
            if setup is None:
                self._smc._tcp_bytes()
                return
            # Optimistic and not answered: TCP bytes from the server mean it is not ours (or it
            # declined and its application speaks first). Hold them and withdraw.
            self._held += data
            setup.withdraw(R.PEER_NOT_SMCISH)
            if self._smc._setup is None and self._smc._info.mode == "ism" and self._held:
                self._held.clear()
                self._smc._tcp_bytes()         # it accepted after all: it must not write on TCP
            return
        if state is not _DECIDING:
            return
        self._held += data
        self._smc_notify()                # a client that went TCP wrote FINAL_TCP first
        if self._state is _DECIDING and len(self._held) > _MAX_HELD and not self._held_paused:
            # A client whose application uses its pre-claimed socket in a way smcish does not
            # see (a plain send() from a thread, ...) writes on TCP before its final word, which
            # its claim timer then gives (FINAL_TCP). Hold no more: let TCP flow control stop
            # the sender until then (nothing is dropped, the connection is not reset).
            self._held_paused = True
            self._tcp.pause_reading()

    def eof_received(self) -> Any:
        state = self._state
        if state is _ESTABLISHED:
            setup = self._smc._setup
            if setup is not None:              # optimistic, not answered: see data_received
                self._eof = True
                setup.withdraw(R.PEER_NOT_SMCISH)
                if self._smc._setup is None and self._smc._info.mode == "ism":
                    self._smc._tcp_eof()
                return True
            self._smc._tcp_eof()
            return True
        if state is not _DECIDING:
            return True
        self._eof = True
        self._smc_notify()
        machine = self._machine
        if self._state is _DECIDING and machine is not None:
            machine.peer_gone(self._loop.time())
            self._process()
        # Still DECIDING (verifying through ismd): decided when that ends. Else _fall_back
        # delivered the EOF to the application. The TCP transport stays open either way.
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        state = self._state
        if state is _ESTABLISHED:
            self._smc._tcp_lost(exc)
            return
        if state is not _DECIDING:
            return
        self._set_state(_FAILED)
        self._release_setup()
        error = exc or ConnectionResetError("connection lost during the smcish set-up")
        self._fail(error)

    # ------------------------------------------------------------ server set-up
    def _server_start(self) -> None:
        hub = self._hub
        tcp = self._tcp
        peer = tcp.get_extra_info("peername")
        local = tcp.get_extra_info("sockname")
        found = None
        if hub is not None and peer and local:
            try:
                found = hub.find_claim(peer, local)
            except Exception as exc:  # noqa: BLE001 - no claim visible: a plain client
                log.debug("smcish: claim lookup failed: %r", exc)
        if found is None:
            self._fall_back(R.PEER_NOT_SMCISH, b"")
            return
        assert hub is not None                      # (found through it)
        group, slot, setup = found
        if slot in group.conns:
            # Our side of that slot is still in use: an honest client never claims it (it waits
            # for our release), so this claim is not for us to answer. Stay TCP without a word.
            self._fall_back(R.PROTOCOL_ERROR, b"")
            return
        self._set_state(_DECIDING)
        self._group, self._slot, self._claim, self._smc_gen = group, slot, setup, setup.gen
        self._machine = clc.SetupMachine("server", self._loop.time(), self._config.handshake_timeout)
        group.bind(slot, self, self._poll_us)        # hold the slot while we decide
        verdict = self._verify_local(peer, local, setup, group, hub)
        if verdict is True:
            self._accept()
        elif verdict is False:
            self._decline(R.PROTOCOL_ERROR)
        else:
            sock = tcp.get_extra_info("socket")
            fut = self._loop.run_in_executor(device_pool(), hub.device.verify_remote_peer, sock,
                                             setup.sock_ino, group.peer_endpoint)
            fut.add_done_callback(self._remote_verified)

    def _verify_local(self, peer: tuple[Any, ...], local: tuple[Any, ...], setup: Any, group: LinkGroup,
                      hub: Hub) -> bool | None:
        """Is the socket at the other end of this connection the one the claim names?

        True/False from the kernel (same network namespace); None when the kernel cannot see it
        here and the device can check across namespaces (ismd).
        """
        from ism_backend import sockets

        family = self._tcp.get_extra_info("socket").family
        try:
            hit = sockets.diag().lookup(family, (peer[0], peer[1]), (local[0], local[1]))
        except OSError as exc:
            log.debug("smcish: sock_diag lookup failed: %r", exc)
            return False
        if hit is None:
            return None if hub.device.kind == "daemon" else False
        return hit.inode == setup.sock_ino and hit.uid == group.peer_uid and hit.inode != 0

    def _remote_verified(self, fut: Any) -> None:
        if self._state is not _DECIDING:
            return
        ok = not fut.cancelled() and fut.exception() is None and fut.result()
        if ok:
            self._accept(waited=True)
        else:
            self._decline(R.PROTOCOL_ERROR)

    def _accept(self, waited: bool = False) -> None:
        group = self._group
        assert group is not None                    # (DECIDING)
        got = group.alloc_block(self._config.ring_size)
        if got is None:
            task = self._loop.create_task(group.alloc_block_growing(
                self._config.ring_size, self._config.handshake_timeout))
            # (the group passed along: a set-up that ended meanwhile has let go of it)
            task.add_done_callback(functools.partial(self._grown, group))
            return
        self._accept_with(got, waited)

    def _grown(self, group: LinkGroup, task: Any) -> None:
        got = None
        if not task.cancelled() and task.exception() is None:
            got = task.result()
        if self._state is not _DECIDING:
            if got is not None:
                group.free_block(got[0])
            return
        if got is None:
            self._decline(R.NO_MEMORY)
        else:
            self._accept_with(got, True)

    def _accept_with(self, got: tuple[Any, Any], waited: bool = False) -> None:
        group, machine = self._group, self._machine
        assert group is not None and machine is not None    # (DECIDING)
        slot, claim = self._slot, self._claim
        block, extent = got
        if group.dying:
            group.free_block(block)
            self._decline(R.ATTACH_FAILED)
            return
        # After an await (extent growth, a remote verification) the client may have given up
        # meanwhile: look again (without one, the claim we found is current).
        snap = group.group.read_peer_setup(slot) if waited else claim
        if snap.gen != claim.gen or snap.phase not in _CLAIM_PHASES:
            group.free_block(block)                 # the client gave up meanwhile
            machine.accept(claim.gen, self._loop.time())
            self._smc_notify()
            return
        group.group.reset_slot(slot)
        try:
            ring = _ring.Ring.in_slot(group.group, slot, extent, block.off, block.size,
                                      claim.ring0_ext, claim.ring0_off, claim.ring0_log2)
        except (_ring.RingCorrupted, ValueError) as exc:
            log.debug("smcish: the client's ring block is unusable: %r", exc)
            group.free_block(block)
            self._decline(R.PROTOCOL_ERROR)
            return
        self._block, self._extent, self._ring = block, extent, ring
        group.gens[slot] = claim.gen
        group.group.publish_setup(slot, _ring.Setup(
            gen=claim.gen, phase=clc.PHASE_ACCEPTED, reason=0, family=claim.family,
            ring0_off=block.off, ring0_ext=block.ext, ring0_log2=_log2(block.size), sock_ino=0,
            cport=claim.cport, sport=claim.sport, caddr=claim.caddr, saddr=claim.saddr))
        group.notify_or_fail(slot)
        machine.accept(claim.gen, self._loop.time())
        self._smc_notify()                # OPTIMISTIC (after the fence): established right here
        if self._state is _DECIDING:      # a CLAIMED client's final word follows at once
            self._arm_timer()
            group.schedule_poll(wake=True)

    def _decline(self, reason: R) -> None:
        machine = self._machine
        assert machine is not None                  # (DECIDING)
        machine.decline(reason, self._loop.time(), gen=self._smc_gen)
        self._process()

    # ------------------------------------------------------------ group callbacks (server)
    def _smc_notify(self) -> None:
        machine, group = self._machine, self._group
        if (self._state is not _DECIDING or machine is None or group is None
                or machine.state is not clc.SetupState.WAIT_FINAL):
            return
        snap = group.group.read_peer_setup(self._slot)
        machine.observe(snap.gen, snap.phase, snap.reason, self._loop.time())
        self._process()

    def _smc_group_failed(self, exc: BaseException) -> None:
        if self._state is _DECIDING:
            self._abort(R.ATTACH_FAILED, f"link group failed: {exc}")

    def _process(self) -> None:
        machine, group = self._machine, self._group
        assert machine is not None and group is not None    # (DECIDING)
        write = machine.take_write()
        if write is not None and not group.destroyed:
            group.group.set_phase(self._slot, self._smc_gen, write[0], write[1])
            group.notify_or_fail(self._slot)
        while True:
            event = machine.next_event()
            if event is None:
                break
            if isinstance(event, clc.Established):
                self._cancel_timer()
                self._establish(self._ring, group, self._slot, self._smc_gen, self._block)
                self._ring = self._block = None
            elif isinstance(event, clc.FellBack):
                self._cancel_timer()
                self._release_setup()
                self._fall_back(event.reason, bytes(self._held), event.by_peer)
            elif isinstance(event, clc.Aborted):
                self._abort(event.reason, event.message)
        if self._state is _DECIDING:
            self._arm_timer()

    def _release_setup(self) -> None:
        """Server: give back what the set-up took (ring, block, our side of the slot)."""
        group = self._group
        if group is None or self._machine is None:
            return
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._block is not None:
            group.free_block(self._block)
            self._block = None
        if group.conns.get(self._slot) is self:
            group.slot_done(self._slot, self._smc_gen)
        self._group = None

    # ------------------------------------------------------------ outcomes
    def _establish(self, ring: Any, group: LinkGroup, slot: int, gen: int, block: Any,
                   pending: Any = None) -> None:
        self._set_state(_ESTABLISHED)
        smc = self._smc
        info = smc._info
        info.device = group.hub.device.gid.hex()
        info.ring_size = ring.tx_capacity
        info.peer_ring_size = ring.rx_capacity if pending is None else None
        self._app = self._app_factory()
        smc.set_protocol(self._app)
        smc._become_ism(ring, group, slot, gen, block, self._config, pending, self)
        self._app.connection_made(smc)
        if self._held:
            self._held.clear()
            smc._tcp_bytes()
        elif self._eof:
            smc._tcp_eof()
        self._resolve()

    def _migrated(self) -> None:
        """The optimistic transport went TCP: hand the application what TCP brought meanwhile."""
        app = self._app
        data, self._held = bytes(self._held), bytearray()
        if data:
            deliver(app, data)
        if self._eof:
            try:
                keep_open = app.eof_received()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - as asyncio: a protocol's error goes to the loop
                self._loop.call_exception_handler({
                    "message": "Fatal error: protocol.eof_received() call failed.",
                    "exception": exc, "transport": self._smc, "protocol": app})
                self._tcp.abort()
            else:
                if not keep_open:
                    self._tcp.close()

    def _fall_back(self, reason: R, data: bytes, by_peer: bool = False) -> None:
        self._set_state(_FELL_BACK)
        if self._held_paused:             # (before delivering: the application may pause it)
            self._held_paused = False
            self._tcp.resume_reading()
        _stats.count_fallback(reason, peer=self._tcp, server=self._role == "server")
        smc = self._smc
        factory = self._app_factory
        # A TLS factory builds the loop's own SSLProtocol for TCP (tls.py); isinstance, not a
        # getattr that fails for every other factory (this is the fallback set-up path).
        self._app = factory.for_tcp() if isinstance(factory, TlsFactory) else factory()
        smc.set_protocol(self._app)
        smc._become_tcp(reason, by_peer)
        self._app.connection_made(smc)
        self._held = bytearray()
        if data:
            deliver(self._app, data)
        if self._eof:
            try:
                keep_open = self._app.eof_received()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - as asyncio: a protocol's error goes to the loop
                self._loop.call_exception_handler({
                    "message": "Fatal error: protocol.eof_received() call failed.",
                    "exception": exc, "transport": smc, "protocol": self._app})
                self._tcp.abort()
            else:
                if not keep_open:
                    self._tcp.close()
        self._resolve()

    def _abort(self, reason: R, message: str) -> None:
        self._set_state(_FAILED)
        self._cancel_timer()
        self._release_setup()
        _stats.count("handshake_aborts")
        self._fail(HandshakeError(reason, f"smcish set-up aborted: {message}"))
        self._tcp.abort()

    def _resolve(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((self._smc, self._app))

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_exception(exc)
        elif self._app is not None and self._smc is not None:
            self._smc._force_close(exc, False)

    # ------------------------------------------------------------ timer (server)
    def _arm_timer(self) -> None:
        deadline = self._machine.deadline if self._machine is not None else None
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        machine = self._machine
        if self._state is not _DECIDING or machine is None:
            return
        machine.handle_timer(self._loop.time())
        self._process()
