"""HTTP/2 to real upstreams, for guest requests that arrived over HTTP/2.

:func:`fetch_upstream_h2` has the signature and the guarantees of
:func:`~.upstream.fetch_upstream` (verification always on, the original
host name checked, every bound the same, :class:`~.upstream.UpstreamError`
for any failure) and offers ``h2`` and ``http/1.1`` in ALPN. An upstream
that selects ``h2`` gets the request as one HTTP/2 stream and its response
keeps its trailers (gRPC's ``grpc-status``); one that picks ``http/1.1``
(or nothing) gets the request over HTTP/1.1 on the same connection, as
:func:`~.upstream.fetch_upstream` would send it. One connection per request,
like the HTTP/1.1 client: nothing is shared between guest requests, and
nothing is remembered about an upstream (a test server on a reused port
may speak the other protocol).
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.messages import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HttpRequest,
    HttpResponse,
    strip_hop_by_hop,
)
from pytest_gondolin.netpolicy.http.upstream import (
    DEFAULT_UPSTREAM_TIMEOUT,
    Deadline,
    fetch_upstream,
    read_response,
)

__all__ = ["fetch_upstream_h2", "request_headers"]

log = logging.getLogger(__name__)

_RECV_SIZE: Final = 64 * 1024
#: The receive window of the one stream (RFC 9113 §6.9.2): a download flows
#: without a WINDOW_UPDATE round trip per 64 KiB; the body bound is separate.
_WINDOW: Final = 1 << 20
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
# RFC 9113 §8.2.2: connection-specific fields, never sent in HTTP/2.
_NOT_SENT: Final = frozenset({"host", "connection", "keep-alive", "proxy-connection", "upgrade"})


@functools.lru_cache(maxsize=8)
def _h2_context(ca_file: str | None, _mtime_ns: int) -> ssl.SSLContext:
    context = ssl.create_default_context()  # CERT_REQUIRED + check_hostname
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    path = None if ca_file is None else os.fspath(ca_file)
    try:
        return _h2_context(path, 0 if path is None else os.stat(path).st_mtime_ns)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise NetworkPolicyError(f"cannot load upstream CA file {path!r}: {exc}") from exc


def fetch_upstream_h2(
    request: HttpRequest,
    addr: str,
    port: int,
    tls: bool,
    server_hostname: str | None,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_UPSTREAM_TIMEOUT,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> HttpResponse:
    """Send ``request`` to ``addr:port`` in HTTP/2 if the upstream offers it, else HTTP/1.1.

    Same contract as :func:`~.upstream.fetch_upstream`; the response also
    carries the upstream's trailers when it spoke HTTP/2.
    """
    if not tls:
        return fetch_upstream(
            request, addr, port, tls, server_hostname, ca_file, timeout,
            max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes,
        )  # fmt: skip
    deadline = Deadline(timeout, addr=addr, port=port, server_hostname=server_hostname)
    raw = deadline.connect()
    try:
        context = _context(ca_file)
        raw.settimeout(deadline.remaining())
        sock = context.wrap_socket(raw, server_hostname=server_hostname or addr)
    except BaseException as exc:
        raw.close()
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise deadline.fail(
                f"TLS certificate verification failed: {exc.verify_message}"
            ) from exc
        if isinstance(exc, OSError):
            raise deadline.fail(f"{type(exc).__name__}: {exc}") from exc
        raise
    with sock:
        try:
            if sock.selected_alpn_protocol() != "h2":
                log.debug("upstream %s:%d picked HTTP/1.1", addr, port)
                return _fetch_h1(sock, request, deadline, max_header_bytes, max_body_bytes)
            return _H2Exchange(sock, deadline, max_header_bytes, max_body_bytes).run(request)
        except (OSError, ssl.SSLError) as exc:  # TimeoutError is an OSError
            raise deadline.fail(f"{type(exc).__name__}: {exc}") from exc
        except h2.exceptions.ProtocolError as exc:
            raise deadline.fail(f"malformed HTTP/2 response: {exc}") from exc
        except h11.ProtocolError as exc:
            raise deadline.fail(f"malformed HTTP response: {exc}") from exc


def _fetch_h1(
    sock: ssl.SSLSocket,
    request: HttpRequest,
    deadline: Deadline,
    max_header_bytes: int,
    max_body_bytes: int,
) -> HttpResponse:
    """``request`` over HTTP/1.1 on ``sock``, framed as :func:`~.upstream.fetch_upstream` does."""
    headers = strip_hop_by_hop(request.headers)
    if not any(n.lower() == "host" for n, _ in headers):
        headers.insert(0, ("Host", request.authority))
    if request.body or request.method in _BODY_METHODS:
        headers.append(("Content-Length", str(len(request.body))))
    headers.append(("Connection", "close"))
    target = request.path + (f"?{request.query}" if request.query else "")
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
    try:
        head = h11.Request(
            method=request.method.encode("ascii"),
            target=target.encode("latin-1"),
            headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
        )
    except (UnicodeEncodeError, h11.LocalProtocolError) as exc:
        raise deadline.fail(f"cannot encode the request: {exc}") from exc
    sock.settimeout(deadline.remaining())
    sock.sendall(conn.send(head) or b"")
    if request.body:
        sock.sendall(conn.send(h11.Data(data=request.body)) or b"")
    sock.sendall(conn.send(h11.EndOfMessage()) or b"")
    return read_response(conn, sock, deadline, max_body_bytes)


def request_headers(request: HttpRequest) -> list[tuple[bytes, bytes]]:
    """The header block of ``request`` as an HTTP/2 request (RFC 9113 §8.3.1)."""
    target = request.path + (f"?{request.query}" if request.query else "")
    te = request.header("te") or ""
    fields = [
        (":method", request.method),
        (":scheme", "https"),
        (":authority", request.authority),
        (":path", target),
    ]
    fields += [
        (n.lower(), v) for n, v in strip_hop_by_hop(request.headers) if n.lower() not in _NOT_SENT
    ]
    if "trailers" in te.lower():  # RFC 9113 §8.2.2: the one TE an HTTP/2 request may carry
        fields.append(("te", "trailers"))
    if request.body or request.method in _BODY_METHODS:
        fields.append(("content-length", str(len(request.body))))
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields]


@dataclass
class _H2Exchange:
    """One request on a fresh HTTP/2 connection, and its response."""

    sock: ssl.SSLSocket
    deadline: Deadline
    max_header_bytes: int
    max_body_bytes: int
    stream_id: int = 0
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    done: bool = False

    def run(self, request: HttpRequest) -> HttpResponse:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        conn = h2.connection.H2Connection(config=config)
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.max_header_bytes,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # h2 applies SETTINGS_MAX_HEADER_LIST_SIZE to its HPACK decoder only when a
        # change is acknowledged, never for initial values: bound the decoder itself.
        conn.decoder.max_header_list_size = self.max_header_bytes
        conn.initiate_connection()
        # The connection's window too (RFC 9113 §6.9.2: SETTINGS sets only the streams').
        conn.increment_flow_control_window(_WINDOW - 65_535)
        try:
            block = request_headers(request)
        except UnicodeEncodeError as exc:
            raise self.deadline.fail(f"cannot encode the request: {exc}") from exc
        self.stream_id = conn.get_next_available_stream_id()
        conn.send_headers(self.stream_id, block, end_stream=not request.body)
        self._send_body(conn, memoryview(request.body))
        log.debug("upstream h2 %s <- %s %s", self.deadline.addr, request.method, request.url)
        while not self.done:
            self._flush(conn)
            self._receive(conn)
        assert self.status is not None
        return HttpResponse(
            status=self.status,
            headers=tuple(self.headers),
            body=bytes(self.body),
            trailers=tuple(self.trailers),
        )

    def _send_body(self, conn: h2.connection.H2Connection, body: memoryview) -> None:
        while body and not self.done:
            size = min(
                len(body),
                conn.local_flow_control_window(self.stream_id),
                conn.max_outbound_frame_size,
            )
            if size <= 0:  # the upstream's window is full: wait for WINDOW_UPDATE
                self._flush(conn)
                self._receive(conn)
                continue
            conn.send_data(self.stream_id, bytes(body[:size]), end_stream=size == len(body))
            body = body[size:]
            self._flush(conn)

    def _flush(self, conn: h2.connection.H2Connection) -> None:
        out = conn.data_to_send()
        if out:
            self.sock.settimeout(self.deadline.remaining())
            self.sock.sendall(out)

    def _receive(self, conn: h2.connection.H2Connection) -> None:
        self.sock.settimeout(self.deadline.remaining())
        data = self.sock.recv(_RECV_SIZE)
        if not data:
            raise self.deadline.fail("connection closed before a complete response")
        for event in conn.receive_data(data):
            self._on_event(conn, event)

    def _on_event(self, conn: h2.connection.H2Connection, event: h2.events.Event) -> None:
        fail = self.deadline.fail
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == self.stream_id:
            fields = [(_text(n), _text(v)) for n, v in event.headers or ()]
            status = next((v for n, v in fields if n == ":status"), "")
            if not status.isdigit() or not 200 <= int(status) <= 599:
                raise fail(f"invalid :status {status[:20]!r}")
            self.status = int(status)
            self.headers = [(n, v) for n, v in fields if not n.startswith(":")]
        elif isinstance(event, h2.events.DataReceived) and event.stream_id == self.stream_id:
            self.body += event.data or b""
            if len(self.body) > self.max_body_bytes:
                raise fail(f"response body exceeds {self.max_body_bytes} bytes")
            if event.flow_controlled_length:
                conn.acknowledge_received_data(event.flow_controlled_length, self.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == self.stream_id:
            self.trailers = [
                (_text(n), _text(v)) for n, v in event.headers or () if not _text(n).startswith(":")
            ]
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id == self.stream_id:
            if self.status is None:
                raise fail("stream ended without a response")
            self.done = True
        elif isinstance(event, h2.events.StreamReset) and event.stream_id == self.stream_id:
            raise fail(f"upstream reset the stream ({event.error_code!r})")
        elif isinstance(event, h2.events.ConnectionTerminated) and not self.done:
            raise fail(f"upstream closed the HTTP/2 connection ({event.error_code!r})")


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("latin-1")
