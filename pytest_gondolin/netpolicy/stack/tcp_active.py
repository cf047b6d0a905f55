"""Active open: the host dials a port of the guest (ingress, ``VM.forward``).

Every other flow starts from the guest's SYN (:mod:`.tcp`); here the host
sends the SYN (RFC 9293 §3.5, figure 6, from the host's side)::

    (host SYN) -> SYN-SENT --guest SYN-ACK--> ACK, ESTABLISHED
                  SYN-SENT --guest RST acking our SYN--> refused (§3.10.7.3)
                  SYN-SENT --no answer after max_retries--> timeout

:class:`ActiveOpen` holds the attempt until the SYN-ACK (the SYN is
retransmitted with the connection's own backoff); then
:meth:`DialledConnection.from_syn_ack` turns the handshake into an ordinary
:class:`~.tcp.TcpConnection` in ESTABLISHED, so data, windows, FIN and RST
work exactly as on a flow the guest opened. Sans-IO like the rest of the
stack: segments in, segments out, the caller's clock.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, replace

from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    seq_add,
)
from pytest_gondolin.netpolicy.stack.tcp import TcpConnection, TcpState
from pytest_gondolin.netpolicy.stack.tcp_config import BufferBudget, TcpConfig

__all__ = ["ActiveOpen", "DialAnswer", "DialledConnection"]


class DialAnswer(enum.Enum):
    """What a guest segment means to a pending active open."""

    ESTABLISHED = "established"  # the guest's SYN-ACK acknowledged our SYN
    REFUSED = "refused"  # a RST acknowledging our SYN: nothing listens there
    IGNORED = "ignored"  # anything else: dropped (a bad ACK is answered with RST)


@dataclass
class ActiveOpen:
    """One SYN the host sent to the guest's ``guest_port`` from ``local_port``.

    ``deadline`` is when :meth:`on_timer` resends the SYN (or gives up after
    ``config.max_retries`` resends).
    """

    local_port: int
    guest_port: int
    iss: int
    config: TcpConfig
    deadline: float
    retries: int = 0

    @classmethod
    def start(
        cls, *, local_port: int, guest_port: int, iss: int, config: TcpConfig, now: float
    ) -> ActiveOpen:
        """A new attempt; send :meth:`syn` now."""
        return cls(local_port, guest_port, iss & 0xFFFFFFFF, config, now + config.rto_initial)

    def syn(self) -> TcpSegment:
        """Our SYN: MSS and window scale offered (RFC 7323 §2.2: its window is unscaled)."""
        cfg = self.config
        return TcpSegment(
            self.local_port,
            self.guest_port,
            self.iss,
            0,
            TCP_SYN,
            min(cfg.recv_buffer, 0xFFFF),
            options=TcpOptions(mss=cfg.mss, window_scale=cfg.window_shift),
        )

    def answer(self, seg: TcpSegment) -> DialAnswer:
        """Classify one guest segment (RFC 9293 §3.10.7.3, SYN-SENT)."""
        acks_syn = seg.has_ack and seg.ack == seq_add(self.iss, 1)
        if seg.rst:
            return DialAnswer.REFUSED if acks_syn else DialAnswer.IGNORED
        if seg.syn and acks_syn and not seg.fin:
            return DialAnswer.ESTABLISHED
        return DialAnswer.IGNORED

    def on_timer(self, now: float) -> TcpSegment | None:
        """Call once :attr:`deadline` passed: the SYN to resend, or ``None`` to give up.

        ``None`` comes once ``config.max_retries`` resends went unanswered;
        each resend doubles the wait (RFC 6298 §5.5), capped at ``rto_max``.
        """
        cfg = self.config
        if self.retries >= cfg.max_retries:
            return None
        self.retries += 1
        self.deadline = now + min(cfg.rto_initial * (1 << min(self.retries, 30)), cfg.rto_max)
        return self.syn()


class DialledConnection(TcpConnection):
    """A :class:`TcpConnection` the host opened; it starts in ESTABLISHED."""

    @classmethod
    def from_syn_ack(
        cls,
        synack: TcpSegment,
        dial: ActiveOpen,
        *,
        now: float,
        budget: BufferBudget | None = None,
        counters: Counter[str] | None = None,
    ) -> DialledConnection:
        """The connection after the guest's ``synack`` (already classified ESTABLISHED).

        The guest's half of the handshake is its SYN (sequence number,
        options, unscaled window), so the connection is built from it as a
        passive open would be, then moved past our own SYN: it is
        acknowledged, nothing is in flight, and the handshake's final ACK
        is the first segment :meth:`flush` returns.
        """
        guest_syn = replace(synack, flags=TCP_SYN, ack=0, payload=b"")
        conn = cls(
            guest_syn, iss=dial.iss, now=now, config=dial.config, budget=budget, counters=counters
        )
        conn._out.clear()  # no SYN-ACK from us: we sent the SYN
        conn._state = TcpState.ESTABLISHED
        conn.snd_una = conn.snd_nxt = conn._snd_max = seq_add(dial.iss, 1)
        conn._wl1, conn._wl2 = synack.seq, synack.ack
        conn._rto_deadline = None
        conn._ack_pending = True
        assert synack.flags & TCP_ACK
        return conn
