"""The vocabulary of a TCP flow: its RFC 9293 states and why it ended.

This module owns :class:`TcpState`, :class:`CloseReason` and the state sets
the state machine (:mod:`.tcp`) and the flow's application side
(:mod:`.tcp_endpoint`) test against; it holds no behaviour.
"""

from __future__ import annotations

import enum

__all__ = ["APP_CAN_SEND", "RECEIVING", "SENDING", "CloseReason", "TcpState"]


class TcpState(enum.Enum):
    """RFC 9293 connection states the host side can be in."""

    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    CLOSED = "CLOSED"


class CloseReason(enum.Enum):
    """Why a flow ended."""

    NORMAL = "closed"  # both sides sent FIN and it was acknowledged
    GUEST_RESET = "reset-by-guest"
    ABORTED = "aborted"  # the owner called abort()
    TIMEOUT = "retransmission-timeout"  # the guest stopped acknowledging
    REJECTED = "rejected"  # the owner rejected the SYN (stack level)
    ACCEPT_TIMEOUT = "accept-timeout"  # the owner never decided (stack level)
    STACK_LIMIT = "stack-limit"  # over the stack's flow cap (stack level)
    REFUSED = "refused-by-guest"  # the guest answered the host's SYN with RST (tcp_active)


# States in which we may still put data (or a FIN) on the wire, and in
# which guest data is still accepted.
SENDING = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
        TcpState.FIN_WAIT_1,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
    }
)
RECEIVING = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
APP_CAN_SEND = frozenset({TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT})
