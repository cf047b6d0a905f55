"""The guest's TCP flows, held by the stack: a sans-IO flow table.

Every IPv4 destination the guest dials with TCP is answered here: a SYN to
any address and port opens a *flow* that the owner relays (or refuses) as
it sees fit. :class:`FlowTable` keeps one :class:`~.tcp.TcpConnection` per
flow, keyed by the guest's port and the address and port it dialled, and
turns what happens to them into events. :class:`~.network.NetworkStack`
feeds it the guest's segments and owns everything below TCP.

Flow life cycle, as events: ``NewFlow`` (SYN held, nothing sent yet) ->
owner calls ``accept`` (SYN-ACK goes out) or ``reject`` (RST: the guest
sees "connection refused") -> ``FlowData`` / ``FlowWritable`` /
``FlowEOF`` while it lives -> ``FlowClosed`` exactly once, when the flow
is over and its data has been read (the owner may then forget it).

Holding the SYN until the owner decides (rather than completing the
handshake at once) lets the owner refuse a flow the way a real host does
-- with RST, before the handshake -- and lets it connect upstream first
and mirror a refusal there. An owner that needs to see data before it can
decide (TLS SNI, HTTP Host) simply accepts at once. A SYN left undecided
for ``accept_timeout`` seconds is refused; duplicate SYNs the guest sends
meanwhile are absorbed.

The host may also dial the guest (``connect``, for ``VM.forward``): that
flow is the caller's from the start (no ``NewFlow``), waits in SYN-SENT
(:mod:`.tcp_active`) and reports ``FlowWritable`` once the guest accepted,
or ``FlowClosed`` (``REFUSED`` / ``TIMEOUT``).

Limits: at most ``max_flows`` live flows (a SYN beyond that is answered
with RST) and all flows' buffers together at most ``buffer_budget`` bytes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.stack.flow_events import (
    Event,
    FlowClosed,
    FlowData,
    FlowEOF,
    FlowInfo,
    FlowWritable,
    NewFlow,
)
from pytest_gondolin.netpolicy.stack.segments import TcpSegment, reset_for
from pytest_gondolin.netpolicy.stack.tcp import CloseReason, TcpConnection
from pytest_gondolin.netpolicy.stack.tcp_active import ActiveOpen, DialAnswer, DialledConnection
from pytest_gondolin.netpolicy.stack.tcp_config import (
    DEFAULT_ACCEPT_TIMEOUT,
    DEFAULT_BUFFER_BUDGET,
    DEFAULT_MAX_FLOWS,
    BufferBudget,
    TcpConfig,
)

__all__ = ["FlowTable", "SendSegment"]

logger = logging.getLogger(__name__)

#: Local ports the host dials the guest from (IANA's dynamic range, RFC 6335).
_DIAL_PORTS = range(49152, 65536)


def _random_isn() -> int:
    # RFC 6528 wants unpredictable ISNs against off-path attackers; there
    # are none on this link, but randomness costs nothing and keeps flows
    # on a reused port from ever looking alike.
    return int.from_bytes(os.urandom(4), "big")


_FlowKey = tuple[int, IPv4Address, int]  # guest port, destination address, destination port


@dataclass(eq=False)
class _Flow:
    id: int
    key: _FlowKey
    dns_name: str | None
    syn: TcpSegment | None  # the held SYN, until accept()
    accept_deadline: float | None
    conn: TcpConnection | None = None
    dial: ActiveOpen | None = None  # the host's SYN, until the guest answers
    data_notified: bool = False
    eof_notified: bool = False
    closed_notified: bool = False


#: Queues one segment for the guest, sent from ``src`` (the address it dialled).
SendSegment = Callable[[IPv4Address, TcpSegment], None]


# --------------------------------------------------------------------------
# the table


class FlowTable:
    """The guest's TCP flows; see the module docstring.

    Guarantees: each flow gets exactly one ``NewFlow`` and one
    ``FlowClosed``; operations on unknown or finished flow ids are no-ops;
    unwanted segments are dropped and counted in ``counters`` under
    ``drop.<reason>``, never raised.

    Parameters: ``send`` queues a segment for the guest; ``name_for`` maps
    a destination address back to the name the guest resolved it from;
    ``counters`` is shared with the stack; ``tcp_config``, ``max_flows``,
    ``buffer_budget`` and ``accept_timeout`` are the limits above; ``isn``
    supplies initial sequence numbers (tests pin it).
    """

    def __init__(
        self,
        *,
        send: SendSegment,
        name_for: Callable[[IPv4Address], str | None],
        counters: Counter[str],
        tcp_config: TcpConfig,
        max_flows: int = DEFAULT_MAX_FLOWS,
        buffer_budget: int = DEFAULT_BUFFER_BUDGET,
        accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
        isn: Callable[[], int] | None = None,
    ) -> None:
        if max_flows < 1:
            raise ConfigError(f"max_flows must be positive, got {max_flows}")
        self.max_flows = max_flows
        self.tcp_config = tcp_config
        self.accept_timeout = accept_timeout
        self._send = send
        self._name_for = name_for
        self._counters = counters
        self._isn = isn if isn is not None else _random_isn
        self._budget = BufferBudget(buffer_budget)
        self._flows: dict[int, _Flow] = {}
        self._by_key: dict[_FlowKey, _Flow] = {}
        self._next_flow_id = 1
        self._next_dial_port = _DIAL_PORTS.start
        self._events: list[Event] = []
        self._now = 0.0

    # -- stack interface ------------------------------------------------------

    def advance(self, now: float) -> None:
        """Note the stack's latest ``now``; the ``flow_*`` methods act at that time."""
        self._now = max(self._now, now)

    def receive_segment(self, dst: IPv4Address, seg: TcpSegment, now: float) -> None:
        """Process one segment the guest sent to ``dst``. Never raises."""
        key = (seg.src_port, dst, seg.dst_port)
        flow = self._by_key.get(key)
        if flow is None:
            self._segment_without_flow(key, seg, now)
        elif flow.dial is not None:
            self._segment_for_dial(flow, flow.dial, seg, now)
        elif flow.conn is None:
            self._segment_for_pending(flow, seg)
        else:
            self._emit_tcp(flow, flow.conn.receive_segment(seg, now))
            self._after(flow)

    def on_timer(self, now: float) -> None:
        """Run every timer due at ``now`` (retransmissions, probes, accept timeouts)."""
        self._now = max(self._now, now)
        for flow in list(self._flows.values()):
            if flow.dial is not None:
                if now >= flow.dial.deadline:
                    self._redial(flow, flow.dial, now)
            elif flow.conn is None:
                if flow.accept_deadline is not None and now >= flow.accept_deadline:
                    self._refuse_pending(flow, CloseReason.ACCEPT_TIMEOUT)
            elif not flow.conn.closed:
                self._emit_tcp(flow, flow.conn.on_timer(now))
                self._after(flow)
        self.nudge_starved()

    @property
    def next_timer(self) -> float | None:
        """The earliest time ``on_timer`` has work, or ``None``."""
        deadlines = [
            d
            for flow in self._flows.values()
            if (
                d := flow.conn.next_timer
                if flow.conn is not None
                else flow.dial.deadline
                if flow.dial is not None
                else flow.accept_deadline
            )
            is not None
        ]
        return min(deadlines) if deadlines else None

    def events(self) -> list[Event]:
        """Take the events that happened since the last call, in order."""
        events, self._events = self._events, []
        return events

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in all flows' buffers (never above ``buffer_budget``)."""
        return self._budget.used

    # -- flow interface -------------------------------------------------------

    def connect(self, src_ip: IPv4Address, guest_port: int) -> int | None:
        """Dial the guest's ``guest_port`` from ``src_ip`` (the host's SYN goes out).

        Returns the new flow's id, or ``None`` when the flow cap is reached
        or no local port is free. The flow gets no ``NewFlow``: it is the
        caller's from the start. Then ``FlowWritable`` once the guest
        accepted, or ``FlowClosed`` (``REFUSED``: nothing listens;
        ``TIMEOUT``: no answer) if it never does.
        """
        if len(self._by_key) >= self.max_flows:
            self._counters["drop.tcp-flow-limit"] += 1
            return None
        for _ in range(len(_DIAL_PORTS)):
            port = self._next_dial_port
            self._next_dial_port = port + 1 if port + 1 in _DIAL_PORTS else _DIAL_PORTS.start
            key = (guest_port, src_ip, port)
            if key not in self._by_key:
                break
        else:
            return None
        flow_id = self._next_flow_id
        self._next_flow_id += 1
        dial = ActiveOpen.start(
            local_port=port,
            guest_port=guest_port,
            iss=self._isn(),
            config=self.tcp_config,
            now=self._now,
        )
        flow = _Flow(flow_id, key, None, None, None, dial=dial)
        self._flows[flow_id] = flow
        self._by_key[key] = flow
        self._counters["tcp.dials"] += 1
        self._send(src_ip, dial.syn())
        return flow_id

    def accept(self, flow_id: int) -> None:
        """Complete the handshake of a pending flow (the SYN-ACK goes out)."""
        flow = self._flows.get(flow_id)
        if flow is None or flow.syn is None:
            logger.debug("accept(%d): no such pending flow", flow_id)
            return
        conn = TcpConnection(
            flow.syn,
            iss=self._isn(),
            now=self._now,
            config=self.tcp_config,
            budget=self._budget,
            counters=self._counters,
        )
        flow.conn, flow.syn, flow.accept_deadline = conn, None, None
        self._emit_tcp(flow, conn.flush(self._now))

    def reject(self, flow_id: int) -> None:
        """Refuse a pending flow with RST ("connection refused"); abort an accepted one."""
        flow = self._flows.get(flow_id)
        if flow is None:
            return
        if flow.conn is None:
            self._refuse_pending(flow, CloseReason.REJECTED)
        else:
            self.flow_abort(flow_id)

    def flow_send(self, flow_id: int, data: bytes) -> int:
        """Queue bytes for the guest; return how many were accepted (0 if none fit).

        After a short write a ``FlowWritable`` event says when to retry.
        """
        conn = self._conn(flow_id)
        if conn is None:
            return 0
        n = conn.send(data)
        self._emit_tcp(self._flows[flow_id], conn.flush(self._now))
        self._after(self._flows[flow_id])
        return n

    def flow_read(self, flow_id: int, max_bytes: int | None = None) -> bytes:
        """Take bytes the guest sent (all by default). Opens the flow's window.

        If data remains (``max_bytes`` was smaller) or more arrives later,
        a new ``FlowData`` event says so.
        """
        flow = self._flows.get(flow_id)
        if flow is None or flow.conn is None:
            return b""
        data = flow.conn.read(max_bytes)
        flow.data_notified = False
        if not flow.conn.closed:
            self._emit_tcp(flow, flow.conn.flush(self._now))
        self._after(flow)
        self.nudge_starved()
        return data

    def flow_close(self, flow_id: int) -> None:
        """Send FIN after queued data (the guest may keep sending: half-close).

        On a flow not yet accepted, this refuses it.
        """
        flow = self._flows.get(flow_id)
        if flow is None:
            return
        if flow.conn is None:
            self._refuse_pending(flow, CloseReason.REJECTED)
            return
        flow.conn.close()
        self._emit_tcp(flow, flow.conn.flush(self._now))
        self._after(flow)

    def flow_abort(self, flow_id: int) -> None:
        """Reset the flow (RST to the guest) and forget it, unread data included."""
        flow = self._flows.get(flow_id)
        if flow is None:
            return
        if flow.conn is None:
            self._refuse_pending(flow, CloseReason.ABORTED)
            return
        flow.conn.abort()
        self._emit_tcp(flow, flow.conn.flush(self._now))
        flow.conn.release()
        self._after(flow)
        self.nudge_starved()

    def flow_info(self, flow_id: int) -> FlowInfo | None:
        """A snapshot of one flow, or ``None`` if unknown or forgotten."""
        flow = self._flows.get(flow_id)
        if flow is None:
            return None
        guest_port, dst_ip, dst_port = flow.key
        conn = flow.conn
        return FlowInfo(
            flow_id=flow.id,
            src_port=guest_port,
            dst_ip=dst_ip,
            dst_port=dst_port,
            dns_name=flow.dns_name,
            state=("SYN-SENT" if flow.dial else "PENDING") if conn is None else conn.state.value,
            readable=0 if conn is None else conn.readable,
            unacked=0 if conn is None else conn.unacked_bytes,
        )

    @property
    def flows(self) -> list[FlowInfo]:
        """Snapshots of every flow the stack still holds."""
        return [info for fid in list(self._flows) if (info := self.flow_info(fid)) is not None]

    # -- segments -------------------------------------------------------------

    def _drop(self, reason: str, detail: str = "") -> None:
        self._counters[f"drop.{reason}"] += 1
        logger.debug("dropped guest segment: %s %s", reason, detail)

    def _segment_without_flow(self, key: _FlowKey, seg: TcpSegment, now: float) -> None:
        if not (seg.syn and not (seg.has_ack or seg.rst or seg.fin)):
            # RFC 9293 §3.10.7.1: anything but a SYN to a closed port gets RST.
            self._counters["tcp.no-flow"] += 1
            self._reply_rst(key[1], seg)
            return
        if len(self._by_key) >= self.max_flows:
            self._drop("tcp-flow-limit", f"{len(self._by_key)} flows open")
            self._reply_rst(key[1], seg)
            return
        flow_id = self._next_flow_id
        self._next_flow_id += 1
        dns_name = self._name_for(key[1])
        flow = _Flow(flow_id, key, dns_name, seg, now + self.accept_timeout)
        self._flows[flow_id] = flow
        self._by_key[key] = flow
        self._counters["tcp.flows"] += 1
        logger.debug(
            "new flow %d: guest:%d -> %s:%d (%s)", flow_id, key[0], key[1], key[2], dns_name
        )
        self._events.append(NewFlow(flow_id, key[1], key[2], dns_name, key[0]))

    def _segment_for_dial(self, flow: _Flow, dial: ActiveOpen, seg: TcpSegment, now: float) -> None:
        answer = dial.answer(seg)
        if answer is DialAnswer.REFUSED:
            self._close_pending(flow, CloseReason.REFUSED)
        elif answer is DialAnswer.ESTABLISHED:
            conn = DialledConnection.from_syn_ack(
                seg, dial, now=now, budget=self._budget, counters=self._counters
            )
            flow.conn, flow.dial = conn, None
            self._emit_tcp(flow, conn.flush(now))
            self._events.append(FlowWritable(flow.id))  # "connected": the owner may send
            self._after(flow)
        elif seg.has_ack and not seg.rst:
            self._reply_rst(flow.key[1], seg)  # §3.10.7.3: an unacceptable ACK gets RST
        else:
            self._drop("tcp-dial-unexpected", seg.describe())

    def _redial(self, flow: _Flow, dial: ActiveOpen, now: float) -> None:
        syn = dial.on_timer(now)
        if syn is None:
            self._close_pending(flow, CloseReason.TIMEOUT)
        else:
            self._counters["tcp.retransmits"] += 1
            self._send(flow.key[1], syn)

    def _segment_for_pending(self, flow: _Flow, seg: TcpSegment) -> None:
        syn = flow.syn
        assert syn is not None
        if seg.rst:
            # The guest gave up on connecting. Accept only a RST that
            # plausibly belongs to the held SYN.
            if seg.seq in (syn.seq, (syn.seq + 1) & 0xFFFFFFFF):
                self._close_pending(flow, CloseReason.GUEST_RESET)
            else:
                self._drop("tcp-pending-bad-rst")
        elif seg.syn and not (seg.has_ack or seg.fin):
            if seg.seq != syn.seq:
                flow.syn = seg  # a fresh attempt on the same port: answer that one
            self._counters["tcp.pending-syn-retransmits"] += 1
        else:
            self._drop("tcp-pending-unexpected", seg.describe())

    # -- flow bookkeeping -----------------------------------------------------

    def _conn(self, flow_id: int) -> TcpConnection | None:
        flow = self._flows.get(flow_id)
        return None if flow is None else flow.conn

    def _refuse_pending(self, flow: _Flow, reason: CloseReason) -> None:
        if flow.syn is not None:
            self._reply_rst(flow.key[1], flow.syn)
        self._close_pending(flow, reason)

    def _close_pending(self, flow: _Flow, reason: CloseReason) -> None:
        self._by_key.pop(flow.key, None)
        self._flows.pop(flow.id, None)
        flow.closed_notified = True
        self._counters[f"tcp.closed.{reason.value}"] += 1
        self._events.append(FlowClosed(flow.id, reason))

    def _after(self, flow: _Flow) -> None:
        """Turn a connection's new state into events; forget finished flows."""
        conn = flow.conn
        assert conn is not None
        if conn.readable and not flow.data_notified:
            flow.data_notified = True
            self._events.append(FlowData(flow.id))
        if conn.eof and not flow.eof_notified:
            flow.eof_notified = True
            self._events.append(FlowEOF(flow.id))
        if conn.poll_writable():
            self._events.append(FlowWritable(flow.id))
        if conn.closed:
            # The 4-tuple is free at once (a new SYN on it is a new flow),
            # but the flow id lives on until the owner has read what the
            # guest sent before closing: FlowClosed then means "forget it",
            # and an owner that drops its state on FlowClosed loses nothing
            # nor strands bytes in the shared budget.
            if self._by_key.get(flow.key) is flow:
                del self._by_key[flow.key]
            if not conn.readable and not flow.closed_notified:
                flow.closed_notified = True
                self._flows.pop(flow.id, None)
                reason = conn.close_reason or CloseReason.NORMAL
                self._events.append(FlowClosed(flow.id, reason))

    def nudge_starved(self) -> None:
        """When the shared budget frees up after starving, let every flow
        advertise its reopened window and report room to send."""
        if not self._budget.starved or self._budget.available == 0:
            return
        self._budget.starved = False
        for flow in list(self._flows.values()):
            if flow.conn is not None and not flow.conn.closed:
                self._emit_tcp(flow, flow.conn.flush(self._now))
                self._after(flow)

    # -- transmit -------------------------------------------------------------

    def _reply_rst(self, src: IPv4Address, seg: TcpSegment) -> None:
        rst = reset_for(seg)
        if rst is not None:
            self._counters["tcp.resets-sent"] += 1
            self._send(src, rst)

    def _emit_tcp(self, flow: _Flow, segments: list[TcpSegment]) -> None:
        for seg in segments:
            self._send(flow.key[1], seg)
