"""HTTP/2 helpers for the tests: a sans-IO guest client and a real TLS HTTP/2 upstream."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings

from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.h2_server import H2Interceptor
from pytest_gondolin.netpolicy.http.interceptor import HttpEvent

Fields = list[tuple[str, str]]


def h2_client(**settings: int) -> h2.connection.H2Connection:
    """A guest-side HTTP/2 client connection (sans-IO), preface queued."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
    )
    if settings:
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                getattr(h2.settings.SettingCodes, k.upper()): v for k, v in settings.items()
            },
        )
    conn.initiate_connection()
    return conn


def request_fields(
    path: str = "/", method: str = "GET", authority: str = "api.test", extra: Fields = ()
) -> Fields:
    return [
        (":method", method),
        (":scheme", "https"),
        (":authority", authority),
        (":path", path),
        *extra,
    ]


@dataclass
class Pair:
    """A guest client and the interceptor it talks to, moved one step at a time."""

    icpt: H2Interceptor
    client: h2.connection.H2Connection = field(default_factory=h2_client)
    received: list[h2.events.Event] = field(default_factory=list)

    def send(self) -> list[HttpEvent]:
        """Client bytes to the interceptor; interceptor bytes back to the client."""
        events = self.icpt.receive_data(self.client.data_to_send())
        self.pull()
        return events

    def pull(self, room: int = 1 << 20) -> None:
        self.icpt.produce(room)
        out = bytes(self.icpt.data_to_send())
        if out:
            self.received += self.client.receive_data(out)
            ack = self.client.data_to_send()
            if ack:
                self.icpt.receive_data(ack)
                self.icpt.produce(room)
                more = bytes(self.icpt.data_to_send())
                if more:
                    self.received += self.client.receive_data(more)

    def response(self, stream_id: int) -> tuple[dict[str, str], bytes, dict[str, str], bool]:
        """(headers, body, trailers, ended) the client has for ``stream_id``."""
        headers: dict[str, str] = {}
        trailers: dict[str, str] = {}
        body = b""
        ended = False
        for ev in self.received:
            if getattr(ev, "stream_id", None) != stream_id:
                continue
            if isinstance(ev, h2.events.ResponseReceived):
                headers = dict(ev.headers or ())  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data or b""
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers = dict(ev.headers or ())  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
        return headers, body, trailers, ended


# --------------------------------------------------------------------------- a real upstream

#: (method, path, headers, body) -> (status, headers, body, trailers)
Handler = Callable[[str, str, Fields, bytes], tuple[int, Fields, bytes, Fields]]


def echo_handler(
    method: str, path: str, headers: Fields, body: bytes
) -> tuple[int, Fields, bytes, Fields]:
    """Echo the request as text; ``/grpc`` answers gRPC-style with trailers."""
    if path.startswith("/grpc"):
        return (
            200,
            [("content-type", "application/grpc")],
            b"\0\0\0\0\x02hi",
            [
                ("grpc-status", "0"),
                ("grpc-message", "OK"),
            ],
        )
    text = f"{method} {path} " + " ".join(f"{n}={v}" for n, v in headers if n != "user-agent")
    return 200, [("content-type", "text/plain")], f"{text} body={len(body)}".encode(), []


@dataclass
class H2Upstream:
    """A threaded HTTP/2-over-TLS server on 127.0.0.1 (one h2 connection per client)."""

    port: int
    seen: list[tuple[str, str, Fields, bytes]]
    protocols: list[str]
    #: Trailer sections clients sent (RFC 9110 §6.5), one per stream that had one.
    trailers: list[Fields] = field(default_factory=list)


@contextlib.contextmanager
def h2_upstream(
    ca: CertificateAuthority, name: str, handler: Handler = echo_handler
) -> Iterator[H2Upstream]:
    """Serve ``handler`` over HTTP/2 with a leaf for ``name`` from ``ca``."""
    context = ca.ssl_context_for(name, alpn=("h2",))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    upstream = H2Upstream(listener.getsockname()[1], [], [])
    stop = threading.Event()

    def serve_one(raw: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            raw.settimeout(10)
            with context.wrap_socket(raw, server_side=True) as tls:
                upstream.protocols.append(tls.selected_alpn_protocol() or "")
                _serve_h2(tls, handler, upstream.seen, upstream.trailers)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(raw,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _serve_h2(
    tls: ssl.SSLSocket,
    handler: Handler,
    seen: list[tuple[str, str, Fields, bytes]],
    trailers_seen: list[Fields],
) -> None:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
    )
    conn.initiate_connection()
    tls.sendall(conn.data_to_send())
    heads: dict[int, Fields] = {}
    bodies: dict[int, bytes] = {}
    while True:
        data = tls.recv(65536)
        if not data:
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                heads[ev.stream_id or 0] = list(ev.headers or ())  # type: ignore[arg-type]
                bodies[ev.stream_id or 0] = b""
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers_seen.append(list(ev.headers or ()))  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id or 0] += ev.data or b""
                conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id or 0)
            elif isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id or 0
                fields = heads.pop(sid)
                pseudo = dict(f for f in fields if f[0].startswith(":"))
                regular = [f for f in fields if not f[0].startswith(":")]
                body = bodies.pop(sid)
                seen.append((pseudo[":method"], pseudo[":path"], regular, body))
                status, headers, out, trailers = handler(
                    pseudo[":method"], pseudo[":path"], regular, body
                )
                conn.send_headers(sid, [(":status", str(status)), *headers])
                conn.send_data(sid, out, end_stream=not trailers)
                if trailers:
                    conn.send_headers(sid, trailers, end_stream=True)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                tls.sendall(conn.data_to_send())
                return
        tls.sendall(conn.data_to_send())
