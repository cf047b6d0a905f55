"""WebSocket mediation without a VM: the interceptor's switch, the handshake upstream, cassettes.

The upstream is a real ``websockets`` server on 127.0.0.1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.server import ServerConnection, serve

from pytest_gondolin.netpolicy.http.cassette import open_cassette
from pytest_gondolin.netpolicy.http.interceptor import HttpInterceptor, RequestReceived
from pytest_gondolin.netpolicy.http.mediation import (
    Mediated,
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.http.messages import HttpResponse
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.websocket import is_websocket

HANDSHAKE = (
    b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def ws_port() -> Iterator[int]:
    def handler(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = serve(handler, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()
    thread.join(5)


def _request() -> RequestReceived:
    icpt = HttpInterceptor("http", authority="ws.test", port=80)
    (event,) = icpt.receive_data(HANDSHAKE)
    assert isinstance(event, RequestReceived)
    return event


def test_the_interceptor_switches_on_101_and_hands_over_early_frames() -> None:
    icpt = HttpInterceptor("http", authority="ws.test", port=80)
    (event,) = icpt.receive_data(HANDSHAKE + b"\x81\x85early")
    assert isinstance(event, RequestReceived) and is_websocket(event.request.headers)
    assert icpt.respond(HttpResponse(101, (("Sec-WebSocket-Accept", "abc"),), b"")) == []
    assert icpt.switched and not icpt.wants_data and not icpt.closed
    head = bytes(icpt.data_to_send())
    assert head.startswith(b"HTTP/1.1 101 ") and b"Sec-WebSocket-Accept: abc\r\n" in head
    assert b"Upgrade: websocket\r\n" in head and b"Connection: Upgrade\r\n" in head
    assert icpt.switched_input() == b"\x81\x85early"


def test_a_declined_upgrade_is_an_ordinary_exchange() -> None:
    icpt = HttpInterceptor("http", authority="ws.test", port=80)
    icpt.receive_data(HANDSHAKE)
    icpt.respond(HttpResponse(403, (), b"no"))
    assert not icpt.switched and icpt.data_to_send().startswith(b"HTTP/1.1 403 ")
    assert icpt.wants_data  # keep-alive: the next request may come


def test_wss_is_refused_naming_the_rule() -> None:
    icpt = HttpInterceptor("https", authority="ws.test", port=443)
    (event,) = icpt.receive_data(HANDSHAKE)
    assert not isinstance(event, RequestReceived)
    assert "wss://" in event.exchange.reason and "[rule: websocket]" in event.exchange.reason


def _context(port: int, cassette: object = None) -> MediationContext:
    policy = NetworkPolicy(allow_hosts=["ws.test"], resolve={"ws.test:80": f"127.0.0.1:{port}"})
    return MediationContext(policy, None, Recorder(), cassette)  # type: ignore[arg-type]


def _run(context: MediationContext) -> Mediated:
    event = _request()
    job = plan_request(event.request, event.started, context)
    assert isinstance(job, UpstreamJob)
    return run_upstream(job, timeout=10)


def test_the_handshake_goes_upstream_and_keeps_the_connection(ws_port: int) -> None:
    outcome = _run(_context(ws_port))
    assert outcome.exchange.status == 101 and outcome.upgraded is not None
    try:
        sock = outcome.upgraded.sock
        sock.sendall(b"\x81\x82abcd" + bytes(x ^ y for x, y in zip(b"hi", b"ab", strict=True)))
        assert sock.recv(100) == b"\x81\x02hi"  # the server's unmasked echo
    finally:
        outcome.upgraded.close()


def test_a_server_that_is_not_websocket_declines(tmp_path: Path) -> None:
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        outcome = _run(_context(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()
    assert outcome.upgraded is None and outcome.exchange.status == 404


def test_a_cassette_records_the_handshake_and_replays_it_as_a_refusal(
    tmp_path: Path, ws_port: int
) -> None:
    path = tmp_path / "ws.yaml"
    recording = open_cassette(path, "all")
    outcome = _run(_context(ws_port, recording))
    assert outcome.upgraded is not None
    outcome.upgraded.close()
    assert recording.save()
    assert "status:" in path.read_text() and "101" in path.read_text()

    replaying = open_cassette(path, "none")
    event = _request()
    refused = plan_request(event.request, event.started, _context(ws_port, replaying))
    assert isinstance(refused, Mediated) and refused.exchange.decision == "denied"
    assert refused.response.status == 403
    assert "holds only the handshake of this WebSocket" in refused.exchange.reason
    assert "[rule: cassette]" in refused.exchange.reason


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_guest_bytes_after_an_upgrade_request_are_handed_over_verbatim(tail: bytes) -> None:
    icpt = HttpInterceptor("http", authority="ws.test", port=80)
    events = icpt.receive_data(HANDSHAKE + tail)
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    icpt.respond(HttpResponse(101, (), b""))
    assert icpt.switched_input() == tail
