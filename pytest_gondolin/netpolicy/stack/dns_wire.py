"""The DNS wire format the guest's queries arrive in: strict parsing, small answers.

Sans-IO, pure functions. This module owns reading a query and writing a
response (RFC 1035 §4); which names get which answer is
:class:`~.dns.SyntheticResolver`'s. Parsing is deliberately narrow,
because every byte comes from the guest:

* at most 512 bytes (RFC 1035 §2.3.4, the UDP limit without EDNS);
* a query (QR=0) with opcode QUERY, exactly one question, no answer or
  authority records and at most one additional record, which must be an
  EDNS(0) OPT record (RFC 6891) -- anything else is answered FORMERR
  (multiple questions: RFC 9619), other opcodes NOTIMP;
* names of at most 255 octets on the wire (253 characters as text),
  labels of at most 63, no extended label types;
* compression pointers (§4.1.4) only to offsets strictly *before* the
  current run of labels, with a hop limit, so loops are impossible.

Responses never exceed 512 bytes (one question, at most one A record).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from pytest_gondolin.netpolicy.stack.packets import PacketError

__all__ = [
    "DEFAULT_TTL",
    "MAX_UDP_MESSAGE",
    "QCLASS_IN",
    "QTYPE_A",
    "DnsError",
    "DnsQuery",
    "Edns",
    "Rcode",
    "build_response",
    "error_response",
    "is_hostname",
    "looks_like_ipv4",
    "parse_query",
]

#: RFC 1035 §2.3.4: DNS messages over UDP are limited to 512 bytes.
MAX_UDP_MESSAGE = 512
#: RFC 1035 §2.3.4: 255 octets for a name on the wire, i.e. 253 characters
#: of dotted text.
MAX_NAME_WIRE = 255
MAX_LABEL = 63
#: Pointer hops allowed while reading one name. Pointers must go strictly
#: backwards, so a loop is impossible anyway; the hop limit is a second,
#: independent bound on work per name.
MAX_POINTER_HOPS = 16

#: TTL of synthetic answers, seconds. The mapping never changes while a
#: resolver lives, so caching is harmless within that time; but a VM
#: restored from a snapshot keeps whatever its caches held at snapshot
#: time, possibly from a resolver instance that no longer exists. Five
#: seconds bounds that staleness while still covering the burst of
#: lookups one connection makes (A + AAAA, retries, happy eyeballs).
DEFAULT_TTL = 5

QTYPE_A = 1
QTYPE_AAAA = 28
QTYPE_OPT = 41
QCLASS_IN = 1

_HEADER = struct.Struct("!HHHHHH")
_FLAG_QR = 0x8000
_FLAG_AA = 0x0400
_FLAG_RD = 0x0100
_FLAG_RA = 0x0080
_OPCODE_SHIFT = 11
_HOSTNAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class Rcode(enum.IntEnum):
    """DNS response codes used here (RFC 1035 §4.1.1, RFC 6891 §9)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


