"""The packet stack: the guest's network below HTTP, sans-IO.

Frames from QEMU's ``-netdev stream`` in, frames out; nothing here knows
HTTP, TLS, policies or secrets (``tests/unit/test_layout.py`` fails if a
module of this package imports :mod:`pytest_gondolin.netpolicy.http` or
the driver). One module per layer:

====================  ===============================================================
:mod:`.link`          QEMU's stream framing (length-prefixed Ethernet frames)
:mod:`.peer`          the socket end of that link (the one module here with I/O)
:mod:`.packets`       Ethernet, ARP, IPv4, ICMP echo and UDP codecs
:mod:`.segments`      TCP segment codec, sequence arithmetic, closed-port RST
:mod:`.tcp_states`    the states of a flow and why it ended
:mod:`.tcp_endpoint`  one flow's buffers, sequence variables and application API
:mod:`.tcp`           the TCP state machine of one flow (over :mod:`.tcp_endpoint`)
:mod:`.tcp_active`    the host dialling the guest (``VM.forward``)
:mod:`.tcp_config`    per-flow TCP parameters, the shared buffer budget, stack limits
:mod:`.dns_wire`      DNS messages: strict query parsing, small answers
:mod:`.dns`           the synthetic resolver answering the guest's DNS
:mod:`.flow_events`   what the flow table tells its owner
:mod:`.flows`         the guest's TCP flows (the flow table)
:mod:`.network`       the stack: the gateway and every address the guest dials
====================  ===============================================================
"""

from __future__ import annotations

from pytest_gondolin.netpolicy.stack.dns import SyntheticResolver
from pytest_gondolin.netpolicy.stack.flow_events import (
    Event,
    FlowClosed,
    FlowData,
    FlowEOF,
    FlowInfo,
    FlowWritable,
    NewFlow,
)
from pytest_gondolin.netpolicy.stack.link import LinkError
from pytest_gondolin.netpolicy.stack.network import (
    DEFAULT_MTU,
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_NETWORK,
    NetworkStack,
)
from pytest_gondolin.netpolicy.stack.packets import PacketError
from pytest_gondolin.netpolicy.stack.peer import PeerLink
from pytest_gondolin.netpolicy.stack.tcp import CloseReason
from pytest_gondolin.netpolicy.stack.tcp_config import TcpConfig

__all__ = [
    "DEFAULT_MTU",
    "GATEWAY_IP",
    "GATEWAY_MAC",
    "GUEST_IP",
    "GUEST_NETWORK",
    "CloseReason",
    "Event",
    "FlowClosed",
    "FlowData",
    "FlowEOF",
    "FlowInfo",
    "FlowWritable",
    "LinkError",
    "NetworkStack",
    "NewFlow",
    "PacketError",
    "PeerLink",
    "SyntheticResolver",
    "TcpConfig",
]
