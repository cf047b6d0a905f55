"""Packet codecs: build -> bytes -> parse round trips, and every rejection."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.stack.packets import (
    ARP_REPLY,
    ARP_REQUEST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ICMP_ECHO_REQUEST,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ArpPacket,
    EthernetFrame,
    IcmpEcho,
    IPv4Packet,
    PacketError,
    UdpDatagram,
    internet_checksum,
    parse_arp,
    parse_ethernet,
    parse_icmp_echo,
    parse_ipv4,
    parse_udp,
)
from pytest_gondolin.netpolicy.stack.segments import (
    TCP_ACK,
    TCP_SYN,
    TcpOptions,
    TcpSegment,
    parse_tcp,
)

A = IPv4Address("192.168.127.3")
B = IPv4Address("93.184.216.34")
MAC1 = bytes.fromhex("525400123456")
MAC2 = bytes.fromhex("02676f6e6431")


def _reference_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: add 16-bit words, fold carries."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x00\x00\x00\x00",
        b"\xff\xff",
        b"\xff\xff\xff\xff",
        b"\x12\x34\x56",
        bytes(range(256)) * 3,
        # RFC 1071 §3 worked example: sum 0xddf2, checksum 0x220d.
        bytes.fromhex("0001f203f4f5f6f7"),
    ],
)
def test_checksum_matches_reference(data: bytes) -> None:
    assert internet_checksum(data) == _reference_checksum(data)


def test_checksum_rfc1071_example() -> None:
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_packet_error_is_a_network_policy_error() -> None:
    err = PacketError("ipv4-fragment", "id=1")
    assert isinstance(err, NetworkPolicyError)
    assert err.reason == "ipv4-fragment"
    assert "id=1" in str(err)


# -- Ethernet -----------------------------------------------------------------


def test_ethernet_round_trip() -> None:
    frame = EthernetFrame(MAC1, MAC2, ETHERTYPE_IPV4, b"payload")
    wire = frame.build()
    assert wire[:6] == MAC1 and wire[6:12] == MAC2 and wire[12:14] == b"\x08\x00"
    assert parse_ethernet(wire) == frame


def test_ethernet_short() -> None:
    with pytest.raises(PacketError) as exc:
        parse_ethernet(b"\x00" * 13)
    assert exc.value.reason == "ethernet-short"


# -- ARP ----------------------------------------------------------------------


def test_arp_round_trip() -> None:
    arp = ArpPacket(ARP_REQUEST, MAC1, A, b"\0" * 6, IPv4Address("192.168.127.1"))
    wire = arp.build()
    assert len(wire) == 28
    assert parse_arp(wire) == arp
    # Trailing Ethernet padding is ignored.
    assert parse_arp(wire + b"\0" * 18) == arp


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda w: w[:27], "arp-short"),
        (lambda w: b"\x00\x06" + w[2:], "arp-unsupported"),  # htype 6 (IEEE 802)
        (lambda w: w[:2] + b"\x86\xdd" + w[4:], "arp-unsupported"),  # ptype IPv6
        (lambda w: w[:4] + b"\x08" + w[5:], "arp-unsupported"),  # hlen 8
        (lambda w: w[:6] + b"\x00\x03" + w[8:], "arp-bad-op"),  # RARP request
    ],
)
def test_arp_rejects(mutate: object, reason: str) -> None:
    wire = ArpPacket(ARP_REPLY, MAC1, A, MAC2, B).build()
    assert callable(mutate)
    with pytest.raises(PacketError) as exc:
        parse_arp(mutate(wire))
    assert exc.value.reason == reason


# -- IPv4 ---------------------------------------------------------------------


def _ipv4(payload: bytes = b"hello", **kw: object) -> bytes:
    return IPv4Packet(A, B, IPPROTO_UDP, payload, identification=7, **kw).build()  # type: ignore[arg-type]


def _with_header(wire: bytes, **fields: int) -> bytes:
    """Rewrite IPv4 header fields and fix the checksum."""
    ver_ihl, tos, total, ident, flags_off, ttl, proto, _c, src, dst = struct.unpack(
        "!BBHHHBBH4s4s", wire[:20]
    )
    values = {
        "ver_ihl": ver_ihl,
        "total": total,
        "flags_off": flags_off,
    } | fields
    header = struct.pack(
        "!BBHHHBBH4s4s",
        values["ver_ihl"],
        tos,
        values["total"],
        ident,
        values["flags_off"],
        ttl,
        proto,
        0,
        src,
        dst,
    )
    csum = internet_checksum(header)
    return header[:10] + csum.to_bytes(2, "big") + header[12:] + wire[20:]


def test_ipv4_round_trip() -> None:
    wire = _ipv4()
    assert internet_checksum(wire[:20]) == 0
    pkt = parse_ipv4(wire)
    assert (pkt.src, pkt.dst, pkt.protocol, pkt.payload) == (A, B, IPPROTO_UDP, b"hello")
    assert pkt.dont_fragment and pkt.ttl == 64 and pkt.identification == 7


def test_ipv4_ignores_ethernet_padding() -> None:
    assert parse_ipv4(_ipv4(b"x") + b"\0" * 20).payload == b"x"


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (_ipv4()[:19], "ipv4-short"),
        (_with_header(_ipv4(), ver_ihl=0x65), "ipv4-version"),
        (_with_header(_ipv4(), ver_ihl=0x44), "ipv4-bad-header-length"),
        # IHL 6: one word of options (the payload's first 4 bytes stand in).
        (_with_header(_ipv4(), ver_ihl=0x46), "ipv4-options"),
        (_with_header(_ipv4(), total=19), "ipv4-bad-length"),
        (_with_header(_ipv4(), total=200), "ipv4-bad-length"),
        (_with_header(_ipv4(), flags_off=0x2000), "ipv4-fragment"),  # MF
        (_with_header(_ipv4(), flags_off=0x0001), "ipv4-fragment"),  # offset 8
        (_with_header(_ipv4(), flags_off=0x6000), "ipv4-fragment"),  # DF+MF
        (_ipv4()[:10] + b"\x12\x34" + _ipv4()[12:], "ipv4-bad-checksum"),
    ],
)
def test_ipv4_rejects(wire: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as exc:
        parse_ipv4(wire)
    assert exc.value.reason == reason


def test_ipv4_build_refuses_oversize() -> None:
    with pytest.raises(ValueError):
        IPv4Packet(A, B, IPPROTO_UDP, b"\0" * 65516).build()


# -- ICMP ---------------------------------------------------------------------


def test_icmp_echo_round_trip() -> None:
    echo = IcmpEcho(ICMP_ECHO_REQUEST, 0x1234, 7, b"abcdefgh" * 7)
    wire = echo.build()
    assert internet_checksum(wire) == 0
    assert parse_icmp_echo(wire) == echo


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x08\x00\x00", "icmp-short"),
        (IcmpEcho(ICMP_ECHO_REQUEST, 1, 1, b"x").build()[:-1] + b"y", "icmp-bad-checksum"),
        # Destination unreachable, valid checksum.
        (
            b"\x03\x03"
            + internet_checksum(b"\x03\x03\x00\x00\x00\x00\x00\x00").to_bytes(2, "big")
            + b"\0" * 4,
            "icmp-not-echo",
        ),
    ],
)
def test_icmp_rejects(wire: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as exc:
        parse_icmp_echo(wire)
    assert exc.value.reason == reason


# -- UDP ----------------------------------------------------------------------


def test_udp_round_trip_and_checksum() -> None:
    dgram = UdpDatagram(5353, 53, b"query")
    wire = dgram.build(A, B)
    assert parse_udp(wire, A, B) == dgram
    # The pseudo-header is covered: other addresses break the checksum.
    with pytest.raises(PacketError) as exc:
        parse_udp(wire, A, IPv4Address("1.1.1.1"))
    assert exc.value.reason == "udp-bad-checksum"


def test_udp_zero_checksum_means_none() -> None:
    wire = struct.pack("!HHHH", 1000, 53, 10, 0) + b"hi"
    assert parse_udp(wire, A, B).payload == b"hi"


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    # With a zero payload word the checksum is c; a payload word of c makes
    # the one's complement sum 0xFFFF, i.e. a computed checksum of 0.
    c = int.from_bytes(UdpDatagram(1, 2, b"\0\0").build(A, B)[6:8], "big")
    dgram = UdpDatagram(1, 2, c.to_bytes(2, "big"))
    wire = dgram.build(A, B)
    assert wire[6:8] == b"\xff\xff"
    assert parse_udp(wire, A, B) == dgram


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x00" * 7, "udp-short"),
        (struct.pack("!HHHH", 1, 2, 7, 0), "udp-bad-length"),
        (struct.pack("!HHHH", 1, 2, 9, 0), "udp-bad-length"),
    ],
)
def test_udp_rejects(wire: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as exc:
        parse_udp(wire, A, B)
    assert exc.value.reason == reason


# -- TCP ----------------------------------------------------------------------


def test_tcp_syn_ack_round_trip() -> None:
    seg = TcpSegment(
        80,
        40000,
        0xFFFFFFFF,
        12345,
        TCP_SYN | TCP_ACK,
        65535,
        b"",
        TcpOptions(mss=65480, window_scale=3),
    )
    wire = seg.build(B, A)
    assert len(wire) == 28  # MSS (4) + NOP, WS (4)
    assert wire[20:28] == bytes.fromhex("0204ffc8") + bytes.fromhex("01030303")
    assert parse_tcp(wire, B, A) == seg


def test_tcp_all_options_round_trip() -> None:
    opts = TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamps=(1, 2))
    seg = TcpSegment(1, 2, 3, 4, TCP_SYN, 5, b"data", opts)
    assert parse_tcp(seg.build(A, B), A, B) == seg


def _tcp_with_options(raw_opts: bytes, payload: bytes = b"") -> bytes:
    assert len(raw_opts) % 4 == 0
    header = struct.pack(
        "!HHIIBBHHH", 40000, 80, 1, 0, (5 + len(raw_opts) // 4) << 4, TCP_SYN, 1000, 0, 0
    )
    seg = header + raw_opts + payload
    pseudo = A.packed + B.packed + struct.pack("!BBH", 0, IPPROTO_TCP, len(seg))
    csum = internet_checksum(pseudo + seg)
    return seg[:16] + csum.to_bytes(2, "big") + seg[18:]


@pytest.mark.parametrize(
    ("raw_opts", "expected"),
    [
        # Linux's usual SYN: MSS, SACK-permitted, timestamps, NOP, window scale.
        (
            bytes.fromhex("020405b40402080a000000010000000001030307"),
            TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamps=(1, 0)),
        ),
        # Unknown option (kind 30, len 4) skipped.
        (bytes.fromhex("1e04abcd020405b4"), TcpOptions(mss=1460)),
        # EOL ends the list.
        (bytes.fromhex("00000000020405b4"), TcpOptions()),
        # MSS with the wrong length is ignored, the rest still parsed.
        (bytes.fromhex("0203050103030800"), TcpOptions(window_scale=8)),
        # Window scale above 14 is clamped (RFC 7323 §2.3).
        (bytes.fromhex("01030320"), TcpOptions(window_scale=14)),
        # Length 0 would loop forever: parsing stops, keeping what came before.
        (bytes.fromhex("020405b41e000000"), TcpOptions(mss=1460)),
        # Length running past the header: stop.
        (bytes.fromhex("020405b41e090000"), TcpOptions(mss=1460)),
        # Kind byte as the very last byte: stop.
        (bytes.fromhex("01010102"), TcpOptions()),
    ],
)
def test_tcp_options_parse_tolerantly(raw_opts: bytes, expected: TcpOptions) -> None:
    assert parse_tcp(_tcp_with_options(raw_opts), A, B).options == expected


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x00" * 19, "tcp-short"),
        # Data offset 4 words (< 20 bytes).
        (_tcp_with_options(b"")[:12] + b"\x40" + _tcp_with_options(b"")[13:], "tcp-bad-offset"),
        # Data offset 15 words, segment only 24 bytes.
        (
            _tcp_with_options(b"\x01\x01\x01\x01")[:12]
            + b"\xf0"
            + _tcp_with_options(b"\x01" * 4)[13:],
            "tcp-bad-offset",
        ),
        (_tcp_with_options(b"", b"x")[:-1] + b"y", "tcp-bad-checksum"),
    ],
)
def test_tcp_rejects(wire: bytes, reason: str) -> None:
    with pytest.raises(PacketError) as exc:
        parse_tcp(wire, A, B)
    assert exc.value.reason == reason


def test_tcp_segment_properties() -> None:
    seg = TcpSegment(1, 2, 3, 4, TCP_SYN | TCP_ACK, 5, b"abc")
    assert seg.syn and seg.has_ack and not seg.fin and not seg.rst
    assert seg.seg_len == 4
    assert "[S.]" in seg.describe()


def test_arp_ethernet_nesting() -> None:
    arp = ArpPacket(ARP_REQUEST, MAC1, A, b"\0" * 6, B)
    frame = EthernetFrame(b"\xff" * 6, MAC1, ETHERTYPE_ARP, arp.build()).build()
    eth = parse_ethernet(frame)
    assert eth.ethertype == ETHERTYPE_ARP
    assert parse_arp(eth.payload) == arp
