"""H2Interceptor and HTTP/2 through FlowProxy, sans-IO: a real h2 client's bytes in, frames out."""

from __future__ import annotations

import ssl
from ipaddress import IPv4Address

import h2.errors
import h2.events
import pytest

from pytest_gondolin.guest.recording import exchange_from_dict
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.h2_server import H2Interceptor
from pytest_gondolin.netpolicy.http.interceptor import BodyBudget, RequestReceived, RequestRefused
from pytest_gondolin.netpolicy.http.mediation import MediationContext, plan_request
from pytest_gondolin.netpolicy.http.messages import HttpResponse
from pytest_gondolin.netpolicy.http.mitm import H2_OUTPUT_HIGH, FlowProxy
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Exchange, Recorder
from pytest_gondolin.netpolicy.relay import ANSWER_BACKLOG

from .h2_helpers import Pair, h2_client, request_fields

OK = HttpResponse(200, (("Content-Type", "text/plain"), ("Connection", "keep-alive")), b"fine")


def pair(**kwargs: object) -> Pair:
    p = Pair(H2Interceptor(authority="api.test", port=443, **kwargs))  # type: ignore[arg-type]
    p.send()  # prefaces and SETTINGS both ways
    return p


def requests(events: list[object]) -> list[RequestReceived]:
    return [e for e in events if isinstance(e, RequestReceived)]


def refusals(events: list[object]) -> list[RequestRefused]:
    return [e for e in events if isinstance(e, RequestRefused)]


def test_one_stream_is_one_request_with_http_version_2() -> None:
    p = pair()
    p.client.send_headers(1, request_fields("/v1?x=1", extra=[("accept", "*/*")]), end_stream=True)
    (got,) = requests(p.send())
    req = got.request
    assert (req.method, req.url, req.http_version) == ("GET", "https://api.test/v1?x=1", "2")
    assert req.headers == (("accept", "*/*"),)  # pseudo-headers are the URL, not headers
    p.icpt.respond(req, OK)
    p.pull()
    headers, body, trailers, ended = p.response(1)
    assert (headers[":status"], headers["content-length"], body, ended) == (
        "200",
        "4",
        b"fine",
        True,
    )
    assert "connection" not in headers and not trailers  # RFC 9113 §8.2.2


def test_concurrent_streams_answered_out_of_order() -> None:
    p = pair()
    for sid in (1, 3, 5):
        p.client.send_headers(sid, request_fields(f"/s{sid}"), end_stream=True)
    got = requests(p.send())
    assert [r.request.path for r in got] == ["/s1", "/s3", "/s5"]
    assert p.icpt.awaiting == 3
    for r in reversed(got):
        p.icpt.respond(r.request, HttpResponse(200, (), r.request.path.encode()))
    p.pull()
    assert [p.response(sid)[1] for sid in (1, 3, 5)] == [b"/s1", b"/s3", b"/s5"]
    assert p.icpt.awaiting == 0


def test_request_body_across_frames_and_trailers_out() -> None:
    p = pair()
    p.client.send_headers(1, request_fields("/up", "POST", extra=[("expect", "100-continue")]))
    assert requests(p.send()) == []
    informational = [
        e for e in p.received if isinstance(e, h2.events.InformationalResponseReceived)
    ]
    assert [dict(e.headers or ())[":status"] for e in informational] == ["100"]  # type: ignore[arg-type]
    p.client.send_data(1, b"a" * 10_000)
    p.client.send_data(1, b"b" * 10, end_stream=True)
    (got,) = requests(p.send())
    assert got.request.body == b"a" * 10_000 + b"b" * 10
    p.icpt.respond(got.request, HttpResponse(200, (), b"x", trailers=(("grpc-status", "0"),)))
    p.pull()
    headers, body, trailers, ended = p.response(1)
    assert (body, trailers, ended) == (b"x", {"grpc-status": "0"}, True)
    assert "content-length" not in headers  # a client may stop at the length, before trailers


