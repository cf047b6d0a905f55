"""DNS: strict query parsing and the synthetic resolver."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.stack.dns import DEFAULT_POOL, DEFAULT_TTL, SyntheticResolver
from pytest_gondolin.netpolicy.stack.dns_wire import (
    MAX_UDP_MESSAGE,
    DnsError,
    Rcode,
    _read_name,
    build_response,
    parse_query,
)
from pytest_gondolin.netpolicy.stack.packets import PacketError

from .dns_helpers import opt_record, parse_response, query, wire_name

# -- parsing -----------------------------------------------------------------


def test_parse_valid_query() -> None:
    q = parse_query(query("Example.ORG", 28, qid=7))
    assert q.id == 7
    assert q.labels == (b"Example", b"ORG")  # case preserved for the echo
    assert q.name == "example.org"
    assert (q.qtype, q.qclass) == (28, 1)
    assert q.recursion_desired
    assert q.edns is None


def test_parse_edns_query() -> None:
    q = parse_query(query("a.b", extra=opt_record(1232, 0), counts=(1, 0, 0, 1)))
    assert q.edns is not None
    assert (q.edns.udp_size, q.edns.version, q.edns.dnssec_ok) == (1232, 0, False)


LONG_LABEL = "a" * 63
NAME_253 = ".".join([LONG_LABEL] * 3 + ["b" * 61])  # 63*3 + 61 + 3 dots = 253
NAME_254 = NAME_253 + "c"


def _bad(data: bytes) -> DnsError:
    with pytest.raises(DnsError) as exc:
        parse_query(data)
    return exc.value


@pytest.mark.parametrize(
    ("data", "rcode", "reason"),
    [
        (b"\x12\x34\x01\x00\x00\x01", None, "dns-short"),
        (query("a.b", flags=0x8100), None, "dns-not-query"),
        (
            query("a.b") + b"\0" * (MAX_UDP_MESSAGE - len(query("a.b")) + 1),
            Rcode.FORMERR,
            "dns-too-long",
        ),
        (query("a.b", flags=0x1100), Rcode.NOTIMP, "dns-opcode"),  # STATUS
        (query("a.b", counts=(0, 0, 0, 0)), Rcode.FORMERR, "dns-question-count"),
        (
            query("a.b", counts=(2, 0, 0, 0), extra=wire_name("c.d") + b"\0\1\0\1"),
            Rcode.FORMERR,
            "dns-question-count",
        ),
        (query("a.b", counts=(1, 1, 0, 0)), Rcode.FORMERR, "dns-unexpected-records"),
        (query("a.b", counts=(1, 0, 1, 0)), Rcode.FORMERR, "dns-unexpected-records"),
        (query("a.b", counts=(1, 0, 0, 2)), Rcode.FORMERR, "dns-unexpected-records"),
        # An additional record that is not OPT (an A record).
        (
            query(
                "a.b",
                counts=(1, 0, 0, 1),
                extra=b"\0" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\1\2\3\4",
            ),
            Rcode.FORMERR,
            "dns-unexpected-records",
        ),
        (
            query("a.b", counts=(1, 0, 0, 1), extra=opt_record(rdata=b"xx")[:-1]),
            Rcode.FORMERR,
            "dns-short",
        ),
        (query("a.b")[:-1], Rcode.FORMERR, "dns-short"),
        (query("a.b") + b"\0", Rcode.FORMERR, "dns-trailing-bytes"),
        # A 300-byte name (five 59-byte labels): over RFC 1035's 255 octets.
        (query(".".join(["x" * 59] * 5)), Rcode.FORMERR, "dns-bad-name"),
        (query(NAME_254), Rcode.FORMERR, "dns-bad-name"),
        # Label type 0x40 (extended, 64+ "length") and 0x80 (reserved).
        (query(b"\x40" + b"a" * 64 + b"\0"), Rcode.FORMERR, "dns-bad-name"),
        (query(b"\x80\x00"), Rcode.FORMERR, "dns-bad-name"),
        # Compression loop: the question name is a pointer to itself.
        (query(b"\xc0\x0c"), Rcode.FORMERR, "dns-bad-name"),
        # A label, then a pointer back to that label: an infinite name.
        (query(b"\x01a\xc0\x0c"), Rcode.FORMERR, "dns-bad-name"),
        # Forward pointer (to the byte after itself).
        (query(b"\xc0\x0e\x01a\x00"), Rcode.FORMERR, "dns-bad-name"),
        # Pointer into the header.
        (query(b"\xc0\x02"), Rcode.FORMERR, "dns-bad-name"),
        # Name runs off the end.
        (query(b"\x05ab"), Rcode.FORMERR, "dns-bad-name"),
    ],
)
def test_parse_rejects(data: bytes, rcode: int | None, reason: str) -> None:
    err = _bad(data)
    assert isinstance(err, PacketError)
    assert err.rcode == rcode
    assert err.reason == reason
    if rcode is not None:
        assert err.query_id == 0x1234


def test_name_of_253_characters_is_fine() -> None:
    assert len(NAME_253) == 253
    assert parse_query(query(NAME_253)).name == NAME_253


def test_read_name_follows_backward_pointers() -> None:
    # "b.c" at 12, then "a" + pointer to 12 at 17: a.b.c
    data = b"\0" * 12 + wire_name("b.c") + b"\x01a\xc0\x0c"
    labels, end = _read_name(data, 17)
    assert labels == [b"a", b"b", b"c"]
    assert end == len(data)


def test_read_name_refuses_pointer_ping_pong() -> None:
    # Pointer at 12 -> 14, pointer at 14 -> 12: each is "backwards" from
    # the other's position, but not from where the current run started.
    data = b"\0" * 12 + b"\xc0\x0e\xc0\x0c"
    with pytest.raises(PacketError, match="not backwards"):
        _read_name(data, 14)


def test_read_name_refuses_a_loop_at_the_first_hop() -> None:
    # "a" then a pointer back to the "a": every pointer points backwards
    # from itself, yet the name is infinite. The rule "before the start of
    # the current run" refuses it at once, not after the hop limit.
    data = b"\0" * 12 + b"\x01a\xc0\x0c"
    with pytest.raises(PacketError, match="not backwards"):
        _read_name(data, 12)


def test_read_name_hop_limit() -> None:
    # A legal chain of 20 pointers, each to the one before it.
    data = bytearray(b"\0" * 12 + b"\x00")  # root name at 12
    for i in range(20):
        target = 12 + (2 * i - 1 if i else 0)
        data += bytes([0xC0 | (target >> 8), target & 0xFF])
    with pytest.raises(PacketError, match="too many"):
        _read_name(bytes(data), len(data) - 2)
    # A short chain is fine.
    assert _read_name(bytes(data), 13 + 2 * 3)[0] == []


def test_name_property_escapes_odd_bytes() -> None:
    q = parse_query(query(b"\x03a.b\x02\x00Z\x00"))
    assert q.name == "a\\046b.\\000z"


# -- responses -----------------------------------------------------------------


def test_a_query_gets_a_stable_synthetic_address() -> None:
    resolver = SyntheticResolver()
    r1 = parse_response(resolver.handle_query(query("example.org", qid=1)) or b"")
    assert (r1.id, r1.rcode, r1.qdcount, r1.ancount) == (1, Rcode.NOERROR, 1, 1)
    assert r1.flags & 0x8000 and r1.flags & 0x0400 and r1.flags & 0x0100 and r1.flags & 0x0080
    (address,) = r1.addresses
    assert address in DEFAULT_POOL
    assert r1.answers[0][1] == DEFAULT_TTL
    # Same name (any case, trailing dot or not) -> same address.
    r2 = parse_response(resolver.handle_query(query("EXAMPLE.org.")) or b"")
    assert r2.addresses == [address]
    # Another name -> another address.
    r3 = parse_response(resolver.handle_query(query("example.com")) or b"")
    assert r3.addresses[0] != address
    assert resolver.name_for(address) == "example.org"
    assert resolver.name_for(r3.addresses[0]) == "example.com"
    assert resolver.name_for(IPv4Address("198.18.255.255")) is None
    assert resolver.address_for("Example.Org") == address


def test_response_echoes_question_case() -> None:
    response = SyntheticResolver().handle_query(query("MiXeD.example", qid=9)) or b""
    assert wire_name("MiXeD.example") in response


@pytest.mark.parametrize("qtype", [28, 15, 16, 65, 255, 12])  # AAAA MX TXT HTTPS ANY PTR
def test_other_types_get_nodata(qtype: int) -> None:
    resolver = SyntheticResolver()
    r = parse_response(resolver.handle_query(query("example.org", qtype)) or b"")
    assert (r.rcode, r.ancount, r.qdcount) == (Rcode.NOERROR, 0, 1)
    assert resolver.names == {}  # only A queries take an address


@pytest.mark.parametrize(
    "name",
    [
        b"\x03a b\x00",  # space
        b"\x03a\x00b\x00",  # NUL
        b"\x03a.b\x00",  # dot inside a label
        b"\x02\xc3\xa9\x00",  # UTF-8 "é" (IDNs arrive as xn-- punycode)
        b"\x00",  # the root
        wire_name("1.2.3.4"),  # an address literal
    ],
)
def test_non_hostnames_get_nxdomain(name: bytes) -> None:
    resolver = SyntheticResolver()
    r = parse_response(resolver.handle_query(query(name)) or b"")
    assert r.rcode == Rcode.NXDOMAIN
    assert resolver.names == {}


def test_underscore_and_punycode_are_hostnames() -> None:
    resolver = SyntheticResolver()
    for name in ("_dmarc.example.org", "xn--bcher-kva.example"):
        assert parse_response(resolver.handle_query(query(name)) or b"").ancount == 1


def test_non_in_class_is_refused() -> None:
    r = parse_response(SyntheticResolver().handle_query(query("version.bind", 16, 3)) or b"")
    assert r.rcode == Rcode.REFUSED


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (query(".".join(["x" * 59] * 5)), Rcode.FORMERR),
        (query("a.b", counts=(2, 0, 0, 0), extra=wire_name("c.d") + b"\0\1\0\1"), Rcode.FORMERR),
        (query(b"\xc0\x0c"), Rcode.FORMERR),
        (query("a.b", flags=0x2100), Rcode.NOTIMP),  # opcode 4, NOTIFY
    ],
)
def test_malformed_queries_get_bare_error_responses(data: bytes, rcode: int) -> None:
    r = parse_response(SyntheticResolver().handle_query(data) or b"")
    assert (r.id, r.rcode, r.qdcount, r.ancount) == (0x1234, rcode, 0, 0)
    assert r.flags & 0x8000


@pytest.mark.parametrize(
    "data",
    [b"", b"\x12", b"\0" * 11, query("a.b", flags=0x8000)],
)
def test_unanswerable_messages_get_nothing(data: bytes) -> None:
    resolver = SyntheticResolver()
    assert resolver.handle_query(data) is None
    assert sum(resolver.counters.values()) == 1


def test_edns_query_gets_opt_back() -> None:
    data = query("a.example", counts=(1, 0, 0, 1), extra=opt_record(4096))
    r = parse_response(SyntheticResolver().handle_query(data) or b"")
    assert r.ancount == 1
    assert r.opt == (MAX_UDP_MESSAGE, 0)


def test_edns_version_1_gets_badvers() -> None:
    data = query("a.example", counts=(1, 0, 0, 1), extra=opt_record(4096, version=1))
    r = parse_response(SyntheticResolver().handle_query(data) or b"")
    assert r.rcode == 0 and r.ancount == 0
    assert r.opt is not None and r.opt[1] >> 24 == Rcode.BADVERS >> 4


def test_name_cap_refuses_new_names_only() -> None:
    resolver = SyntheticResolver(max_names=3)
    addresses = [
        parse_response(resolver.handle_query(query(f"h{i}.example")) or b"").addresses[0]
        for i in range(3)
    ]
    assert len(set(addresses)) == 3
    r = parse_response(resolver.handle_query(query("h3.example")) or b"")
    assert r.rcode == Rcode.REFUSED
    assert resolver.name_for(addresses[0]) == "h0.example"
    again = parse_response(resolver.handle_query(query("h1.example")) or b"")
    assert again.addresses == [addresses[1]]
    assert resolver.counters["refused-full"] == 1


def test_small_pool_skips_network_and_broadcast() -> None:
    resolver = SyntheticResolver(IPv4Network("10.9.0.0/30"), max_names=100)
    assert resolver.max_names == 2
    assert resolver.assign("a") == IPv4Address("10.9.0.1")
    assert resolver.assign("b") == IPv4Address("10.9.0.2")
    assert resolver.assign("c") is None


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("not a network",), {}),
        (("10.0.0.1/8",), {}),  # host bits set
        ((), {"max_names": 0}),
        ((), {"ttl": -1}),
    ],
)
def test_bad_resolver_config(args: tuple[str, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SyntheticResolver(*args, **kwargs)


def test_build_response_fits_udp() -> None:
    q = parse_query(query(NAME_253, counts=(1, 0, 0, 1), extra=opt_record()))
    data = build_response(q, Rcode.NOERROR, address=IPv4Address("198.18.0.1"))
    assert len(data) <= MAX_UDP_MESSAGE


def test_truncated_pointer() -> None:
    err = _bad(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0")
    assert (err.rcode, err.reason) == (Rcode.FORMERR, "dns-bad-name")


def test_bad_opt_name_is_formerr() -> None:
    err = _bad(query("a.b", counts=(1, 0, 0, 1), extra=b"\xc0"))
    assert (err.rcode, err.reason) == (Rcode.FORMERR, "dns-bad-name")
