"""Flow classification and the strict, bounded TLS ClientHello parser."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.netpolicy.http.sniff import (
    SNIFF_LIMIT,
    ClientHello,
    ClientHelloError,
    classify,
    parse_client_hello,
    sniff,
)


def real_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    """The ClientHello Python's own TLS client (OpenSSL) sends."""
    context = ssl.create_default_context()
    if server_hostname is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# ---- a tiny ClientHello builder for the malformed cases


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + u16(len(data)) + data


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn(*protocols: bytes) -> bytes:
    items = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(16, u16(len(items)) + items)


def hello_body(
    extensions: bytes | None = b"",
    *,
    version: int = 0x0303,
    suites: bytes = b"\x13\x01",
    trailing: bytes = b"",
) -> bytes:
    body = u16(version) + b"\x00" * 32 + b"\x00" + u16(len(suites)) + suites + b"\x01\x00"
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    return body + trailing


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(
    payload: bytes, *sizes: int, content_type: int = 22, version: bytes = b"\x03\x01"
) -> bytes:
    out, pos = b"", 0
    for size in (*sizes, len(payload)):
        chunk = payload[pos : pos + size]
        if chunk:
            out += bytes([content_type]) + version + u16(len(chunk)) + chunk
        pos += size
    return out


def build(extensions: bytes | None = b"", **kwargs: object) -> bytes:
    return records(handshake(hello_body(extensions, **kwargs)))  # type: ignore[arg-type]


# ------------------------------------------------------------------ classify


HTTP_LINE = b"GET /index.html?q=1 HTTP/1.1\r\n"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "need_more"),
        (b"G", "need_more"),
        (b"GET", "need_more"),
        (b"GET /ind", "need_more"),
        (b"GET / HT", "need_more"),
        (b"GET / HTTP/1.1", "need_more"),
        (b"GET / HTTP/1.1\r", "need_more"),
        (HTTP_LINE, "http"),
        (HTTP_LINE + b"Host: example.com\r\n\r\n", "http"),
        (b"POST /x HTTP/1.0\r\n", "http"),
        (b"OPTIONS * HTTP/1.1\r\n", "http"),
        (b"GET http://example.com/ HTTP/1.1\r\n", "http"),
        (b"GET / HTTP/1.1\n", "http"),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", "http"),  # refused later, by the interceptor
        (b"GET / HTTP/2.0\r\n", "other"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "other"),
        (b"GET  / HTTP/1.1\r\n", "other"),
        (b"GET / HTTP/1.1 \r\n", "other"),
        (b"GET /\x00 HTTP/1.1\r\n", "other"),
        (b"G(T / HTTP/1.1\r\n", "other"),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", "other"),
        (b"\r\nGET / HTTP/1.1\r\n", "other"),
        (b"\x00\x00\x00\x01", "other"),
        (b"A" * 33 + b" / HTTP/1.1\r\n", "other"),
        (b"A" * SNIFF_LIMIT, "other"),
        (b"GET /" + b"a" * SNIFF_LIMIT, "other"),
        (b"\x16", "need_more"),
        (b"\x16\x03\x01", "need_more"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "other"),  # ServerHello
        (b"\x80\x2e\x01\x00\x02", "other"),  # SSLv2-compatible hello
        (b"\x17\x03\x03\x00\x01\x00", "other"),
    ],
)
def test_classify(data: bytes, kind: str) -> None:
    assert classify(data) == kind