@pytest.mark.parametrize(
    ("fields", "status", "rule"),
    [
        (request_fields(authority="other.test"), 421, "misdirected"),
        (request_fields(authority="api.test:8443"), 421, "misdirected"),
        (request_fields(authority="user@api.test"), 400, "host-header"),
        ([(":method", "CONNECT"), (":authority", "api.test:443")], 405, "connect"),
        (request_fields(extra=[("content-length", "999999999999")]), 413, "limits"),
    ],
)
def test_refusals_answer_that_stream_only(
    fields: list[tuple[str, str]], status: int, rule: str
) -> None:
    p = pair()
    p.client.send_headers(1, fields, end_stream=False)
    (refused,) = refusals(p.send())
    ex = refused.exchange
    assert (ex.status, ex.decision, ex.http_version) == (status, "denied", "2")
    assert f"[rule: {rule}]" in ex.reason
    headers, body, _, _ = p.response(1)
    assert headers[":status"] == str(status) and b"pytest-gondolin denied" in body
    # The request was still coming: RST_STREAM(NO_ERROR) stops it (RFC 9113 §8.1).
    assert any(isinstance(e, h2.events.StreamReset) and e.stream_id == 1 for e in p.received)
    # The connection goes on.
    p.client.send_headers(3, request_fields("/next"), end_stream=True)
    assert [r.request.path for r in requests(p.send())] == ["/next"]
    assert not p.icpt.closed


def test_body_limit_per_stream_and_budget_across_streams() -> None:
    budget = BodyBudget(30_000)
    p = pair(max_body_bytes=20_000, budget=budget)
    p.client.send_headers(1, request_fields("/big", "POST"))
    p.client.send_data(1, b"x" * 16_000)
    p.client.send_data(1, b"x" * 16_000)
    (refused,) = refusals(p.send())
    assert refused.exchange.status == 413 and budget.held == 0
    p.client.send_headers(3, request_fields("/a", "POST"))
    p.client.send_data(3, b"y" * 16_000)
    p.client.send_headers(5, request_fields("/b", "POST"))
    p.client.send_data(5, b"z" * 16_000)
    (refused,) = refusals(p.send())
    assert refused.exchange.status == 503 and refused.exchange.path == "/b"
    assert budget.held == 16_000 + 176  # /a's body and its head (RFC 7541 §4.1 size)
    p.icpt.close()
    assert budget.held == 0


def test_streams_owed_an_answer_are_bounded_even_when_reset() -> None:
    p = pair(max_streams=2)
    for sid in (1, 3):
        p.client.send_headers(sid, request_fields(f"/{sid}"), end_stream=True)
    got = requests(p.send())
    for sid in (1, 3):  # "rapid reset": the guest gives up, the upstream work does not
        p.client.reset_stream(sid)
    p.client.send_headers(5, request_fields("/5"), end_stream=True)
    assert requests(p.send()) == []
    resets = [e for e in p.received if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [
        (5, h2.errors.ErrorCodes.REFUSED_STREAM)
    ]
    p.icpt.respond(got[0].request, OK)  # dropped (reset), frees its slot
    p.client.send_headers(7, request_fields("/7"), end_stream=True)
    assert [r.request.path for r in requests(p.send())] == ["/7"]


def test_flow_control_frames_only_what_the_window_allows() -> None:
    p = Pair(
        H2Interceptor(authority="api.test", port=443), client=h2_client(initial_window_size=1000)
    )
    p.send()
    p.client.send_headers(1, request_fields("/dl"), end_stream=True)
    (got,) = requests(p.send())
    p.icpt.respond(got.request, HttpResponse(200, (), b"q" * 5000))
    p.icpt.produce(1 << 20)
    out = bytes(p.icpt.data_to_send())
    assert p.icpt.pending_bytes == 4000  # the rest waits for WINDOW_UPDATE
    p.received += p.client.receive_data(out)
    for _ in range(20):  # the guest reads, and reopens its window as it does
        for ev in p.received:
            if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                p.client.acknowledge_received_data(ev.flow_controlled_length, 1)
                ev.flow_controlled_length = 0
        p.send()
    assert p.response(1)[1] == b"q" * 5000 and p.icpt.pending_bytes == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # not the preface
        b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # WINDOW_UPDATE of 0 on stream 0
        b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"\0" * 8,  # PING on a stream
    ],
)
def test_protocol_errors_cost_the_connection(garbage: bytes) -> None:
    icpt = H2Interceptor(authority="api.test", port=443)
    client = h2_client()
    preface = client.data_to_send() if not garbage.startswith(b"GET") else b""
    (refused,) = refusals(icpt.receive_data(preface + garbage))
    assert icpt.closed and "[rule: http-protocol]" in refused.exchange.reason
    assert refused.exchange.method == "" and refused.exchange.scheme == "https"
    assert b"\x07" in bytes(icpt.data_to_send())  # a GOAWAY frame (type 7) went out
    assert icpt.receive_data(b"more") == []


