"""One TCP flow as the application sees it, and the state it is built from.

This module owns :class:`TcpEndpoint`: what a flow negotiated from the
guest's SYN (MSS, window scaling, RFC 7323 §2.2), its sequence variables,
its bounded send and receive buffers (charged to the optional shared
:class:`~.tcp_config.BufferBudget`), the application API (:meth:`~TcpEndpoint.send`,
:meth:`~TcpEndpoint.read`, :meth:`~TcpEndpoint.close`, :meth:`~TcpEndpoint.abort`),
building outgoing segments with our current window, and the two ways a
flow ends (orderly finish, reset). The state machine that moves a flow on
guest segments and timers is :class:`~.tcp.TcpConnection`, its subclass,
in :mod:`.tcp`. Sans-IO: no sockets, no clocks.
"""

from __future__ import annotations

import logging
from collections import Counter

from pytest_gondolin.netpolicy.stack.packets import PacketError
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    seq_add,
)
from pytest_gondolin.netpolicy.stack.tcp_config import DEFAULT_PEER_MSS, BufferBudget, TcpConfig
from pytest_gondolin.netpolicy.stack.tcp_states import APP_CAN_SEND, CloseReason, TcpState

__all__ = ["TcpEndpoint"]

logger = logging.getLogger(__name__)


