"""Sans-IO codecs for the frames the guest puts on its virtual wire.

Everything here is a pure function of bytes: ``parse_*`` functions take
bytes from the guest (hostile by assumption) and either return a frozen
value or raise :class:`PacketError` -- never anything else; ``build()``
methods produce correct wire bytes, checksums included.

Covered: Ethernet II, ARP (IPv4 over Ethernet, RFC 826), IPv4 (RFC 791),
ICMP echo (RFC 792) and UDP (RFC 768); TCP segments are in :mod:`.segments`.
Deliberately *not* covered, and rejected with a reason the caller can
count:

* IPv4 fragments. Reassembly means holding state keyed by guest-chosen
  identifiers, a classic memory-exhaustion surface (RFC 8900 calls
  fragmentation fragile). Our own peer never needs it: the guest's TCP
  sizes segments to the MSS we advertise, its DNS queries are tiny, and
  every packet we send has DF set.
* IPv4 options. No option is needed between a guest and its only peer;
  several are hazardous (source routing, RFC 7126 §4.3/§4.4) and all of
  them complicate header handling for no gain.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from pytest_gondolin.errors import NetworkPolicyError

__all__ = [
    "ARP_REPLY",
    "ARP_REQUEST",
    "BROADCAST_MAC",
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "IPPROTO_ICMP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "ArpPacket",
    "EthernetFrame",
    "IPv4Packet",
    "IcmpEcho",
    "PacketError",
    "UdpDatagram",
    "format_mac",
    "internet_checksum",
    "parse_arp",
    "parse_ethernet",
    "parse_icmp_echo",
    "parse_ipv4",
    "parse_udp",
    "pseudo_header",
]


class PacketError(NetworkPolicyError):
    """Bytes from the guest are not a packet we accept.

    ``reason`` is a short stable slug (``"ipv4-fragment"``,
    ``"tcp-bad-checksum"``...) that callers use as a drop counter key;
    ``detail`` is free text for logs.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --------------------------------------------------------------------------
# constants

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD

BROADCAST_MAC = b"\xff" * 6

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

ARP_REQUEST = 1
ARP_REPLY = 2

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8

_ETH_HEADER = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_ICMP_ECHO_HEADER = struct.Struct("!BBHHH")
_UDP_HEADER = struct.Struct("!HHHH")

_IPV4_FLAG_DF = 0x4000
_IPV4_FLAG_MF = 0x2000
_IPV4_OFFSET_MASK = 0x1FFF


def format_mac(mac: bytes) -> str:
    """Return ``aa:bb:cc:dd:ee:ff`` for a 6-byte MAC (any length is rendered)."""
    return ":".join(f"{b:02x}" for b in mac)


def _check_mac(mac: bytes, what: str) -> None:
    if len(mac) != 6:
        raise ValueError(f"{what} must be 6 bytes, got {len(mac)}")


# --------------------------------------------------------------------------
# checksums (RFC 1071)


def _ones_complement_sum(data: bytes) -> int:
    """The 16-bit one's complement sum of ``data`` (odd length padded with 0).

    Because 2**16 = 1 (mod 0xFFFF), the end-around-carry sum of 16-bit words
    is the big-endian integer value of the whole buffer modulo 0xFFFF, with
    "negative zero" (0xFFFF) standing in for 0 when any bit is set. Doing
    it with one bignum operation is orders of magnitude faster in CPython
    than a word loop, which matters with 64 KiB segments.
    """
    if len(data) % 2:
        data += b"\x00"
    value = int.from_bytes(data, "big")
    if value == 0:
        return 0
    folded = value % 0xFFFF
    return folded if folded else 0xFFFF


def internet_checksum(data: bytes) -> int:
    """Return the RFC 1071 Internet checksum of ``data``.

    Verifying: a buffer whose checksum field is filled in correctly sums
    to 0xFFFF, i.e. ``internet_checksum(buf) == 0``.
    """
    return ~_ones_complement_sum(data) & 0xFFFF


def pseudo_header(src: IPv4Address, dst: IPv4Address, protocol: int, length: int) -> bytes:
    """The IPv4 pseudo-header a TCP or UDP checksum covers (RFC 9293 §3.1, RFC 768)."""
    return src.packed + dst.packed + struct.pack("!BBH", 0, protocol, length)