def test_hpack_bomb_is_a_connection_error() -> None:
    p = pair()
    # One 4 KiB header repeated from the dynamic table: tiny on the wire, huge decoded.
    p.client.send_headers(1, request_fields(extra=[("x-big", "v" * 4000)] * 40), end_stream=True)
    events = p.send()
    assert p.icpt.closed and not requests(events)
    assert "protocol error" in refusals(events)[0].exchange.reason


def test_guest_eof_closes_after_owed_answers_goaway_at_once() -> None:
    p = pair()
    p.client.send_headers(1, request_fields(), end_stream=True)
    (got,) = requests(p.send())
    p.icpt.receive_data(b"")
    assert not p.icpt.closed  # stream 1 is still owed
    p.icpt.respond(got.request, OK)
    p.pull()  # the body is framed, then GOAWAY
    assert p.icpt.closed and p.response(1)[1] == b"fine"
    q = pair(budget=BodyBudget(100))
    q.client.send_headers(1, request_fields(method="POST"))
    q.client.send_data(1, b"x" * 10)
    q.send()
    q.client.close_connection()
    q.send()
    assert q.icpt.closed and q.icpt._budget.held == 0


# --------------------------------------------------------------------------- through FlowProxy

CA = CertificateAuthority.create("h2 test CA")


class TlsGuest:
    """A guest TLS client over memory BIOs offering ``alpn``."""

    def __init__(self, proxy: FlowProxy, alpn: list[str]) -> None:
        context = ssl.create_default_context(cadata=CA.ca_pem.decode())
        context.set_alpn_protocols(alpn)
        self.p = proxy
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.inc, self.out, server_hostname="api.test")
        for _ in range(10):
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.pump()
        self.pump()  # the client's Finished: the host's side is done too

    def pump(self) -> None:
        if self.out.pending:
            self.p.receive(self.out.read())
        while data := self.p.pending_output(1 << 20):
            self.p.consume_output(len(data))
            self.inc.write(data)

    def read(self) -> bytes:
        self.pump()
        got = b""
        while True:
            try:
                chunk = self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                return got
            if not chunk:
                return got
            got += chunk


def flow() -> FlowProxy:
    return FlowProxy(
        dst_ip=IPv4Address("198.18.0.5"), dst_port=443, dns_name="api.test", ca=CA, now=0.0
    )


def test_alpn_h2_gets_http2_and_http11_gets_http11() -> None:
    old = TlsGuest(flow(), ["http/1.1"])
    assert old.tls.selected_alpn_protocol() == "http/1.1" and old.p.protocol == "http/1.1"
    guest = TlsGuest(flow(), ["h2", "http/1.1"])
    assert guest.tls.selected_alpn_protocol() == "h2" and guest.p.protocol == "h2"


def test_h2_through_the_pipeline_records_version_2() -> None:
    guest = TlsGuest(flow(), ["h2"])
    client = h2_client()
    client.send_headers(1, request_fields("/denied"), end_stream=True)
    client.send_headers(3, request_fields("/stubbed"), end_stream=True)
    guest.tls.write(client.data_to_send())
    guest.pump()
    recorder = Recorder()
    recorder.stub("GET", "https://api.test/stubbed", body=b"canned")
    context = MediationContext(NetworkPolicy(), None, recorder)
    received = guest.p.take_requests()
    assert len(received) == 2
    for r in received:
        outcome = plan_request(r.request, r.started, context)
        assert not hasattr(outcome, "outgoing")  # answered at once: denied, or the stub
        recorder.record(outcome.exchange)  # type: ignore[union-attr]
        guest.p.respond(outcome.response, to=outcome.request)  # type: ignore[union-attr]
    guest.p.respond(OK)  # no `to`: nothing to answer on HTTP/2
    events = client.receive_data(guest.read())
    statuses = {
        e.stream_id: dict(e.headers or ())[":status"]  # type: ignore[arg-type]
        for e in events
        if isinstance(e, h2.events.ResponseReceived)
    }
    assert statuses == {1: "403", 3: "200"}
    denied, stubbed = recorder.requests
    assert (denied.decision, denied.http_version, stubbed.decision) == ("denied", "2", "stubbed")
    assert exchange_from_dict(denied.to_dict()).http_version == "2"


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678",  # PING
        b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64",  # SETTINGS
    ],
    ids=["ping", "settings"],
)
def test_h2_control_frame_flood_stops_being_read_when_unanswered(frame: bytes) -> None:
    guest = TlsGuest(flow(), ["h2"])
    client = h2_client()
    guest.tls.write(client.data_to_send())
    guest.p.receive(guest.out.read())
    sent = 0
    while guest.p.read_limit > 0 and sent < 100_000:  # the guest never reads the ACKs
        guest.tls.write(frame * 100)
        guest.p.receive(guest.out.read())
        sent += 100
    assert guest.p.read_limit == 0 and sent < 100_000
    assert guest.p.output_bytes < H2_OUTPUT_HIGH + 64 * 1024
    assert guest.p.verdict is None


