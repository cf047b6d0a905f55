"""Sans-IO HTTP/2 interception: the server side of one guest HTTP/2 connection.

A guest client that offers ``h2`` in ALPN on an intercepted TLS connection
(:mod:`.mitm` selects it) speaks HTTP/2 (RFC 9113) to an
:class:`H2Interceptor` instead of an :class:`~.interceptor.HttpInterceptor`.
Both give the same values to the rest of the pipeline: each complete
stream comes out as a :class:`~.interceptor.RequestReceived` (an
:class:`~.messages.HttpRequest` with ``http_version == "2"``), mediated
like any HTTP/1.1 request (:mod:`.mediation`), and is answered with
:meth:`H2Interceptor.respond`, naming the request it answers: streams are
answered in any order, concurrently. Refusals the interceptor makes on its
own come out as :class:`~.interceptor.RequestRefused` with the response
already queued on that stream, with the statuses and rules of the HTTP/1.1
interceptor (400 ``http-protocol``, 405 ``connect``, 413/503 ``limits``,
421 ``misdirected``).

The h2 library (python-hyper) validates frames, HPACK and header blocks;
this module bounds what a guest can make the host hold:

* ``SETTINGS_MAX_CONCURRENT_STREAMS`` (:data:`MAX_CONCURRENT_STREAMS`), and
  the same bound on streams still owed a response (a stream the guest
  reset keeps its slot until its upstream answer is dropped), so resetting
  streams ("rapid reset") cannot queue unbounded upstream work: a stream
  past it is refused with ``REFUSED_STREAM`` (RFC 9113 §8.7, safe to retry);
* ``SETTINGS_MAX_HEADER_LIST_SIZE`` and the HPACK decoder's limit
  (:data:`~.messages.MAX_HEADER_BYTES`), frames of at most 16 KiB (the
  default ``SETTINGS_MAX_FRAME_SIZE``), CONTINUATION chains bounded by h2;
* request bodies: ``max_body_bytes`` per stream (413) and the guest's shared
  :class:`~.interceptor.BodyBudget` across streams and flows (503); the
  receive window is reopened as bytes are buffered, within those bounds;
* decoded header blocks count against that same budget (their RFC 7541 §4.1
  size), from the head until the stream is answered, refused or its flow
  closed -- a reset stream still owed an answer keeps its share, as its
  request is still held: with HPACK, a few bytes on the wire can decode to
  a 64 KiB block, so 100 streams of a connection could otherwise make the
  host hold ~6 MiB for ~6 KiB sent, on every flow;
* responses are framed lazily (:meth:`H2Interceptor.produce`), only as the
  guest's flow-control windows and the caller's output room allow; the
  bodies waiting so are bounded per connection (:data:`MAX_PENDING_BYTES`):
  an answer that would pass it is replaced by a 502, so a guest that opens
  100 streams and never reads holds the host to that, not 100 answers.

Any protocol error (a malformed frame, a HPACK bomb, a flow-control
violation) costs the connection: a ``GOAWAY`` goes out, the flow closes and
one "denied" record says why. Nothing a guest sends raises out of
:meth:`H2Interceptor.receive_data`. Request trailers are read and dropped;
response trailers (:attr:`~.messages.HttpResponse.trailers`) are sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.guest_requests import (
    BodyBudget,
    HttpEvent,
    RequestReceived,
    RequestRefused,
)
from pytest_gondolin.netpolicy.http.h2_requests import (
    StreamRefused,
    refusal_record,
    response_blocks,
    stream_request,
)
from pytest_gondolin.netpolicy.http.h2_streams import H2Stream, head_bytes, server_connection
from pytest_gondolin.netpolicy.http.messages import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HttpRequest,
    HttpResponse,
)
from pytest_gondolin.netpolicy.http.recorder import DEFAULT_BODY_LIMIT, Exchange
from pytest_gondolin.netpolicy.http.rules import normalize_host

__all__ = ["H2_PROTOCOL_RULE", "MAX_CONCURRENT_STREAMS", "MAX_PENDING_BYTES", "H2Interceptor"]

log = logging.getLogger(__name__)

#: Streams open at once, and streams owed a response at once, per connection.
#: 100 is RFC 9113 §6.5.2's recommended minimum: browsers and curl never need more.
MAX_CONCURRENT_STREAMS: Final = 100
#: Response body bytes a connection may hold waiting for the guest's windows:
#: two answers of the largest size (``MAX_BODY_BYTES``), where HTTP/1.1 holds
#: one per flow. Without it, 100 streams of a guest that never reads could
#: each hold a 64 MiB answer.
MAX_PENDING_BYTES: Final = 2 * MAX_BODY_BYTES
#: The rule of a connection-level protocol error, as the HTTP/1.1 interceptor names it.
H2_PROTOCOL_RULE: Final = "http-protocol"
_MAX_REASON: Final = 300


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("latin-1")


class H2Interceptor:
    """The state of one guest HTTP/2 connection (sans-IO; see the module docstring).

    ``authority`` is the TLS server name (the only ``:authority`` host
    accepted), ``port`` the flow's destination port; ``budget`` is shared
    by the flows of one guest. Never raises on guest input.
    """

    def __init__(
        self,
        *,
        authority: str,
        port: int,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_streams: int = MAX_CONCURRENT_STREAMS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        budget: BodyBudget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            self._authority = normalize_host(authority)
        except NetworkPolicyError:
            self._authority = authority
        self._port = port
        self._max_body = max_body_bytes
        self._max_streams = max_streams
        self._max_pending = max_pending_bytes
        self._budget = BodyBudget(max_body_bytes) if budget is None else budget
        self._clock = clock
        self._conn = server_connection(max_streams=max_streams, max_header_bytes=max_header_bytes)
        self._streams: dict[int, H2Stream] = {}
        self._sending: list[H2Stream] = []  # streams with response bytes to frame, in order
        self._out = bytearray(self._conn.data_to_send())
        self._closed = False
        self._guest_done = False  # GOAWAY or EOF from the guest: no new streams

    # ------------------------------------------------------------------ properties

    @property
    def closed(self) -> bool:
        """True once the connection is finished: flush :meth:`data_to_send`, then close."""
        return self._closed

    @property
    def wants_data(self) -> bool:
        """Whether guest bytes are read (streams are multiplexed: always, until closed)."""
        return not self._closed

    @property
    def switched(self) -> bool:
        """Never: HTTP/2 upgrades nothing (RFC 8441 extended CONNECT is not offered)."""
        return False

    @property
    def awaiting(self) -> int:
        """How many streams are owed a response."""
        return sum(1 for s in self._streams.values() if s.request is not None)

    @property
    def pending_bytes(self) -> int:
        """Response body bytes not framed yet (waiting for flow control or output room)."""
        return sum(len(s.out) for s in self._sending if s.out is not None)

    def data_to_send(self) -> bytearray:
        """Bytes for the guest since the last call (the caller's to keep)."""
        out, self._out = self._out, bytearray()
        return out

    def close(self) -> None:
        """The flow is gone: give back the body budget the streams hold. Idempotent."""
        for stream in self._streams.values():
            self._release(stream)
        self._streams.clear()
        self._sending.clear()
        self._closed = True

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[HttpEvent]:
        """Feed bytes from the guest (``b""``: it closed its side); returns the events."""
        if self._closed:
            return []
        if not data:
            self._guest_done = True
            self._finish_if_done()
            return []
        try:
            h2_events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            return [self._connection_error(exc)]
        events: list[HttpEvent] = []
        for event in h2_events:
            try:
                self._on_event(event, events)
            except h2.exceptions.ProtocolError as exc:  # our answer broke a rule h2 enforces
                events.append(self._connection_error(exc))
                break
            if self._closed:
                break
        self._flush()
        self._finish_if_done()
        return events

    def _on_event(self, event: h2.events.Event, events: list[HttpEvent]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_headers(event, events)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event, events)
        elif isinstance(event, h2.events.StreamEnded):
            self._on_end(event, events)
        elif isinstance(event, h2.events.StreamReset):
            stream_id = event.stream_id or 0
            self._sending = [s for s in self._sending if s.id != stream_id]
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._drop(stream)
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 sends nothing after a GOAWAY it received: answers still owed are dropped.
            log.debug("guest sent GOAWAY (%s)", event.error_code)
            self.close()
        # Trailers from the guest, PINGs, SETTINGS, PRIORITY, WINDOW_UPDATE:
        # h2 has acknowledged what needs it; _flush() sends what windows allow.

    def _on_headers(self, event: h2.events.RequestReceived, events: list[HttpEvent]) -> None:
        stream_id = event.stream_id or 0
        headers = [(_text(n), _text(v)) for n, v in event.headers or ()]
        stream = H2Stream(stream_id, self._clock(), headers)
        if self._guest_done or self.awaiting >= self._max_streams:
            # Streams still owed an answer (reset ones too) bound the upstream work.
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self._streams[stream_id] = stream
        stream.head = head_bytes(headers)
        try:
            self._hold(stream, 0)  # the decoded head is held from now on
            request = self._request(stream)  # validate early: refuse before the body
            length = request.header("content-length")
            if length is not None and length.isdigit():
                if int(length) > self._max_body:
                    raise StreamRefused(
                        413, f"request body of {length} bytes exceeds {self._max_body}", "limits"
                    )
                self._hold(stream, int(length))
        except StreamRefused as refusal:
            events.append(self._refuse(stream, refusal))
            return
        expect = (request.header("expect") or "").lower()
        if expect == "100-continue" and not event.stream_ended:
            # RFC 9110 §10.1.1: the body is welcome (its limits were checked above).
            self._conn.send_headers(stream_id, [(b":status", b"100")])

    def _on_data(self, event: h2.events.DataReceived, events: list[HttpEvent]) -> None:
        stream_id = event.stream_id or 0
        data = event.data or b""
        # Reopen the windows for what arrived: the limits below bound what is kept.
        if event.flow_controlled_length:
            self._conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        stream = self._streams.get(stream_id)
        if stream is None or stream.request is not None:
            return  # refused or reset already: discard
        size = len(stream.body) + len(data)
        try:
            if size > self._max_body:
                raise StreamRefused(413, f"request body exceeds {self._max_body} bytes", "limits")
            self._hold(stream, size)
        except StreamRefused as refusal:
            events.append(self._refuse(stream, refusal))
            return
        stream.body += data

    def _on_end(self, event: h2.events.StreamEnded, events: list[HttpEvent]) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is None or stream.request is not None:
            return
        stream.guest_ended = True
        try:
            request = self._request(stream)
        except StreamRefused as refusal:  # pragma: no cover - checked at the head already
            events.append(self._refuse(stream, refusal))
            return
        stream.request = request
        stream.body = bytearray()
        log.debug("guest h2 stream %d: %s %s", stream.id, request.method, request.url)
        events.append(RequestReceived(request=request, started=stream.started))

    def _request(self, stream: H2Stream) -> HttpRequest:
        return stream_request(
            stream.headers, bytes(stream.body), authority=self._authority, port=self._port
        )

    def _hold(self, stream: H2Stream, body: int) -> None:
        """Count ``stream``'s head and ``body`` bytes as held; 503 past the shared budget."""
        more = stream.head + body - stream.taken
        if more <= 0:
            return
        if not self._budget.take(more):
            raise StreamRefused(
                503,
                f"the host already holds {self._budget.held} bytes of this guest's request "
                f"heads and bodies; {more} more would pass the limit of {self._budget.limit} "
                "(DriverLimits.max_request_body_bytes)",
                "limits",
            )
        stream.taken += more

    def _release(self, stream: H2Stream) -> None:
        self._budget.give(stream.taken)
        stream.taken = 0

    def _drop(self, stream: H2Stream) -> None:
        """The guest reset ``stream``: free its body; a request owed an answer keeps its slot.

        That request is still held (mediated, or waiting for its upstream), so it
        keeps its share of the budget until :meth:`respond` drops it.
        """
        stream.body = bytearray()
        if stream.request is None:
            self._release(stream)
            self._streams.pop(stream.id, None)
        else:
            stream.reset = True

    # ------------------------------------------------------------------ output

    def respond(self, request: HttpRequest, response: HttpResponse) -> list[HttpEvent]:
        """Answer the stream that carried ``request`` (the very object it produced).

        A request the guest reset, or one of a closed connection, is
        dropped quietly. Raises :class:`NetworkPolicyError` when the
        response cannot be sent in HTTP/2 (a 1xx status, a header h2
        refuses) or its body would pass the bytes waiting for the guest's
        windows (``max_pending_bytes``); the stream stays owed, so the caller
        can answer a 502.
        """
        stream = next((s for s in self._streams.values() if s.request is request), None)
        if stream is None or self._closed:
            return []
        if stream.reset:
            self._release(stream)
            del self._streams[stream.id]
            self._finish_if_done()
            return []
        if not 200 <= response.status <= 599:
            raise NetworkPolicyError(f"cannot send status {response.status!r} as a final response")
        waiting = self.pending_bytes
        if waiting + len(response.body) > self._max_pending:
            raise NetworkPolicyError(
                f"a {len(response.body)}-byte answer would pass the {self._max_pending} bytes "
                f"a connection may hold for the guest ({waiting} are waiting for its "
                "flow-control windows)"
            )
        try:
            self._send_response(stream, request.method, response)
        except (h2.exceptions.ProtocolError, ValueError, UnicodeEncodeError) as exc:
            raise NetworkPolicyError(f"cannot frame the response: {exc}") from exc
        self._release(stream)
        stream.request = None
        del self._streams[stream.id]
        log.debug("h2 stream %d: responded %d to %s", stream.id, response.status, request.url)
        self._flush()
        self._finish_if_done()
        return []

    def _send_response(self, stream: H2Stream, method: str, response: HttpResponse) -> None:
        block, body, trailers = response_blocks(method, response)
        end = not body and not trailers
        self._conn.send_headers(stream.id, block, end_stream=end)
        if end:
            self._after_end(stream)
            return
        stream.out = memoryview(body)
        stream.trailers = trailers
        self._sending.append(stream)

    def produce(self, limit: int) -> None:
        """Frame up to about ``limit`` more response bytes, as the guest's windows allow."""
        if self._closed:
            return
        try:
            self._frame_bodies(limit)
        except h2.exceptions.ProtocolError as exc:  # pragma: no cover - h2 and we disagree
            log.debug("cannot frame response data: %s", exc)
            self._conn.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR)
            self._closed = True
        self._out += self._conn.data_to_send()
        self._finish_if_done()

    def _frame_bodies(self, limit: int) -> None:
        budget = limit
        progress = True
        while self._sending and budget > 0 and progress:
            progress = False
            for stream in list(self._sending):  # round robin: one frame each per pass
                out = stream.out
                assert out is not None
                window = self._conn.local_flow_control_window(stream.id)
                size = min(len(out), window, self._conn.max_outbound_frame_size, budget)
                if size > 0:
                    self._conn.send_data(stream.id, bytes(out[:size]))
                    stream.out = out = out[size:]
                    budget -= size
                    progress = True
                if not len(out):
                    self._sending.remove(stream)
                    if stream.trailers:
                        self._conn.send_headers(stream.id, stream.trailers, end_stream=True)
                    else:
                        self._conn.end_stream(stream.id)
                    self._after_end(stream)
                if budget <= 0:
                    break

    def _after_end(self, stream: H2Stream) -> None:
        """Our side of ``stream`` ended: stop a request still coming (RFC 9113 §8.1)."""
        if stream.guest_ended:
            return
        state = self._conn.streams.get(stream.id)
        if state is not None and not state.closed:
            self._conn.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)

    def _flush(self) -> None:
        self._out += self._conn.data_to_send()

    def _finish_if_done(self) -> None:
        """After the guest's GOAWAY or EOF, close once no stream is owed or sending."""
        if self._guest_done and not self._closed and not self._streams and not self._sending:
            self._conn.close_connection()
            self._flush()
            self._closed = True

    # ------------------------------------------------------------------ refusals

    def _refuse(self, stream: H2Stream, refusal: StreamRefused) -> RequestRefused:
        """Answer ``stream`` with an error response and describe the refusal."""
        record = refusal_record(
            stream.headers,
            bytes(memoryview(stream.body)[:DEFAULT_BODY_LIMIT]),
            refusal,
            authority=self._authority,
            port=self._port,
            started=stream.started,
            now=self._clock(),
        )
        self._release(stream)
        stream.body = bytearray()
        stream.request = None
        self._streams.pop(stream.id, None)
        headers, stream.headers = stream.headers, []  # the record keeps its own copy
        # A complete response, then RST_STREAM(NO_ERROR) if the request is
        # still coming (_after_end), so its body stops.
        method = next((v for n, v in headers if n == ":method"), "GET")
        response = HttpResponse(record.status or 400, record.response_headers, record.response_body)
        self._send_response(stream, method, response)
        log.debug("refused h2 stream %d (%s): %s", stream.id, refusal.rule, refusal.reason)
        return RequestRefused(record)

    def _connection_error(self, exc: h2.exceptions.ProtocolError) -> RequestRefused:
        """GOAWAY for a protocol error; the whole connection goes, with one record."""
        code = getattr(exc, "error_code", None) or h2.errors.ErrorCodes.PROTOCOL_ERROR
        reason = f"HTTP/2 protocol error from the guest: {type(exc).__name__}: {exc}"[:_MAX_REASON]
        log.debug("%s; sending GOAWAY", reason)
        try:
            self._conn.close_connection(code)
        except h2.exceptions.ProtocolError:  # pragma: no cover - already closed
            pass
        self._flush()
        for stream in self._streams.values():
            self._release(stream)
        self._streams.clear()
        self._sending.clear()
        self._closed = True
        record = Exchange.connection_denied(
            self._authority,
            self._port,
            f"{reason} [rule: {H2_PROTOCOL_RULE}]",
            scheme="https",
            started=self._clock(),
        )
        return RequestRefused(record)