def test_classify_real_tls_hello_and_its_prefixes() -> None:
    data = real_hello("api.example.test", ["h2", "http/1.1"])
    assert classify(data) == "tls"
    result = sniff(data)
    assert result.client_hello == ClientHello("api.example.test", ("h2", "http/1.1"), len(data))
    for cut in (1, 5, 6, len(data) // 2, len(data) - 1):
        assert classify(data[:cut]) == "need_more", cut
    assert classify(data + b"\x17\x03\x03\x00\x10" + b"x" * 16) == "tls"  # early data after it


def test_sniff_reason_for_other() -> None:
    assert "not HTTP/1.x or TLS" in sniff(b"SSH-2.0-x\r\n").reason
    assert "ClientHello" in sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00").reason


# ------------------------------------------------------------------ ClientHello


def test_real_hello_without_sni_for_ip_literal() -> None:
    hello = parse_client_hello(real_hello("127.0.0.1"))
    assert hello is not None and hello.server_name is None


def test_real_hello_names_are_normalised() -> None:
    hello = parse_client_hello(real_hello("Mixed.Case.Example"))
    assert hello is not None and hello.server_name == "mixed.case.example"


def test_hello_split_across_records() -> None:
    payload = handshake(hello_body(sni(b"split.example") + alpn(b"http/1.1")))
    data = records(payload, 3, 40)
    assert data.count(b"\x16\x03\x01") == 3
    assert parse_client_hello(data) == ClientHello("split.example", ("http/1.1",), len(data))
    assert parse_client_hello(data[:-1]) is None


def test_hello_without_extensions() -> None:
    assert parse_client_hello(build(None)) == ClientHello(None, (), len(build(None)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (build(sni(b"a.example") + sni(b"b.example")), "extension 0 appears twice"),
        (build(sni(b"a.example", b"b.example")), "more than one host_name"),
        (build(sni(b"a.example", name_type=1)), "server_name type 1 is unknown"),
        (build(sni(b"192.0.2.1")), "is an IP literal"),
        (build(sni(b"[::1]")), "is an IP literal"),
        (build(sni(b"bad host")), "is not a valid host name"),
        (build(sni(b"caf\xc3\xa9.example")), "is not a valid host name"),
        (build(ext(0, b"")), "extension 0: truncated"),
        (build(ext(0, u16(0))), "server_name_list: length 0"),
        (build(ext(0, u16(4) + b"\x00\x00\x01a" + b"junk")), "trailing bytes"),
        (build(alpn(b"")), "protocol_name_list: length 1"),
        (build(alpn(b"h2", b"")), "protocol_name: length 0"),
        (build(b"", trailing=b"\x00"), "ClientHello: 1 trailing bytes"),
        (build(b"", suites=b"\x13"), "cipher_suites: length 1 outside"),
        (build(b"", suites=b"\x13\x01\x13"), "cipher_suites: odd length"),
        (build(b"", version=0x0200), "legacy_version 0x0200 is not TLS"),
        (records(handshake(hello_body(), msg_type=2)), "type 2, not ClientHello"),
        (records(handshake(hello_body()) + b"\x0b\x00\x00\x00"), "unexpected handshake bytes"),
        (records(handshake(hello_body()), version=b"\x02\x00"), "record version 2.0 is not TLS"),
        (b"\x16\x03\x01\x00\x00", "record length 0"),
        (b"\x16\x03\x01\x40\x01" + b"\x00" * 100, "record length 16385"),
        (b"\x16\x03\x01\x00\x04\x01\x00\x30\x00", "exceeds the 8192-byte sniff limit"),
        (records(b"\x01\x00\x00\x10", content_type=23), "record type 23"),
        (records(handshake(b"\x03\x03" + b"\x00" * 10)), "ClientHello: truncated"),
    ],
)
def test_malformed_hellos_raise_our_error(data: bytes, message: str) -> None:
    with pytest.raises(ClientHelloError, match=message):
        parse_client_hello(data)
    assert classify(data) == "other"


def test_hello_records_beyond_sniff_limit() -> None:
    """The handshake message fits, but not with the overhead of many small records."""
    body = hello_body(ext(21, b"\x00" * (SNIFF_LIMIT - 100)))  # padding extension
    assert len(body) + 4 <= SNIFF_LIMIT
    data = records(handshake(body), *[500] * 16)
    with pytest.raises(ClientHelloError, match="exceed the 8192-byte sniff limit"):
        parse_client_hello(data)


# ------------------------------------------------------------------ fuzz: parse or raise our error


def check_invariant(data: bytes) -> None:
    try:
        result = parse_client_hello(data)
    except ClientHelloError:
        return
    assert result is None or isinstance(result, ClientHello)


@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    check_invariant(data)
    assert sniff(data).kind in {"http", "tls", "other", "need_more"}


@given(st.binary(max_size=400))
def test_fuzz_after_a_tls_record_header(tail: bytes) -> None:
    check_invariant(b"\x16\x03\x01" + u16(len(tail)) + tail)
    check_invariant(b"\x16\x03\x01\x01\x00" + tail)


_REAL = real_hello("fuzz.example.test", ["h2", "http/1.1"])


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_real_hello(data: st.DataObject) -> None:
    mutated = bytearray(_REAL)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    check_invariant(bytes(mutated[:cut]))
    assert classify(bytes(mutated[:cut])) in {"tls", "other", "need_more"}


@given(
    st.lists(
        st.sampled_from(
            [b"GET", b" ", b"/", b"HTTP/1.1", b"\r\n", b"\r", b"\n", b"a", b"\x00", b"\x16"]
        ),
        max_size=20,
    )
)
def test_fuzz_http_like_tokens(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert classify(data) in {"http", "tls", "other", "need_more"}
