"""A small synchronous HTTP/1.1 client for talking to real upstreams.

The only module of the HTTP interception layer that does I/O. One request
per connection (``Connection: close``): simple, bounded, and nothing is
shared between guest requests. TLS verification is always on — the system
trust store plus the policy's ``upstream_ca`` — with the *original* host
name checked even when ``resolve`` redirected the connection (like curl
``--resolve``).

Call it only with an address obtained from
:func:`~pytest_gondolin.netpolicy.http.policy.resolve_upstream`, which enforces
``block_internal`` on the resolved address.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
import time
from typing import Final

import h11

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.messages import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HttpRequest,
    HttpResponse,
    strip_hop_by_hop,
)

__all__ = [
    "DEFAULT_UPSTREAM_TIMEOUT",
    "Deadline",
    "UpstreamError",
    "client_context",
    "fetch_upstream",
    "read_response",
]

log = logging.getLogger(__name__)

#: Whole-exchange bound (connect + TLS + request + response); a slow public
#: API answers well within it, a hung one must not hold the guest forever.
DEFAULT_UPSTREAM_TIMEOUT: Final = 30.0
_RECV_SIZE: Final = 64 * 1024
#: Bodies up to this size go out in one write with the head (a small second
#: write would wait for the server's delayed ACK); larger ones are written
#: as they are, so a 64 MiB upload is not copied to join it to its head.
_COALESCE_BYTES: Final = 64 * 1024
# Methods whose empty body is still announced (RFC 9110 §8.6: a user agent
# SHOULD send Content-Length when the method defines a meaning for content).
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(NetworkPolicyError):
    """Talking to the upstream failed (connect, TLS verification, HTTP, limits, timeout).

    Carries ``addr``, ``port`` and ``server_hostname``.
    """

    def __init__(self, message: str, *, addr: str, port: int, server_hostname: str | None) -> None:
        self.addr = addr
        self.port = port
        self.server_hostname = server_hostname
        where = (
            f"{addr}:{port}" if server_hostname is None else f"{server_hostname} ({addr}:{port})"
        )
        super().__init__(f"upstream {where}: {message}")


@functools.lru_cache(maxsize=8)
def _client_context(ca_file: str | None, _mtime_ns: int) -> ssl.SSLContext:
    context = ssl.create_default_context()  # CERT_REQUIRED + check_hostname
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


def client_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """The (cached) verifying client context: system CAs plus ``ca_file``.

    Raises :class:`NetworkPolicyError` if ``ca_file`` cannot be loaded.
    """
    path = None if ca_file is None else os.fspath(ca_file)
    try:
        mtime = 0 if path is None else os.stat(path).st_mtime_ns
        return _client_context(path, mtime)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise NetworkPolicyError(f"cannot load upstream CA file {path!r}: {exc}") from exc


class Deadline:
    """One upstream exchange's time bound, its errors and its connection set-up.

    Shared by every client here (:func:`fetch_upstream`, the WebSocket
    handshake): :meth:`fail` builds the :class:`UpstreamError` naming the
    upstream, :meth:`remaining` raises it once ``timeout`` has passed,
    :meth:`connect` and :meth:`start_tls` are bounded by what is left.
    """

    def __init__(
        self, timeout: float, *, addr: str, port: int, server_hostname: str | None
    ) -> None:
        self.timeout = timeout
        self.addr = addr
        self.port = port
        self.server_hostname = server_hostname
        self._end = time.monotonic() + timeout

    def fail(self, message: str) -> UpstreamError:
        """The error to raise for ``message``, naming this upstream."""
        return UpstreamError(
            message, addr=self.addr, port=self.port, server_hostname=self.server_hostname
        )

    def remaining(self) -> float:
        """Seconds left (> 0); raises :meth:`fail` ("timed out") once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.fail(f"timed out after {self.timeout}s")
        return left

    def connect(self) -> socket.socket:
        """A blocking TCP connection to the upstream; :class:`UpstreamError` if it fails."""
        try:
            return socket.create_connection((self.addr, self.port), timeout=self.remaining())
        except OSError as exc:
            raise self.fail(f"cannot connect: {exc}") from exc

    def start_tls(
        self, sock: socket.socket, ca_file: str | os.PathLike[str] | None
    ) -> ssl.SSLSocket:
        """``sock`` after a verified TLS handshake (system CAs plus ``ca_file``).

        The certificate is checked for ``server_hostname`` (default: the
        address), which is also the SNI. On failure ``sock`` is closed and
        :class:`UpstreamError` raised.
        """
        try:
            context = client_context(ca_file)
            sock.settimeout(self.remaining())
            return context.wrap_socket(sock, server_hostname=self.server_hostname or self.addr)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise self.fail(
                    f"TLS certificate verification failed: {exc.verify_message}"
                ) from exc
            if isinstance(exc, OSError):  # ssl.SSLError and timeouts too
                raise self.fail(f"{type(exc).__name__}: {exc}") from exc
            raise