class DnsError(PacketError):
    """A guest DNS message we will not answer normally.

    ``rcode`` is the error to answer with, or ``None`` when the message
    must not be answered at all (too short to carry an ID, or itself a
    response). ``query_id`` and ``flags`` come from the header when it was
    readable.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        rcode: int | None = None,
        query_id: int = 0,
        flags: int = 0,
    ) -> None:
        super().__init__(reason, detail)
        self.rcode = rcode
        self.query_id = query_id
        self.flags = flags


@dataclass(frozen=True)
class Edns:
    """The EDNS(0) OPT record of a query (RFC 6891 §6.1)."""

    udp_size: int
    version: int
    dnssec_ok: bool


@dataclass(frozen=True)
class DnsQuery:
    """A validated one-question query.

    ``labels`` are the question name's labels exactly as sent (case
    preserved, so the response can echo the question verbatim).
    """

    id: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    edns: Edns | None = None

    @property
    def recursion_desired(self) -> bool:
        return bool(self.flags & _FLAG_RD)

    @property
    def name(self) -> str:
        """The name as lower-case text without the trailing dot.

        Bytes outside printable ASCII, and dots inside a label, are
        escaped RFC 4343-style (``\\DDD``) so distinct wire names never
        map to the same string.
        """
        return ".".join(_label_text(label) for label in self.labels)


def _label_text(label: bytes) -> str:
    out = []
    for b in label.lower():
        if b in (0x2E, 0x5C) or b < 0x21 or b > 0x7E:
            out.append(f"\\{b:03d}")
        else:
            out.append(chr(b))
    return "".join(out)


def _read_name(data: bytes, offset: int, *, floor: int = _HEADER.size) -> tuple[list[bytes], int]:
    """Read a (possibly compressed) name at ``offset``.

    Returns the labels and the offset just past the name *where it
    started* (pointers are followed, but the caller resumes after the
    first pointer). Raises :class:`PacketError` (``dns-bad-name``) for
    truncation, reserved label types, over-long labels or names, pointers
    that do not go strictly backwards past the start of the current run of
    labels, pointers into the header (below ``floor``), or too many hops.
    """
    labels: list[bytes] = []
    wire_len = 1  # the terminating root label
    pos = offset
    run_start = offset  # a pointer must land before this
    resume: int | None = None
    hops = 0
    while True:
        if pos >= len(data):
            raise PacketError("dns-bad-name", "name runs past the end of the message")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise PacketError("dns-bad-name", "truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise PacketError("dns-bad-name", "too many compression pointers")
            if target >= run_start or target < floor:
                raise PacketError(
                    "dns-bad-name", f"compression pointer at {pos} to {target} is not backwards"
                )
            if resume is None:
                resume = pos + 2
            pos = run_start = target
            continue
        if kind != 0:
            # 0x40 (extended label, RFC 6891 deprecates it) and 0x80 (reserved).
            raise PacketError("dns-bad-name", f"unsupported label type {kind:#x}")
        if length == 0:
            return labels, (resume if resume is not None else pos + 1)
        if length > MAX_LABEL:  # unreachable with 6 bits, kept for clarity
            raise PacketError("dns-bad-name", "label longer than 63 octets")
        end = pos + 1 + length
        if end > len(data):
            raise PacketError("dns-bad-name", "label runs past the end of the message")
        wire_len += 1 + length
        if wire_len > MAX_NAME_WIRE:
            raise PacketError("dns-bad-name", f"name longer than {MAX_NAME_WIRE} octets")
        labels.append(bytes(data[pos + 1 : end]))
        pos = end


def parse_query(data: bytes) -> DnsQuery:
    """Parse one guest query, or raise :class:`DnsError` saying how to answer.

    Guarantees on return: the message was at most 512 bytes, a QUERY with
    exactly one question whose name obeys RFC 1035 limits, no answer or
    authority records, at most one additional record (an OPT), and no
    trailing bytes.
    """
    if len(data) < _HEADER.size:
        raise DnsError("dns-short", f"{len(data)} bytes")
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)

    def formerr(reason: str, detail: str = "", rcode: int = Rcode.FORMERR) -> DnsError:
        return DnsError(reason, detail, rcode=rcode, query_id=qid, flags=flags)

    if flags & _FLAG_QR:
        # Never answer a response: two responders could loop.
        raise DnsError("dns-not-query", "QR bit set", query_id=qid, flags=flags)
    if len(data) > MAX_UDP_MESSAGE:
        raise formerr("dns-too-long", f"{len(data)} bytes")
    opcode = (flags >> _OPCODE_SHIFT) & 0xF
    if opcode != 0:
        raise formerr("dns-opcode", f"opcode {opcode}", Rcode.NOTIMP)
    if qdcount != 1:
        raise formerr("dns-question-count", f"{qdcount} questions")
    if ancount or nscount:
        raise formerr("dns-unexpected-records", f"ancount={ancount} nscount={nscount}")
    if arcount > 1:
        raise formerr("dns-unexpected-records", f"arcount={arcount}")
    try:
        labels, pos = _read_name(data, _HEADER.size)
    except PacketError as exc:
        raise formerr(exc.reason, exc.detail) from exc
    # (255 octets on the wire is exactly 253 characters of dotted text.)
    if pos + 4 > len(data):
        raise formerr("dns-short", "question truncated")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    pos += 4
    edns: Edns | None = None
    if arcount:
        try:
            opt_labels, pos = _read_name(data, pos)
        except PacketError as exc:
            raise formerr(exc.reason, exc.detail) from exc
        if pos + 10 > len(data):
            raise formerr("dns-short", "additional record truncated")
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if rtype != QTYPE_OPT or opt_labels:
            raise formerr("dns-unexpected-records", f"additional record of type {rtype}")
        if pos + rdlength > len(data):
            raise formerr("dns-short", "OPT data truncated")
        pos += rdlength  # EDNS options (cookies, padding...) are ignored
        edns = Edns(udp_size=rclass, version=(ttl >> 16) & 0xFF, dnssec_ok=bool(ttl & 0x8000))
    if pos != len(data):
        raise formerr("dns-trailing-bytes", f"{len(data) - pos} bytes after the last record")
    return DnsQuery(qid, flags, tuple(labels), qtype, qclass, edns)


def _encode_name(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def build_response(
    query: DnsQuery,
    rcode: int,
    *,
    address: IPv4Address | None = None,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """Return the response to ``query``: its question echoed, ``rcode``, and
    one A record for ``address`` if given.

    The response is authoritative (we own the synthetic namespace) and
    says recursion is available so stub resolvers do not complain. If the
    query carried an OPT record, one is returned (RFC 6891 §7), advertising
    a 512-byte UDP size; ``rcode`` above 15 goes into its extended bits.
    """
    flags = _FLAG_QR | _FLAG_AA | _FLAG_RA | (query.flags & _FLAG_RD) | (rcode & 0xF)
    out = bytearray(
        _HEADER.pack(query.id, flags, 1, 1 if address is not None else 0, 0, 1 if query.edns else 0)
    )
    out += _encode_name(query.labels) + struct.pack("!HH", query.qtype, query.qclass)
    if address is not None:
        # 0xC00C: a pointer to the question name, right after the header.
        out += struct.pack("!HHHIH", 0xC00C, QTYPE_A, QCLASS_IN, ttl, 4) + address.packed
    if query.edns:
        ext_ttl = (rcode >> 4) << 24  # extended rcode; version 0; no flags
        out += b"\x00" + struct.pack("!HHIH", QTYPE_OPT, MAX_UDP_MESSAGE, ext_ttl, 0)
    return bytes(out)


def error_response(exc: DnsError) -> bytes | None:
    """A bare response (no question) carrying ``exc.rcode``, or None."""
    if exc.rcode is None:
        return None
    flags = _FLAG_QR | _FLAG_RA | (exc.flags & _FLAG_RD) | (exc.flags & (0xF << _OPCODE_SHIFT))
    return _HEADER.pack(exc.query_id, flags | (exc.rcode & 0xF), 0, 0, 0, 0)


def is_hostname(labels: tuple[bytes, ...]) -> bool:
    """True for names made of letters, digits, hyphens and underscores only.

    Anything else is legal DNS but has no business reaching the host's
    policy and logs (a dot or NUL inside a label would let two different
    wire names render as the same text).
    """
    return bool(labels) and all(label and _HOSTNAME_CHARS.issuperset(label) for label in labels)


def looks_like_ipv4(name: str) -> bool:
    # A name that is an IPv4 literal would map back to a "name" that is
    # really an address; resolvers never ask for these, so refuse them.
    try:
        IPv4Address(name)
    except ValueError:
        return False
    return True
