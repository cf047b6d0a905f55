"""A scripted guest for NetworkStack tests: builds its frames, reads ours."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from ipaddress import IPv4Address

from pytest_gondolin.netpolicy.stack.flow_events import NewFlow
from pytest_gondolin.netpolicy.stack.network import GATEWAY_MAC, GUEST_IP, NetworkStack
from pytest_gondolin.netpolicy.stack.packets import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ArpPacket,
    EthernetFrame,
    IcmpEcho,
    IPv4Packet,
    UdpDatagram,
    parse_arp,
    parse_ethernet,
    parse_icmp_echo,
    parse_ipv4,
    parse_udp,
)
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_FIN,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    parse_tcp,
)

GUEST_MAC = bytes.fromhex("525400123456")


def eth_frame(
    payload: bytes,
    ethertype: int = ETHERTYPE_IPV4,
    *,
    dst: bytes = GATEWAY_MAC,
    src: bytes = GUEST_MAC,
) -> bytes:
    return EthernetFrame(dst, src, ethertype, payload).build()


def ip_frame(
    dst_ip: IPv4Address, protocol: int, payload: bytes, *, src_ip: IPv4Address = GUEST_IP
) -> bytes:
    return eth_frame(IPv4Packet(src_ip, dst_ip, protocol, payload).build())


def tcp_frame(dst_ip: IPv4Address, seg: TcpSegment) -> bytes:
    return ip_frame(dst_ip, IPPROTO_TCP, seg.build(GUEST_IP, dst_ip))


def udp_frame(dst_ip: IPv4Address, sport: int, dport: int, payload: bytes) -> bytes:
    return ip_frame(dst_ip, IPPROTO_UDP, UdpDatagram(sport, dport, payload).build(GUEST_IP, dst_ip))


def icmp_frame(dst_ip: IPv4Address, echo: IcmpEcho) -> bytes:
    return ip_frame(dst_ip, IPPROTO_ICMP, echo.build())


def arp_frame(arp: ArpPacket) -> bytes:
    return eth_frame(arp.build(), ETHERTYPE_ARP, dst=b"\xff" * 6)


@dataclass(frozen=True)
class Out:
    """One frame from the stack, decoded and checked for well-formedness."""

    eth: EthernetFrame
    ip: IPv4Packet | None
    arp: ArpPacket | None = None
    tcp: TcpSegment | None = None
    udp: UdpDatagram | None = None
    icmp: IcmpEcho | None = None


def decode(frame: bytes) -> Out:
    """Parse a frame we sent; every checksum must verify."""
    eth = parse_ethernet(frame)
    assert eth.src == GATEWAY_MAC
    if eth.ethertype == ETHERTYPE_ARP:
        return Out(eth, None, arp=parse_arp(eth.payload))
    ip = parse_ipv4(eth.payload)
    assert ip.dst == GUEST_IP and eth.dst == GUEST_MAC
    if ip.protocol == IPPROTO_TCP:
        return Out(eth, ip, tcp=parse_tcp(ip.payload, ip.src, ip.dst))
    if ip.protocol == IPPROTO_UDP:
        return Out(eth, ip, udp=parse_udp(ip.payload, ip.src, ip.dst))
    assert ip.protocol == IPPROTO_ICMP
    return Out(eth, ip, icmp=parse_icmp_echo(ip.payload))


def drain(stack: NetworkStack) -> list[Out]:
    return [decode(f) for f in stack.outgoing_frames()]


def tcp_out(stack: NetworkStack) -> list[TcpSegment]:
    segs = []
    for out in drain(stack):
        assert out.tcp is not None
        segs.append(out.tcp)
    return segs


# Segments drained from a stack but addressed to another GuestSocket.
_backlog: weakref.WeakKeyDictionary[NetworkStack, list[TcpSegment]] = weakref.WeakKeyDictionary()


class GuestSocket:
    """The guest end of one TCP connection, driven by hand."""

    def __init__(
        self,
        stack: NetworkStack,
        dst_ip: IPv4Address,
        dst_port: int,
        *,
        sport: int = 40000,
        isn: int = 7000,
    ) -> None:
        self.stack = stack
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.sport = sport
        self.isn = isn
        self.snd = isn
        self.rcv = 0
        self.received = b""
        self.now = 0.0

    def seg(
        self,
        flags: int,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        window: int = 65535,
        options: TcpOptions | None = None,
    ) -> TcpSegment:
        return TcpSegment(
            self.sport,
            self.dst_port,
            self.snd if seq is None else seq,
            self.rcv if flags & TCP_ACK else 0,
            flags,
            window,
            payload,
            options or TcpOptions(),
        )

    def send_seg(self, seg: TcpSegment) -> None:
        self.stack.receive_frame(tcp_frame(self.dst_ip, seg), self.now)

    def syn(self) -> None:
        self.send_seg(self.seg(TCP_SYN, seq=self.isn, options=TcpOptions(mss=1460, window_scale=7)))
        self.snd = (self.isn + 1) & 0xFFFFFFFF

    def take(self) -> list[TcpSegment]:
        """Receive what the stack sent to this socket: track sequence
        numbers, collect data. Segments for other sockets wait for them."""
        pending = _backlog.setdefault(self.stack, [])
        pending += tcp_out(self.stack)
        segs = [s for s in pending if (s.src_port, s.dst_port) == (self.dst_port, self.sport)]
        pending[:] = [s for s in pending if (s.src_port, s.dst_port) != (self.dst_port, self.sport)]
        for s in segs:
            if s.syn:
                self.rcv = (s.seq + 1) & 0xFFFFFFFF
            elif s.seq == self.rcv and (s.payload or s.fin):
                self.received += s.payload
                self.rcv = (self.rcv + len(s.payload) + s.fin) & 0xFFFFFFFF
        return segs

    def ack(self, payload: bytes = b"", *, fin: bool = False, window: int = 65535) -> None:
        flags = TCP_ACK | (TCP_FIN if fin else 0)
        self.send_seg(self.seg(flags, payload, window=window))
        self.snd = (self.snd + len(payload) + fin) & 0xFFFFFFFF


def established(
    stack: NetworkStack, dst_ip: IPv4Address, dst_port: int = 80, *, sport: int = 40000
) -> tuple[GuestSocket, int]:
    """Open and accept a flow; return the guest socket and the flow id,
    with no frames or events left over."""
    sock = GuestSocket(stack, dst_ip, dst_port, sport=sport)
    sock.syn()
    (new,) = [e for e in stack.events() if isinstance(e, NewFlow)]
    flow_id = new.flow_id
    stack.accept(flow_id)
    sock.take()
    sock.ack()
    sock.take()  # the window update announcing the scaled window
    stack.events()
    return sock, flow_id
