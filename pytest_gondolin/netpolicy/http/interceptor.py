"""Sans-IO HTTP interception: parse a guest flow's requests, frame the responses.

Nothing here touches a socket or a clock it was not given; the network
driver feeds bytes in and writes the bytes out. What the flow speaks was
decided before (:mod:`.sniff`); the values passed in and out are in
:mod:`.messages`.

:class:`HttpInterceptor`
    One per guest flow (the TCP stream for plain HTTP, or the decrypted
    stream after the driver terminated TLS with
    :meth:`~.ca.CertificateAuthority.ssl_context_for`). It runs h11 in the
    server role and emits :class:`RequestReceived` for each complete
    request (head and body, bounded by :data:`~.messages.MAX_HEADER_BYTES`
    and :data:`~.messages.MAX_BODY_BYTES`). The driver decides (stub,
    policy, secrets, upstream) and calls :meth:`HttpInterceptor.respond`
    with the response; the interceptor frames it and resumes with the next
    request on the same connection (keep-alive, pipelining). Requests the
    interceptor refuses on its own come out as :class:`RequestRefused`
    carrying a ready "denied" :class:`~.recorder.Exchange`, with the error
    response already queued:

    ============================================  ======  =================
    what                                          status  rule
    ============================================  ======  =================
    malformed HTTP (h11 ``RemoteProtocolError``)  400     ``http-protocol``
    Content-Length *and* Transfer-Encoding        400     ``smuggling``
    (RFC 9112 §6.1: a request-smuggling vector)
    missing, repeated or invalid Host             400     ``host-header``
    unsupported transfer coding                   501     ``http-protocol``
    head larger than ``max_header_bytes``         431     ``limits``
    body larger than ``max_body_bytes``           413     ``limits``
    bodies held across flows past the budget      503     ``limits``
    (:class:`BodyBudget`, shared by the flows
    of one guest)
    ``CONNECT`` (no tunnels, RFC 9110 §9.3.6)     405     ``connect``
    destination mismatch (:mod:`.destination`)    421     ``misdirected``
    ============================================  ======  =================

The destination rule (Host header, absolute-form target, port, SNI) is
:mod:`.destination`'s; the events and the shared body budget are
:mod:`.guest_requests`'s (re-exported here).

Intended driver loop, per flow::

    kind = classify(buf)                      # until it is not "need_more"
    # "tls": hello = sniff(buf).client_hello; name = hello.server_name or dst_ip
    #        terminate TLS with ca.ssl_context_for(name) (denials are then
    #        visible to the guest as a 403 naming the rule)
    # "other": recorder.record(Exchange.connection_denied(...)); close
    icpt = HttpInterceptor(scheme, authority=name_or_dst_ip, port=dst_port)
    for event in icpt.receive_data(plaintext):
        RequestReceived -> stub? policy.decide? secrets.apply? fetch_upstream?
                           icpt.respond(response) (returns further events)
        RequestRefused  -> recorder.record(event.exchange)
    send(icpt.data_to_send()); close once icpt.closed
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final, Literal

import h11

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.destination import host_header, resolve_destination
from pytest_gondolin.netpolicy.http.guest_requests import (
    BodyBudget,
    HttpEvent,
    Refusal,
    RequestReceived,
    RequestRefused,
)
from pytest_gondolin.netpolicy.http.messages import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HttpRequest,
    HttpResponse,
    denial_response,
    strip_hop_by_hop,
)
from pytest_gondolin.netpolicy.http.recorder import DEFAULT_BODY_LIMIT, Exchange, Headers
from pytest_gondolin.netpolicy.http.rules import DEFAULT_PORTS, format_authority, normalize_host
from pytest_gondolin.netpolicy.http.websocket import is_websocket

__all__ = [
    "BodyBudget",
    "HttpEvent",
    "HttpInterceptor",
    "RequestReceived",
    "RequestRefused",
]

log = logging.getLogger(__name__)

# Refusal reasons go into records and the guest's error page: keep them short.
_MAX_REASON: Final = 300


def _decode(value: bytes) -> str:
    return value.decode("latin-1")


class HttpInterceptor:
    """The state of one guest HTTP flow (sans-IO; see the module docstring).

    ``scheme`` is ``"http"`` or ``"https"``; ``authority`` is the flow's
    destination as the driver knows it (the SNI for TLS, or the destination
    address) and, for TLS, the only Host name accepted; ``port`` is the TCP
    destination port (``None``: unknown, not checked). ``budget``, shared
    by the flows of one guest, bounds the request bodies they hold together
    (default: one of its own, as large as ``max_body_bytes``).

    Never raises on guest input: every malformed, oversize or forbidden
    request becomes a :class:`RequestRefused` plus an error response.
    """

    def __init__(
        self,
        scheme: Literal["http", "https"],
        *,
        authority: str,
        port: int | None,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        budget: BodyBudget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if scheme not in DEFAULT_PORTS:
            raise NetworkPolicyError(f"unsupported scheme {scheme!r}")
        self.scheme: Literal["http", "https"] = scheme
        try:
            self._authority = normalize_host(authority)
        except NetworkPolicyError:
            self._authority = authority
        self._port = port
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._budget = BodyBudget(max_body_bytes) if budget is None else budget
        self._taken = 0  # bytes of self._budget this flow holds
        self._clock = clock
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._out = bytearray()
        self._head: h11.Request | None = None
        self._body = bytearray()
        self._started = 0.0
        self._pending: HttpRequest | None = None
        self._pending_bytes = 0  # received while a response is owed
        self._closed = False
        self._switched = False  # a 101 went out: the flow speaks WebSocket now

    # ------------------------------------------------------------------ properties

    @property
    def closed(self) -> bool:
        """True once the flow is finished: flush :meth:`data_to_send`, then close it."""
        return self._closed

    @property
    def awaiting_response(self) -> HttpRequest | None:
        """The request the driver still has to :meth:`respond` to, if any."""
        return self._pending

    @property
    def wants_data(self) -> bool:
        """False while a response is owed, the flow is closed or switched (apply backpressure)."""
        return self._pending is None and not self._closed and not self._switched

    @property
    def switched(self) -> bool:
        """A ``101 Switching Protocols`` went out: what follows is not HTTP (see :meth:`respond`)."""
        return self._switched

    def switched_input(self) -> bytes:
        """Guest bytes read past the upgrade request (the first WebSocket frames). Once."""
        data, _closed = self._conn.trailing_data
        self._conn = h11.Connection(h11.SERVER)  # the old one still holds them: drop it
        return bytes(data)

    def data_to_send(self) -> bytearray:
        """Bytes to write to the guest since the last call (the caller's to keep: no copy)."""
        out, self._out = self._out, bytearray()
        return out

    def close(self) -> None:
        """The flow is gone: give back what it held of the shared :class:`BodyBudget`. Idempotent."""
        self._release()
        self._closed = True
        self._pending = None
        self._body = bytearray()

    def _release(self) -> None:
        self._budget.give(self._taken)
        self._taken = 0

    def _hold(self, total: int) -> None:
        """Hold ``total`` body bytes for the current request, or refuse it (503)."""
        more = total - self._taken
        if more <= 0:
            return
        if not self._budget.take(more):
            raise Refusal(
                503,
                f"the host already holds {self._budget.held} bytes of this guest's request "
                f"bodies; {more} more would pass the limit of {self._budget.limit} "
                "(DriverLimits.max_request_body_bytes)",
                "limits",
            )
        self._taken += more

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[HttpEvent]:
        """Feed bytes from the guest (``b""`` means the guest closed its side)."""
        if self._closed:
            return []
        if data and self._pending is not None:
            self._pending_bytes += len(data)
            if self._pending_bytes > self._max_header + self._max_body:
                return [
                    self._refuse(
                        400, "too much pipelined data while a response is pending", "limits"
                    )
                ]
        try:
            self._conn.receive_data(bytes(data))
        except RuntimeError:  # data after EOF: h11's own usage error
            return []
        return self._pump()

    def _pump(self) -> list[HttpEvent]:
        events: list[HttpEvent] = []
        while not self._closed and self._pending is None:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                rule = "limits" if status == 431 else "http-protocol"
                events.append(self._refuse(status, f"malformed HTTP request: {exc}", rule))
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            try:
                if isinstance(event, h11.Request):
                    self._on_head(event)
                elif isinstance(event, h11.Data):
                    # Checked before the bytes are kept: at most one read past a limit.
                    size = len(self._body) + len(event.data)
                    if size > self._max_body:
                        raise Refusal(413, f"request body exceeds {self._max_body} bytes", "limits")
                    self._hold(size)
                    self._body += event.data  # bytearray: amortised, never quadratic
                elif isinstance(event, h11.EndOfMessage):
                    events.append(self._on_complete())
                elif isinstance(event, h11.ConnectionClosed):
                    self._closed = True  # only seen between requests: h11 raises mid-request
                    break
            except Refusal as refusal:
                events.append(self._refuse(refusal.status, refusal.reason, refusal.rule))
                break
        return events

    def _on_head(self, head: h11.Request) -> None:
        self._head = head
        self._body = bytearray()
        self._started = self._clock()
        method = _decode(head.method)
        names = [_decode(n) for n, _ in head.headers]
        log.debug("guest %s request: %s %r", self.scheme, method, head.target[:200])
        if method == "CONNECT":
            raise Refusal(
                405,
                "CONNECT tunnels are not allowed (the host is the only network peer)",
                "connect",
            )
        if "transfer-encoding" in names and "content-length" in names:
            raise Refusal(
                400, "both Content-Length and Transfer-Encoding (request smuggling)", "smuggling"
            )
        self._resolve_destination(head)  # validate early: refuse before the body arrives
        length = [v for n, v in head.headers if n == b"content-length"]
        if length and int(length[0]) > self._max_body:
            raise Refusal(
                413, f"request body of {int(length[0])} bytes exceeds {self._max_body}", "limits"
            )
        if length:
            self._hold(int(length[0]))  # refuse before the body arrives
        if self._conn.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))

    def _resolve_destination(self, head: h11.Request) -> tuple[str, int, str, str]:
        return resolve_destination(
            head, scheme=self.scheme, authority=self._authority, flow_port=self._port
        )

    def _on_complete(self) -> HttpEvent:
        head = self._head
        if head is None:  # h11 never yields EndOfMessage without a Request
            raise Refusal(400, "request body without a request", "http-protocol")
        host, port, path, query = self._resolve_destination(head)
        request = HttpRequest(
            method=_decode(head.method),
            target=_decode(head.target),
            scheme=self.scheme,
            host=host,
            port=port,
            path=path,
            query=query,
            headers=tuple((_decode(n), _decode(v)) for n, v in head.headers.raw_items()),
            body=bytes(self._body),
            http_version=_decode(head.http_version),
        )
        self._pending = request
        self._body = bytearray()
        return RequestReceived(request=request, started=self._started)

    # ------------------------------------------------------------------ output

    def respond(self, response: HttpResponse) -> list[HttpEvent]:
        """Send ``response`` for the pending request; returns events for pipelined requests.

        Hop-by-hop and framing headers of ``response`` are replaced by our
        own (``Content-Length``). Raises :class:`NetworkPolicyError` if no
        request is pending or the response cannot be framed (bad status,
        header text); the pending request stays pending then, so the
        driver can answer with a :func:`denial_response` instead.
        """
        request = self._pending
        if request is None:
            raise NetworkPolicyError("respond() without a pending request")
        if response.status == 101 and is_websocket(request.headers):
            return self._switch(request, response)
        if not isinstance(response.status, int) or not 200 <= response.status <= 599:
            raise NetworkPolicyError(f"cannot send status {response.status!r} as a final response")
        try:
            head, body = self._frame(request.method, response, close=False)
        except (UnicodeEncodeError, h11.LocalProtocolError) as exc:
            raise NetworkPolicyError(f"cannot frame the response: {exc}") from exc
        self._pending = None
        self._pending_bytes = 0
        self._head = None
        self._release()
        self._send_message(head, body)
        log.debug("responded %d to %s %s", response.status, request.method, request.url)
        return self._next_cycle()

    def _switch(self, request: HttpRequest, response: HttpResponse) -> list[HttpEvent]:
        """Send the 101 (RFC 9110 §15.2.2): the flow is WebSocket from here on."""
        headers = strip_hop_by_hop(response.headers)
        upgrade = response.header("upgrade") or "websocket"
        headers += [("Upgrade", upgrade), ("Connection", "Upgrade")]
        try:
            raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
            self._send(h11.InformationalResponse(status_code=101, headers=raw))
        except (UnicodeEncodeError, h11.LocalProtocolError) as exc:
            raise NetworkPolicyError(f"cannot frame the 101 response: {exc}") from exc
        self._pending = None
        self._head = None
        self._release()
        self._switched = True
        log.debug("switched to WebSocket: %s", request.url)
        return []

    def _frame(
        self, method: str, response: HttpResponse, *, close: bool
    ) -> tuple[h11.Response, bytes]:
        headers = strip_hop_by_hop(response.headers)
        body = response.body
        no_body = method == "HEAD" or response.status in (204, 304)
        if no_body:
            # RFC 9110 §8.6: HEAD/304 may state the length the body would have.
            length = response.header("content-length")
            if length is not None and response.status != 204 and length.strip().isdigit():
                headers.append(("Content-Length", length.strip()))
            body = b""
        else:
            headers.append(("Content-Length", str(len(body))))
        if close:
            headers.append(("Connection", "close"))
        raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        reason = response.reason.encode("latin-1") if response.reason else b""
        head = h11.Response(status_code=response.status, headers=raw, reason=reason)
        return head, body

    def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            self._out += data

    def _send_message(self, head: h11.Response, body: bytes) -> None:
        try:
            self._send(head)
            if body:
                self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:  # our state machine disagrees: give up on the flow
            log.debug("cannot send response: %s", exc)
            self._conn.send_failed()
            self._closed = True

    def _next_cycle(self) -> list[HttpEvent]:
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
            return self._pump()
        # Connection: close, HTTP/1.0 without keep-alive, or a failed send.
        self._closed = True
        return []

    def _refuse(self, status: int, reason: str, rule: str) -> RequestRefused:
        """Queue an error response, close the flow and describe the refusal."""
        if len(reason) > _MAX_REASON:  # h11 messages may quote guest bytes
            reason = reason[: _MAX_REASON - 3] + "..."
        head = self._head
        method = _decode(head.method) if head is not None else ""
        host, port, path, query, url = (
            self._authority,
            self._port or DEFAULT_PORTS[self.scheme],
            "",
            "",
            "",
        )
        headers: Headers = ()
        if head is not None:
            headers = tuple((_decode(n), _decode(v)) for n, v in head.headers.raw_items())
            try:
                host, port, path, query = self._resolve_destination(head)
            except Refusal:
                path, _, query = _decode(head.target).partition("?")
                with contextlib.suppress(Refusal):
                    host, port = host_header(head, self.scheme)
            else:
                query_part = f"?{query}" if query else ""
                shown_port = None if port == DEFAULT_PORTS[self.scheme] else port
                url = f"{self.scheme}://{format_authority(host, shown_port)}{path}{query_part}"
        response = denial_response(reason, rule, status)
        if self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                framed, body = self._frame(method or "GET", response, close=True)
            except (UnicodeEncodeError, h11.LocalProtocolError):  # pragma: no cover - our own text
                framed, body = h11.Response(status_code=status, headers=[]), b""
            self._send_message(framed, body)
        log.debug("refused guest request (%s): %s", rule, reason)
        self._pending = None
        self._head = None
        self._closed = True
        self._release()
        # One copy, at most what the recorder would keep of it.
        body_kept = bytes(memoryview(self._body)[:DEFAULT_BODY_LIMIT])
        self._body = bytearray()
        now = self._clock()
        return RequestRefused(
            Exchange(
                method=method,
                url=url,
                scheme=self.scheme,
                host=host,
                port=port,
                path=path,
                query=query,
                request_headers=headers,
                request_body=body_kept,
                status=status,
                response_headers=response.headers,
                response_body=response.body,
                decision="denied",
                reason=f"{reason} [rule: {rule}]",
                started=self._started if head is not None else now,
                duration=max(0.0, now - self._started) if head is not None else 0.0,
                http_version=_decode(head.http_version) if head is not None else "",
            )
        )
