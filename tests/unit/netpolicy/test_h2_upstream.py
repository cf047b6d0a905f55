"""fetch_upstream_h2 against real local TLS servers: HTTP/2 with trailers, else HTTP/1.1."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import h2.events
import pytest

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.guest_requests import RequestReceived
from pytest_gondolin.netpolicy.http.h2_server import H2Interceptor
from pytest_gondolin.netpolicy.http.mediation import (
    MediationContext,
    UpstreamJob,
    plan_request,
    run_upstream,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy
from pytest_gondolin.netpolicy.http.recorder import Recorder
from pytest_gondolin.netpolicy.http.secrets import Secret, SecretStore
from pytest_gondolin.netpolicy.http.upstream import UpstreamError
from pytest_gondolin.netpolicy.http.upstream_h2 import fetch_upstream_h2

from .h2_helpers import Fields, H2Upstream, Pair, h2_client, h2_upstream, request_fields

CA = CertificateAuthority.create("h2 upstream test CA")


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("h2ca") / "ca.pem"
    path.write_bytes(CA.ca_pem)
    return path


@pytest.fixture
def upstream() -> Iterator[H2Upstream]:
    with h2_upstream(CA, "api.test") as up:
        yield up


def request(
    path: str = "/x", method: str = "GET", body: bytes = b"", headers: Fields = ()
) -> HttpRequest:
    return HttpRequest(
        method=method,
        target=path,
        scheme="https",
        host="api.test",
        port=443,
        path=path,
        query="",
        headers=tuple(headers),
        body=body,
        http_version="2",
    )


def fetch(req: HttpRequest, port: int, ca_file: Path | None, **kw: int):  # type: ignore[no-untyped-def]
    return fetch_upstream_h2(req, "127.0.0.1", port, True, "api.test", ca_file, 10.0, **kw)


def test_h2_upstream_gets_one_stream_and_trailers_come_back(
    upstream: H2Upstream, ca_file: Path
) -> None:
    got = fetch(
        request(
            "/grpc.Echo/Say",
            "POST",
            b"\0\0\0\0\x01a",
            [("te", "trailers"), ("content-type", "application/grpc")],
        ),
        upstream.port,
        ca_file,
    )
    assert (got.status, got.body, got.trailers) == (
        200,
        b"\0\0\0\0\x02hi",
        (("grpc-status", "0"), ("grpc-message", "OK")),
    )
    assert upstream.protocols == ["h2"]
    method, path, headers, body = upstream.seen[0]
    assert (method, path, body) == ("POST", "/grpc.Echo/Say", b"\0\0\0\0\x01a")
    assert ("te", "trailers") in headers and ("content-length", "6") in headers


def test_large_upload_respects_the_upstreams_window(upstream: H2Upstream, ca_file: Path) -> None:
    body = bytes(range(256)) * 1000  # 256 KB: four times the default 64 KiB window
    got = fetch(request("/up", "PUT", body), upstream.port, ca_file)
    assert got.status == 200 and upstream.seen[0][3] == body


def test_body_bound_and_verification(upstream: H2Upstream, ca_file: Path) -> None:
    with pytest.raises(UpstreamError, match="exceeds 10 bytes"):
        fetch(request("/long-enough-path"), upstream.port, ca_file, max_body_bytes=10)
    with pytest.raises(UpstreamError, match="certificate verification failed"):
        fetch(request(), upstream.port, None)  # negative control: the test CA is not trusted


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"h1 {self.path} {self.headers.get('X-Probe')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_an_http11_upstream_gets_http11_on_the_same_connection(ca_file: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.socket = CA.ssl_context_for("api.test").wrap_socket(server.socket, server_side=True)
    accepted = []
    real_accept = server.socket.accept

    def counting_accept():  # type: ignore[no-untyped-def]
        accepted.append(1)
        return real_accept()

    server.socket.accept = counting_accept  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for path in ("/one", "/two"):
            got = fetch(request(path, headers=[("x-probe", "p")]), port, ca_file)
            assert (got.status, got.body, got.trailers) == (200, f"h1 {path} p".encode(), ())
        assert len(accepted) == 2  # one connection per request, no second try
    finally:
        server.shutdown()
        server.server_close()


def test_run_upstream_sends_http2_requests_upstream_in_http2_and_redacts_trailers(
    ca_file: Path,
) -> None:
    def leaky(method: str, path: str, headers: Fields, body: bytes):  # type: ignore[no-untyped-def]
        auth = dict(headers).get("authorization", "")
        return 200, [("content-type", "text/plain")], b"ok", [("grpc-message", f"saw {auth}")]

    with h2_upstream(CA, "api.test", leaky) as up:
        secrets = SecretStore({"TOK": Secret(value="s3cr3t-value", hosts=["api.test"])})
        placeholder = secrets.placeholder("TOK")
        policy = NetworkPolicy(
            allow_hosts=["api.test"],
            resolve={"api.test:443": f"127.0.0.1:{up.port}"},
            upstream_ca=str(ca_file),
        )
        recorder = Recorder(redactor=secrets)
        context = MediationContext(policy, secrets, recorder)
        req = request("/svc", headers=[("authorization", f"Bearer {placeholder}")])
        from pytest_gondolin.netpolicy.http.mediation import plan_request

        job = plan_request(req, 0.0, context)
        assert isinstance(job, UpstreamJob)
        outcome = run_upstream(job, timeout=10.0)
        assert up.seen[0][2][0] == ("authorization", "Bearer s3cr3t-value")  # substituted upstream
        assert outcome.response.trailers == (("grpc-message", f"saw Bearer {placeholder}"),)
        assert outcome.exchange.http_version == "2" and outcome.request is req


def test_a_cassette_records_an_http2_exchange_and_replays_it_to_a_stream(
    ca_file: Path, tmp_path: Path
) -> None:
    from pytest_gondolin.netpolicy.http.cassette import open_cassette
    from pytest_gondolin.netpolicy.http.mediation import Mediated, plan_request

    path = tmp_path / "h2.yaml"
    with h2_upstream(CA, "api.test") as up:
        policy = NetworkPolicy(
            allow_hosts=["api.test"],
            resolve={"api.test:443": f"127.0.0.1:{up.port}"},
            upstream_ca=str(ca_file),
        )
        recording = open_cassette(path, "once")
        context = MediationContext(policy, None, Recorder(), recording)
        job = plan_request(request("/rec"), 0.0, context)
        assert isinstance(job, UpstreamJob)
        live = run_upstream(job, timeout=10.0)
        assert recording.save() and len(up.seen) == 1
    replaying = open_cassette(path, "none")
    context = MediationContext(policy, None, Recorder(), replaying)
    replayed = plan_request(request("/rec"), 0.0, context)  # the upstream is gone: replayed
    assert isinstance(replayed, Mediated)
    assert (replayed.exchange.decision, replayed.exchange.http_version) == ("replayed", "2")
    assert replayed.response.body == live.response.body and replayed.request is not None


def _post_with_trailers_directly(port: int, ca_file: Path, trailers: Fields) -> None:
    """An HTTP/2 client of our own: POST a body, then ``trailers``, straight to the upstream."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="api.test") as tls,
    ):
        conn = h2_client()
        conn.send_headers(1, request_fields("/direct", "POST"))
        conn.send_data(1, b"payload")
        conn.send_headers(1, trailers, end_stream=True)
        tls.sendall(conn.data_to_send())
        while not any(
            isinstance(e, h2.events.StreamEnded) for e in conn.receive_data(tls.recv(65536))
        ):
            tls.sendall(conn.data_to_send())


