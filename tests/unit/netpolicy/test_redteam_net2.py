"""Red team of the new network code (HTTP/2, DNS policy), sans-IO: a hostile guest's bytes in.

Each test plays one attack and asserts what the host guarantees; each has
its negative control (the same path, benign, goes through).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.dns_policy import policy_resolver
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.h2_server import H2Interceptor
from pytest_gondolin.netpolicy.http.interceptor import (
    BodyBudget,
    HttpInterceptor,
    RequestReceived,
    RequestRefused,
)
from pytest_gondolin.netpolicy.http.mediation import (
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.upstream import UpstreamError
from pytest_gondolin.netpolicy.http.upstream_h2 import fetch_upstream_h2
from pytest_gondolin.netpolicy.stack.dns_wire import Rcode

from .dns_helpers import parse_response, query
from .h2_helpers import Fields, Pair, h2_upstream, request_fields

OK = HttpResponse(200, (), b"ok")


def pair(**kwargs: object) -> Pair:
    p = Pair(H2Interceptor(authority="api.test", port=443, **kwargs))  # type: ignore[arg-type]
    p.send()
    return p


def received(events: Sequence[object]) -> list[RequestReceived]:
    return [e for e in events if isinstance(e, RequestReceived)]


def refused(events: Sequence[object]) -> list[RequestRefused]:
    return [e for e in events if isinstance(e, RequestRefused)]


# ----------------------------------------------------------------------------- HTTP/2 memory

#: One 4,000-byte header value, then 15 references to it: ~6 bytes on the
#: wire per stream once HPACK's dynamic table holds it, 60 KiB decoded.
BLOATED = request_fields(extra=[("x-big", "x" * 4000)] * 15)


def test_hpack_amplified_heads_count_against_the_guest_budget() -> None:
    # Found here: decoded heads were not counted, so 100 streams of ~60
    # bytes each made the host hold ~6 MiB per connection (and as much on
    # every other flow), beyond the guest's DriverLimits budget.
    budget = BodyBudget(1 << 20)
    p = pair(budget=budget)
    taken: list[RequestReceived] = []
    denials: list[RequestRefused] = []
    wire = 0
    for i in range(60):
        p.client.send_headers(1 + 2 * i, BLOATED, end_stream=True)
        data = p.client.data_to_send()
        wire += len(data)
        events = p.icpt.receive_data(data)
        taken += received(events)
        denials += refused(events)
    assert wire < 20_000  # cheap for the guest ...
    assert budget.held <= budget.limit  # ... bounded for the host
    assert 10 <= len(taken) <= 17 and len(taken) + len(denials) == 60
    assert {(d.exchange.status, "[rule: limits]" in d.exchange.reason) for d in denials} == {
        (503, True)
    }
    assert "request heads and bodies" in denials[0].exchange.reason
    assert not p.icpt.closed  # the refusals cost those streams only
    for r in taken:
        p.icpt.respond(r.request, OK)
    assert budget.held == 0
    # Control: once answered, the same heads are taken again.
    p.client.send_headers(1001, BLOATED, end_stream=True)
    assert len(received(p.send())) == 1


def test_a_reset_stream_keeps_its_share_until_its_answer_is_dropped() -> None:
    budget = BodyBudget(1 << 20)
    p = pair(budget=budget)
    p.client.send_headers(1, BLOATED, end_stream=True)
    (got,) = received(p.send())
    held = budget.held
    assert held > 60_000  # the decoded head is counted
    p.client.reset_stream(1)  # "rapid reset": the request is still held by the host
    p.send()
    assert budget.held == held
    p.icpt.respond(got.request, OK)  # dropped quietly: the share goes back
    assert budget.held == 0


def test_refused_streams_keep_no_guest_headers_while_their_answer_waits() -> None:
    # The guest reads nothing (window 0): each refusal's body waits to be
    # framed; the 60 KiB head it came with must not wait with it.
    p = pair(budget=BodyBudget(1 << 20))
    p.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    p.send()
    fields = request_fields(authority="evil.test", extra=[("x-big", "x" * 4000)] * 15)
    for i in range(50):
        p.client.send_headers(1 + 2 * i, fields, end_stream=True)
        (denial,) = refused(p.send())
        assert denial.exchange.status == 421
    assert p.icpt.pending_bytes > 0  # answers wait for the guest's window
    assert all(not s.headers for s in p.icpt._sending)


# ----------------------------------------------------------------------------- HTTP/2 smuggling


def test_authority_other_than_the_sni_is_misdirected_and_recorded_truthfully() -> None:
    p = pair()  # TLS server name: api.test (allowed)
    p.client.send_headers(1, request_fields("/x", authority="evil.test"), end_stream=True)
    events = p.send()
    assert received(events) == []
    (denial,) = refused(events)
    ex = denial.exchange
    assert (ex.status, ex.decision, ex.host) == (421, "denied", "evil.test")
    assert "[rule: misdirected]" in ex.reason and ex.url == "https://evil.test/x"
    # The same trick with a port: the connection's port wins.
    p.client.send_headers(3, request_fields("/x", authority="api.test:8443"), end_stream=True)
    (denial,) = refused(p.send())
    assert denial.exchange.status == 421 and denial.exchange.port == 8443
    # Control: the TLS name in any case, with the default port, is served.
    p.client.send_headers(7, request_fields("/ok", authority="API.Test:443"), end_stream=True)
    (ok,) = received(p.send())
    assert (ok.request.host, ok.request.port) == ("api.test", 443)
    # A Host field that disagrees with :authority: h2 itself refuses the block
    # (RFC 9113 §8.3.1), which costs the connection, with one record.
    q = Pair(H2Interceptor(authority="api.test", port=443), client=raw_client())
    q.send()
    q.client.send_headers(1, request_fields(extra=[("host", "evil.test")]), end_stream=True)
    events = q.send()
    (denial,) = refused(events)
    assert received(events) == [] and q.icpt.closed
    assert "mismatched :authority and Host" in denial.exchange.reason
    assert denial.exchange.host == "api.test" and denial.exchange.decision == "denied"


def raw_client() -> h2.connection.H2Connection:
    """A guest client that sends what it likes (no outbound validation)."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding="latin-1",
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    conn.initiate_connection()
    return conn


