"""The guest's whole network, as seen from the host: a sans-IO stack.

The guest has exactly one peer, this stack, reached through QEMU's
``-netdev stream`` (raw Ethernet frames; framing in :mod:`.link`). The
stack plays every role the guest can address:

* the gateway ``192.168.127.1`` (a fixed MAC), answering ARP, ping and
  DNS on UDP port 53 (via :class:`~.dns.SyntheticResolver`);
* every other IPv4 destination, for TCP only: a SYN to any address and
  port opens a *flow* that the owner relays (or refuses) as it sees fit.

Everything else is dropped and counted by reason: IPv6 (the guest gets no
IPv6 route, so nothing can bypass the IPv4 path), UDP other than DNS to
the gateway, other ICMP, fragments, malformed packets, frames not from
the guest's address.

The owner -- a driver holding the QEMU socket, a thread and the upstream
connections -- runs a loop like::

    while True:
        now = clock()
        for frame in frames_read_from_qemu:
            stack.receive_frame(frame, now)
        stack.on_timer(now)
        for event in stack.events():
            ...  # NewFlow -> accept/reject; FlowData -> flow_read; ...
        write(stack.outgoing_frames())
        wait until readable or stack.next_timer

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

Time: the stack has no clock. ``receive_frame`` and ``on_timer`` take the
caller's ``now``; the ``flow_*`` methods and ``accept`` use the latest
``now`` seen, which is at most one loop iteration old -- this only makes
a retransmission timer fire that much earlier.

Limits: at most ``max_flows`` live flows (a SYN beyond that is answered
with RST), all flows' buffers together at most ``buffer_budget`` bytes,
at most ``max_tx_queue_bytes`` waiting in ``outgoing_frames``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.dns import SyntheticResolver
from pytest_gondolin.netpolicy.packets import (
    ARP_REPLY,
    ARP_REQUEST,
    BROADCAST_MAC,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ArpPacket,
    EthernetFrame,
    IcmpEcho,
    IPv4Packet,
    PacketError,
    TcpSegment,
    UdpDatagram,
    format_mac,
    parse_arp,
    parse_ethernet,
    parse_icmp_echo,
    parse_ipv4,
    parse_tcp,
    parse_udp,
)
from pytest_gondolin.netpolicy.tcp import (
    BufferBudget,
    CloseReason,
    TcpConfig,
    TcpConnection,
    reset_for,
)

__all__ = [
    "DEFAULT_ACCEPT_TIMEOUT",
    "DEFAULT_BUFFER_BUDGET",
    "DEFAULT_MAX_FLOWS",
    "DEFAULT_MAX_TX_QUEUE_BYTES",
    "DEFAULT_MTU",
    "DNS_PORT",
    "GATEWAY_IP",
    "GATEWAY_MAC",
    "GUEST_IP",
    "GUEST_NETWORK",
    "Event",
    "FlowClosed",
    "FlowData",
    "FlowEOF",
    "FlowInfo",
    "FlowWritable",
    "NetworkStack",
    "NewFlow",
]

logger = logging.getLogger(__name__)

#: The guest's /24 (the numbers QEMU's slirp users know; nothing else about
#: slirp is used). The guest is configured statically: no DHCP.
GUEST_NETWORK = IPv4Network("192.168.127.0/24")
GATEWAY_IP = IPv4Address("192.168.127.1")
GUEST_IP = IPv4Address("192.168.127.3")
#: Locally administered unicast (0x02 first octet), then ASCII "gond1":
#: recognisable in a packet capture, cannot clash with a vendor MAC or
#: with QEMU's default guest MAC 52:54:00:12:34:56.
GATEWAY_MAC = b"\x02gond1"
DNS_PORT = 53
#: The largest MTU virtio-net offers (host_mtu=65520). Bigger segments mean
#: far fewer Python-level packets per byte; the guest still caps our MSS
#: with its own, so a guest left at 1500 works too.
DEFAULT_MTU = 65520
#: Live TCP flows at once. A test suite's guest rarely holds more than a
#: few dozen; the cap bounds per-flow state against a guest opening
#: connections in a loop.
DEFAULT_MAX_FLOWS = 256
#: All flows' send and receive buffers together. Per-flow caps (256 KiB
#: each way) times DEFAULT_MAX_FLOWS would be 128 MiB; 32 MiB keeps the
#: worst case modest while leaving a few busy flows at full speed.
DEFAULT_BUFFER_BUDGET = 32 * 1024 * 1024
#: How long a SYN may wait for accept()/reject(). Generous for an owner
#: that dials upstream before accepting; far below the ~2 minutes the
#: guest itself keeps retrying its SYN.
DEFAULT_ACCEPT_TIMEOUT = 30.0
#: Frames waiting for outgoing_frames(). Only a stalled driver gets near
#: this; past it frames are dropped (TCP retransmits).
DEFAULT_MAX_TX_QUEUE_BYTES = 64 * 1024 * 1024


def _random_isn() -> int:
    # RFC 6528 wants unpredictable ISNs against off-path attackers; there
    # are none on this link, but randomness costs nothing and keeps flows
    # on a reused port from ever looking alike.
    return int.from_bytes(os.urandom(4), "big")


# --------------------------------------------------------------------------
# events


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


_FlowKey = tuple[int, IPv4Address, int]  # guest port, destination address, destination port


@dataclass(eq=False)
class _Flow:
    id: int
    key: _FlowKey
    dns_name: str | None
    syn: TcpSegment | None  # the held SYN, until accept()
    accept_deadline: float | None
    conn: TcpConnection | None = None
    data_notified: bool = False
    eof_notified: bool = False
    closed_notified: bool = False


# --------------------------------------------------------------------------
# the stack


class NetworkStack:
    """The host side of the guest's network. See the module docstring.

    Guarantees: ``receive_frame`` never raises for any bytes (malformed or
    unwanted frames are dropped and counted in :attr:`counters` under
    ``drop.<reason>``); each flow gets exactly one ``NewFlow`` and one
    ``FlowClosed``; operations on unknown or finished flow ids are no-ops.

    Parameters: ``resolver`` answers DNS and maps synthetic addresses back
    to names (default: a fresh :class:`SyntheticResolver`); ``mtu`` sets
    the MSS we advertise (``mtu - 40``) unless ``tcp_config`` is given;
    ``network`` / ``gateway_ip`` / ``guest_ip`` / ``gateway_mac`` describe
    the link; ``guest_mac``, if given, is enforced, else learned from the
    guest's frames; ``max_flows``, ``buffer_budget``, ``accept_timeout``
    and ``max_tx_queue_bytes`` are the limits above; ``isn`` supplies
    initial sequence numbers (tests pin it).
    """

    def __init__(
        self,
        *,
        resolver: SyntheticResolver | None = None,
        mtu: int = DEFAULT_MTU,
        network: IPv4Network = GUEST_NETWORK,
        gateway_ip: IPv4Address = GATEWAY_IP,
        guest_ip: IPv4Address = GUEST_IP,
        gateway_mac: bytes = GATEWAY_MAC,
        guest_mac: bytes | None = None,
        max_flows: int = DEFAULT_MAX_FLOWS,
        buffer_budget: int = DEFAULT_BUFFER_BUDGET,
        tcp_config: TcpConfig | None = None,
        accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT,
        max_tx_queue_bytes: int = DEFAULT_MAX_TX_QUEUE_BYTES,
        isn: Callable[[], int] | None = None,
    ) -> None:
        if not 576 <= mtu <= 0xFFFF:
            raise ConfigError(f"MTU {mtu} outside 576..65535")
        if gateway_ip not in network or guest_ip not in network or gateway_ip == guest_ip:
            raise ConfigError(
                f"gateway {gateway_ip} and guest {guest_ip} must be distinct hosts of {network}"
            )
        if len(gateway_mac) != 6 or gateway_mac[0] & 1:
            raise ConfigError(f"gateway MAC {format_mac(gateway_mac)} is not a unicast MAC")
        if guest_mac is not None and (len(guest_mac) != 6 or guest_mac[0] & 1):
            raise ConfigError(f"guest MAC {format_mac(guest_mac)} is not a unicast MAC")
        if max_flows < 1:
            raise ConfigError(f"max_flows must be positive, got {max_flows}")
        self.resolver = resolver if resolver is not None else SyntheticResolver()
        if self.resolver.pool.overlaps(network):
            raise ConfigError(f"DNS pool {self.resolver.pool} overlaps the guest network {network}")
        self.mtu = mtu
        self.network = network
        self.gateway_ip = gateway_ip
        self.guest_ip = guest_ip
        self.gateway_mac = gateway_mac
        self._fixed_guest_mac = guest_mac is not None
        self._guest_mac = guest_mac
        self.max_flows = max_flows
        self.tcp_config = (
            tcp_config if tcp_config is not None else TcpConfig(mss=min(mtu - 40, 65495))
        )
        self.accept_timeout = accept_timeout
        self.max_tx_queue_bytes = max_tx_queue_bytes
        self._isn = isn if isn is not None else _random_isn
        self._budget = BufferBudget(buffer_budget)
        self._counters: Counter[str] = Counter()
        self._flows: dict[int, _Flow] = {}
        self._by_key: dict[_FlowKey, _Flow] = {}
        self._next_flow_id = 1
        self._events: list[Event] = []
        self._tx: list[bytes] = []
        self._tx_bytes = 0
        self._ip_id = 0
        self._now = 0.0

    # -- driver interface -----------------------------------------------------

    def receive_frame(self, frame: bytes, now: float) -> None:
        """Process one Ethernet frame from the guest. Never raises."""
        self._now = max(self._now, now)
        self._counters["rx.frames"] += 1
        self._counters["rx.bytes"] += len(frame)
        try:
            self._dispatch(frame, now)
        except PacketError as exc:
            self._drop(exc.reason, exc.detail)
        self._nudge_starved()

    def outgoing_frames(self) -> list[bytes]:
        """Take the frames queued for the guest, oldest first."""
        frames, self._tx, self._tx_bytes = self._tx, [], 0
        return frames

    def events(self) -> list[Event]:
        """Take the events that happened since the last call, in order."""
        events, self._events = self._events, []
        return events

    def on_timer(self, now: float) -> None:
        """Run every timer due at ``now`` (retransmissions, probes, accept timeouts)."""
        self._now = max(self._now, now)
        for flow in list(self._flows.values()):
            if flow.conn is None:
                if flow.accept_deadline is not None and now >= flow.accept_deadline:
                    self._refuse_pending(flow, CloseReason.ACCEPT_TIMEOUT)
            elif not flow.conn.closed:
                self._emit_tcp(flow, flow.conn.on_timer(now))
                self._after(flow)
        self._nudge_starved()

    @property
    def next_timer(self) -> float | None:
        """The earliest time ``on_timer`` has work, or ``None``."""
        deadlines = [
            d
            for flow in self._flows.values()
            if (d := flow.conn.next_timer if flow.conn is not None else flow.accept_deadline)
            is not None
        ]
        return min(deadlines) if deadlines else None

    # -- flow interface -------------------------------------------------------

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
        self._nudge_starved()
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
        self._nudge_starved()

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
            state="PENDING" if conn is None else conn.state.value,
            readable=0 if conn is None else conn.readable,
            unacked=0 if conn is None else conn.unacked_bytes,
        )

    @property
    def flows(self) -> list[FlowInfo]:
        """Snapshots of every flow the stack still holds."""
        return [info for fid in list(self._flows) if (info := self.flow_info(fid)) is not None]

    @property
    def counters(self) -> dict[str, int]:
        """Diagnostic counters: ``rx.*``, ``tx.*``, ``tcp.*``, ``dns.*``, ``drop.<reason>``."""
        return dict(self._counters)

    @property
    def dropped(self) -> dict[str, int]:
        """Dropped frames by reason (the ``drop.*`` counters without the prefix)."""
        return {k[5:]: v for k, v in self._counters.items() if k.startswith("drop.")}

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in all flows' buffers (never above ``buffer_budget``)."""
        return self._budget.used

    @property
    def guest_mac(self) -> bytes | None:
        """The guest's MAC: configured, or learned from its frames."""
        return self._guest_mac

    # -- receive path ---------------------------------------------------------

    def _drop(self, reason: str, detail: str = "") -> None:
        self._counters[f"drop.{reason}"] += 1
        logger.debug("dropped guest frame: %s %s", reason, detail)

    def _dispatch(self, frame: bytes, now: float) -> None:
        eth = parse_ethernet(frame)
        if eth.ethertype == ETHERTYPE_IPV6:
            # No IPv6 at all: nothing may bypass the IPv4 path and its policy.
            self._drop("ipv6")
            return
        if eth.src[0] & 1 or (self._fixed_guest_mac and eth.src != self._guest_mac):
            self._drop("ethernet-bad-source", format_mac(eth.src))
            return
        if eth.dst != self.gateway_mac and eth.dst != BROADCAST_MAC:
            self._drop("ethernet-not-for-us", format_mac(eth.dst))
            return
        if eth.ethertype == ETHERTYPE_ARP:
            self._handle_arp(eth)
        elif eth.ethertype == ETHERTYPE_IPV4:
            self._handle_ipv4(eth, now)
        else:
            self._drop("ethertype-unsupported", f"{eth.ethertype:#06x}")

    def _handle_arp(self, eth: EthernetFrame) -> None:
        arp = parse_arp(eth.payload)
        if arp.op != ARP_REQUEST:
            self._drop("arp-not-request")
            return
        target = arp.target_ip
        if target == self.guest_ip:
            # Duplicate address detection (RFC 5227) or a gratuitous ARP:
            # answering would tell the guest its own address is taken.
            self._drop("arp-own-address")
            return
        if arp.sender_ip != self.guest_ip:
            self._drop("arp-bad-sender", str(arp.sender_ip))
            return
        if (
            target not in self.network
            or target == self.network.network_address
            or target == self.network.broadcast_address
        ):
            self._drop("arp-not-ours", str(target))
            return
        # Every other address in the subnet answers with the gateway's MAC,
        # so the guest learns nothing by probing (all neighbours look alike)
        # and a flow to a neighbour still reaches us, where policy applies.
        self._learn_guest_mac(eth.src)
        reply = ArpPacket(ARP_REPLY, self.gateway_mac, target, arp.sender_mac, arp.sender_ip)
        self._counters["arp.replies"] += 1
        self._queue_frame(eth.src, ETHERTYPE_ARP, reply.build())

    def _handle_ipv4(self, eth: EthernetFrame, now: float) -> None:
        ip = parse_ipv4(eth.payload)
        if ip.src != self.guest_ip:
            self._drop("ipv4-bad-source", str(ip.src))
            return
        if eth.dst != self.gateway_mac:
            self._drop("ipv4-link-broadcast")
            return
        self._learn_guest_mac(eth.src)
        if ip.protocol == IPPROTO_TCP:
            self._handle_tcp(ip, now)
        elif ip.protocol == IPPROTO_UDP:
            self._handle_udp(ip)
        elif ip.protocol == IPPROTO_ICMP:
            self._handle_icmp(ip)
        else:
            self._drop("ipv4-protocol-unsupported", str(ip.protocol))

    def _handle_icmp(self, ip: IPv4Packet) -> None:
        if ip.dst != self.gateway_ip:
            self._drop("icmp-not-gateway", str(ip.dst))
            return
        echo = parse_icmp_echo(ip.payload)
        if echo.type != ICMP_ECHO_REQUEST:
            self._drop("icmp-not-request")
            return
        reply = IcmpEcho(ICMP_ECHO_REPLY, echo.identifier, echo.sequence, echo.payload)
        self._counters["icmp.echo-replies"] += 1
        self._queue_ip(self.gateway_ip, IPPROTO_ICMP, reply.build())

    def _handle_udp(self, ip: IPv4Packet) -> None:
        udp = parse_udp(ip.payload, ip.src, ip.dst)
        if ip.dst != self.gateway_ip or udp.dst_port != DNS_PORT:
            self._drop("udp-not-dns", f"{ip.dst}:{udp.dst_port}")
            return
        self._counters["dns.queries"] += 1
        response = self.resolver.handle_query(udp.payload)
        if response is None:
            self._drop("dns-unanswerable")
            return
        self._counters["dns.responses"] += 1
        reply = UdpDatagram(DNS_PORT, udp.src_port, response)
        self._queue_ip(self.gateway_ip, IPPROTO_UDP, reply.build(self.gateway_ip, self.guest_ip))

    def _routable(self, dst: IPv4Address) -> bool:
        """Whether a TCP flow to ``dst`` makes sense at all (policy comes later)."""
        return not (
            dst == self.guest_ip
            or dst == self.network.network_address
            or dst == self.network.broadcast_address
            or dst.is_multicast
            or dst.is_loopback
            or dst.is_reserved  # 240/4, including 255.255.255.255
            or dst.packed[0] == 0  # 0/8, "this network"
        )

    def _handle_tcp(self, ip: IPv4Packet, now: float) -> None:
        if not self._routable(ip.dst):
            self._drop("tcp-bad-destination", str(ip.dst))
            return
        seg = parse_tcp(ip.payload, ip.src, ip.dst)
        if seg.src_port == 0 or seg.dst_port == 0:
            self._drop("tcp-port-zero")
            return
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("tcp in  %s -> %s %s", ip.src, ip.dst, seg.describe())
        key = (seg.src_port, ip.dst, seg.dst_port)
        flow = self._by_key.get(key)
        if flow is None:
            self._segment_without_flow(key, seg, now)
        elif flow.conn is None:
            self._segment_for_pending(flow, seg)
        else:
            self._emit_tcp(flow, flow.conn.receive_segment(seg, now))
            self._after(flow)

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
        dns_name = self.resolver.name_for(key[1])
        flow = _Flow(flow_id, key, dns_name, seg, now + self.accept_timeout)
        self._flows[flow_id] = flow
        self._by_key[key] = flow
        self._counters["tcp.flows"] += 1
        logger.debug(
            "new flow %d: guest:%d -> %s:%d (%s)", flow_id, key[0], key[1], key[2], dns_name
        )
        self._events.append(NewFlow(flow_id, key[1], key[2], dns_name, key[0]))

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

    def _nudge_starved(self) -> None:
        """When the shared budget frees up after starving, let every flow
        advertise its reopened window and report room to send."""
        if not self._budget.starved or self._budget.available == 0:
            return
        self._budget.starved = False
        for flow in list(self._flows.values()):
            if flow.conn is not None and not flow.conn.closed:
                self._emit_tcp(flow, flow.conn.flush(self._now))
                self._after(flow)

    # -- transmit path --------------------------------------------------------

    def _learn_guest_mac(self, mac: bytes) -> None:
        if not self._fixed_guest_mac and mac != self._guest_mac:
            logger.debug("guest MAC is %s", format_mac(mac))
            self._guest_mac = mac

    def _reply_rst(self, src: IPv4Address, seg: TcpSegment) -> None:
        rst = reset_for(seg)
        if rst is not None:
            self._counters["tcp.resets-sent"] += 1
            self._queue_ip(src, IPPROTO_TCP, rst.build(src, self.guest_ip))

    def _emit_tcp(self, flow: _Flow, segments: list[TcpSegment]) -> None:
        src = flow.key[1]
        for seg in segments:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("tcp out %s -> %s %s", src, self.guest_ip, seg.describe())
            self._queue_ip(src, IPPROTO_TCP, seg.build(src, self.guest_ip))

    def _queue_ip(self, src: IPv4Address, protocol: int, payload: bytes) -> None:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        packet = IPv4Packet(src, self.guest_ip, protocol, payload, identification=self._ip_id)
        if self._guest_mac is None:
            self._drop("tx-no-guest-mac")
            return
        self._queue_frame(self._guest_mac, ETHERTYPE_IPV4, packet.build())

    def _queue_frame(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        frame = EthernetFrame(dst_mac, self.gateway_mac, ethertype, payload).build()
        if self._tx_bytes + len(frame) > self.max_tx_queue_bytes:
            self._counters["drop.tx-queue-full"] += 1
            return
        self._tx.append(frame)
        self._tx_bytes += len(frame)
        self._counters["tx.frames"] += 1
        self._counters["tx.bytes"] += len(frame)
