"""Sans-IO TCP for connections the guest opens to the host-emulated peers.

This module owns the TCP state machine (RFC 9293 §3.3.2) for one flow:
what a guest segment or an expired timer does to it. The flow's buffers,
sequence variables and application API are :class:`~.tcp_endpoint.TcpEndpoint`
(the base class); its states are in :mod:`.tcp_states`.
The host always plays the passive side: a flow starts from the guest's
SYN and the host answers for whatever address and port the guest dialled.
No sockets, no clocks: segments go in with the caller's ``now``, segments
come out; the application side (the driver that relays to the real
upstream) uses :meth:`TcpConnection.send`, :meth:`~TcpConnection.read`,
:meth:`~TcpConnection.close` and :meth:`~TcpConnection.abort`, then calls
:meth:`~TcpConnection.flush` to collect what those produced.

States and transitions (host side)::

    (guest SYN) -> SYN_RECEIVED --ACK--> ESTABLISHED
    ESTABLISHED --guest FIN--> CLOSE_WAIT --close()--> LAST_ACK --ACK--> CLOSED
    ESTABLISHED --close()--> FIN_WAIT_1 --ACK--> FIN_WAIT_2 --guest FIN--> CLOSED
                             FIN_WAIT_1 --guest FIN--> CLOSING --ACK--> CLOSED
    any --RST in / abort() / retransmission give-up--> CLOSED

What is deliberately simpler than a general-purpose TCP, and why it is
sound *here* -- the only network is an in-order, lossless stream socket
to QEMU, and the only peer is one guest kernel:

* No TIME-WAIT (RFC 9293 §3.6.1). It guards against old duplicates
  delayed in the network and against a lost final ACK; neither can happen
  on this link, and skipping it frees the flow slot at once. A stray
  retransmission afterwards gets a RST from the stack, which the guest
  handles.
* No RTT estimation (RFC 6298): a fixed initial RTO (1 s, RFC 6298 §2.1)
  doubled on each retry up to a cap; after ``max_retries`` the flow is
  reset. Segments are only "lost" when the guest drops them.
* Out-of-order segments are dropped and answered with a duplicate ACK;
  the guest retransmits (its fast retransmit kicks in at once). Nothing
  can arrive out of order on this link unless the guest itself dropped
  something.
* No SACK, no timestamps, no congestion control (there is no congestion
  between a VM and its host). Window scaling (RFC 7323) is supported.
* Data carried on the SYN is not accepted (no TFO); the guest resends it.

What is *not* simplified: sequence arithmetic modulo 2**32 (RFC 9293
§3.4, in :mod:`.segments`), the acceptability test (§3.10.7.4), both receive windows (we never
send beyond the guest's scaled window; we advertise only our free receive
buffer, so a slow application backpressures the guest), zero-window
probing (§3.8.6.1), RFC 5961 challenge ACKs for in-window RST and SYN,
and bounded send and receive buffers, optionally also bounded by a
budget shared by all flows (:mod:`.tcp_config`).
"""

from __future__ import annotations

import logging

from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TcpSegment,
    seq_add,
    seq_diff,
    seq_in_window,
    seq_le,
    seq_lt,
)
from pytest_gondolin.netpolicy.stack.tcp_endpoint import TcpEndpoint
from pytest_gondolin.netpolicy.stack.tcp_states import (
    RECEIVING,
    SENDING,
    CloseReason,
    TcpState,
)

__all__ = ["CloseReason", "TcpConnection", "TcpState"]

logger = logging.getLogger(__name__)