def test_extended_connect_is_never_a_tunnel() -> None:
    # RFC 8441: the host never offers SETTINGS_ENABLE_CONNECT_PROTOCOL.
    p = Pair(H2Interceptor(authority="api.test", port=443), client=raw_client())
    p.send()
    assert p.client.remote_settings.enable_connect_protocol == 0
    fields = [
        (":method", "CONNECT"),
        (":protocol", "websocket"),
        (":scheme", "https"),
        (":authority", "api.test"),
        (":path", "/chat"),
    ]
    p.client.send_headers(1, fields, end_stream=False)
    events = p.send()
    assert received(events) == []
    (denial,) = refused(events)  # a stream refusal (405) or the connection's error
    assert denial.exchange.decision == "denied"
    # Plain CONNECT (a tunnel to anywhere) is a 405 on its stream.
    q = pair()
    q.client.send_headers(1, [(":method", "CONNECT"), (":authority", "evil.test:22")])
    (denial,) = refused(q.send())
    assert denial.exchange.status == 405 and "[rule: connect]" in denial.exchange.reason


def test_request_trailers_never_reach_the_request() -> None:
    # Documented: request trailers are dropped, so a placeholder there is
    # neither substituted nor sent anywhere.
    p = pair()
    p.client.send_headers(1, request_fields("/up", "POST", extra=[("te", "trailers")]))
    p.client.send_data(1, b"body")
    p.client.send_headers(1, [("authorization", "GONDOLIN_SECRET_T_" + "0" * 32)], end_stream=True)
    (got,) = received(p.send())
    assert got.request.body == b"body"
    assert all(n != "authorization" for n, _ in got.request.headers)


def test_window_update_overflow_costs_the_connection_only() -> None:
    p = pair()
    # WINDOW_UPDATE on the connection by 2**31 - 1: past the RFC 9113 §6.9.1 maximum.
    p.icpt.receive_data(struct.pack("!I", 4)[1:] + b"\x08\x00" + b"\0\0\0\0" + b"\x7f\xff\xff\xff")
    assert p.icpt.closed
    events = p.icpt.receive_data(b"more")
    assert events == []  # nothing after the GOAWAY


# ----------------------------------------------------------------------------- rebinding