class TcpEndpoint:
    """The buffers, sequence variables and application side of one flow.

    Not used on its own: :class:`~.tcp.TcpConnection` adds the segment
    and timer processing. The SYN-ACK is queued at construction.
    """

    def __init__(
        self,
        syn: TcpSegment,
        *,
        iss: int,
        now: float,
        config: TcpConfig | None = None,
        budget: BufferBudget | None = None,
        counters: Counter[str] | None = None,
    ) -> None:
        if not syn.syn or syn.has_ack or syn.rst or syn.fin:
            raise PacketError("tcp-not-syn", f"cannot open a flow from {syn.describe()}")
        self.config = cfg = config or TcpConfig()
        self._budget = budget
        self._counters: Counter[str] = counters if counters is not None else Counter()
        self.local_port = syn.dst_port
        self.remote_port = syn.src_port
        self._state = TcpState.SYN_RECEIVED
        self._close_reason: CloseReason | None = None

        # Receive side.
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self._recv = bytearray()
        self._eof = False
        self._adv_edge = self.rcv_nxt  # right edge of the window last advertised
        self._ack_pending = False

        # Send side.
        self.iss = seq_add(iss, 0)  # into sequence space
        self.snd_una = self.iss
        self.snd_nxt = seq_add(self.iss, 1)
        self._snd_max = self.snd_nxt  # highest sequence number ever sent
        self._send = bytearray()  # bytes from snd_una on, sent or not
        self._fin_queued = False
        self._fin_sent = False
        self._fin_acked = False
        self._send_blocked = False

        # Options (RFC 7323 §2.2: scaling only if both SYNs carry it).
        self._ws_ok = syn.options.window_scale is not None
        self._snd_shift = syn.options.window_scale or 0
        self._rcv_shift = cfg.window_shift if self._ws_ok else 0
        peer_mss = syn.options.mss if syn.options.mss is not None else DEFAULT_PEER_MSS
        self.mss = min(cfg.mss, max(peer_mss, cfg.min_peer_mss))
        self.snd_wnd = syn.window  # RFC 7323 §2.2: a SYN's window is never scaled
        self._max_snd_wnd = self.snd_wnd
        self._wl1 = syn.seq
        self._wl2 = self.iss

        # Timers.
        self._rto_deadline: float | None = now + cfg.rto_initial
        self._retries = 0
        self._burst: int | None = None  # segments allowed right after an RTO
        self._persist_deadline: float | None = None
        self._persist_backoff = 0
        self._unanswered_probes = 0

        self._out: list[TcpSegment] = []
        self._queue_syn_ack()

    # -- public state ---------------------------------------------------------

    @property
    def state(self) -> TcpState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is TcpState.CLOSED

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the flow closed; ``None`` while it is open."""
        return self._close_reason

    @property
    def readable(self) -> int:
        """Bytes from the guest waiting for :meth:`read`."""
        return len(self._recv)

    @property
    def eof(self) -> bool:
        """The guest sent FIN: after what is buffered, no more data will come."""
        return self._eof

    @property
    def writable_bytes(self) -> int:
        """How many bytes :meth:`send` would accept now."""
        if self._state not in APP_CAN_SEND or self._fin_queued:
            return 0
        room = self.config.send_buffer - len(self._send)
        if self._budget is not None:
            room = min(room, self._budget.available)
        return max(room, 0)

    @property
    def unacked_bytes(self) -> int:
        """Bytes accepted by :meth:`send` that the guest has not acknowledged."""
        return len(self._send)

    @property
    def buffered_bytes(self) -> int:
        """Bytes this flow holds in both buffers."""
        return len(self._send) + len(self._recv)

    @property
    def next_timer(self) -> float | None:
        """The earliest time :meth:`on_timer` has work, or ``None``."""
        if self._state is TcpState.CLOSED:
            return None
        deadlines = [d for d in (self._rto_deadline, self._persist_deadline) if d is not None]
        return min(deadlines) if deadlines else None

    # -- application side -----------------------------------------------------

    def send(self, data: bytes) -> int:
        """Queue bytes for the guest; return how many were accepted.

        Accepts at most :attr:`writable_bytes` (0 once :meth:`close` was
        called or the flow is closing or closed). After a short write,
        :meth:`poll_writable` reports when there is room again.
        """
        room = self.writable_bytes
        n = min(len(data), room)
        if n < len(data) and self._state in APP_CAN_SEND and not self._fin_queued:
            self._send_blocked = True
            if self._budget is not None and self._budget.available < len(data) - n:
                self._budget.starved = True
        if n:
            self._send += data[:n]
            self._take(n)
        return n

    def poll_writable(self) -> bool:
        """True once after a short :meth:`send`, when room has come back."""
        if self._send_blocked and self.writable_bytes > 0:
            self._send_blocked = False
            return True
        if self._state not in APP_CAN_SEND:
            self._send_blocked = False
        return False

    def read(self, max_bytes: int | None = None) -> bytes:
        """Take up to ``max_bytes`` (default: all) bytes the guest sent.

        Freeing buffer space may open our window; :meth:`flush` then
        carries the window update.
        """
        n = len(self._recv) if max_bytes is None else max(0, min(max_bytes, len(self._recv)))
        data = bytes(self._recv[:n])
        del self._recv[:n]
        self._release(n)
        return data

    def close(self) -> None:
        """Send FIN after all queued data (half-close; guest data still flows in).

        Idempotent; does nothing once closing or closed.
        """
        if self._state in APP_CAN_SEND:
            self._fin_queued = True

    def abort(self) -> None:
        """Reset the flow now (RST to the guest), discarding both buffers."""
        if self._state is not TcpState.CLOSED:
            self._reset(CloseReason.ABORTED, send_rst=True)

    def release(self) -> None:
        """Discard unread data of a closed flow (returns it to the budget)."""
        if self._state is TcpState.CLOSED:
            self._release(len(self._recv))
            self._recv.clear()

    # -- internals ------------------------------------------------------------

    def _take(self, n: int) -> None:
        if self._budget is not None:
            self._budget.take(n)

    def _release(self, n: int) -> None:
        if self._budget is not None and n:
            self._budget.release(n)

    def _rcv_window(self, *, count_starvation: bool = True) -> int:
        """Free receive space in bytes: the most we can accept right now."""
        room = self.config.recv_buffer - len(self._recv)
        if self._budget is not None and self._budget.available < room:
            room = self._budget.available
            if count_starvation:
                self._budget.starved = True
        return max(room, 0)

    def _segment(
        self, seq: int, flags: int, payload: bytes = b"", options: TcpOptions | None = None
    ) -> TcpSegment:
        """Build an outgoing segment; any ACK carries our current window."""
        window = 0
        ack = 0
        if flags & TCP_ACK:
            ack = self.rcv_nxt
            room = self._rcv_window()
            if flags & TCP_SYN:
                window = min(room, 0xFFFF)  # RFC 7323 §2.2: unscaled in a SYN
                edge = seq_add(self.rcv_nxt, window)
            else:
                window = min(room >> self._rcv_shift, 0xFFFF)
                edge = seq_add(self.rcv_nxt, window << self._rcv_shift)
            self._adv_edge = edge
            self._ack_pending = False
        return TcpSegment(
            self.local_port,
            self.remote_port,
            seq,
            ack,
            flags,
            window,
            payload,
            options if options is not None else TcpOptions(),
        )

    def _queue_syn_ack(self) -> None:
        options = TcpOptions(
            mss=self.config.mss, window_scale=self._rcv_shift if self._ws_ok else None
        )
        self._out.append(self._segment(self.iss, TCP_SYN | TCP_ACK, options=options))

    def _finish(self) -> None:
        """Orderly close: both FINs acknowledged. Unread data stays readable."""
        self._state = TcpState.CLOSED
        self._close_reason = CloseReason.NORMAL
        self._release(len(self._send))
        self._send.clear()
        self._rto_deadline = self._persist_deadline = None
        self._counters[f"tcp.closed.{CloseReason.NORMAL.value}"] += 1
        logger.debug("tcp %d<-%d closed", self.local_port, self.remote_port)

    def _reset(self, reason: CloseReason, *, send_rst: bool) -> None:
        self._out.clear()
        self._ack_pending = False
        if send_rst:
            self._out.append(
                TcpSegment(
                    self.local_port,
                    self.remote_port,
                    self.snd_nxt,
                    self.rcv_nxt,
                    TCP_RST | TCP_ACK,
                    0,
                )
            )
        self._release(len(self._send) + len(self._recv))
        self._send.clear()
        self._recv.clear()
        self._state = TcpState.CLOSED
        self._close_reason = reason
        self._rto_deadline = self._persist_deadline = None
        self._counters[f"tcp.closed.{reason.value}"] += 1
        logger.debug("tcp %d<-%d reset: %s", self.local_port, self.remote_port, reason.value)