def test_request_trailers_of_a_guest_stream_are_dropped_and_the_request_goes_on(
    upstream: H2Upstream, ca_file: Path
) -> None:
    """What docs/network.md says: a guest's request trailers never reach the upstream.

    The body and the headers do; the trailer section is read and discarded
    by the host (neither in ``HttpRequest.headers`` nor sent upstream).
    """
    # Control: the upstream does see a trailer section a client sends it.
    _post_with_trailers_directly(upstream.port, ca_file, [("x-checksum", "abc")])
    assert upstream.trailers == [[("x-checksum", "abc")]]
    upstream.trailers.clear()

    guest = Pair(H2Interceptor(authority="api.test", port=443))
    guest.send()
    guest.client.send_headers(1, request_fields("/upload", "POST", extra=[("te", "trailers")]))
    guest.client.send_data(1, b"payload")
    guest.client.send_headers(1, [("x-checksum", "abc")], end_stream=True)
    (event,) = [e for e in guest.send() if isinstance(e, RequestReceived)]
    req = event.request
    assert req.body == b"payload" and req.header("te") == "trailers"
    assert req.header("x-checksum") is None  # not folded into the headers

    policy = NetworkPolicy(
        allow_hosts=["api.test"],
        resolve={"api.test:443": f"127.0.0.1:{upstream.port}"},
        upstream_ca=str(ca_file),
    )
    job = plan_request(req, 0.0, MediationContext(policy, None, Recorder()))
    assert isinstance(job, UpstreamJob)
    outcome = run_upstream(job, timeout=10.0)
    assert outcome.response.status == 200
    method, path, _headers, body = upstream.seen[-1]
    assert (method, path, body) == ("POST", "/upload", b"payload")
    assert upstream.trailers == []  # dropped on the way
