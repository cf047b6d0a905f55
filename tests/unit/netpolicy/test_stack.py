"""The whole stack, frame in / frame out, as the guest would see it."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.stack.dns import SyntheticResolver
from pytest_gondolin.netpolicy.stack.flow_events import (
    FlowClosed,
    FlowData,
    FlowEOF,
    FlowWritable,
    NewFlow,
)
from pytest_gondolin.netpolicy.stack.network import GATEWAY_IP, GATEWAY_MAC, GUEST_IP, NetworkStack
from pytest_gondolin.netpolicy.stack.packets import (
    ARP_REPLY,
    ARP_REQUEST,
    ETHERTYPE_IPV6,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    IPPROTO_TCP,
    ArpPacket,
    IcmpEcho,
    IPv4Packet,
    internet_checksum,
)
from pytest_gondolin.netpolicy.stack.segments import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpSegment
from pytest_gondolin.netpolicy.stack.tcp import CloseReason
from pytest_gondolin.netpolicy.stack.tcp_config import TcpConfig

from .dns_helpers import parse_response, query, wire_name
from .stack_helpers import (
    GUEST_MAC,
    GuestSocket,
    arp_frame,
    drain,
    established,
    eth_frame,
    icmp_frame,
    tcp_frame,
    tcp_out,
    udp_frame,
)

REMOTE = IPv4Address("93.184.216.34")


def make_stack(**kwargs: object) -> NetworkStack:
    return NetworkStack(isn=lambda: 1_000_000, **kwargs)  # type: ignore[arg-type]


# -- ARP ------------------------------------------------------------------------------


def _arp_request(target: str, sender: IPv4Address = GUEST_IP) -> bytes:
    return arp_frame(ArpPacket(ARP_REQUEST, GUEST_MAC, sender, b"\0" * 6, IPv4Address(target)))


@pytest.mark.parametrize(
    "target", ["192.168.127.1", "192.168.127.2", "192.168.127.200", "192.168.127.254"]
)
def test_arp_answered_for_every_neighbour(target: str) -> None:
    stack = make_stack()
    stack.receive_frame(_arp_request(target), 0.0)
    (out,) = drain(stack)
    assert out.eth.dst == GUEST_MAC
    assert out.arp == ArpPacket(ARP_REPLY, GATEWAY_MAC, IPv4Address(target), GUEST_MAC, GUEST_IP)
    assert stack.counters["arp.replies"] == 1


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        # Duplicate address detection probe for the guest's own address (RFC 5227).
        (_arp_request("192.168.127.3", IPv4Address("0.0.0.0")), "arp-own-address"),
        # Gratuitous ARP announcement.
        (_arp_request("192.168.127.3"), "arp-own-address"),
        (_arp_request("192.168.127.0"), "arp-not-ours"),
        (_arp_request("192.168.127.255"), "arp-not-ours"),
        (_arp_request("10.0.0.1"), "arp-not-ours"),
        (_arp_request("192.168.127.1", IPv4Address("192.168.127.9")), "arp-bad-sender"),
        (
            arp_frame(ArpPacket(ARP_REPLY, GUEST_MAC, GUEST_IP, GATEWAY_MAC, GATEWAY_IP)),
            "arp-not-request",
        ),
    ],
)
def test_arp_not_answered(frame: bytes, reason: str) -> None:
    stack = make_stack()
    stack.receive_frame(frame, 0.0)
    assert stack.outgoing_frames() == []
    assert stack.dropped == {reason: 1}


# -- ICMP ---------------------------------------------------------------------------------


def test_ping_gateway() -> None:
    stack = make_stack()
    stack.receive_frame(
        icmp_frame(GATEWAY_IP, IcmpEcho(ICMP_ECHO_REQUEST, 0xBEEF, 3, b"ping" * 14)), 0.0
    )
    (out,) = drain(stack)
    assert out.ip is not None and out.ip.src == GATEWAY_IP
    assert out.icmp == IcmpEcho(ICMP_ECHO_REPLY, 0xBEEF, 3, b"ping" * 14)
    assert stack.guest_mac == GUEST_MAC


def test_ping_elsewhere_is_dropped() -> None:
    stack = make_stack()
    stack.receive_frame(icmp_frame(REMOTE, IcmpEcho(ICMP_ECHO_REQUEST, 1, 1)), 0.0)
    assert stack.outgoing_frames() == []
    assert stack.dropped == {"icmp-not-gateway": 1}


# -- DNS ------------------------------------------------------------------------------------


def _dns(stack: NetworkStack, message: bytes, sport: int = 33333) -> bytes:
    stack.receive_frame(udp_frame(GATEWAY_IP, sport, 53, message), 0.0)
    (out,) = drain(stack)
    assert out.ip is not None and out.ip.src == GATEWAY_IP
    assert out.udp is not None and (out.udp.src_port, out.udp.dst_port) == (53, sport)
    return out.udp.payload


def test_dns_a_then_connect_maps_back_to_the_name() -> None:
    stack = make_stack()
    r = parse_response(_dns(stack, query("api.github.com")))
    (address,) = r.addresses
    assert address in IPv4Network("198.18.0.0/15")
    guest = GuestSocket(stack, address, 443)
    guest.syn()
    (event,) = stack.events()
    assert event == NewFlow(1, address, 443, "api.github.com", 40000)


def test_dns_aaaa_is_empty() -> None:
    r = parse_response(_dns(make_stack(), query("example.org", 28)))
    assert (r.rcode, r.ancount) == (0, 0)


@pytest.mark.parametrize(
    "message",
    [
        query(b"\x01a\xc0\x0c"),  # compression loop
        query("a.b", counts=(2, 0, 0, 0), extra=wire_name("c.d") + b"\0\1\0\1"),
        query(".".join(["x" * 59] * 5)),  # a 300-byte name
    ],
)
def test_dns_malformed_gets_formerr(message: bytes) -> None:
    stack = make_stack()
    r = parse_response(_dns(stack, message))
    assert (r.rcode, r.qdcount, r.ancount) == (1, 0, 0)
    assert stack.resolver.names == {}


def test_dns_garbage_is_dropped_silently() -> None:
    stack = make_stack()
    stack.receive_frame(udp_frame(GATEWAY_IP, 1000, 53, b"\x00"), 0.0)
    assert stack.outgoing_frames() == []
    assert stack.dropped == {"dns-unanswerable": 1}


@pytest.mark.parametrize(("dst", "port"), [(REMOTE, 53), (GATEWAY_IP, 123), (GATEWAY_IP, 67)])
def test_other_udp_is_dropped(dst: IPv4Address, port: int) -> None:
    stack = make_stack()
    stack.receive_frame(udp_frame(dst, 1000, port, b"x"), 0.0)
    assert stack.outgoing_frames() == []
    assert stack.dropped == {"udp-not-dns": 1}


# -- what gets dropped before any protocol -----------------------------------------------------


def _fragment() -> bytes:
    packet = bytearray(IPv4Packet(GUEST_IP, GATEWAY_IP, 17, b"\0" * 16).build())
    packet[6] |= 0x20  # MF
    packet[10:12] = b"\0\0"
    packet[10:12] = internet_checksum(bytes(packet[:20])).to_bytes(2, "big")
    return eth_frame(bytes(packet))


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "ethernet-short"),
        (b"\xff" * 13, "ethernet-short"),
        (eth_frame(b"\x60" + b"\0" * 39, ETHERTYPE_IPV6, dst=b"\x33\x33\0\0\0\x16"), "ipv6"),
        (eth_frame(b"\0" * 46, 0x88CC), "ethertype-unsupported"),  # LLDP
        (eth_frame(b"\0" * 46, dst=bytes.fromhex("020000000099")), "ethernet-not-for-us"),
        (eth_frame(b"\0" * 46, src=b"\x01" * 6), "ethernet-bad-source"),
        (eth_frame(b"\0" * 46), "ipv4-version"),
        (
            eth_frame(IPv4Packet(GUEST_IP, GATEWAY_IP, 17, b"").build(), dst=b"\xff" * 6),
            "ipv4-link-broadcast",
        ),
        (
            eth_frame(IPv4Packet(IPv4Address("192.168.127.9"), GATEWAY_IP, 17, b"").build()),
            "ipv4-bad-source",
        ),
        (
            eth_frame(IPv4Packet(GUEST_IP, GATEWAY_IP, 47, b"gre").build()),
            "ipv4-protocol-unsupported",
        ),
        (_fragment(), "ipv4-fragment"),
    ],
)
def test_frames_dropped_by_reason(frame: bytes, reason: str) -> None:
    stack = make_stack()
    stack.receive_frame(frame, 0.0)
    assert stack.outgoing_frames() == []
    assert stack.events() == []
    assert stack.dropped == {reason: 1}
    assert stack.counters["rx.frames"] == 1


@pytest.mark.parametrize(
    "dst",
    ["192.168.127.3", "192.168.127.255", "255.255.255.255", "224.0.0.1", "127.0.0.1", "0.1.2.3"],
)
def test_tcp_to_impossible_destinations_dropped(dst: str) -> None:
    stack = make_stack()
    GuestSocket(stack, IPv4Address(dst), 80).syn()
    assert stack.events() == [] and stack.outgoing_frames() == []
    assert stack.dropped == {"tcp-bad-destination": 1}


def test_fixed_guest_mac_is_enforced() -> None:
    stack = make_stack(guest_mac=bytes.fromhex("525400000001"))
    stack.receive_frame(_arp_request("192.168.127.1"), 0.0)
    assert stack.dropped == {"ethernet-bad-source": 1}


# -- TCP flows -------------------------------------------------------------------------------------


def test_flow_life_cycle() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    (new,) = stack.events()
    assert new == NewFlow(1, REMOTE, 80, None, 40000)
    assert stack.outgoing_frames() == []  # the SYN is held until accept()
    assert stack.flow_info(1) is not None and stack.flow_info(1).state == "PENDING"  # type: ignore[union-attr]

    stack.accept(1)
    (synack,) = guest.take()
    assert synack.flags == TCP_SYN | TCP_ACK and synack.ack == 7001
    assert synack.options.mss == 65480  # MTU 65520 - 40
    guest.ack()
    guest.take()  # the window update announcing the scaled window
    assert stack.flow_info(1).state == "ESTABLISHED"  # type: ignore[union-attr]

    guest.ack(b"GET / HTTP/1.0\r\n\r\n")
    assert stack.events() == [FlowData(1)]
    guest.take()
    assert stack.flow_read(1) == b"GET / HTTP/1.0\r\n\r\n"

    assert stack.flow_send(1, b"HTTP/1.0 200 OK\r\n\r\nhi") == 21
    guest.take()
    assert guest.received == b"HTTP/1.0 200 OK\r\n\r\nhi"
    guest.ack()

    guest.ack(fin=True)
    assert stack.events() == [FlowEOF(1)]
    guest.take()
    stack.flow_close(1)
    (fin,) = guest.take()
    assert fin.flags & TCP_FIN
    guest.ack()
    assert stack.events() == [FlowClosed(1, CloseReason.NORMAL)]
    assert stack.flow_info(1) is None
    assert stack.buffered_bytes == 0
    # A late segment on the finished 4-tuple is answered with RST.
    guest.ack()
    (rst,) = guest.take()
    assert rst.flags & TCP_RST


def test_reject_sends_rst() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 22)
    guest.syn()
    (new,) = stack.events()
    assert isinstance(new, NewFlow)
    stack.reject(new.flow_id)
    (rst,) = guest.take()
    assert (rst.flags, rst.seq, rst.ack) == (TCP_RST | TCP_ACK, 0, 7001)
    assert stack.events() == [FlowClosed(new.flow_id, CloseReason.REJECTED)]
    assert stack.flow_info(new.flow_id) is None
    # Everything about the old flow is gone: operations are no-ops.
    stack.accept(new.flow_id)
    assert stack.flow_send(new.flow_id, b"x") == 0
    assert stack.flow_read(new.flow_id) == b""
    assert stack.outgoing_frames() == []


def test_duplicate_syn_while_pending_is_absorbed() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    guest.syn()
    assert len(stack.events()) == 1
    assert stack.outgoing_frames() == []
    stack.accept(1)
    assert len(guest.take()) == 1


def test_guest_rst_while_pending() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.events()
    guest.send_seg(guest.seg(TCP_RST))
    assert stack.events() == [FlowClosed(1, CloseReason.GUEST_RESET)]
    assert stack.outgoing_frames() == []


def test_accept_timeout() -> None:
    stack = make_stack(accept_timeout=5.0)
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.events()
    assert stack.next_timer == 5.0
    stack.on_timer(4.9)
    assert stack.events() == []
    stack.on_timer(5.0)
    assert stack.events() == [FlowClosed(1, CloseReason.ACCEPT_TIMEOUT)]
    (rst,) = guest.take()
    assert rst.flags & TCP_RST
    assert stack.next_timer is None


def test_guest_reset_of_established_flow() -> None:
    stack = make_stack()
    guest, _ = established(stack, REMOTE)
    guest.ack(b"partial")
    guest.send_seg(guest.seg(TCP_RST))
    assert stack.events() == [FlowData(1), FlowClosed(1, CloseReason.GUEST_RESET)]
    assert stack.flow_read(1) == b""  # RFC 9293: a reset flushes the queues
    assert stack.flow_info(1) is None


def test_flow_abort() -> None:
    stack = make_stack()
    guest, _ = established(stack, REMOTE)
    stack.flow_abort(1)
    (rst,) = guest.take()
    assert rst.flags & TCP_RST
    assert stack.events()[-1] == FlowClosed(1, CloseReason.ABORTED)
    assert stack.flow_info(1) is None


def test_data_stays_readable_after_close() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.accept(1)
    guest.take()
    guest.ack()
    stack.flow_close(1)
    guest.take()
    guest.ack(b"last words", fin=True)
    # The connection is closed, but FlowClosed waits until the data is read.
    assert stack.events()[-2:] == [FlowData(1), FlowEOF(1)]
    assert stack.flow_info(1).state == "CLOSED"  # type: ignore[union-attr]
    assert stack.flow_read(1, 4) == b"last"
    assert stack.events() == [FlowData(1)]  # more is waiting
    assert stack.flow_read(1) == b" words"
    assert stack.events() == [FlowClosed(1, CloseReason.NORMAL)]
    assert stack.flow_info(1) is None
    assert stack.buffered_bytes == 0


def test_abort_discards_data_of_a_closed_flow() -> None:
    stack = make_stack()
    guest, fid = established(stack, REMOTE)
    stack.flow_close(fid)
    guest.take()
    guest.ack(b"unwanted", fin=True)
    guest.take()
    stack.events()
    assert stack.buffered_bytes == 8
    stack.flow_abort(fid)
    assert stack.events() == [FlowClosed(fid, CloseReason.NORMAL)]
    assert stack.buffered_bytes == 0
    assert stack.outgoing_frames() == []  # nothing to reset: it was closed


def test_closed_flow_frees_its_port_before_being_read() -> None:
    stack = make_stack()
    guest, fid = established(stack, REMOTE)
    stack.flow_close(fid)
    guest.take()
    guest.ack(b"unread", fin=True)
    guest.take()
    stack.events()
    guest.syn()  # the same 4-tuple again
    assert [type(e) for e in stack.events()] == [NewFlow]
    assert stack.flow_read(fid) == b"unread"


def test_flow_cap() -> None:
    stack = make_stack(max_flows=2)
    for port in (1001, 1002, 1003):
        GuestSocket(stack, REMOTE, 80, sport=port).syn()
    events = stack.events()
    assert [e.src_port for e in events if isinstance(e, NewFlow)] == [1001, 1002]
    (rst,) = tcp_out(stack)
    assert rst.dst_port == 1003 and rst.flags & TCP_RST
    assert stack.dropped == {"tcp-flow-limit": 1}
    # Closing one frees a slot.
    stack.reject(1)
    stack.outgoing_frames()
    GuestSocket(stack, REMOTE, 80, sport=1004).syn()
    assert any(isinstance(e, NewFlow) and e.src_port == 1004 for e in stack.events())


def test_segment_without_flow_gets_rst() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.rcv = 123
    guest.ack(b"hello?")
    (rst,) = guest.take()
    assert (rst.flags, rst.seq) == (TCP_RST, 123)
    assert stack.counters["tcp.no-flow"] == 1
    assert stack.events() == []


def test_retransmission_through_the_stack() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.accept(1)
    guest.take()
    guest.ack()
    guest.take()
    stack.flow_send(1, b"payload")
    (first,) = guest.take()
    assert stack.next_timer == 1.0
    stack.on_timer(1.0)
    (again,) = tcp_out(stack)
    assert (again.seq, again.payload) == (first.seq, b"payload")
    assert stack.counters["tcp.retransmits"] == 1


def test_short_send_then_flow_writable() -> None:
    stack = make_stack(tcp_config=TcpConfig(send_buffer=1000))
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.accept(1)
    guest.take()
    guest.ack()
    stack.events()
    assert stack.flow_send(1, b"x" * 1500) == 1000
    guest.take()
    assert stack.events() == []
    guest.ack()
    assert stack.events() == [FlowWritable(1)]
    assert stack.flow_send(1, b"x" * 500) == 500


def test_shared_budget_backpressures_and_recovers() -> None:
    stack = make_stack(buffer_budget=3000)
    a, _ = established(stack, REMOTE, sport=1001)
    b, _ = established(stack, REMOTE, sport=1002)
    a.ack(b"a" * 3000)
    (ack_a,) = a.take()
    assert ack_a.window == 0  # the budget is spent
    b.ack(b"b" * 100)
    (ack_b,) = b.take()
    assert ack_b.ack == b.snd - 100 and ack_b.window == 0  # nothing fit
    assert stack.buffered_bytes == 3000
    # Reading flow 1 frees the budget: flow 2 gets a window update unprompted.
    stack.flow_read(1)
    (update_a,) = a.take()
    (update_b,) = b.take()
    assert update_a.window > 0 and update_b.window > 0
    assert stack.buffered_bytes == 0


def test_small_mtu() -> None:
    stack = make_stack(mtu=1500)
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.accept(1)
    (synack,) = guest.take()
    assert synack.options.mss == 1460


def test_outgoing_frames_respect_guest_mss() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()  # MSS 1460
    stack.accept(1)
    guest.take()
    guest.ack()
    guest.take()
    stack.flow_send(1, b"z" * 5000)
    frames = stack.outgoing_frames()
    assert max(len(f) for f in frames) == 14 + 20 + 20 + 1460


def test_tx_queue_cap() -> None:
    stack = make_stack(max_tx_queue_bytes=200)
    for _ in range(5):
        stack.receive_frame(
            icmp_frame(GATEWAY_IP, IcmpEcho(ICMP_ECHO_REQUEST, 1, 1, b"x" * 50)), 0.0
        )
    assert len(stack.outgoing_frames()) == 2
    assert stack.dropped == {"tx-queue-full": 3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mtu": 100},
        {"mtu": 70000},
        {"guest_ip": IPv4Address("10.0.0.3")},
        {"guest_ip": GATEWAY_IP},
        {"gateway_mac": b"\x01" * 6},
        {"guest_mac": b"\x00"},
        {"max_flows": 0},
        {"buffer_budget": 0},
        {"resolver": SyntheticResolver(IPv4Network("192.168.127.128/25"))},
    ],
)
def test_bad_stack_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make_stack(**kwargs)


def test_frames_for_tcp_are_valid_ipv4() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.accept(1)
    (out,) = drain(stack)
    assert out.ip is not None
    assert (out.ip.src, out.ip.protocol, out.ip.dont_fragment) == (REMOTE, IPPROTO_TCP, True)
    assert isinstance(out.tcp, TcpSegment)
    assert out.tcp.ack == 7001


def test_bad_tcp_checksum_is_dropped() -> None:
    stack = make_stack()
    frame = bytearray(tcp_frame(REMOTE, TcpSegment(1000, 2, 3, 0, TCP_SYN, 100)))
    frame[-1] ^= 0xFF  # the last byte of the TCP header (urgent pointer)
    stack.receive_frame(bytes(frame), 0.0)
    assert stack.dropped == {"tcp-bad-checksum": 1}
    assert stack.events() == []


def test_tcp_port_zero_is_dropped() -> None:
    stack = make_stack()
    stack.receive_frame(tcp_frame(REMOTE, TcpSegment(0, 2, 3, 0, TCP_SYN, 100)), 0.0)
    assert stack.dropped == {"tcp-port-zero": 1}


@pytest.mark.parametrize(
    ("flags", "seq", "reason"),
    [
        (TCP_ACK, 7001, "tcp-pending-unexpected"),
        (TCP_RST, 9999, "tcp-pending-bad-rst"),
    ],
)
def test_pending_flow_ignores_other_segments(flags: int, seq: int, reason: str) -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.events()
    guest.send_seg(guest.seg(flags, seq=seq))
    assert stack.dropped == {reason: 1}
    assert stack.events() == [] and stack.outgoing_frames() == []
    assert stack.flow_info(1).state == "PENDING"  # type: ignore[union-attr]


def test_pending_flow_follows_a_fresh_syn() -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.events()
    guest.isn = 424242
    guest.syn()  # same port, new ISN: the guest restarted its attempt
    stack.accept(1)
    (synack,) = guest.take()
    assert synack.ack == 424243


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        ("flow_close", CloseReason.REJECTED),
        ("flow_abort", CloseReason.ABORTED),
        ("reject", CloseReason.REJECTED),
    ],
)
def test_closing_a_pending_flow_refuses_it(op: str, reason: CloseReason) -> None:
    stack = make_stack()
    guest = GuestSocket(stack, REMOTE, 80)
    guest.syn()
    stack.events()
    getattr(stack, op)(1)
    (rst,) = guest.take()
    assert rst.flags == TCP_RST | TCP_ACK
    assert stack.events() == [FlowClosed(1, reason)]


def test_reject_after_accept_aborts() -> None:
    stack = make_stack()
    guest, fid = established(stack, REMOTE)
    stack.reject(fid)
    (rst,) = guest.take()
    assert rst.flags & TCP_RST
    assert stack.events() == [FlowClosed(fid, CloseReason.ABORTED)]


def test_flows_listing_and_counters() -> None:
    stack = make_stack()
    established(stack, REMOTE, sport=1001)
    GuestSocket(stack, REMOTE, 443, sport=1002).syn()
    states = sorted((f.src_port, f.dst_port, f.state) for f in stack.flows)
    assert states == [(1001, 80, "ESTABLISHED"), (1002, 443, "PENDING")]
    counters = stack.counters
    assert counters["tcp.flows"] == 2
    assert counters["tx.frames"] >= 2 and counters["rx.frames"] == 3