class TcpConnection(TcpEndpoint):
    """One guest-initiated TCP flow, host side.

    Created from the guest's SYN; the SYN-ACK is queued at once (collect it
    with :meth:`flush`). Guarantees:

    * never raises on any segment passed to :meth:`receive_segment`;
    * never sends beyond the guest's advertised (scaled) window, nor
      segments larger than the negotiated MSS;
    * advertises only free receive-buffer space (and never more than the
      shared budget has), so :attr:`readable` stays <= ``recv_buffer``;
    * buffers at most ``send_buffer`` bytes from :meth:`send`;
    * the :attr:`next_timer` deadline is ``None`` or a time at which
      :meth:`on_timer` has work; after ``max_retries`` fruitless
      retransmissions the flow is reset (``close_reason`` TIMEOUT).
    """

    # -- network side ---------------------------------------------------------

    def receive_segment(self, seg: TcpSegment, now: float) -> list[TcpSegment]:
        """Process one segment from the guest; return the segments to send.

        Follows RFC 9293 §3.10.7.4 ("SEGMENT ARRIVES", other states) with
        RFC 5961 mitigations. Never raises.
        """
        if self._state is TcpState.CLOSED:
            return []
        self._unanswered_probes = 0
        if seg.syn and not seg.rst:
            if self._state is TcpState.SYN_RECEIVED and seg.seq == self.irs and not seg.has_ack:
                # A retransmitted SYN: our SYN-ACK was lost or is late.
                self._queue_syn_ack()
            else:
                self._challenge_ack()  # RFC 5961 §4.2
            return self.flush(now)

        payload, fin = seg.payload, seg.fin
        wnd = self._rcv_window(count_starvation=False)
        if not self._acceptable(seg.seq, seg.seg_len, wnd):
            if wnd == 0 and seg.seq == self.rcv_nxt and not seg.rst:
                # §3.10.7.4: a zero window accepts no data, but ACK fields
                # must still be processed, or two full buffers deadlock.
                payload, fin = b"", False
                self._ack_pending = True
                self._counters["tcp.zero-window-drops"] += 1
            else:
                if not seg.rst:
                    self._ack_pending = True
                self._counters["tcp.unacceptable"] += 1
                return self.flush(now)

        if seg.rst:
            if seg.seq == self.rcv_nxt:
                self._reset(CloseReason.GUEST_RESET, send_rst=False)
            else:
                self._challenge_ack()  # RFC 5961 §3.2: in window but not exact
            return self.flush(now)

        if not seg.has_ack:
            return self.flush(now)
        if self._state is TcpState.SYN_RECEIVED:
            if not (seq_lt(self.snd_una, seg.ack) and seq_le(seg.ack, self._snd_max)):
                self._out.append(
                    TcpSegment(self.local_port, self.remote_port, seg.ack, 0, TCP_RST, 0)
                )
                return self.flush(now)
            self._state = TcpState.ESTABLISHED
            # Our SYN is acknowledged. It has a sequence number but no byte
            # in the send buffer, so account for it here, not in _process_ack.
            self.snd_una = seg.ack
            self._retries = 0
            self.snd_wnd = seg.window << self._snd_shift
            self._max_snd_wnd = max(self._max_snd_wnd, self.snd_wnd)
            self._wl1, self._wl2 = seg.seq, seg.ack
            logger.debug("tcp %d<-%d established", self.local_port, self.remote_port)
        if not self._process_ack(seg, now) or self._state is TcpState.CLOSED:
            return self.flush(now)

        if payload or fin:
            self._process_text(seg.seq, payload, fin)
        return self.flush(now)

    def on_timer(self, now: float) -> list[TcpSegment]:
        """Run expired timers; return segments to (re)send.

        Retransmits the oldest unacknowledged data (or the SYN-ACK, or the
        FIN) when the retransmission timer expires, with exponential
        backoff; probes a zero window when the persist timer expires;
        resets the flow after ``max_retries`` fruitless attempts.
        """
        if self._state is TcpState.CLOSED:
            return []
        cfg = self.config
        if self._rto_deadline is not None and now >= self._rto_deadline:
            if self._retries >= cfg.max_retries:
                logger.debug(
                    "tcp %d<-%d: guest unresponsive, resetting", self.local_port, self.remote_port
                )
                self._reset(CloseReason.TIMEOUT, send_rst=True)
                return self.flush(now)
            self._retries += 1
            self._counters["tcp.retransmits"] += 1
            self._rto_deadline = now + self._backoff(self._retries)
            if self._state is TcpState.SYN_RECEIVED:
                self._queue_syn_ack()
            else:
                # Go back to the oldest unacknowledged byte, but send only
                # one segment until the guest acknowledges something.
                self._rewind()
                self._burst = 1
        if self._persist_deadline is not None and now >= self._persist_deadline:
            if self._unanswered_probes >= cfg.max_retries:
                self._reset(CloseReason.TIMEOUT, send_rst=True)
                return self.flush(now)
            self._unanswered_probes += 1
            self._persist_backoff += 1
            self._counters["tcp.window-probes"] += 1
            # An already-acknowledged sequence number: the guest must answer
            # with an ACK carrying its current window (as Linux probes).
            self._out.append(self._segment(seq_add(self.snd_una, -1), TCP_ACK))
            self._persist_deadline = now + self._persist_interval()
        return self.flush(now)

    def flush(self, now: float) -> list[TcpSegment]:
        """Return everything that should go on the wire now.

        That is queued control segments, new or retransmitted data and FIN
        as the guest's window allows, and an ACK or window update if one
        is due. Arms the retransmission / persist timers from ``now``.
        """
        out = self._out
        self._out = []
        if self._state in SENDING:
            self._emit_data(out, now)
        if self._ack_pending or (self._state in RECEIVING and self._window_update_due()):
            out.append(self._segment(self.snd_nxt, TCP_ACK))
        if self.snd_nxt == self.snd_una:
            self._rto_deadline = None
        return out

    # -- internals ------------------------------------------------------------

    def _challenge_ack(self) -> None:
        self._ack_pending = True
        self._counters["tcp.challenge-acks"] += 1

    def _acceptable(self, seq: int, seg_len: int, wnd: int) -> bool:
        # The four cases of RFC 9293 §3.10.7.4.
        if seg_len == 0:
            return seq == self.rcv_nxt if wnd == 0 else seq_in_window(seq, self.rcv_nxt, wnd)
        if wnd == 0:
            return False
        return seq_in_window(seq, self.rcv_nxt, wnd) or seq_in_window(
            seq_add(seq, seg_len - 1), self.rcv_nxt, wnd
        )

    def _process_ack(self, seg: TcpSegment, now: float) -> bool:
        """Apply the ACK field; False if the segment must be dropped."""
        ack = seg.ack
        if seq_lt(self._snd_max, ack):
            # Acknowledges something never sent: ACK and drop (§3.10.7.4).
            self._ack_pending = True
            return False
        if seq_lt(ack, seq_add(self.snd_una, -self._max_snd_wnd)):
            # Far older than any window we were offered: RFC 5961 §5.2.
            self._ack_pending = True
            return False
        if seq_lt(self.snd_una, ack):
            acked = seq_diff(ack, self.snd_una)
            data_acked = min(acked, len(self._send))
            del self._send[:data_acked]
            self._release(data_acked)
            if acked > data_acked:
                self._fin_acked = True
            self.snd_una = ack
            if seq_lt(self.snd_nxt, ack):
                self.snd_nxt = ack
            self._retries = 0
            self._burst = None
            self._rto_deadline = (
                None if self.snd_nxt == self.snd_una else now + self.config.rto_initial
            )
        # Window update, guarded against old segments (§3.10.7.4, SND.WL1/WL2).
        if seq_lt(self._wl1, seg.seq) or (self._wl1 == seg.seq and seq_le(self._wl2, ack)):
            self.snd_wnd = seg.window << self._snd_shift
            self._max_snd_wnd = max(self._max_snd_wnd, self.snd_wnd)
            self._wl1, self._wl2 = seg.seq, ack
            if self.snd_wnd:
                self._persist_deadline = None
                self._persist_backoff = 0
        if self.snd_wnd == 0 and self.snd_nxt != self.snd_una:
            # The guest shrank its window to zero with data in flight.
            # §3.8.6.1: probe it, and do not time the connection out.
            self._rewind()
            self._rto_deadline = None
        if self._fin_acked:
            if self._state is TcpState.FIN_WAIT_1:
                self._state = TcpState.FIN_WAIT_2
            elif self._state in (TcpState.CLOSING, TcpState.LAST_ACK):
                self._finish()
        return True

    def _process_text(self, seq: int, payload: bytes, fin: bool) -> None:
        self._ack_pending = True
        if self._state not in RECEIVING:
            return  # the guest already sent FIN; nothing more can follow it
        if seq_lt(self.rcv_nxt, seq):
            # Out of order: drop it; the duplicate ACK makes the guest resend.
            self._counters["tcp.out-of-order"] += 1
            return
        data = payload[seq_diff(self.rcv_nxt, seq) :]
        room = self._rcv_window()
        accepted = data[:room]
        if accepted:
            self._recv += accepted
            self._take(len(accepted))
            self.rcv_nxt = seq_add(self.rcv_nxt, len(accepted))
        if fin and len(accepted) == len(data):
            self._receive_fin()

    def _receive_fin(self) -> None:
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        self._eof = True
        if self._state is TcpState.ESTABLISHED:
            self._state = TcpState.CLOSE_WAIT
        elif self._state is TcpState.FIN_WAIT_1:
            self._state = TcpState.CLOSING
        elif self._state is TcpState.FIN_WAIT_2:
            self._finish()  # no TIME-WAIT: see the module docstring
        logger.debug(
            "tcp %d<-%d: guest FIN, now %s", self.local_port, self.remote_port, self._state.value
        )

    def _emit_data(self, out: list[TcpSegment], now: float) -> None:
        """Send unsent data, then FIN, within the guest's window."""
        while True:
            in_flight = seq_diff(self.snd_nxt, self.snd_una)
            unsent = len(self._send) - in_flight
            room = self.snd_wnd - in_flight
            if unsent <= 0 or room <= 0 or self._burst == 0:
                break
            n = min(unsent, room, self.mss)
            payload = bytes(self._send[in_flight : in_flight + n])
            out.append(
                self._segment(self.snd_nxt, TCP_ACK | (TCP_PSH if n == unsent else 0), payload)
            )
            self._advance_snd_nxt(n, now)
        if self._fin_queued and not self._fin_sent and self._burst != 0:
            in_flight = seq_diff(self.snd_nxt, self.snd_una)
            if in_flight == len(self._send) and self.snd_wnd > in_flight:
                out.append(self._segment(self.snd_nxt, TCP_FIN | TCP_ACK))
                self._fin_sent = True
                self._advance_snd_nxt(1, now)
                if self._state is TcpState.ESTABLISHED:
                    self._state = TcpState.FIN_WAIT_1
                elif self._state is TcpState.CLOSE_WAIT:
                    self._state = TcpState.LAST_ACK
        waiting = len(self._send) > seq_diff(self.snd_nxt, self.snd_una) or (
            self._fin_queued and not self._fin_sent
        )
        if waiting and self.snd_wnd == 0 and self.snd_nxt == self.snd_una:
            if self._persist_deadline is None:
                self._persist_deadline = now + self._persist_interval()
        elif not waiting or self.snd_wnd:
            self._persist_deadline = None

    def _advance_snd_nxt(self, n: int, now: float) -> None:
        self.snd_nxt = seq_add(self.snd_nxt, n)
        if seq_lt(self._snd_max, self.snd_nxt):
            self._snd_max = self.snd_nxt
        if self._burst is not None:
            self._burst -= 1
        if self._rto_deadline is None:
            self._rto_deadline = now + self.config.rto_initial

    def _rewind(self) -> None:
        """Resend from the oldest unacknowledged byte (go-back-N)."""
        self.snd_nxt = self.snd_una
        if self._fin_sent and not self._fin_acked:
            self._fin_sent = False

    def _backoff(self, attempt: int) -> float:
        """RTO after ``attempt`` doublings, capped (RFC 6298 §5.5)."""
        cfg = self.config
        return min(cfg.rto_initial * (1 << min(attempt, 30)), cfg.rto_max)

    def _persist_interval(self) -> float:
        return self._backoff(self._persist_backoff)

    def _window_update_due(self) -> bool:
        """Whether reading opened our window enough to tell the guest.

        Receiver-side silly window avoidance (RFC 9293 §3.8.6.2.2): only
        when the right edge moved by min(MSS, half the buffer).
        """
        if self._eof:
            return False
        room = self._rcv_window(count_starvation=False)
        edge = seq_add(self.rcv_nxt, min(room >> self._rcv_shift, 0xFFFF) << self._rcv_shift)
        if not seq_lt(self._adv_edge, edge):
            return False
        return seq_diff(edge, self._adv_edge) >= min(self.mss, self.config.recv_buffer // 2)
