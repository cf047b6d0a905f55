"""Building guest DNS queries and reading our responses, for tests."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address


def wire_name(name: str) -> bytes:
    """``"a.b"`` -> length-prefixed labels plus the root label."""
    labels = [label.encode() for label in name.split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def query(
    name: str | bytes,
    qtype: int = 1,
    qclass: int = 1,
    *,
    qid: int = 0x1234,
    flags: int = 0x0100,
    counts: tuple[int, int, int, int] | None = None,
    extra: bytes = b"",
) -> bytes:
    """A query message; ``name`` as text or ready-made wire bytes."""
    qname = wire_name(name) if isinstance(name, str) else name
    qd, an, ns, ar = counts if counts is not None else (1, 0, 0, 0)
    return (
        struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)
        + qname
        + struct.pack("!HH", qtype, qclass)
        + extra
    )


def opt_record(udp_size: int = 1232, version: int = 0, rdata: bytes = b"") -> bytes:
    return b"\x00" + struct.pack("!HHIH", 41, udp_size, version << 16, len(rdata)) + rdata


@dataclass(frozen=True)
class Response:
    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int
    answers: tuple[tuple[int, int, bytes], ...]  # (type, ttl, rdata)
    opt: tuple[int, int] | None  # (udp size, ttl field)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def addresses(self) -> list[IPv4Address]:
        return [IPv4Address(rdata) for rtype, _ttl, rdata in self.answers if rtype == 1]


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        length = data[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length


def parse_response(data: bytes) -> Response:
    """Parse one of our responses (trusted input; asserts on surprises)."""
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    pos = 12
    for _ in range(qd):
        pos = _skip_name(data, pos) + 4
    answers = []
    for _ in range(an):
        pos = _skip_name(data, pos)
        rtype, _rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        answers.append((rtype, ttl, data[pos : pos + rdlen]))
        pos += rdlen
    opt = None
    for _ in range(ar):
        pos = _skip_name(data, pos)
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10 + rdlen
        assert rtype == 41
        opt = (rclass, ttl)
    assert pos == len(data), "trailing bytes in our own response"
    return Response(qid, flags, qd, an, ns, ar, tuple(answers), opt)