def test_exchange_http_version_is_validated_across_the_boundary() -> None:
    data = {**Exchange.connection_denied("api.test", 443, "x").to_dict(), "http_version": "3"}
    with pytest.raises(ValueError, match="http_version"):
        exchange_from_dict(data)


def test_continuation_flood_is_a_connection_error() -> None:
    p = pair()
    block = p.client.encoder.encode(request_fields())
    headers = b"\x00" + len(block).to_bytes(2, "big") + b"\x01\x00\x00\x00\x00\x01" + block
    continuation = b"\x00\x00\x01\x09\x00\x00\x00\x00\x01" + b"\x00"  # never END_HEADERS
    events = p.icpt.receive_data(headers + continuation * 1000)
    assert p.icpt.closed and "protocol error" in refusals(events)[0].exchange.reason


def test_h2c_prior_knowledge_is_refused_by_name() -> None:
    plain = FlowProxy(
        dst_ip=IPv4Address("198.18.0.5"), dst_port=80, dns_name="api.test", ca=CA, now=0.0
    )
    plain.receive(h2_client().data_to_send())
    (ex,) = plain.take_records()
    assert plain.verdict == "abort" and "plain-text HTTP/2 (h2c)" in ex.reason


def test_a_slowly_read_stream_does_not_hold_back_the_next_requests() -> None:
    guest = TlsGuest(flow(), ["h2"])
    client = h2_client(initial_window_size=1000)  # the guest reads stream 1 slowly
    client.send_headers(1, request_fields("/big"), end_stream=True)
    guest.tls.write(client.data_to_send())
    guest.pump()
    (big,) = guest.p.take_requests()
    guest.p.respond(HttpResponse(200, (), b"b" * (1 << 20)), to=big.request)
    guest.pump()
    # The whole body is held (counted for the driver's memory bound) ...
    assert guest.p.output_bytes > ANSWER_BACKLOG
    # ... but only framed bytes hold back the flow's next request.
    assert guest.p.answer_backlog < ANSWER_BACKLOG


@pytest.mark.parametrize(
    ("method", "status", "length", "body"),
    [("HEAD", 200, "1234", b""), ("GET", 204, None, b""), ("GET", 304, "99", b"")],
)
def test_bodiless_answers_keep_the_stated_length(
    method: str, status: int, length: str | None, body: bytes
) -> None:
    p = pair()
    p.client.send_headers(1, request_fields("/h", method), end_stream=True)
    (got,) = requests(p.send())
    stated = HttpResponse(status, (("Content-Length", "1234" if status == 200 else "99"),), b"")
    p.icpt.respond(got.request, stated)
    p.pull()
    headers, received, _, ended = p.response(1)
    assert (headers.get("content-length"), received, ended) == (length, body, True)


@pytest.mark.parametrize(
    "bad", [("x-bad", "a\nb"), ("bad name", "v"), ("x-nul", "a\0b"), ("x-wide", "\u0100")]
)
def test_a_response_field_http2_cannot_carry_is_a_502_on_that_stream(bad: tuple[str, str]) -> None:
    guest = TlsGuest(flow(), ["h2"])
    client = h2_client()
    client.send_headers(1, request_fields("/x"), end_stream=True)
    guest.tls.write(client.data_to_send())
    guest.pump()
    (got,) = guest.p.take_requests()
    guest.p.respond(HttpResponse(200, (bad,), b"body"), to=got.request)
    events = client.receive_data(guest.read())
    (head,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert dict(head.headers or ())[":status"] == "502"  # type: ignore[arg-type]
    assert guest.p.verdict is None  # the connection goes on
