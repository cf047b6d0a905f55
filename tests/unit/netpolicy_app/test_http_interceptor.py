"""HttpInterceptor round trips: requests in, framed responses out, refusals recorded."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.interceptor import (
    HttpInterceptor,
    RequestReceived,
    RequestRefused,
)
from pytest_gondolin.netpolicy.http.messages import (
    HttpRequest,
    HttpResponse,
    denial_response,
    make_exchange,
)
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.sniff import sniff

from .tlshelpers import client_context


def plain(port: int | None = 80, **kwargs: Any) -> HttpInterceptor:
    return HttpInterceptor(
        "http", authority="10.0.2.100", port=port, clock=lambda: 1000.0, **kwargs
    )


def read_response(data: bytes, method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
    """Parse one response with an independent h11 client."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target=b"/", headers=[(b"Host", b"x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    status, headers, body = 0, {}, b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {n.decode().lower(): v.decode() for n, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, body
        elif isinstance(event, h11.InformationalResponse):
            continue
        else:
            raise AssertionError(f"incomplete response: {event!r} in {data!r}")


def one_request(events: list[Any]) -> HttpRequest:
    assert len(events) == 1 and isinstance(events[0], RequestReceived), events
    return events[0].request


def one_refusal(events: list[Any]) -> RequestRefused:
    assert len(events) == 1 and isinstance(events[0], RequestRefused), events
    return events[0]


GET = b"GET /v1/items?page=2 HTTP/1.1\r\nHost: API.example.com\r\nAccept: */*\r\n\r\n"


def test_simple_get_round_trip() -> None:
    icpt = plain()
    request = one_request(icpt.receive_data(GET))
    assert (request.method, request.host, request.port, request.path, request.query) == (
        "GET", "api.example.com", 80, "/v1/items", "page=2",
    )  # fmt: skip
    assert request.url == "http://api.example.com/v1/items?page=2"
    assert request.headers == (("Host", "API.example.com"), ("Accept", "*/*"))
    assert request.header("accept") == "*/*"
    assert icpt.awaiting_response is request and not icpt.wants_data
    events = icpt.respond(
        HttpResponse(
            200,
            (
                ("Content-Type", "text/plain"),
                ("Transfer-Encoding", "chunked"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
            ),
            b"hello",
        )
    )
    assert events == []
    status, headers, body = read_response(icpt.data_to_send())
    assert (status, body) == (200, b"hello")
    assert headers == {"content-type": "text/plain", "content-length": "5"}  # hop-by-hop stripped
    assert not icpt.closed and icpt.wants_data


def test_keep_alive_several_requests_per_flow() -> None:
    icpt = plain()
    for i in range(3):
        request = one_request(
            icpt.receive_data(f"GET /{i} HTTP/1.1\r\nHost: a.example\r\n\r\n".encode())
        )
        assert request.path == f"/{i}"
        icpt.respond(HttpResponse(200, (), str(i).encode()))
        assert read_response(icpt.data_to_send())[2] == str(i).encode()
    assert not icpt.closed


def test_pipelined_requests_come_one_at_a_time() -> None:
    icpt = plain()
    data = b"GET /1 HTTP/1.1\r\nHost: a.example\r\n\r\nGET /2 HTTP/1.1\r\nHost: a.example\r\n\r\n"
    assert one_request(icpt.receive_data(data)).path == "/1"
    assert icpt.receive_data(b"") == []  # guest half-closes; the pending answers are still owed
    second = one_request(icpt.respond(HttpResponse(204)))
    assert second.path == "/2"
    assert icpt.respond(HttpResponse(200, (), b"x")) == []
    assert icpt.closed


def test_byte_by_byte_feed() -> None:
    icpt = plain()
    events: list[Any] = []
    for i in range(len(GET)):
        events += icpt.receive_data(GET[i : i + 1])
    assert one_request(events).path == "/v1/items"


@pytest.mark.parametrize(
    "wire",
    [
        b"POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: 11\r\n\r\nhello world",
        b"POST /upload HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    ],
)
def test_request_bodies(wire: bytes) -> None:
    request = one_request(plain().receive_data(wire))
    assert request.body == b"hello world"


def test_expect_100_continue() -> None:
    icpt = plain()
    assert (
        icpt.receive_data(
            b"PUT /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        == []
    )
    assert icpt.data_to_send() == b"HTTP/1.1 100 \r\n\r\n"
    assert one_request(icpt.receive_data(b"abc")).body == b"abc"


def test_head_response_keeps_length_without_body() -> None:
    icpt = plain()
    one_request(icpt.receive_data(b"HEAD / HTTP/1.1\r\nHost: a.example\r\n\r\n"))
    icpt.respond(HttpResponse(200, (("Content-Length", "1234"),), b"ignored"))
    out = icpt.data_to_send()
    assert b"content-length: 1234\r\n" in out.lower() and out.endswith(b"\r\n\r\n")
    assert read_response(out, b"HEAD") == (200, {"content-length": "1234"}, b"")


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a.example\r\n\r\n",
    ],
)
def test_close_after_response(wire: bytes) -> None:
    icpt = plain()
    one_request(icpt.receive_data(wire))
    icpt.respond(HttpResponse(200, (), b"bye"))
    assert icpt.closed
    assert icpt.data_to_send().endswith(b"bye")
    assert icpt.receive_data(GET) == []  # nothing after close


def test_guest_eof_between_requests_closes() -> None:
    icpt = plain()
    assert icpt.receive_data(b"") == []
    assert icpt.closed


def test_absolute_form_target() -> None:
    request = one_request(
        plain().receive_data(b"GET http://A.example/p?q HTTP/1.1\r\nHost: a.example\r\n\r\n")
    )
    assert (request.host, request.path, request.query) == ("a.example", "/p", "q")


def test_host_port_and_ipv6_host() -> None:
    request = one_request(
        plain(8080).receive_data(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n")
    )
    assert (request.host, request.port, request.url) == (
        "2001:db8::1",
        8080,
        "http://[2001:db8::1]:8080/",
    )


def test_flow_port_unknown_is_not_checked() -> None:
    request = one_request(
        plain(None).receive_data(b"GET / HTTP/1.1\r\nHost: a.example:9000\r\n\r\n")
    )
    assert request.port == 9000


# (wire, status, rule, reason fragment)
REFUSALS = [
    (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        405,
        "connect",
        "CONNECT tunnels",
    ),
    # Upgrade: websocket over plain HTTP is mediated now (test_websocket.py); wss:// is refused.
    (
        b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "smuggling",
        "request smuggling",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        400,
        "http-protocol",
        "Content-Length",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "http-protocol",
        "Transfer-Encoding",
    ),
    (
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        400,
        "http-protocol",
        "multiple Host",
    ),
    (b"GET / HTTP/1.0\r\n\r\n", 400, "host-header", "one Host header, got 0"),
    (b"GET / HTTP/1.1\r\nHost: exa mple.com\r\n\r\n", 400, "host-header", "invalid Host"),
    (b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n", 400, "host-header", "invalid Host"),
    (b"GET / HTTP/1.1\r\nHost: a.example:99999\r\n\r\n", 400, "host-header", "invalid Host"),
    (
        b"GET http://b.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        400,
        "host-header",
        "disagrees with Host",
    ),
    (
        b"GET https://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        400,
        "host-header",
        "disagrees with Host",
    ),
    (
        b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n",
        400,
        "http-protocol",
        "unsupported request target",
    ),
    (b"GET /#frag HTTP/1.1\r\nHost: a.example\r\n\r\n", 400, "http-protocol", "fragment"),
    (
        b"GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
        421,
        "misdirected",
        "differs from the connection's port 80",
    ),
    (b"GET / HTTP/1.1\r\nHost : a.example\r\n\r\n", 400, "http-protocol", "malformed HTTP request"),
    # obs-fold (RFC 9112 §5.2): h11 unfolds it into the Host value, which is then invalid
    (b"GET / HTTP/1.1\r\nHost: a.example\r\n folded\r\n\r\n", 400, "host-header", "invalid Host"),
    (b"\x00\x01garbage\r\n\r\n", 400, "http-protocol", "malformed"),
]


@pytest.mark.parametrize(("wire", "status", "rule", "reason"), REFUSALS)
def test_refusals_are_answered_recorded_and_close(
    wire: bytes, status: int, rule: str, reason: str
) -> None:
    icpt = plain()
    check_refusal(icpt, icpt.receive_data(wire), status, rule, reason)


def test_guest_eof_mid_body_is_refused() -> None:
    icpt = plain()
    wire = b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100\r\n\r\nshort"
    assert icpt.receive_data(wire) == []
    check_refusal(icpt, icpt.receive_data(b""), 400, "http-protocol", "malformed")


def check_refusal(
    icpt: HttpInterceptor, events: list[Any], status: int, rule: str, reason: str
) -> None:
    refusal = one_refusal(events)
    got_status, headers, body = read_response(icpt.data_to_send())
    assert got_status == status
    assert headers["connection"] == "close"
    assert headers["x-gondolin-rule"] == rule
    assert f"rule: {rule}".encode() in body
    ex = refusal.exchange
    assert (ex.decision, ex.status) == ("denied", status)
    assert reason in ex.reason and f"[rule: {rule}]" in ex.reason
    assert icpt.closed


def test_connect_refusal_record_details() -> None:
    icpt = plain(443)
    ex = one_refusal(
        icpt.receive_data(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    ).exchange
    assert (ex.method, ex.host, ex.port) == ("CONNECT", "example.com", 443)
    Recorder().record(ex)  # a valid record


def test_oversize_headers_431() -> None:
    icpt = plain(max_header_bytes=1024)
    events = icpt.receive_data(b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Big: " + b"a" * 2000)
    ex = one_refusal(events).exchange
    assert ex.status == 431 and "[rule: limits]" in ex.reason
    assert ex.host == "10.0.2.100" and ex.method == ""  # nothing parsed: the flow's destination
    assert read_response(icpt.data_to_send())[0] == 431


def test_oversize_declared_body_413_before_reading_it() -> None:
    icpt = plain(max_body_bytes=10)
    events = icpt.receive_data(b"POST /u HTTP/1.1\r\nHost: a.example\r\nContent-Length: 11\r\n\r\n")
    ex = one_refusal(events).exchange
    assert (ex.status, ex.url, ex.method) == (413, "http://a.example/u", "POST")
    assert read_response(icpt.data_to_send())[0] == 413


def test_oversize_chunked_body_413() -> None:
    icpt = plain(max_body_bytes=10)
    wire = b"POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n"
    assert one_refusal(icpt.receive_data(wire)).exchange.status == 413


def test_refusal_reason_is_bounded() -> None:
    icpt = plain()
    ex = one_refusal(
        icpt.receive_data(
            b"GET / HTTP/1.1\r\nHost: a.example\r\n" + b"\x01" * 5000 + b": x\r\n\r\n"
        )
    ).exchange
    assert ex.status == 400 and len(ex.reason) < 400


def test_pipelined_flood_while_waiting_is_bounded() -> None:
    icpt = plain(max_header_bytes=1024, max_body_bytes=1024)
    one_request(icpt.receive_data(GET))
    assert one_refusal(icpt.receive_data(b"x" * 4096)).exchange.status == 400
    assert icpt.closed


# ------------------------------------------------------------------ TLS: SNI vs Host


def tls(authority: str = "api.example.com", port: int | None = 443) -> HttpInterceptor:
    return HttpInterceptor("https", authority=authority, port=port)


def test_tls_host_must_equal_sni() -> None:
    request = one_request(
        tls().receive_data(b"GET / HTTP/1.1\r\nHost: API.example.com:443\r\n\r\n")
    )
    assert request.url == "https://api.example.com/"
    icpt = tls()
    ex = one_refusal(icpt.receive_data(b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")).exchange
    assert ex.status == 421 and "differs from the TLS server name 'api.example.com'" in ex.reason
    assert read_response(icpt.data_to_send())[0] == 421


def test_tls_without_sni_uses_destination_address() -> None:
    request = one_request(
        tls("203.0.113.7").receive_data(b"GET / HTTP/1.1\r\nHost: 203.0.113.7\r\n\r\n")
    )
    assert request.host == "203.0.113.7"


# ------------------------------------------------------------------ respond() misuse


def test_respond_without_pending_request() -> None:
    with pytest.raises(NetworkPolicyError, match="without a pending request"):
        plain().respond(HttpResponse(200))


@pytest.mark.parametrize(
    "response",
    [
        HttpResponse(101),
        HttpResponse(700),
        HttpResponse(200, (("X", "a\r\nInjected: 1"),)),
        HttpResponse(200, (("X", "ж"),)),
    ],
)
def test_unframeable_response_keeps_request_pending(response: HttpResponse) -> None:
    icpt = plain()
    request = one_request(icpt.receive_data(GET))
    with pytest.raises(NetworkPolicyError):
        icpt.respond(response)
    assert icpt.awaiting_response is request
    icpt.respond(denial_response("upstream sent garbage", "upstream", 502))
    assert read_response(icpt.data_to_send())[0] == 502


def test_denial_response_and_make_exchange() -> None:
    response = denial_response("example.org:443 is not in allow_hosts", "default-deny")
    assert response.status == 403
    assert response.header("x-gondolin-rule") == "default-deny"
    assert (
        response.body
        == b"pytest-gondolin denied this request: example.org:443 is not in allow_hosts\nrule: default-deny\n"
    )
    icpt = plain()
    request = one_request(icpt.receive_data(GET))
    ex = make_exchange(request, response, "denied", "not allowed", started=1.0, duration=0.5)
    assert (ex.url, ex.status, ex.decision, ex.request_header("accept")) == (
        request.url,
        403,
        "denied",
        "*/*",
    )


# ------------------------------------------------------------------ a whole TLS flow, driver-style


def test_tls_flow_end_to_end(ca: CertificateAuthority) -> None:
    """Guest TLS client -> sniff SNI -> terminate with our CA -> interceptor -> policy -> response."""
    policy = NetworkPolicy(allow_hosts=["api.example.com"])
    recorder = Recorder()
    guest_in, guest_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    guest = client_context(ca.ca_pem).wrap_bio(
        guest_in, guest_out, server_hostname="api.example.com"
    )
    with pytest.raises(ssl.SSLWantReadError):
        guest.do_handshake()
    first = guest_out.read()
    hello = sniff(first).client_hello
    assert hello is not None and hello.server_name == "api.example.com"
    host_in, host_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    host = ca.ssl_context_for(hello.server_name).wrap_bio(host_in, host_out, server_side=True)
    icpt = HttpInterceptor("https", authority=hello.server_name, port=443)
    host_in.write(first)

    def pump() -> None:
        for _ in range(10):
            for side in (host, guest):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            guest_in.write(host_out.read())
            host_in.write(guest_out.read())

    pump()
    assert guest.selected_alpn_protocol() == "http/1.1"
    for path in ("/allowed", "/again"):
        guest.write(f"GET {path} HTTP/1.1\r\nHost: api.example.com\r\n\r\n".encode())
        host_in.write(guest_out.read())
        request = one_request(icpt.receive_data(host.read(65536)))
        decision = policy.decide(request.host, request.port, request.scheme)
        assert decision.allowed
        icpt.respond(HttpResponse(200, (("Content-Type", "text/plain"),), b"secret data"))
        recorder.record(
            make_exchange(
                request, HttpResponse(200), "allowed", decision.reason, started=0, duration=0
            )
        )
        host.write(icpt.data_to_send())
        guest_in.write(host_out.read())
        assert guest.read(65536).endswith(b"secret data")
    assert len(recorder.get_requests(host="api.example.com", path="/again")) == 1


# ------------------------------------------------------------------ fuzz: hostile bytes never crash it


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
def test_fuzz_interceptor_never_raises(chunks: list[bytes], eof: bool) -> None:
    icpt = plain()
    for chunk in [*chunks, *([b""] if eof else [])]:
        for event in icpt.receive_data(chunk):
            assert isinstance(event, RequestReceived | RequestRefused)
            if isinstance(event, RequestReceived):
                icpt.respond(HttpResponse(200, (), b"ok"))
        icpt.data_to_send()


_REQUEST_PARTS = [
    b"GET",
    b"POST",
    b" ",
    b"/",
    b"HTTP/1.1",
    b"\r\n",
    b"Host: a.example",
    b"Content-Length: 3",
    b"Transfer-Encoding: chunked",
    b"abc",
    b"0",
    b"3",
    b":",
]


@settings(max_examples=200)
@given(st.lists(st.sampled_from(_REQUEST_PARTS), max_size=30))
def test_fuzz_request_shaped_input(parts: list[bytes]) -> None:
    icpt = plain()
    for event in icpt.receive_data(b"".join(parts)):
        if isinstance(event, RequestReceived):
            icpt.respond(HttpResponse(200))
    icpt.receive_data(b"")


def test_chunked_request_trailers_are_dropped_and_the_request_goes_on() -> None:
    """What docs/network.md says: an HTTP/1.1 request's trailer section never goes upstream.

    The request is re-framed with Content-Length (no trailer section can
    follow), so the trailer fields are read and discarded, not folded into
    the headers.
    """
    wire = (
        b"POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Checksum\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    )
    request = one_request(plain().receive_data(wire))
    assert request.body == b"hello" and request.header("trailer") == "X-Checksum"
    assert request.header("x-checksum") is None
    # Control: the same field in the header section is kept.
    moved = wire.replace(b"Trailer: X-Checksum\r\n", b"X-Checksum: abc\r\n").replace(
        b"0\r\nX-Checksum: abc\r\n\r\n", b"0\r\n\r\n"
    )
    assert one_request(plain().receive_data(moved)).header("x-checksum") == "abc"
