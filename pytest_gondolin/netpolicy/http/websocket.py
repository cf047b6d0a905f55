"""WebSocket upgrades (RFC 6455 §4) of plain-HTTP guest requests.

The handshake is an ordinary request, so it is mediated like one (stubs,
policy, secrets, cassette, recorder: :mod:`.mediation`); what differs is
the upstream. :func:`open_websocket` sends the handshake and, when the
server answers ``101 Switching Protocols``, keeps the connection and hands
it back as :class:`Upgraded`, with any bytes the server sent right after
the 101. The driver then relays the session as an opaque stream
(:mod:`pytest_gondolin.netpolicy.streams`), bounded by the stream limits.
For ``wss://`` both sides stay TLS: the guest's session is the one the
MITM terminated (:class:`~pytest_gondolin.netpolicy.stream_tls.GuestTls`
carries it on), the upstream's a verified TLS connection.

What is not done, and why:

* a handshake that carries a secret is refused (:data:`SECRET_REFUSAL`):
  after the 101 the host cannot redact frames, so a server echoing the
  ``Authorization`` header would hand the guest the real value; so is any
  handshake to a host a secret is bound to (:func:`secret_host_refusal`),
  whose server may hold the value from an earlier request;
* only ``websocket`` is offered upstream and only a 101 to ``websocket``
  is relayed: a switch to another protocol (``h2c``) is a 502;
* frames are not parsed: the host neither inspects nor records them, only
  counts the bytes each way.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Final

import h11

from pytest_gondolin.netpolicy.http.messages import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HttpRequest,
    HttpResponse,
    strip_hop_by_hop,
)
from pytest_gondolin.netpolicy.http.upstream import Deadline, read_response

__all__ = [
    "SECRET_REFUSAL",
    "Upgraded",
    "is_websocket",
    "open_websocket",
    "secret_host_refusal",
]

log = logging.getLogger(__name__)

#: Why a handshake carrying a secret is refused (recorded, and the guest's 403 body).
SECRET_REFUSAL: Final = (
    "a WebSocket handshake carrying a secret is refused: after the upgrade the host "
    "cannot redact the frames, so the server could echo the real value to the guest"
)
_RECV_SIZE: Final = 64 * 1024


def secret_host_refusal(names: tuple[str, ...], host: str) -> str:
    """Why a WebSocket to ``host``, which secrets ``names`` are bound to, is refused.

    Even without the placeholder in the handshake: the server may hold the
    value from an earlier request and send it in a frame, which the host
    cannot redact (an ordinary response would be).
    """
    return (
        f"a WebSocket to {host}, a host of secret(s) {', '.join(names)}, is refused: "
        "the host cannot redact the frames, so the server could send the real value "
        "to the guest"
    )


def is_websocket(headers: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``headers`` name the ``websocket`` protocol in ``Upgrade`` (RFC 6455 §4.1).

    The token itself, not a substring: ``websocket/13`` or ``x-websocket-tunnel``
    are other protocols (RFC 9110 §7.8) and stay ordinary requests.
    """
    return any(
        name.lower() == "upgrade"
        and any(token.strip().lower() == "websocket" for token in value.split(","))
        for name, value in headers
    )


@dataclass(eq=False)
class Upgraded:
    """An upstream connection the server switched to WebSocket (blocking mode; the driver's now).

    ``early``: bytes the server sent after its 101 that h11 had already
    read (frames for the guest, in order).
    """

    sock: socket.socket  # an ssl.SSLSocket for wss://
    early: bytes
    target: str  # "addr:port" the host connected to

    def close(self) -> None:
        self.sock.close()


def _handshake_head(request: HttpRequest) -> h11.Request:
    headers = strip_hop_by_hop(request.headers)
    if not any(n.lower() == "host" for n, _ in headers):
        headers.insert(0, ("Host", request.authority))
    # Only websocket is offered, whatever else the guest listed (h2c...): the
    # server must not pick a protocol the relay would pass on unseen.
    headers += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    target = request.path + (f"?{request.query}" if request.query else "")
    return h11.Request(
        method=request.method.encode("ascii"),
        target=target.encode("latin-1"),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
    )


def open_websocket(
    request: HttpRequest,
    addr: str,
    port: int,
    *,
    timeout: float,
    tls: bool = False,
    ca_file: str | os.PathLike[str] | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> tuple[HttpResponse, Upgraded | None]:
    """Send the handshake ``request`` to ``addr:port``; the response, and the connection if 101.

    With ``tls`` (``wss://``) the connection is TLS, verified as HTTPS
    requests are (:meth:`~.upstream.Deadline.start_tls`: system CAs plus
    ``ca_file``, for ``request.host``), and the :class:`Upgraded` socket is
    that TLS socket. Any other answer (a 4xx, a redirect) is read whole and
    returned with ``None``; the connection is closed. The handshake is
    bounded by ``timeout``. Raises :class:`UpstreamError` for any failure.
    """
    deadline = Deadline(
        timeout, addr=addr, port=port, server_hostname=request.host if tls else None
    )
    try:
        head = _handshake_head(request)
    except (UnicodeEncodeError, h11.LocalProtocolError) as exc:
        raise deadline.fail(f"cannot encode the WebSocket handshake: {exc!r}") from exc
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
    sock = deadline.connect()
    if tls:
        sock = deadline.start_tls(sock, ca_file)
    keep = False
    try:
        sock.sendall((conn.send(head) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                sock.settimeout(deadline.remaining())
                conn.receive_data(sock.recv(_RECV_SIZE))
                continue
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                switched_to = [v for n, v in event.headers if n == b"upgrade"]
                if [v.strip().lower() for v in switched_to] != [b"websocket"]:
                    raise deadline.fail(
                        "the server switched to "
                        f"{b', '.join(switched_to).decode('latin-1')[:100]!r}, "
                        "not websocket (only WebSocket sessions are relayed)"
                    )
                early, _closed = conn.trailing_data
                response = HttpResponse(
                    status=101,
                    headers=tuple(
                        (n.decode("latin-1"), v.decode("latin-1"))
                        for n, v in event.headers.raw_items()
                    ),
                    body=b"",
                    reason=event.reason.decode("latin-1"),
                )
                keep = True
                log.debug("upstream %s:%s switched to WebSocket (tls=%s)", addr, port, tls)
                return response, Upgraded(sock, bytes(early), f"{addr}:{port}")
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends
            if isinstance(event, h11.Response):
                # Declined: read the rest of the answer as an ordinary response.
                return read_response(conn, sock, deadline, max_body_bytes, head=event), None
            raise deadline.fail("connection closed before the handshake's answer")
    except (OSError, h11.ProtocolError) as exc:  # ssl.SSLError is an OSError
        raise deadline.fail(f"WebSocket handshake failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if not keep:
            sock.close()
