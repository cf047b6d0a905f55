"""WebSocket mediation without a VM: the interceptor's switch, the handshake upstream, cassettes.

The upstream is a real ``websockets`` server on 127.0.0.1.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.server import ServerConnection, serve

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
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


def test_a_wss_handshake_is_an_ordinary_request_and_switches() -> None:
    icpt = HttpInterceptor("https", authority="ws.test", port=443)
    (event,) = icpt.receive_data(HANDSHAKE + b"\x81\x80abcd")
    assert isinstance(event, RequestReceived) and event.request.url == "https://ws.test/chat"
    assert icpt.respond(HttpResponse(101, (), b"")) == [] and icpt.switched
    assert icpt.switched_input() == b"\x81\x80abcd"


@pytest.fixture(scope="module")
def wss_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A TLS WebSocket echo server for ``ws.test`` on 127.0.0.1, and its CA file."""
    ca = CertificateAuthority.create("wss test CA")
    ca_file = tmp_path_factory.mktemp("wss") / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)

    def handler(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = serve(handler, "127.0.0.1", 0, ssl=ca.ssl_context_for("ws.test"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1], ca_file
    server.shutdown()
    thread.join(5)


def _wss_context(port: int, ca_file: Path | None, cassette: object = None) -> MediationContext:
    policy = NetworkPolicy(
        allow_hosts=["ws.test"],
        resolve={"ws.test:443": f"127.0.0.1:{port}"},
        upstream_ca=None if ca_file is None else str(ca_file),
    )
    return MediationContext(policy, None, Recorder(), cassette)  # type: ignore[arg-type]


def _wss_request() -> RequestReceived:
    icpt = HttpInterceptor("https", authority="ws.test", port=443)
    (event,) = icpt.receive_data(HANDSHAKE)
    assert isinstance(event, RequestReceived)
    return event


def _wss_run(port: int, ca_file: Path | None, cassette: object = None) -> Mediated:
    event = _wss_request()
    job = plan_request(event.request, event.started, _wss_context(port, ca_file, cassette))
    assert isinstance(job, UpstreamJob)
    return run_upstream(job, timeout=10)


def test_a_cassette_records_a_wss_handshake_and_replays_it_as_a_refusal(
    tmp_path: Path, wss_server: tuple[int, Path]
) -> None:
    port, ca_file = wss_server
    path = tmp_path / "wss.yaml"
    recording = open_cassette(path, "all")
    outcome = _wss_run(port, ca_file, recording)
    assert outcome.upgraded is not None
    outcome.upgraded.close()
    assert recording.save() and "uri: https://ws.test/chat" in path.read_text()
    event = _wss_request()
    refused = plan_request(
        event.request, event.started, _wss_context(port, ca_file, open_cassette(path, "none"))
    )
    assert isinstance(refused, Mediated) and refused.response.status == 403
    assert "holds only the handshake of this WebSocket" in refused.exchange.reason


def test_a_wss_handshake_goes_upstream_over_verified_tls(wss_server: tuple[int, Path]) -> None:
    port, ca_file = wss_server
    outcome = _wss_run(port, ca_file)
    assert outcome.exchange.status == 101 and outcome.upgraded is not None
    assert outcome.exchange.url == "https://ws.test/chat"
    try:
        sock = outcome.upgraded.sock
        assert isinstance(sock, ssl.SSLSocket) and sock.server_hostname == "ws.test"
        sock.sendall(b"\x81\x82abcd" + bytes(x ^ y for x, y in zip(b"hi", b"ab", strict=True)))
        assert sock.recv(100) == b"\x81\x02hi"  # the server's unmasked echo, decrypted
    finally:
        outcome.upgraded.close()


def test_a_wss_upstream_the_trust_does_not_cover_is_refused(wss_server: tuple[int, Path]) -> None:
    # Negative control: without upstream_ca the test CA is not trusted.
    outcome = _wss_run(wss_server[0], None)
    assert outcome.upgraded is None and outcome.response.status == 502
    assert "certificate verification failed" in outcome.exchange.reason


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