# --------------------------------------------------------------------------
# Ethernet II


@dataclass(frozen=True)
class EthernetFrame:
    """An Ethernet II frame (no FCS: QEMU neither sends nor expects one)."""

    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    def build(self) -> bytes:
        """Return the frame's wire bytes.

        Short frames are not padded to 60 bytes: virtio-net accepts any
        frame holding at least an Ethernet header.
        """
        _check_mac(self.dst, "destination MAC")
        _check_mac(self.src, "source MAC")
        return _ETH_HEADER.pack(self.dst, self.src, self.ethertype) + self.payload


def parse_ethernet(data: bytes) -> EthernetFrame:
    """Parse an Ethernet II frame; raise :class:`PacketError` if it is too short."""
    if len(data) < _ETH_HEADER.size:
        raise PacketError("ethernet-short", f"{len(data)} bytes")
    dst, src, ethertype = _ETH_HEADER.unpack_from(data)
    return EthernetFrame(dst, src, ethertype, bytes(data[_ETH_HEADER.size :]))


# --------------------------------------------------------------------------
# ARP (RFC 826), IPv4 over Ethernet only


@dataclass(frozen=True)
class ArpPacket:
    """An ARP request or reply for IPv4 over Ethernet."""

    op: int
    sender_mac: bytes
    sender_ip: IPv4Address
    target_mac: bytes
    target_ip: IPv4Address

    def build(self) -> bytes:
        """Return the 28-byte ARP payload (to be carried in an Ethernet frame)."""
        _check_mac(self.sender_mac, "sender MAC")
        _check_mac(self.target_mac, "target MAC")
        return _ARP.pack(
            1,
            ETHERTYPE_IPV4,
            6,
            4,
            self.op,
            self.sender_mac,
            self.sender_ip.packed,
            self.target_mac,
            self.target_ip.packed,
        )


def parse_arp(data: bytes) -> ArpPacket:
    """Parse an ARP packet; only Ethernet/IPv4 requests and replies are accepted."""
    if len(data) < _ARP.size:
        raise PacketError("arp-short", f"{len(data)} bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
    if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4):
        raise PacketError(
            "arp-unsupported", f"htype={htype} ptype={ptype:#x} hlen={hlen} plen={plen}"
        )
    if op not in (ARP_REQUEST, ARP_REPLY):
        raise PacketError("arp-bad-op", f"op={op}")
    return ArpPacket(op, sha, IPv4Address(spa), tha, IPv4Address(tpa))


# --------------------------------------------------------------------------
# IPv4 (RFC 791)


@dataclass(frozen=True)
class IPv4Packet:
    """An unfragmented IPv4 packet without options."""

    src: IPv4Address
    dst: IPv4Address
    protocol: int
    payload: bytes
    ttl: int = 64
    identification: int = 0
    tos: int = 0
    dont_fragment: bool = True

    def build(self) -> bytes:
        """Return the packet's wire bytes with a correct header checksum.

        Raises ``ValueError`` when the payload does not fit in one packet
        (a bug in the caller, never a guest's doing).
        """
        total = 20 + len(self.payload)
        if total > 0xFFFF:
            raise ValueError(f"IPv4 payload of {len(self.payload)} bytes does not fit")
        header = _IPV4_HEADER.pack(
            0x45,
            self.tos,
            total,
            self.identification & 0xFFFF,
            _IPV4_FLAG_DF if self.dont_fragment else 0,
            self.ttl,
            self.protocol,
            0,
            self.src.packed,
            self.dst.packed,
        )
        checksum = internet_checksum(header)
        return header[:10] + checksum.to_bytes(2, "big") + header[12:] + self.payload