def _request_head(request: HttpRequest) -> h11.Request:
    headers = strip_hop_by_hop(request.headers)
    if not any(n.lower() == "host" for n, _ in headers):
        headers.insert(0, ("Host", request.authority))
    if request.body or request.method in _BODY_METHODS:
        headers.append(("Content-Length", str(len(request.body))))
    headers.append(("Connection", "close"))
    target = request.path + (f"?{request.query}" if request.query else "")
    return h11.Request(
        method=request.method.encode("ascii"),
        target=target.encode("latin-1"),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
    )


def fetch_upstream(
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
    """Send ``request`` to ``addr:port`` and return the whole response.

    With ``tls``, the certificate must verify against the system CAs or
    ``ca_file`` for ``server_hostname`` (default: ``addr``), which is also
    the SNI. The response head is bounded by ``max_header_bytes``, its body
    by ``max_body_bytes``, the whole exchange by ``timeout`` seconds.
    Hop-by-hop request headers are dropped and the body re-framed with
    ``Content-Length``. Raises :class:`UpstreamError` for any failure.
    """
    deadline = Deadline(timeout, addr=addr, port=port, server_hostname=server_hostname)
    try:
        head = _request_head(request)
    except (UnicodeEncodeError, h11.LocalProtocolError) as exc:
        raise deadline.fail(f"cannot encode the request: {exc}") from exc
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
    sock = deadline.connect()
    if tls:
        sock = deadline.start_tls(sock, ca_file)
    with sock:
        try:
            out = conn.send(head) or b""
            body = b""
            if request.body:  # h11 hands a Content-Length body back as is: no copy
                body = conn.send(h11.Data(data=request.body)) or b""
            end = conn.send(h11.EndOfMessage()) or b""
            sock.settimeout(deadline.remaining())
            if len(body) <= _COALESCE_BYTES:
                sock.sendall(out + body + end)
            else:  # a large body is not copied once more just to join it to the head
                for part in (out, body, end):
                    sock.sendall(part)
            log.debug("upstream %s:%s <- %s %s", addr, port, request.method, request.url)
            return read_response(conn, sock, deadline, max_body_bytes)
        except (OSError, ssl.SSLError) as exc:  # TimeoutError is an OSError
            raise deadline.fail(f"{type(exc).__name__}: {exc}") from exc
        except h11.ProtocolError as exc:
            raise deadline.fail(f"malformed HTTP response: {exc}") from exc


def read_response(
    conn: h11.Connection,
    sock: socket.socket,
    deadline: Deadline,
    max_body_bytes: int,
    *,
    head: h11.Response | None = None,
) -> HttpResponse:
    """Read the rest of a response from ``sock`` (``head``: its head, if already read).

    The body is bounded by ``max_body_bytes``, every read by ``deadline``.
    Raises :class:`UpstreamError` for a bound or a truncated response.
    """
    remaining, fail = deadline.remaining, deadline.fail
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            sock.settimeout(remaining())
            conn.receive_data(sock.recv(_RECV_SIZE))
            continue
        if isinstance(event, h11.InformationalResponse):
            continue  # 100 Continue and friends: the final response follows
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body_bytes:
                raise fail(f"response body exceeds {max_body_bytes} bytes")
        elif isinstance(event, h11.EndOfMessage):
            break
        else:  # ConnectionClosed before a response, or PAUSED (cannot happen for one request)
            raise fail("connection closed before a complete response")
    if head is None:  # pragma: no cover - h11 yields a Response before EndOfMessage
        raise fail("no response")
    log.debug("upstream answered %d with %d body bytes", head.status_code, len(body))
    return HttpResponse(
        status=head.status_code,
        headers=tuple(
            (n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers.raw_items()
        ),
        body=bytes(body),
        reason=head.reason.decode("latin-1"),
    )
