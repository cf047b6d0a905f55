"""Sans-IO TCP segments: the wire codec, sequence space, and the closed-port reset.

:func:`parse_tcp` takes a segment from the guest (hostile by assumption)
and returns a frozen :class:`TcpSegment` or raises
:class:`~.packets.PacketError`, never anything else; :meth:`TcpSegment.build`
produces wire bytes, checksum included. Options from RFC 7323 and
RFC 2018 are parsed tolerantly. Sequence numbers live modulo 2**32
(RFC 9293 §3.4): compare them only with :func:`seq_lt` and friends.
:func:`reset_for` is the RST that answers a segment no connection owns
(RFC 9293 §3.10.7.1), the one thing the stack sends without a connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pytest_gondolin.netpolicy.stack.packets import (
    IPPROTO_TCP,
    PacketError,
    internet_checksum,
    pseudo_header,
)

__all__ = [
    "MAX_WINDOW_SCALE",
    "TCP_ACK",
    "TCP_CWR",
    "TCP_ECE",
    "TCP_FIN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "TCP_URG",
    "TcpOptions",
    "TcpSegment",
    "parse_tcp",
    "reset_for",
    "seq_add",
    "seq_diff",
    "seq_in_window",
    "seq_le",
    "seq_lt",
]

#: Header flags (RFC 9293 §3.1).
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

_TCP_HEADER = struct.Struct("!HHIIBBHHH")

#: RFC 7323 §2.3: a shift above 14 is treated as 14.
MAX_WINDOW_SCALE = 14

_TCPOPT_EOL = 0
_TCPOPT_NOP = 1
_TCPOPT_MSS = 2
_TCPOPT_WSCALE = 3
_TCPOPT_SACK_PERMITTED = 4
_TCPOPT_TIMESTAMPS = 8

_MASK = 0xFFFFFFFF
_HALF = 1 << 31


# --------------------------------------------------------------------------
# sequence-number arithmetic (RFC 9293 §3.4, modulo 2**32)


def seq_add(a: int, n: int) -> int:
    """``a + n`` in sequence space (``n`` may be negative)."""
    return (a + n) & _MASK


def seq_diff(a: int, b: int) -> int:
    """How far ``a`` lies ahead of ``b``, in ``[0, 2**32)``."""
    return (a - b) & _MASK


def seq_lt(a: int, b: int) -> bool:
    """``a < b`` in sequence space (a signed 32-bit difference is negative)."""
    return ((a - b) & _MASK) >= _HALF


def seq_le(a: int, b: int) -> bool:
    """``a <= b`` in sequence space."""
    return a == b or seq_lt(a, b)


def seq_in_window(x: int, start: int, size: int) -> bool:
    """Whether ``x`` lies in the ``size`` numbers from ``start`` on, in sequence space."""
    return seq_diff(x, start) < size


# --------------------------------------------------------------------------
# segments and their options (RFC 9293 §3.1, RFC 7323, RFC 2018)


@dataclass(frozen=True)
class TcpOptions:
    """The TCP options we understand; everything else is skipped on parse."""

    mss: int | None = None
    window_scale: int | None = None
    sack_permitted: bool = False
    timestamps: tuple[int, int] | None = None

    def build(self) -> bytes:
        """Return the encoded options, padded with EOL to a multiple of 4 bytes."""
        out = bytearray()
        if self.mss is not None:
            out += struct.pack("!BBH", _TCPOPT_MSS, 4, self.mss)
        if self.window_scale is not None:
            # The NOP keeps what follows 4-byte aligned, as every stack does.
            out += struct.pack("!BBBB", _TCPOPT_NOP, _TCPOPT_WSCALE, 3, self.window_scale)
        if self.sack_permitted:
            out += struct.pack("!BBBB", _TCPOPT_NOP, _TCPOPT_NOP, _TCPOPT_SACK_PERMITTED, 2)
        if self.timestamps is not None:
            out += struct.pack(
                "!BBBBII", _TCPOPT_NOP, _TCPOPT_NOP, _TCPOPT_TIMESTAMPS, 10, *self.timestamps
            )
        out += b"\x00" * (-len(out) % 4)
        return bytes(out)


def _parse_tcp_options(raw: bytes) -> TcpOptions:
    """Parse TCP options tolerantly (RFC 9293 §3.1 asks receivers to cope).

    Unknown kinds are skipped; a known kind with the wrong length is
    ignored; a malformed length (below 2, or running past the header) ends
    parsing, keeping what was understood so far -- the segment itself is
    still good. Never raises.
    """
    mss: int | None = None
    wscale: int | None = None
    sack_ok = False
    timestamps: tuple[int, int] | None = None
    i = 0
    n = len(raw)
    while i < n:
        kind = raw[i]
        if kind == _TCPOPT_EOL:
            break
        if kind == _TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            break
        length = raw[i + 1]
        if length < 2 or i + length > n:
            break
        body = raw[i + 2 : i + length]
        if kind == _TCPOPT_MSS and length == 4:
            mss = int.from_bytes(body, "big")
        elif kind == _TCPOPT_WSCALE and length == 3:
            wscale = min(body[0], MAX_WINDOW_SCALE)
        elif kind == _TCPOPT_SACK_PERMITTED and length == 2:
            sack_ok = True
        elif kind == _TCPOPT_TIMESTAMPS and length == 10:
            timestamps = (int.from_bytes(body[:4], "big"), int.from_bytes(body[4:], "big"))
        i += length
    return TcpOptions(mss, wscale, sack_ok, timestamps)


@dataclass(frozen=True)
class TcpSegment:
    """A TCP segment; addresses live in the enclosing IPv4 packet.

    ``window`` is the raw 16-bit header field (unscaled).
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes = b""
    options: TcpOptions = field(default_factory=TcpOptions)
    urgent: int = 0

    @property
    def syn(self) -> bool:
        return bool(self.flags & TCP_SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & TCP_FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & TCP_RST)

    @property
    def has_ack(self) -> bool:
        return bool(self.flags & TCP_ACK)

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: data plus one each for SYN and FIN."""
        return len(self.payload) + self.syn + self.fin

    def build(self, src_ip: IPv4Address, dst_ip: IPv4Address) -> bytes:
        """Return the segment's wire bytes with the pseudo-header checksum."""
        opts = self.options.build()
        if len(opts) > 40:
            raise ValueError("TCP options exceed 40 bytes")
        header_len = 20 + len(opts)
        length = header_len + len(self.payload)
        if length > 0xFFFF:
            raise ValueError(f"TCP payload of {len(self.payload)} bytes does not fit")
        header = (
            _TCP_HEADER.pack(
                self.src_port,
                self.dst_port,
                self.seq & 0xFFFFFFFF,
                self.ack & 0xFFFFFFFF,
                (header_len // 4) << 4,
                self.flags & 0xFF,
                self.window,
                0,
                self.urgent,
            )
            + opts
        )
        checksum = internet_checksum(
            pseudo_header(src_ip, dst_ip, IPPROTO_TCP, length) + header + self.payload
        )
        return header[:16] + checksum.to_bytes(2, "big") + header[18:] + self.payload

    def describe(self) -> str:
        """A one-line tcpdump-like summary for DEBUG logs."""
        names = "".join(
            c
            for bit, c in ((TCP_SYN, "S"), (TCP_FIN, "F"), (TCP_RST, "R"), (TCP_PSH, "P"))
            if self.flags & bit
        )
        if self.flags & TCP_ACK:
            names += "."
        return (
            f"{self.src_port}>{self.dst_port} [{names}] seq={self.seq} ack={self.ack} "
            f"win={self.window} len={len(self.payload)}"
        )


def parse_tcp(data: bytes, src_ip: IPv4Address, dst_ip: IPv4Address) -> TcpSegment:
    """Parse a TCP segment, verifying its pseudo-header checksum.

    Options are parsed tolerantly (see ``_parse_tcp_options``); a data
    offset outside the segment raises ``tcp-bad-offset``.
    """
    if len(data) < 20:
        raise PacketError("tcp-short", f"{len(data)} bytes")
    src_port, dst_port, seq, ack, off, flags, window, _csum, urgent = _TCP_HEADER.unpack_from(data)
    header_len = (off >> 4) * 4
    if header_len < 20 or header_len > len(data):
        raise PacketError("tcp-bad-offset", f"data offset {header_len}, have {len(data)} bytes")
    if internet_checksum(pseudo_header(src_ip, dst_ip, IPPROTO_TCP, len(data)) + data) != 0:
        raise PacketError("tcp-bad-checksum")
    options = _parse_tcp_options(bytes(data[20:header_len])) if header_len > 20 else TcpOptions()
    return TcpSegment(
        src_port=src_port,
        dst_port=dst_port,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        payload=bytes(data[header_len:]),
        options=options,
        urgent=urgent,
    )


def reset_for(seg: TcpSegment) -> TcpSegment | None:
    """The RST answering ``seg`` when no connection exists (RFC 9293 §3.10.7.1).

    Returns ``None`` for an incoming RST (never answer a reset).
    """
    if seg.rst:
        return None
    if seg.has_ack:
        return TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, TCP_RST, 0)
    return TcpSegment(
        seg.dst_port, seg.src_port, 0, seq_add(seg.seq, seg.seg_len), TCP_RST | TCP_ACK, 0
    )
