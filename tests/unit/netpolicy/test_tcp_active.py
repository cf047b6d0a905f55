"""The host dialling the guest (``NetworkStack.connect``, for ``VM.forward``), frame by frame."""

from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.stack.flow_events import FlowClosed, FlowData, FlowEOF, FlowWritable
from pytest_gondolin.netpolicy.stack.network import GATEWAY_IP, GUEST_IP, NetworkStack
from pytest_gondolin.netpolicy.stack.packets import ARP_REPLY, ARP_REQUEST, ArpPacket
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
)
from pytest_gondolin.netpolicy.stack.tcp import CloseReason
from pytest_gondolin.netpolicy.stack.tcp_config import TcpConfig

from .stack_helpers import GUEST_MAC, arp_frame, drain, tcp_frame, tcp_out

ISS = 5_000
GUEST_ISS = 77_000
PORT = 8000


def make_stack(**kwargs: object) -> NetworkStack:
    return NetworkStack(isn=lambda: ISS, guest_mac=GUEST_MAC, **kwargs)  # type: ignore[arg-type]


def guest(stack: NetworkStack, seg: TcpSegment, now: float = 0.0) -> None:
    stack.receive_frame(tcp_frame(GATEWAY_IP, seg), now)


def dial(stack: NetworkStack) -> tuple[int, TcpSegment]:
    flow_id = stack.connect(PORT)
    assert flow_id is not None
    (syn,) = tcp_out(stack)
    return flow_id, syn


def synack(syn: TcpSegment, **options: int) -> TcpSegment:
    return TcpSegment(
        PORT, syn.src_port, GUEST_ISS, ISS + 1, TCP_SYN | TCP_ACK, 64240,
        options=TcpOptions(mss=options.get("mss", 1460), window_scale=options.get("ws", 7)),
    )  # fmt: skip


def test_syn_offers_mss_and_window_scale_from_a_dynamic_port() -> None:
    stack = make_stack()
    _, syn = dial(stack)
    assert syn.flags == TCP_SYN and syn.seq == ISS and syn.dst_port == PORT
    assert 49152 <= syn.src_port <= 65535
    assert syn.options.mss == stack.tcp_config.mss
    assert syn.options.window_scale == stack.tcp_config.window_shift
    assert stack.events() == []  # no NewFlow: the flow is the caller's


def test_syn_ack_establishes_and_data_flows_both_ways() -> None:
    stack = make_stack()
    flow_id, syn = dial(stack)
    guest(stack, synack(syn))
    (ack,) = tcp_out(stack)
    assert ack.flags == TCP_ACK and (ack.seq, ack.ack) == (ISS + 1, GUEST_ISS + 1)
    assert stack.events() == [FlowWritable(flow_id)]
    assert stack.flow_info(flow_id).state == "ESTABLISHED"  # type: ignore[union-attr]

    assert stack.flow_send(flow_id, b"GET / HTTP/1.0\r\n\r\n") == 18
    (data,) = tcp_out(stack)
    assert data.payload == b"GET / HTTP/1.0\r\n\r\n" and data.seq == ISS + 1
    reply = TcpSegment(PORT, syn.src_port, GUEST_ISS + 1, ISS + 19, TCP_ACK | TCP_FIN, 501, b"ok")
    guest(stack, reply)
    assert stack.events() == [FlowData(flow_id), FlowEOF(flow_id)]
    assert stack.flow_read(flow_id) == b"ok"
    stack.flow_close(flow_id)
    (fin,) = [s for s in tcp_out(stack) if s.fin]
    guest(stack, TcpSegment(PORT, syn.src_port, GUEST_ISS + 4, fin.seq + 1, TCP_ACK, 501))
    assert stack.events()[-1] == FlowClosed(flow_id, CloseReason.NORMAL)


def test_rst_acking_the_syn_is_refused() -> None:
    stack = make_stack()
    flow_id, syn = dial(stack)
    guest(stack, TcpSegment(PORT, syn.src_port, 0, ISS + 1, TCP_RST | TCP_ACK, 0))
    assert stack.events() == [FlowClosed(flow_id, CloseReason.REFUSED)]
    assert stack.flow_info(flow_id) is None


