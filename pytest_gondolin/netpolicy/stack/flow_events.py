"""What the flow table tells its owner: one value per thing that happened to a flow.

This module owns the events :class:`~.flows.FlowTable` emits
(:class:`NewFlow`, :class:`FlowData`, :class:`FlowWritable`,
:class:`FlowEOF`, :class:`FlowClosed`; their order is the flow life cycle
in :mod:`.flows`) and :class:`FlowInfo`, its diagnostic snapshot of one
flow. Frozen values, no behaviour; :mod:`.flows` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from pytest_gondolin.netpolicy.stack.tcp_states import CloseReason

__all__ = [
    "Event",
    "FlowClosed",
    "FlowData",
    "FlowEOF",
    "FlowInfo",
    "FlowWritable",
    "NewFlow",
]


@dataclass(frozen=True)
class NewFlow:
    """The guest sent a SYN; call ``accept(flow_id)`` or ``reject(flow_id)``.

    ``dns_name`` is the name the guest resolved to ``dst_ip`` through our
    resolver, or ``None`` if it dialled an address it did not get from us.
    """

    flow_id: int
    dst_ip: IPv4Address
    dst_port: int
    dns_name: str | None
    src_port: int


@dataclass(frozen=True)
class FlowData:
    """Guest data is readable, and the owner has not been told since its
    last ``flow_read`` (so a partial read is followed by a fresh one)."""

    flow_id: int


@dataclass(frozen=True)
class FlowWritable:
    """After a short ``flow_send``, the flow has room again."""

    flow_id: int


@dataclass(frozen=True)
class FlowEOF:
    """The guest closed its sending side; what is buffered is all there is."""

    flow_id: int


@dataclass(frozen=True)
class FlowClosed:
    """The flow is over and forgotten (emitted exactly once per flow).

    After an orderly close this comes only once the owner has read
    everything the guest sent (``FlowData`` / ``FlowEOF`` come first), so
    no data is lost by dropping the flow here; ``flow_abort`` discards
    unread data instead. After a reset nothing is left to read.
    """

    flow_id: int
    reason: CloseReason


Event = NewFlow | FlowData | FlowWritable | FlowEOF | FlowClosed


@dataclass(frozen=True)
class FlowInfo:
    """A snapshot of one flow, for diagnostics."""

    flow_id: int
    src_port: int
    dst_ip: IPv4Address
    dst_port: int
    dns_name: str | None
    state: str  # "PENDING" until accepted, then a TcpState value
    readable: int
    unacked: int
