"""fetch_upstream against real local servers (plain and TLS with a CA from ca.py)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.interceptor import HttpInterceptor, RequestReceived
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.policy import NetworkPolicy, resolve_upstream
from pytest_gondolin.netpolicy.http.upstream import UpstreamError, client_context, fetch_upstream

#: The /slow handler's delay; tests use a much shorter client timeout.
SLOW_SECONDS = 1.5


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/big"):
            payload = b"x" * 5000
        elif self.path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
            payload = b"late"
        else:
            payload = json.dumps(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": [[k, v] for k, v in self.headers.items()],
                    "body": body.decode("latin-1"),
                }
            ).encode()
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for piece in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Upstream", "yes")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_HEAD = do_PUT = _echo


class TLSServer(ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Handshake in the handler thread: a client rejecting our certificate
        # must not disturb the accept loop.
        try:
            request = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        super().finish_request(request, client_address)


class PlainServer(ThreadingHTTPServer):
    daemon_threads = True


def serve(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    yield from serve(PlainServer(("127.0.0.1", 0), Handler))


@pytest.fixture(scope="module")
def https_port(ca: CertificateAuthority) -> Iterator[int]:
    server = TLSServer(("127.0.0.1", 0), Handler)
    server.context = ca.ssl_context_for("upstream.test")
    yield from serve(server)


def req(
    method: str = "GET",
    path: str = "/echo",
    *,
    host: str = "upstream.test",
    port: int = 80,
    scheme: str = "http",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    query: str = "",
) -> HttpRequest:
    return HttpRequest(
        method=method,
        target=path + (f"?{query}" if query else ""),
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        query=query,
        headers=(("Host", f"{host}:{port}"), *headers),
        body=body,
    )


def echoed(response: HttpResponse) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.body)
    data["headers"] = {k.lower(): v for k, v in data["headers"]}
    return data


def test_plain_get(http_port: int) -> None:
    request = req(
        query="a=1",
        headers=(
            ("Accept", "*/*"),
            ("Connection", "keep-alive, X-Drop"),
            ("X-Drop", "1"),
            ("Keep-Alive", "300"),
            ("Expect", "100-continue"),
        ),
    )
    response = fetch_upstream(request, "127.0.0.1", http_port, False, None, None, 5)
    assert response.status == 200 and response.header("x-upstream") == "yes"
    got = echoed(response)
    assert (got["method"], got["path"]) == ("GET", "/echo?a=1")
    assert got["headers"]["host"] == "upstream.test:80"  # the guest's Host, not the address
    assert got["headers"]["accept"] == "*/*"
    assert got["headers"]["connection"] == "close"
    assert not {"x-drop", "keep-alive", "expect", "content-length"} & set(got["headers"])


def test_post_body_and_empty_put(http_port: int) -> None:
    response = fetch_upstream(req("POST", body=b"payload"), "127.0.0.1", http_port, False, None)
    assert response.status == 201
    assert echoed(response)["body"] == "payload"
    put = echoed(fetch_upstream(req("PUT"), "127.0.0.1", http_port, False, None))
    assert put["headers"]["content-length"] == "0"


def test_head_has_no_body(http_port: int) -> None:
    response = fetch_upstream(req("HEAD"), "127.0.0.1", http_port, False, None)
    assert response.status == 200 and response.body == b""
    assert int(response.header("content-length") or 0) > 0


def test_chunked_response_relayed_to_the_guest(http_port: int) -> None:
    """Guest request -> interceptor -> upstream (chunked) -> guest gets a Content-Length response."""
    icpt = HttpInterceptor("http", authority="10.0.2.100", port=http_port)
    (event,) = icpt.receive_data(
        f"GET /chunked HTTP/1.1\r\nHost: upstream.test:{http_port}\r\n\r\n".encode()
    )
    assert isinstance(event, RequestReceived)
    upstream = fetch_upstream(event.request, "127.0.0.1", http_port, False, None)
    assert upstream.body == b"hello chunked world"
    icpt.respond(upstream)
    out = icpt.data_to_send()
    assert b"content-length: 19\r\n" in out.lower() and b"transfer-encoding" not in out.lower()
    assert out.endswith(b"\r\n\r\nhello chunked world")


def test_tls_verified_with_upstream_ca(https_port: int, ca_file: Path) -> None:
    response = fetch_upstream(
        req(port=https_port, scheme="https"),
        "127.0.0.1",
        https_port,
        True,
        "upstream.test",
        ca_file,
        5,
    )
    assert echoed(response)["path"] == "/echo"


def test_tls_through_resolve_entry(https_port: int, ca_file: Path) -> None:
    """The curl --resolve flow: the name is verified, the address comes from resolve."""
    policy = NetworkPolicy(
        resolve={f"upstream.test:{https_port}": f"127.0.0.1:{https_port}"}, upstream_ca=ca_file
    )
    assert policy.decide("upstream.test", https_port, "https").allowed
    addr, port = resolve_upstream("upstream.test", https_port, policy)
    response = fetch_upstream(
        req(port=https_port, scheme="https"),
        addr,
        port,
        True,
        "upstream.test",
        policy.upstream_ca_path,
    )
    assert response.status == 200


def test_tls_without_our_ca_is_rejected(https_port: int) -> None:
    """Negative control: system CAs alone do not trust the test CA."""
    with pytest.raises(UpstreamError, match="certificate verification failed") as info:
        fetch_upstream(
            req(port=https_port, scheme="https"),
            "127.0.0.1",
            https_port,
            True,
            "upstream.test",
            None,
            5,
        )
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert info.value.server_hostname == "upstream.test"


def test_tls_wrong_name_is_rejected(https_port: int, ca_file: Path) -> None:
    with pytest.raises(UpstreamError, match="Hostname mismatch"):
        fetch_upstream(
            req(port=https_port, scheme="https"),
            "127.0.0.1",
            https_port,
            True,
            "other.test",
            ca_file,
            5,
        )


def test_tls_wrong_ca_file_is_rejected(https_port: int, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(CertificateAuthority.create().ca_pem)
    with pytest.raises(UpstreamError, match="certificate verification failed"):
        fetch_upstream(
            req(port=https_port, scheme="https"),
            "127.0.0.1",
            https_port,
            True,
            "upstream.test",
            other,
            5,
        )


def test_body_limit(http_port: int) -> None:
    with pytest.raises(UpstreamError, match="response body exceeds 100 bytes"):
        fetch_upstream(req(path="/big"), "127.0.0.1", http_port, False, None, max_body_bytes=100)


def test_timeout_is_bounded(http_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamError, match=r"timed out|TimeoutError"):
        fetch_upstream(req(path="/slow"), "127.0.0.1", http_port, False, None, None, 0.3)
    assert time.monotonic() - started < SLOW_SECONDS


def test_connection_refused_is_wrapped() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connecting is refused
        with pytest.raises(UpstreamError, match="cannot connect") as info:
            fetch_upstream(req(), "127.0.0.1", port, False, None, None, 2)
    assert isinstance(info.value, NetworkPolicyError)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"garbage\r\n\r\n", "malformed HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "malformed HTTP response|closed"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000, "malformed HTTP response"),
        (b"", "malformed HTTP response|closed"),
    ],
)
def test_bad_upstream_replies(reply: bytes, message: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(5)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(reply)

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(UpstreamError, match=message):
            fetch_upstream(req(), "127.0.0.1", listener.getsockname()[1], False, None, None, 5)
    finally:
        thread.join(5)
        listener.close()


def test_unencodable_request_is_wrapped(http_port: int) -> None:
    with pytest.raises(UpstreamError, match="cannot encode the request"):
        fetch_upstream(req(headers=(("X", "ж"),)), "127.0.0.1", http_port, False, None)


def test_client_context_errors_are_wrapped(tmp_path: Path) -> None:
    with pytest.raises(NetworkPolicyError, match="cannot load upstream CA file"):
        client_context(tmp_path / "missing.pem")
    assert client_context(None).verify_mode == ssl.CERT_REQUIRED
    assert client_context(None).check_hostname