def test_plain_http_to_an_allowed_synthetic_address_is_judged_by_its_host_header() -> None:
    # The guest dials the synthetic address of allowed.test and names
    # denied.test in Host: the request is for denied.test, and denied.
    icpt = HttpInterceptor("http", authority="allowed.test", port=80)
    (event,) = icpt.receive_data(b"GET /x HTTP/1.1\r\nHost: denied.test\r\n\r\n")
    assert isinstance(event, RequestReceived)
    context = MediationContext(NetworkPolicy(allow_hosts=["allowed.test"]), None, Recorder())
    outcome = plan_request(event.request, 0.0, context)
    exchange = outcome.exchange  # type: ignore[union-attr]
    assert (exchange.host, exchange.decision, exchange.status) == ("denied.test", "denied", 403)
    # Control: Host allowed.test on the same flow is allowed (goes upstream).
    icpt = HttpInterceptor("http", authority="allowed.test", port=80)
    (event,) = icpt.receive_data(b"GET /x HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert hasattr(plan_request(event.request, 0.0, context), "outgoing")  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- DNS

DNS_POLICY = NetworkPolicy(
    allow_hosts=["api.test", "*.wild.test", "bücher.test"],
    tcp={"db.test:5432": "127.0.0.1:5432"},
)


def resolver() -> tuple[Recorder, object]:
    recorder = Recorder()
    context = MediationContext(DNS_POLICY, None, recorder)
    return recorder, policy_resolver(lambda: context)


@pytest.mark.parametrize(
    ("name", "answered"),
    [
        ("API.TEST", True),
        ("api.test.", True),
        ("xn--bcher-kva.test", True),  # the IDNA form of an allowed IDN
        ("XN--BCHER-KVA.test", True),
        ("a.wild.test", True),
        ("wild.test", False),  # "*.wild.test" covers the names below it only
        ("db.test", True),  # a tcp entry's name (its port is checked at connect)
        ("api.test.evil.test", False),
        ("evilapi.test", False),
        ("api-test", False),
        ("x" * 63 + ".api.test", False),
    ],
)
def test_dns_answers_exactly_the_names_the_policy_knows(name: str, answered: bool) -> None:
    recorder, res = resolver()
    answer = parse_response(res.handle_query(query(name)))  # type: ignore[attr-defined]
    assert bool(answer.addresses) is answered
    assert answer.rcode == (Rcode.NOERROR if answered else Rcode.NXDOMAIN)
    assert len(recorder.requests) == (0 if answered else 1)


@pytest.mark.parametrize("qtype", [16, 255, 28, 15])  # TXT, ANY, AAAA, MX
def test_other_query_types_get_no_address_and_unknown_names_no_data(qtype: int) -> None:
    recorder, res = resolver()
    known = parse_response(res.handle_query(query("api.test", qtype)))  # type: ignore[attr-defined]
    unknown = parse_response(res.handle_query(query("evil.test", qtype)))  # type: ignore[attr-defined]
    assert (known.rcode, known.addresses) == (Rcode.NOERROR, [])
    assert (unknown.rcode, unknown.addresses) == (Rcode.NXDOMAIN, [])
    assert recorder.requests == []  # only A lookups are recorded (documented)


def test_hostile_wire_names_get_no_address() -> None:
    _, res = resolver()
    loop = query(b"\xc0\x0c", counts=(1, 0, 0, 0))  # a pointer to itself
    two = query("api.test", counts=(2, 0, 0, 0), extra=b"\x03api\x04test\x00\x00\x01\x00\x01")
    dotted = query(b"\x08api.test\x00")  # one label holding a dot
    nul = query(b"\x09api\x00.test\x00".replace(b"\x09", b"\x08"))
    for message in (loop, two, dotted, nul):
        reply = res.handle_query(message)  # type: ignore[attr-defined]
        assert reply is not None and parse_response(reply).addresses == []


@settings(max_examples=300, deadline=None)
@given(
    labels=st.lists(
        st.sampled_from(["api", "API", "test", "wild", "a", "xn--bcher-kva", "db", "evil", "-"]),
        min_size=1,
        max_size=5,
    ),
    dot=st.booleans(),
)
def test_an_address_is_given_only_to_a_name_the_policy_knows(labels: list[str], dot: bool) -> None:
    name = ".".join(labels) + ("." if dot else "")
    _, res = resolver()
    answer = parse_response(res.handle_query(query(name)))  # type: ignore[attr-defined]
    assert bool(answer.addresses) == DNS_POLICY.knows_name(name.rstrip(".").lower())


# ----------------------------------------------------------------------------- hostile upstream

UPSTREAM_CA = CertificateAuthority.create("red team h2 upstream CA")


def _upstream_request() -> HttpRequest:
    return HttpRequest(
        method="GET",
        target="/",
        scheme="https",
        host="api.test",
        port=443,
        path="/",
        query="",
        headers=(),
        body=b"",
        http_version="2",
    )


@pytest.mark.parametrize("where", ["headers", "trailers"])
def test_an_upstream_header_block_past_the_bound_is_an_upstream_error(
    where: str, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(UPSTREAM_CA.ca_pem)
    huge = [(f"x-h{i}", "v" * 1000) for i in range(30)]  # ~30 KiB decoded

    def handler(method: str, path: str, headers: Fields, body: bytes):  # type: ignore[no-untyped-def]
        if where == "headers":
            return 200, huge, b"ok", []
        return 200, [], b"ok", huge

    with h2_upstream(UPSTREAM_CA, "api.test", handler) as up:
        with pytest.raises(UpstreamError, match="header list larger than 16384"):
            fetch_upstream_h2(
                _upstream_request(), "127.0.0.1", up.port, True, "api.test", ca_file, 10.0,
                max_header_bytes=16_384,
            )  # fmt: skip
        # Control: within the bound (the default, 64 KiB) the same answer is served.
        got = fetch_upstream_h2(
            _upstream_request(), "127.0.0.1", up.port, True, "api.test", ca_file, 10.0
        )
        assert got.status == 200 and got.body == b"ok"


def test_the_guest_header_bound_is_the_one_configured() -> None:
    # Found here: h2 applies the advertised SETTINGS_MAX_HEADER_LIST_SIZE
    # to its decoder only on a change, so a bound below h2's 64 KiB default
    # was advertised but not enforced (here and for upstreams).
    fields = request_fields(extra=[(f"x-h{i}", "v" * 1000) for i in range(30)])
    small = pair(max_header_bytes=16_384)
    small.client.send_headers(1, fields, end_stream=True)
    events = small.send()
    (denial,) = refused(events)
    assert received(events) == [] and small.icpt.closed
    assert "header list larger than 16384" in denial.exchange.reason
    # Control: the default bound (64 KiB) takes the same block.
    default = pair()
    default.client.send_headers(1, fields, end_stream=True)
    assert len(received(default.send())) == 1


# ----------------------------------------------------------------------------- wss upstream

WSS_HANDSHAKE = (
    b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize(("leaf", "upgraded"), [("other.test", False), ("ws.test", True)])
def test_a_wss_upstream_with_a_certificate_for_another_name_is_refused(
    leaf: str, upgraded: bool, tmp_path: Path
) -> None:
    # The CA is trusted (upstream_ca), the leaf names another host: refused.
    # Control (ws.test): the same server with the right name is upgraded.
    from websockets.sync.server import ServerConnection, serve

    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(UPSTREAM_CA.ca_pem)

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = serve(echo, "127.0.0.1", 0, ssl=UPSTREAM_CA.ssl_context_for(leaf))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.socket.getsockname()[1]
        policy = NetworkPolicy(
            allow_hosts=["ws.test"],
            resolve={"ws.test:443": f"127.0.0.1:{port}"},
            upstream_ca=str(ca_file),
        )
        (event,) = HttpInterceptor("https", authority="ws.test", port=443).receive_data(
            WSS_HANDSHAKE
        )
        assert isinstance(event, RequestReceived)
        job = plan_request(event.request, event.started, MediationContext(policy, None, Recorder()))
        assert isinstance(job, UpstreamJob)
        outcome = run_upstream(job, timeout=10)
        assert (outcome.upgraded is not None) is upgraded
        if upgraded:
            assert outcome.upgraded is not None
            outcome.upgraded.close()
        else:
            assert outcome.response.status == 502
            assert "certificate verification failed" in outcome.exchange.reason
            assert "Hostname mismatch" in outcome.exchange.reason
    finally:
        server.shutdown()
        thread.join(5)


def test_answers_waiting_for_a_guest_that_never_reads_are_bounded_per_connection() -> None:
    # Found here: bodies waiting for the guest's flow-control windows were
    # not bounded (the relay's backlog leaves them out on purpose), so a
    # guest that opened 100 streams and never read could make the host hold
    # 100 answers of up to 64 MiB each on one connection.
    p = pair(max_pending_bytes=150_000)
    for sid in (1, 3, 5, 7):
        p.client.send_headers(sid, request_fields(f"/{sid}"), end_stream=True)
    got = received(p.send())
    big = HttpResponse(200, (), b"x" * 60_000)
    for r in got[:3]:
        p.icpt.respond(r.request, big)
        p.pull()  # 64 KiB (the connection's window) go out; the guest never reopens it
    assert p.icpt.pending_bytes > 100_000
    with pytest.raises(NetworkPolicyError, match="would pass the 150000 bytes"):
        p.icpt.respond(got[3].request, big)
    assert p.icpt.pending_bytes <= 150_000
    # The stream stays owed: the caller's 502 (FlowProxy does this) fits.
    p.icpt.respond(got[3].request, HttpResponse(502, (), b"too much waiting"))
    assert p.icpt.awaiting == 0 and not p.icpt.closed