def test_stray_segments_do_not_open_the_flow() -> None:
    stack = make_stack()
    flow_id, syn = dial(stack)
    # A RST that does not acknowledge our SYN is ignored (RFC 9293 §3.10.7.3).
    guest(stack, TcpSegment(PORT, syn.src_port, 0, ISS + 99, TCP_RST | TCP_ACK, 0))
    # A SYN-ACK for another ISS is answered with RST and ignored.
    bad = TcpSegment(PORT, syn.src_port, GUEST_ISS, ISS + 7, TCP_SYN | TCP_ACK, 64240)
    guest(stack, bad)
    (rst,) = tcp_out(stack)
    assert rst.rst and rst.seq == ISS + 7
    assert stack.events() == []
    assert stack.flow_info(flow_id).state == "SYN-SENT"  # type: ignore[union-attr]


def test_syn_is_resent_with_backoff_then_the_dial_times_out() -> None:
    config = TcpConfig(rto_initial=1.0, rto_max=4.0, max_retries=3)
    stack = make_stack(tcp_config=config)
    flow_id, _ = dial(stack)
    resent = []
    now = 0.0
    while stack.flow_info(flow_id) is not None:
        deadline = stack.next_timer
        assert deadline is not None and deadline > now
        now = deadline
        stack.on_timer(now)
        resent += [(now, s.seq) for s in tcp_out(stack)]
    assert resent == [(1.0, ISS), (3.0, ISS), (7.0, ISS)]  # 1 s, then 2 s, then 4 s (the cap)
    assert stack.events() == [FlowClosed(flow_id, CloseReason.TIMEOUT)]


def test_unknown_guest_mac_is_asked_for_with_arp_and_the_syn_follows_the_reply() -> None:
    stack = NetworkStack(isn=lambda: ISS)  # a restored guest that has sent nothing yet
    stack.connect(PORT)
    (request,) = drain(stack)
    assert request.arp is not None and request.arp.op == ARP_REQUEST
    assert request.eth.dst == b"\xff" * 6 and request.arp.target_ip == GUEST_IP
    reply = ArpPacket(ARP_REPLY, GUEST_MAC, GUEST_IP, request.arp.sender_mac, GATEWAY_IP)
    stack.receive_frame(arp_frame(reply), 0.0)
    (syn,) = tcp_out(stack)  # the held SYN, now to the guest's MAC
    assert syn.syn and syn.dst_port == PORT


def test_dials_are_bounded_by_the_flow_cap() -> None:
    stack = make_stack(max_flows=3)
    ids = [stack.connect(PORT) for _ in range(4)]
    assert ids[3] is None and None not in ids[:3]
    assert len({s.src_port for s in tcp_out(stack)}) == 3  # a distinct local port each


@settings(max_examples=300, deadline=None)
@given(
    flags=st.integers(0, 0x3F),
    seq=st.integers(0, 2**32 - 1),
    ack=st.sampled_from([0, ISS, ISS + 1, ISS + 2, 2**32 - 1]),
    window=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=64),
    ws=st.none() | st.integers(0, 20),
    mss=st.none() | st.integers(0, 0xFFFF),
)
def test_any_guest_segment_to_a_dial_is_handled_without_raising(
    flags: int, seq: int, ack: int, window: int, payload: bytes, ws: int | None, mss: int | None
) -> None:
    stack = make_stack()
    flow_id, syn = dial(stack)
    options = TcpOptions(mss=mss, window_scale=ws)
    guest(stack, TcpSegment(PORT, syn.src_port, seq, ack, flags, window, payload, options))
    for out in drain(stack):
        assert out.tcp is not None and out.tcp.dst_port == PORT
    info = stack.flow_info(flow_id)
    assert info is None or info.state in {"SYN-SENT", "ESTABLISHED", "CLOSE-WAIT"}
    assert stack.buffered_bytes <= stack.tcp_config.recv_buffer
    stack.on_timer(100.0)
    drain(stack)


def test_dial_source_is_the_gateway() -> None:
    stack = make_stack()
    stack.connect(PORT)
    (out,) = drain(stack)
    assert out.ip is not None and out.ip.src == GATEWAY_IP == IPv4Address("192.168.127.1")
