"""The guest's whole network, as seen from the host: a sans-IO stack.

The guest has exactly one peer, this stack, reached through QEMU's
``-netdev stream`` (raw Ethernet frames; framing in :mod:`.link`). The
stack plays every role the guest can address:

* the gateway ``192.168.127.1`` (a fixed MAC), answering ARP, ping and
  DNS on UDP port 53 (via :class:`~.dns.SyntheticResolver`);
* every other IPv4 destination, for TCP only: a SYN to any address and
  port opens a *flow* that the owner relays (or refuses) as it sees fit
  (the flows, their events and their life cycle: :mod:`.flows`).

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

Time: the stack has no clock. ``receive_frame`` and ``on_timer`` take the
caller's ``now``; the ``flow_*`` methods and ``accept`` use the latest
``now`` seen, which is at most one loop iteration old -- this only makes
a retransmission timer fire that much earlier.

Limits: those of :mod:`.flows` (``max_flows``, ``buffer_budget``,
``accept_timeout``) and at most ``max_tx_queue_bytes`` waiting in
``outgoing_frames``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.stack.dns import SyntheticResolver
from pytest_gondolin.netpolicy.stack.flow_events import Event, FlowInfo
from pytest_gondolin.netpolicy.stack.flows import FlowTable
from pytest_gondolin.netpolicy.stack.packets import (
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
    UdpDatagram,
    format_mac,
    parse_arp,
    parse_ethernet,
    parse_icmp_echo,
    parse_ipv4,
    parse_udp,
)
from pytest_gondolin.netpolicy.stack.segments import TcpSegment, parse_tcp
from pytest_gondolin.netpolicy.stack.tcp_config import (
    DEFAULT_ACCEPT_TIMEOUT,
    DEFAULT_BUFFER_BUDGET,
    DEFAULT_MAX_FLOWS,
    TcpConfig,
)

__all__ = [
    "DEFAULT_MAX_TX_QUEUE_BYTES",
    "DEFAULT_MTU",
    "DNS_PORT",
    "GATEWAY_IP",
    "GATEWAY_MAC",
    "GUEST_IP",
    "GUEST_NETWORK",
    "NetworkStack",
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
#: Frames waiting for outgoing_frames(). Only a stalled driver gets near
#: this; past it frames are dropped (TCP retransmits).
DEFAULT_MAX_TX_QUEUE_BYTES = 64 * 1024 * 1024
#: IPv4 packets held while the guest's MAC is unknown (a few SYNs).
_MAX_AWAITING_MAC = 16


# --------------------------------------------------------------------------
# the stack


class NetworkStack:
    """The host side of the guest's network. See the module docstring.

    Guarantees: ``receive_frame`` never raises for any bytes (malformed or
    unwanted frames are dropped and counted in :attr:`counters` under
    ``drop.<reason>``); the flow guarantees of :class:`~.flows.FlowTable`
    (one ``NewFlow`` and one ``FlowClosed`` per flow, no-ops on unknown ids).

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
        self.resolver = resolver if resolver is not None else SyntheticResolver()
        self._counters: Counter[str] = Counter()
        self._table = FlowTable(
            send=self._send_segment,
            name_for=self.resolver.name_for,
            counters=self._counters,
            tcp_config=(
                tcp_config if tcp_config is not None else TcpConfig(mss=min(mtu - 40, 65495))
            ),
            max_flows=max_flows,
            buffer_budget=buffer_budget,
            accept_timeout=accept_timeout,
            isn=isn,
        )
        if self.resolver.pool.overlaps(network):
            raise ConfigError(f"DNS pool {self.resolver.pool} overlaps the guest network {network}")
        self.mtu = mtu
        self.network = network
        self.gateway_ip = gateway_ip
        self.guest_ip = guest_ip
        self.gateway_mac = gateway_mac
        self._fixed_guest_mac = guest_mac is not None
        self._guest_mac = guest_mac
        self.max_tx_queue_bytes = max_tx_queue_bytes
        self._tx: list[bytes] = []
        self._awaiting_mac: list[bytes] = []  # IPv4 packets held until the guest's MAC is known
        self._tx_bytes = 0
        self._ip_id = 0

    @property
    def max_flows(self) -> int:
        return self._table.max_flows

    @property
    def tcp_config(self) -> TcpConfig:
        return self._table.tcp_config

    @property
    def accept_timeout(self) -> float:
        return self._table.accept_timeout

    # -- driver interface -----------------------------------------------------

    def receive_frame(self, frame: bytes, now: float) -> None:
        """Process one Ethernet frame from the guest. Never raises."""
        self._table.advance(now)
        self._counters["rx.frames"] += 1
        self._counters["rx.bytes"] += len(frame)
        try:
            self._dispatch(frame, now)
        except PacketError as exc:
            self._drop(exc.reason, exc.detail)
        self._table.nudge_starved()

    def outgoing_frames(self) -> list[bytes]:
        """Take the frames queued for the guest, oldest first."""
        frames, self._tx, self._tx_bytes = self._tx, [], 0
        return frames

    def events(self) -> list[Event]:
        """Take the events that happened since the last call, in order."""
        return self._table.events()

    def on_timer(self, now: float) -> None:
        """Run every timer due at ``now`` (retransmissions, probes, accept timeouts)."""
        self._table.on_timer(now)

    @property
    def next_timer(self) -> float | None:
        """The earliest time ``on_timer`` has work, or ``None``."""
        return self._table.next_timer

    # -- flow interface (see :class:`~.flows.FlowTable`) ----------------------

    def connect(self, guest_port: int) -> int | None:
        """Dial the guest's ``guest_port`` from the gateway (see :meth:`.FlowTable.connect`)."""
        return self._table.connect(self.gateway_ip, guest_port)

    def accept(self, flow_id: int) -> None:
        """Complete the handshake of a pending flow (the SYN-ACK goes out)."""
        self._table.accept(flow_id)

    def reject(self, flow_id: int) -> None:
        """Refuse a pending flow with RST ("connection refused"); abort an accepted one."""
        self._table.reject(flow_id)

    def flow_send(self, flow_id: int, data: bytes) -> int:
        """Queue bytes for the guest; return how many were accepted (0 if none fit)."""
        return self._table.flow_send(flow_id, data)

    def flow_read(self, flow_id: int, max_bytes: int | None = None) -> bytes:
        """Take bytes the guest sent (all by default). Opens the flow's window."""
        return self._table.flow_read(flow_id, max_bytes)

    def flow_close(self, flow_id: int) -> None:
        """Send FIN after queued data (half-close); refuses a flow not yet accepted."""
        self._table.flow_close(flow_id)

    def flow_abort(self, flow_id: int) -> None:
        """Reset the flow (RST to the guest) and forget it, unread data included."""
        self._table.flow_abort(flow_id)

    def flow_info(self, flow_id: int) -> FlowInfo | None:
        """A snapshot of one flow, or ``None`` if unknown or forgotten."""
        return self._table.flow_info(flow_id)

    @property
    def flows(self) -> list[FlowInfo]:
        """Snapshots of every flow the stack still holds."""
        return self._table.flows

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
        return self._table.buffered_bytes

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
        if (
            arp.op == ARP_REPLY
            and self._awaiting_mac
            and arp.sender_ip == self.guest_ip
            and arp.sender_mac == eth.src
        ):
            self._learn_guest_mac(eth.src)  # the answer to _ask_guest_mac
            return
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
        self._table.receive_segment(ip.dst, seg, now)

    # -- transmit path --------------------------------------------------------

    def _learn_guest_mac(self, mac: bytes) -> None:
        if not self._fixed_guest_mac and mac != self._guest_mac:
            logger.debug("guest MAC is %s", format_mac(mac))
            self._guest_mac = mac
        if self._guest_mac is not None:
            waiting, self._awaiting_mac = self._awaiting_mac, []
            for packet in waiting:
                self._queue_frame(self._guest_mac, ETHERTYPE_IPV4, packet)

    def _ask_guest_mac(self, packet: bytes) -> None:
        """Hold ``packet`` and ask the guest its MAC (RFC 826): the host speaks first.

        Only the host's own dial (``connect``, after a restore the guest has
        sent nothing yet) needs it; at most :data:`_MAX_AWAITING_MAC` packets
        wait, the rest are dropped (TCP resends them).
        """
        if len(self._awaiting_mac) >= _MAX_AWAITING_MAC:
            self._drop("tx-no-guest-mac")
            return
        self._awaiting_mac.append(packet)
        request = ArpPacket(ARP_REQUEST, self.gateway_mac, self.gateway_ip, bytes(6), self.guest_ip)
        self._counters["arp.requests"] += 1
        self._queue_frame(b"\xff" * 6, ETHERTYPE_ARP, request.build())

    def _send_segment(self, src: IPv4Address, seg: TcpSegment) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("tcp out %s -> %s %s", src, self.guest_ip, seg.describe())
        self._queue_ip(src, IPPROTO_TCP, seg.build(src, self.guest_ip))

    def _queue_ip(self, src: IPv4Address, protocol: int, payload: bytes) -> None:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        packet = IPv4Packet(src, self.guest_ip, protocol, payload, identification=self._ip_id)
        if self._guest_mac is None:
            self._ask_guest_mac(packet.build())
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
