"""Property tests: hostile bytes parse or raise our error, never anything else."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.stack.dns import SyntheticResolver
from pytest_gondolin.netpolicy.stack.dns_wire import MAX_UDP_MESSAGE, DnsError, parse_query
from pytest_gondolin.netpolicy.stack.flow_events import FlowClosed, FlowData, NewFlow
from pytest_gondolin.netpolicy.stack.link import FrameDecoder, LinkError, encode_frame
from pytest_gondolin.netpolicy.stack.network import GATEWAY_IP, GUEST_IP, NetworkStack
from pytest_gondolin.netpolicy.stack.packets import (
    ARP_REQUEST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ArpPacket,
    IcmpEcho,
    IPv4Packet,
    PacketError,
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
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    parse_tcp,
    seq_add,
    seq_diff,
)
from pytest_gondolin.netpolicy.stack.tcp import TcpConnection
from pytest_gondolin.netpolicy.stack.tcp_config import BufferBudget, TcpConfig

from .dns_helpers import query
from .stack_helpers import (
    GuestSocket,
    arp_frame,
    decode,
    eth_frame,
    icmp_frame,
    ip_frame,
    tcp_frame,
    udp_frame,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

A = IPv4Address("192.168.127.3")
B = IPv4Address("198.18.0.1")


def _parses_or_packet_error(fn: Callable[[bytes], object], data: bytes) -> None:
    try:
        fn(data)
    except PacketError:
        pass


PARSERS: list[Callable[[bytes], object]] = [
    parse_ethernet,
    parse_arp,
    parse_ipv4,
    parse_icmp_echo,
    lambda d: parse_udp(d, A, B),
    lambda d: parse_tcp(d, A, B),
    parse_query,
]


@FAST
@given(st.binary(max_size=300), st.sampled_from(range(len(PARSERS))))
def test_random_bytes_into_every_parser(data: bytes, which: int) -> None:
    _parses_or_packet_error(PARSERS[which], data)


def _valid_samples() -> list[tuple[Callable[[bytes], object], bytes]]:
    tcp = TcpSegment(40000, 443, 1, 2, TCP_SYN, 100, b"xy", TcpOptions(1460, 7, True, (1, 2)))
    return [
        (parse_arp, ArpPacket(ARP_REQUEST, b"\x02" * 6, A, b"\0" * 6, B).build()),
        (parse_ipv4, IPv4Packet(A, B, IPPROTO_UDP, b"hello").build()),
        (parse_icmp_echo, IcmpEcho(ICMP_ECHO_REQUEST, 1, 2, b"abc").build()),
        (lambda d: parse_udp(d, A, B), UdpDatagram(1, 53, b"q").build(A, B)),
        (lambda d: parse_tcp(d, A, B), tcp.build(A, B)),
        (
            parse_query,
            query("example.org", counts=(1, 0, 0, 1), extra=b"\0\0\x29\x04\0\0\0\0\0\0\0"),
        ),
    ]


@FAST
@given(st.data())
def test_mutated_valid_packets(data: st.DataObject) -> None:
    samples = _valid_samples()
    parser, wire = samples[data.draw(st.integers(0, len(samples) - 1))]
    buf = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    _parses_or_packet_error(parser, bytes(buf[:cut]))


@FAST
@given(st.binary(max_size=600))
def test_resolver_never_raises(data: bytes) -> None:
    response = SyntheticResolver(max_names=8).handle_query(data)
    assert response is None or len(response) <= MAX_UDP_MESSAGE


@FAST
@given(
    st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=6),
    st.sampled_from([1, 28, 15, 255]),
)
def test_resolver_any_labels(labels: list[bytes], qtype: int) -> None:
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    response = SyntheticResolver().handle_query(query(name, qtype))
    assert response is not None  # a readable header always gets an answer
    try:
        parse_query(query(name, qtype))
    except DnsError as exc:
        assert exc.rcode is not None


@FAST
@given(st.lists(st.binary(max_size=40), max_size=10))
def test_frame_decoder_random_stream(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame_size=64)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                assert 1 <= len(frame) <= 64
    except LinkError:
        assert decoder.broken is not None


@FAST
@given(st.lists(st.binary(min_size=1, max_size=100), max_size=8), st.integers(1, 50))
def test_frame_decoder_round_trip(frames: list[bytes], chunk: int) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        decoder.feed(stream[i : i + chunk])
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
    assert got == frames


@FAST
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFFFF),
    st.binary(max_size=200),
    st.builds(
        TcpOptions,
        st.none() | st.integers(0, 0xFFFF),
        st.none() | st.integers(0, 14),
        st.booleans(),
        st.none() | st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
    ),
)
def test_tcp_build_parse_round_trip(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes,
    options: TcpOptions,
) -> None:
    seg = TcpSegment(sport, dport, seq, ack, flags, window, payload, options)
    assert parse_tcp(seg.build(A, B), A, B) == seg


# -- the stack ---------------------------------------------------------------------


@FAST
@given(st.binary(max_size=200))
def test_stack_random_frames_never_raise(frame: bytes) -> None:
    stack = NetworkStack()
    stack.receive_frame(frame, 0.0)
    stack.outgoing_frames()
    stack.events()


_DESTS = [
    GATEWAY_IP,
    IPv4Address("198.18.0.1"),
    IPv4Address("93.184.216.34"),
    GUEST_IP,
    IPv4Address("255.255.255.255"),
]


@st.composite
def guest_frames(draw: st.DrawFn) -> bytes:
    """Well-formed frames with arbitrary contents: they get past the codecs."""
    kind = draw(st.sampled_from(["tcp", "tcp", "tcp", "udp", "icmp", "arp", "ip", "raw"]))
    dst = draw(st.sampled_from(_DESTS))
    if kind == "tcp":
        seg = TcpSegment(
            draw(st.sampled_from([40000, 40001, 0])),
            draw(st.sampled_from([80, 443])),
            draw(st.integers(0, 0xFFFFFFFF) | st.integers(0, 3000)),
            draw(st.integers(0, 0xFFFFFFFF) | st.integers(0, 3000)),
            draw(st.integers(0, 0xFF)),
            draw(st.integers(0, 0xFFFF)),
            draw(st.binary(max_size=64)),
            TcpOptions(
                draw(st.none() | st.integers(0, 0xFFFF)), draw(st.none() | st.integers(0, 14))
            ),
        )
        return tcp_frame(dst, seg)
    if kind == "udp":
        return udp_frame(
            dst,
            draw(st.integers(0, 0xFFFF)),
            draw(st.sampled_from([53, 123])),
            draw(st.binary(max_size=80)),
        )
    if kind == "icmp":
        return icmp_frame(
            dst, IcmpEcho(draw(st.sampled_from([0, 8, 13])), 1, 2, draw(st.binary(max_size=32)))
        )
    if kind == "arp":
        target = IPv4Address(
            draw(st.sampled_from(["192.168.127.1", "192.168.127.3", "10.0.0.1", "192.168.127.255"]))
        )
        return arp_frame(
            ArpPacket(draw(st.sampled_from([1, 2])), b"\x52" * 6, GUEST_IP, b"\0" * 6, target)
        )
    if kind == "ip":
        return ip_frame(
            dst,
            draw(st.sampled_from([IPPROTO_ICMP, IPPROTO_UDP, IPPROTO_TCP, 50])),
            draw(st.binary(max_size=60)),
        )
    return eth_frame(
        draw(st.binary(max_size=80)), draw(st.sampled_from([ETHERTYPE_IPV4, ETHERTYPE_ARP, 0x86DD]))
    )


@SLOW
@given(
    st.lists(
        st.tuples(
            guest_frames(),
            st.sampled_from(
                ["none", "accept", "reject", "send", "read", "close", "abort", "timer"]
            ),
        ),
        max_size=40,
    )
)
def test_stack_weird_but_wellformed_traffic(steps: list[tuple[bytes, str]]) -> None:
    stack = NetworkStack(
        buffer_budget=4096,
        tcp_config=TcpConfig(send_buffer=2048, recv_buffer=2048, max_retries=2),
        max_flows=3,
    )
    now = 0.0
    flow_ids: set[int] = set()
    for frame, op in steps:
        now += 0.7
        stack.receive_frame(frame, now)
        for ev in stack.events():
            if isinstance(ev, NewFlow):
                flow_ids.add(ev.flow_id)
        for fid in sorted(flow_ids):
            if op == "accept":
                stack.accept(fid)
            elif op == "reject":
                stack.reject(fid)
            elif op == "send":
                stack.flow_send(fid, b"s" * 700)
            elif op == "read":
                stack.flow_read(fid)
            elif op == "close":
                stack.flow_close(fid)
            elif op == "abort":
                stack.flow_abort(fid)
        if op == "timer":
            stack.on_timer(now + 10)
        for f in stack.outgoing_frames():
            assert len(f) <= 14 + stack.mtu
        assert 0 <= stack.buffered_bytes <= 4096
        assert len([f for f in stack.flows if f.state != "CLOSED"]) <= 3


# -- the TCP state machine ------------------------------------------------------------

IRS = 0xFFFFFF00  # close to the wrap, so sequences cross it
ISS = 0xFFFFFFF0


def pattern(offset: int, n: int) -> bytes:
    """Stream content as a function of position, so any misplaced byte shows."""
    return bytes((offset + i) % 251 for i in range(n))


# Mostly plausible flags, sometimes any of the 256 combinations.
_FLAGS = st.sampled_from(
    [TCP_ACK] * 12
    + [TCP_ACK | TCP_PSH] * 4
    + [TCP_ACK | TCP_FIN, TCP_RST, TCP_ACK | TCP_RST, TCP_SYN, TCP_SYN | TCP_ACK, -1]
).flatmap(lambda f: st.integers(0, 0xFF) if f < 0 else st.just(f))
_NEAR = st.sampled_from([0, 0, 0, 1, -1]) | st.integers(-2000, 2000)


@SLOW
@given(st.none() | st.integers(0, 14), st.booleans(), st.data())
def test_tcp_weird_segment_sequences(
    wscale: int | None, handshake: bool, data: st.DataObject
) -> None:
    """Random segments near the live sequence space, mixed with application
    calls: never raises, and the byte streams stay exact in both directions."""
    cfg = TcpConfig(send_buffer=1500, recv_buffer=1200, max_retries=3)
    budget = BufferBudget(2000)
    syn = TcpSegment(
        40000, 443, IRS, 0, TCP_SYN, 5000, b"", TcpOptions(mss=600, window_scale=wscale)
    )
    conn = TcpConnection(syn, iss=ISS, now=0.0, config=cfg, budget=budget)
    now = 0.0
    conn.flush(now)
    if handshake:
        conn.receive_segment(
            TcpSegment(40000, 443, seq_add(IRS, 1), seq_add(ISS, 1), TCP_ACK, 3000), now
        )
    app_sent = 0  # bytes accepted by send()
    app_read = b""
    for _ in range(data.draw(st.integers(0, 40))):
        now += data.draw(st.sampled_from([0.0, 0.3, 2.0]))
        op = data.draw(
            st.sampled_from(["seg"] * 8 + ["send"] * 3 + ["read"] * 2 + ["close", "abort", "timer"])
        )
        if op == "seg":
            seq = seq_add(conn.rcv_nxt, data.draw(_NEAR))
            if seq_diff(seq, seq_add(IRS, 1)) > 1 << 30:  # before the stream began
                seq = seq_add(IRS, 1)
            ack = seq_add(
                data.draw(st.sampled_from([conn.snd_una, conn.snd_nxt])), data.draw(_NEAR)
            )
            n = data.draw(st.sampled_from([0, 0, 1, 100, 600, 1300]))
            payload = pattern(seq_diff(seq, seq_add(IRS, 1)), n)
            window = data.draw(st.sampled_from([0, 5, 1000, 65535]))
            out = conn.receive_segment(
                TcpSegment(40000, 443, seq, ack, data.draw(_FLAGS), window, payload), now
            )
        elif op == "send":
            n = conn.send(pattern(app_sent, 700))
            app_sent += n
            out = conn.flush(now)
        elif op == "read":
            app_read += conn.read()
            out = conn.flush(now)
        elif op == "close":
            conn.close()
            out = conn.flush(now)
        elif op == "abort":
            conn.abort()
            out = conn.flush(now)
        else:
            out = conn.on_timer(conn.next_timer or now)
        for seg in out:
            assert (seg.src_port, seg.dst_port) == (443, 40000)
            seg.build(B, A)  # every segment we emit is encodable
            if seg.payload:
                assert len(seg.payload) <= conn.mss
                offset = seq_diff(seg.seq, seq_add(ISS, 1))
                assert seg.payload == pattern(offset, len(seg.payload))
                assert offset + len(seg.payload) <= app_sent
                assert seq_diff(seq_add(seg.seq, len(seg.payload)), conn.snd_una) <= conn.snd_wnd
        assert app_read == pattern(0, len(app_read))
        assert conn.readable <= cfg.recv_buffer
        assert conn.unacked_bytes <= cfg.send_buffer
        assert budget.used == conn.buffered_bytes
        assert conn.next_timer is None or not conn.closed
    event(f"final state {conn.state.value}")
    event("guest data delivered" if app_read else "no guest data delivered")


@SLOW
@given(st.data())
def test_stack_flows_keep_exact_streams(data: st.DataObject) -> None:
    """Several guest sockets doing plausible-but-random things through frames;
    the owner reacts to events. Streams stay exact, budgets hold, every
    flow gets one NewFlow and at most one FlowClosed."""
    budget = 3000
    stack = NetworkStack(
        buffer_budget=budget,
        tcp_config=TcpConfig(send_buffer=1500, recv_buffer=1500, max_retries=2),
        max_flows=2,
        isn=lambda: 0xFFFFFF00,
    )
    socks = [
        GuestSocket(stack, IPv4Address("93.184.216.34"), 80, sport=p, isn=0xFFFFFFF0)
        for p in (1001, 1002, 1003)
    ]
    by_port = {s.sport: s for s in socks}
    flow_port: dict[int, int] = {}
    closed: set[int] = set()
    host_got: dict[int, bytes] = {}
    host_sent: dict[int, int] = {}
    now = 0.0
    for _ in range(data.draw(st.integers(0, 40))):
        now += data.draw(st.sampled_from([0.0, 0.4, 3.0]))
        sock = data.draw(st.sampled_from(socks))
        sock.now = now
        op = data.draw(
            st.sampled_from(
                ["syn", "data", "data", "ack", "fin", "rst", "weird", "owner", "owner", "timer"]
            )
        )
        if op == "syn":
            sock.syn()
        elif op == "data":
            offset = seq_diff(sock.snd, seq_add(sock.isn, 1))
            n = data.draw(st.sampled_from([1, 300, 1460]))
            sock.ack(pattern(offset, n), window=data.draw(st.sampled_from([0, 10, 65535])))
        elif op == "ack":
            sock.ack(window=data.draw(st.sampled_from([0, 10, 65535])))
        elif op == "fin":
            sock.ack(fin=True)
        elif op == "rst":
            sock.send_seg(sock.seg(TCP_RST))
        elif op == "weird":
            # No SYN here: a SYN may legitimately restart the sequence space
            # (a fresh connection attempt), which this stream model cannot follow.
            flags = data.draw(_FLAGS) & ~TCP_SYN
            sock.send_seg(sock.seg(flags, seq=seq_add(sock.snd, data.draw(_NEAR))))
        elif op == "timer":
            stack.on_timer(stack.next_timer or now)
        for ev in stack.events():
            fid = ev.flow_id
            if isinstance(ev, NewFlow):
                assert fid not in flow_port
                flow_port[fid] = ev.src_port
                if data.draw(st.booleans()) or len(flow_port) % 3 == 0:
                    stack.accept(fid)
                else:
                    stack.reject(fid)
            elif isinstance(ev, FlowClosed):
                assert fid not in closed
                closed.add(fid)
            elif isinstance(ev, FlowData) and data.draw(st.booleans()):
                host_got[fid] = host_got.get(fid, b"") + stack.flow_read(fid)
        if op == "owner" and flow_port:
            fid = data.draw(st.sampled_from(sorted(flow_port)))
            action = data.draw(st.sampled_from(["send", "send", "read", "close", "abort"]))
            if action == "send":
                sent = host_sent.get(fid, 0)
                host_sent[fid] = sent + stack.flow_send(fid, pattern(sent, 800))
            elif action == "read":
                host_got[fid] = host_got.get(fid, b"") + stack.flow_read(fid)
            elif action == "close":
                stack.flow_close(fid)
            else:
                stack.flow_abort(fid)
        for s in socks:
            s.received = b""
        # Deliver our frames; check the host->guest stream position by position.
        for frame in stack.outgoing_frames():
            seg = decode(frame).tcp
            assert seg is not None
            target = by_port[seg.dst_port]
            if seg.payload:
                offset = seq_diff(seg.seq, seq_add(0xFFFFFF00, 1))
                assert seg.payload == pattern(offset, len(seg.payload))
            if seg.syn:
                target.rcv = seq_add(seg.seq, 1)
            elif seg.seq == target.rcv and (seg.payload or seg.fin):
                target.rcv = seq_add(target.rcv, len(seg.payload) + seg.fin)
        for fid, got in host_got.items():
            assert got == pattern(0, len(got)), fid
        assert 0 <= stack.buffered_bytes <= budget
    event(f"{len(flow_port)} flows, {len(closed)} closed")
    event("host read guest data" if any(host_got.values()) else "no guest data read")
    event("host sent data" if any(host_sent.values()) else "no host data sent")