def parse_ipv4(data: bytes) -> IPv4Packet:
    """Parse and validate an IPv4 packet.

    Guarantees on return: version 4, a 20-byte header (no options), a
    valid header checksum, a total length within ``data`` (bytes past it
    -- Ethernet padding -- are discarded), and no fragmentation (MF clear,
    offset zero). See the module docstring for why options and fragments
    are refused.
    """
    if len(data) < 20:
        raise PacketError("ipv4-short", f"{len(data)} bytes")
    ver_ihl, tos, total, ident, flags_off, ttl, proto, _csum, src, dst = _IPV4_HEADER.unpack_from(
        data
    )
    version, ihl = ver_ihl >> 4, ver_ihl & 0x0F
    if version != 4:
        raise PacketError("ipv4-version", f"version={version}")
    if ihl < 5:
        raise PacketError("ipv4-bad-header-length", f"ihl={ihl}")
    if ihl > 5:
        raise PacketError("ipv4-options", f"ihl={ihl}")
    if total < 20 or total > len(data):
        raise PacketError("ipv4-bad-length", f"total length {total}, have {len(data)} bytes")
    if internet_checksum(data[:20]) != 0:
        raise PacketError("ipv4-bad-checksum")
    if flags_off & _IPV4_FLAG_MF or flags_off & _IPV4_OFFSET_MASK:
        raise PacketError("ipv4-fragment", f"id={ident} flags/offset={flags_off:#06x}")
    return IPv4Packet(
        src=IPv4Address(src),
        dst=IPv4Address(dst),
        protocol=proto,
        payload=bytes(data[20:total]),
        ttl=ttl,
        identification=ident,
        tos=tos,
        dont_fragment=bool(flags_off & _IPV4_FLAG_DF),
    )


# --------------------------------------------------------------------------
# ICMP echo (RFC 792)


@dataclass(frozen=True)
class IcmpEcho:
    """An ICMP echo request (type 8) or reply (type 0)."""

    type: int
    identifier: int
    sequence: int
    payload: bytes = b""

    def build(self) -> bytes:
        """Return the ICMP message's wire bytes, checksum included."""
        header = _ICMP_ECHO_HEADER.pack(
            self.type, 0, 0, self.identifier & 0xFFFF, self.sequence & 0xFFFF
        )
        checksum = internet_checksum(header + self.payload)
        return header[:2] + checksum.to_bytes(2, "big") + header[4:] + self.payload


def parse_icmp_echo(data: bytes) -> IcmpEcho:
    """Parse an ICMP echo request or reply; other ICMP types raise ``icmp-not-echo``."""
    if len(data) < _ICMP_ECHO_HEADER.size:
        raise PacketError("icmp-short", f"{len(data)} bytes")
    if internet_checksum(data) != 0:
        raise PacketError("icmp-bad-checksum")
    icmp_type, code, _csum, ident, seq = _ICMP_ECHO_HEADER.unpack_from(data)
    if icmp_type not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
        raise PacketError("icmp-not-echo", f"type={icmp_type} code={code}")
    return IcmpEcho(icmp_type, ident, seq, bytes(data[_ICMP_ECHO_HEADER.size :]))


# --------------------------------------------------------------------------
# UDP (RFC 768)


@dataclass(frozen=True)
class UdpDatagram:
    """A UDP datagram; addresses live in the enclosing IPv4 packet."""

    src_port: int
    dst_port: int
    payload: bytes

    def build(self, src_ip: IPv4Address, dst_ip: IPv4Address) -> bytes:
        """Return the datagram's wire bytes with the pseudo-header checksum."""
        length = 8 + len(self.payload)
        if length > 0xFFFF:
            raise ValueError(f"UDP payload of {len(self.payload)} bytes does not fit")
        header = _UDP_HEADER.pack(self.src_port, self.dst_port, length, 0)
        checksum = internet_checksum(
            pseudo_header(src_ip, dst_ip, IPPROTO_UDP, length) + header + self.payload
        )
        # RFC 768: a computed checksum of zero is sent as all ones (zero means "none").
        checksum = checksum or 0xFFFF
        return header[:6] + checksum.to_bytes(2, "big") + self.payload


def parse_udp(data: bytes, src_ip: IPv4Address, dst_ip: IPv4Address) -> UdpDatagram:
    """Parse a UDP datagram, verifying its checksum unless it is zero (RFC 768: none)."""
    if len(data) < 8:
        raise PacketError("udp-short", f"{len(data)} bytes")
    src_port, dst_port, length, checksum = _UDP_HEADER.unpack_from(data)
    if length < 8 or length > len(data):
        raise PacketError("udp-bad-length", f"length field {length}, have {len(data)} bytes")
    datagram = data[:length]
    if checksum != 0 and (
        internet_checksum(pseudo_header(src_ip, dst_ip, IPPROTO_UDP, length) + datagram) != 0
    ):
        raise PacketError("udp-bad-checksum")
    return UdpDatagram(src_port, dst_port, bytes(datagram[8:]))
