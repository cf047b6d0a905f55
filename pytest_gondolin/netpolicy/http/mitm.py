"""Per-flow mediation: what the network driver does with one guest TCP flow.

:class:`FlowProxy` is the application side of one accepted guest flow,
free of sockets and threads (:mod:`pytest_gondolin.netpolicy.driver` owns
those, and :mod:`pytest_gondolin.netpolicy.relay` holds the proxies).
Guest bytes go in (:meth:`FlowProxy.receive`), bytes for the guest come
out (:meth:`FlowProxy.pending_output` / :meth:`FlowProxy.consume_output`),
complete HTTP requests come out for the driver to mediate
(:meth:`FlowProxy.take_requests`, then :mod:`.mediation`) and records of
refusals come out for the recorder (:meth:`FlowProxy.take_records`).

The first bytes decide what the flow is (:func:`~.sniff.sniff`, at most
:data:`~.sniff.SNIFF_LIMIT` bytes, within :data:`SNIFF_TIMEOUT`):

* an HTTP/1.x request line: an :class:`~.interceptor.HttpInterceptor` reads it;
* a TLS ClientHello: TLS is terminated here (``ssl.MemoryBIO`` pairs and
  the CA's leaf for the SNI, or for the destination address when the
  client sent none), so even a denied request gets a readable 403, and an
  interceptor reads the plaintext: an :class:`~.h2_server.H2Interceptor`
  when the client offered ``h2`` in ALPN (each stream a request, answered
  in any order: :meth:`FlowProxy.respond` names the request), else an
  HTTP/1.x one. Plain-text HTTP/2 (h2c, prior knowledge) is not HTTP/1.x
  and is refused like any other protocol;
* anything else: the flow is reset and recorded as a denied connection
  (there is no raw TCP egress at all).

Backpressure: :attr:`FlowProxy.read_limit` is 0 while the interceptor owes
a response (``wants_data`` is false), so the driver stops reading and the
guest's TCP window closes; output is encrypted lazily, only as fast as the
driver can hand it to the stack. An HTTP/2 flow is read while fewer than
:data:`H2_OUTPUT_HIGH` bytes wait for the guest (a PING or SETTINGS flood
from a guest that does not read its answers stops there), and its response
bodies are framed lazily too, within the guest's flow-control windows.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Final

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.ca import CertificateAuthority
from pytest_gondolin.netpolicy.http.h2_server import H2Interceptor
from pytest_gondolin.netpolicy.http.interceptor import (
    BodyBudget,
    HttpInterceptor,
    RequestReceived,
    RequestRefused,
)
from pytest_gondolin.netpolicy.http.mediation import error_response, with_rule
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.mitm_tls import GUEST_READ_CHUNK, Phase, TlsTermination, Verdict
from pytest_gondolin.netpolicy.http.recorder import Exchange
from pytest_gondolin.netpolicy.http.sniff import SNIFF_LIMIT, sniff

__all__ = [
    "GUEST_READ_CHUNK",
    "H2_OUTPUT_HIGH",
    "SNIFF_TIMEOUT",
    "FlowProxy",
    "TlsSession",
    "Verdict",
]

log = logging.getLogger(__name__)

#: How long a new flow may take to show what it is (request line or
#: ClientHello, then the TLS handshake). Real clients send at once; a
#: flow that stays silent this long is a probe or a raw-TCP client waiting
#: for a banner, and it holds a flow slot.
SNIFF_TIMEOUT: Final = 30.0
#: Plaintext encrypted per step for a TLS flow (several 16 KiB records).
_TLS_WRITE_CHUNK: Final = 64 * 1024
#: The start of the HTTP/2 client preface (RFC 9113 §3.4): h2c with prior knowledge.
_H2C_PREFACE: Final = b"PRI * HTTP/2.0"
#: What the guest may speak over TLS, preferred first (RFC 7301: the server picks).
_ALPN: Final = ("h2", "http/1.1")
#: Bytes waiting for the guest above which an HTTP/2 flow is not read: one
#: TCP send buffer, as for HTTP/1.1 answers (relay.ANSWER_BACKLOG).
H2_OUTPUT_HIGH: Final = 256 * 1024

#: A guest TLS session handed over with a switched flow: object, incoming and outgoing BIO.
TlsSession = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


# --------------------------------------------------------------------------- the flow


class FlowProxy(TlsTermination):
    """The host's side of one accepted guest TCP flow (see the module docstring).

    Guarantees: never raises on guest bytes; every flow that does not end in
    HTTP exchanges leaves exactly one connection record; :attr:`verdict`
    turns to ``"abort"`` (reset now) or ``"close"`` (FIN once output is
    drained) at most once; output bytes come out in order, exactly once.
    """

    def __init__(
        self,
        *,
        dst_ip: IPv4Address,
        dst_port: int,
        dns_name: str | None,
        ca: CertificateAuthority,
        now: float,
        body_budget: BodyBudget | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.dns_name = dns_name
        self._ca = ca
        self._body_budget = body_budget
        self._clock = clock
        self._phase: Phase = "sniff"
        self._sniff = bytearray()
        self._deadline: float | None = now + SNIFF_TIMEOUT
        self._tls: ssl.SSLObject | None = None
        self._tls_in = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        self._server_name: str | None = None
        self._http: HttpInterceptor | H2Interceptor | None = None
        self._plain_out = bytearray()  # TLS only: plaintext not yet encrypted
        self._wire_out = bytearray()  # bytes ready for the guest
        self._eof = False  # the guest closed its side (no more bytes will come)
        self._eof_pending = False  # plain HTTP: EOF not yet given to the interceptor
        self._tls_closing = False
        self._requests: list[RequestReceived] = []
        self._records: list[Exchange] = []
        self.verdict: Verdict | None = None

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        """The destination as the guest named it: the DNS name, else the address."""
        return self.dns_name or str(self.dst_ip)

    @property
    def kind(self) -> str:
        """``"sniff"`` until classified, then ``"http"`` or ``"https"``; ``"done"`` after a verdict."""
        if self._phase in ("sniff", "done"):
            return self._phase
        return "https" if self._tls is not None else "http"

    @property
    def read_limit(self) -> int:
        """How many guest bytes the proxy takes now; 0 means leave them in TCP (backpressure)."""
        if self.verdict is not None:
            # Closing: keep draining (and discarding) so the guest is never stuck.
            return GUEST_READ_CHUNK if self.verdict == "close" else 0
        if self._eof:
            return 0
        if self._phase == "sniff":
            return SNIFF_LIMIT + 1 - len(self._sniff)
        if self._phase == "handshake":
            return GUEST_READ_CHUNK
        assert self._http is not None
        if isinstance(self._http, H2Interceptor):
            waiting = len(self._wire_out) + len(self._plain_out)
            return GUEST_READ_CHUNK if self._http.wants_data and waiting < H2_OUTPUT_HIGH else 0
        return GUEST_READ_CHUNK if self._http.wants_data else 0

    @property
    def deadline(self) -> float | None:
        """When :meth:`on_timer` must run (the sniff/handshake bound), or ``None``."""
        return self._deadline if self.verdict is None else None

    @property
    def output_bytes(self) -> int:
        """Bytes still to deliver to the guest (plaintext not yet encrypted, HTTP/2 bodies not framed)."""
        framed = len(self._wire_out) + len(self._plain_out)
        if isinstance(self._http, H2Interceptor):
            return framed + self._http.pending_bytes
        return framed

    @property
    def switched(self) -> bool:
        """The flow answered ``101``: hand it over as a stream (:meth:`hand_over`)."""
        return isinstance(self._http, HttpInterceptor) and self._http.switched

    def hand_over(self) -> tuple[bytes, bytes, TlsSession | None]:
        """(bytes for the guest, guest plaintext already read, TLS session) of a :attr:`switched` flow.

        Once. The first are the 101 response (encrypted, for a TLS flow);
        the second the first WebSocket frames the guest sent with its
        request; the third, for a TLS flow (``wss://``), the guest's session
        (object, incoming and outgoing BIO), which the stream carries on
        (:class:`~pytest_gondolin.netpolicy.stream_tls.GuestTls`). The proxy
        is spent after. Raises ``ssl.SSLError`` if the 101 cannot be encrypted.
        """
        assert isinstance(self._http, HttpInterceptor) and self.switched
        session = None
        if self._tls is not None:
            while self._plain_out:
                written = self._tls.write(bytes(memoryview(self._plain_out)[:_TLS_WRITE_CHUNK]))
                del self._plain_out[:written]
            self._drain_tls_out()
            session = (self._tls, self._tls_in, self._tls_out)
        out, self._wire_out = bytes(self._wire_out), bytearray()
        return out, self._http.switched_input(), session

    @property
    def answer_backlog(self) -> int:
        """Answer bytes framed for the guest and not yet taken by the stack.

        What a flow's next request waits on (``relay.ANSWER_BACKLOG``). The
        same as :attr:`output_bytes` for HTTP/1.x; for HTTP/2 it leaves out
        bodies waiting for the guest's flow-control windows, so one stream
        the guest reads slowly does not hold back the others' requests
        (their number is bounded by the stream limits of :mod:`.h2_server`).
        """
        return len(self._wire_out) + len(self._plain_out)

    @property
    def protocol(self) -> str:
        """What the guest speaks once classified: ``"http/1.1"`` or ``"h2"``; ``""`` before."""
        if isinstance(self._http, H2Interceptor):
            return "h2"
        return "" if self._http is None else "http/1.1"

    @property
    def finished(self) -> bool:
        """The flow should be closed (FIN) now: verdict ``close`` and nothing left to send."""
        return self.verdict == "close" and not self._wire_out and not self._plain_out

    # ------------------------------------------------------------------ driver interface

    def take_requests(self) -> list[RequestReceived]:
        """Complete requests to mediate (HTTP/1.x: at most one, answered before the next)."""
        out, self._requests = self._requests, []
        return out

    def take_records(self) -> list[Exchange]:
        """Records the proxy produced on its own (refusals, denied connections)."""
        out, self._records = self._records, []
        return out

    def receive(self, data: bytes) -> None:
        """Feed bytes the guest sent (``b""``: the guest closed its side)."""
        if self.verdict is not None:
            return  # closing or aborted: anything more is discarded
        if not data:
            self._eof = True
        if self._phase == "sniff":
            self._receive_sniff(data)
        elif self._tls is not None:
            if data:
                self._tls_in.write(data)
            else:
                self._tls_in.write_eof()
            self._pump_tls()
        elif data:
            self._feed_http(data)
        else:
            self._deliver_http_eof()

    def on_timer(self, now: float) -> None:
        """Enforce :data:`SNIFF_TIMEOUT` on a flow that never became HTTP."""
        if self._deadline is None or now < self._deadline or self.verdict is not None:
            return
        what = "a request" if self._phase == "sniff" else "a TLS handshake"
        self._deny_connection(
            f"no {what} within {SNIFF_TIMEOUT:.0f} s",
            "sniff-timeout",
            scheme="https" if self._phase == "handshake" else "",
        )

    def respond(self, response: HttpResponse, *, to: HttpRequest | None = None) -> None:
        """Answer a request: HTTP/1.x's pending one, or ``to`` (the request object) on HTTP/2.

        Frames it and resumes reading pipelined requests. A response the
        interceptor cannot frame is replaced by a 502. An HTTP/2 answer
        without ``to``, or to a stream the guest reset, is dropped.
        """
        http = self._http
        if isinstance(http, H2Interceptor):
            if to is not None and self.verdict is None:
                self._respond_h2(http, to, response)
            return
        if http is None or http.awaiting_response is None or self.verdict is not None:
            return
        try:
            events = http.respond(response)
        except NetworkPolicyError as exc:
            log.debug("cannot frame the response (%s); answering 502", exc)
            events = http.respond(error_response(502, str(exc), kind="bad-response"))
        self._collect(events)
        self._after_http()
        if self.verdict is not None or not http.wants_data:
            return
        if self._tls is not None:
            # Pipelined plaintext (or the guest's EOF) may wait inside the TLS layer.
            self._read_tls_plaintext()
        elif self._eof_pending:
            self._eof_pending = False
            self._feed_http(b"")

    def _respond_h2(self, http: H2Interceptor, to: HttpRequest, response: HttpResponse) -> None:
        try:
            events = http.respond(to, response)
        except NetworkPolicyError as exc:
            log.debug("cannot frame the h2 response (%s); answering 502", exc)
            events = http.respond(to, error_response(502, str(exc), kind="bad-response"))
        self._collect(events)
        self._after_http()

    def pending_output(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the next bytes for the guest (not consumed yet)."""
        http = self._http
        if isinstance(http, H2Interceptor) and len(self._plain_out) < max_bytes:
            http.produce(max_bytes - len(self._plain_out))  # frame bodies only as room allows
            self._after_http()
        if self._tls is not None:
            # Encrypt lazily, only what the stack can take soon (bounded ciphertext).
            while self._plain_out and len(self._wire_out) < max_bytes:
                chunk = bytes(memoryview(self._plain_out)[:_TLS_WRITE_CHUNK])
                try:
                    written = self._tls.write(chunk)
                except ssl.SSLError as exc:
                    log.debug("TLS write to the guest failed: %s", exc)
                    self._plain_out.clear()
                    self._set_verdict("abort")
                    break
                del self._plain_out[:written]
                self._drain_tls_out()
            if not self._plain_out:
                self._maybe_close_tls()
        return bytes(memoryview(self._wire_out)[:max_bytes])  # one copy, not two

    def consume_output(self, n: int) -> None:
        """Drop the first ``n`` bytes of output: the stack accepted them."""
        del self._wire_out[:n]

    def close(self) -> None:
        """The flow is gone: free what it holds (its share of the body budget). Idempotent."""
        if self._http is not None:
            self._http.close()
        self._wire_out = bytearray()
        self._plain_out = bytearray()
        self._requests = []

    # ------------------------------------------------------------------ internals

    def _set_verdict(self, verdict: Verdict) -> None:
        if self.verdict is None or verdict == "abort":
            self.verdict = verdict
        self._phase = "done"
        self._deadline = None

    def _deny_connection(self, reason: str, rule: str, *, scheme: str = "") -> None:
        """Record a connection refused before any HTTP request, and reset it."""
        host = self._server_name or self.host
        log.debug("denying flow to %s:%d: %s", host, self.dst_port, reason)
        self._records.append(
            Exchange.connection_denied(
                host,
                self.dst_port,
                with_rule(reason, rule),
                scheme=scheme,
                started=self._clock(),
            )
        )
        self._wire_out.clear()
        self._plain_out.clear()
        self._set_verdict("abort")

    def _receive_sniff(self, data: bytes) -> None:
        self._sniff += data
        result = sniff(bytes(self._sniff))
        if result.kind == "need_more":
            if self._eof:
                if self._sniff:
                    self._deny_connection(
                        "the guest closed the connection before a complete request line or TLS ClientHello",
                        "not-http",
                    )
                else:
                    # Connect-and-close (a port probe): nothing was sent, nothing to mediate.
                    self._deny_connection(
                        "the guest closed the connection without sending anything", "not-http"
                    )
            return
        if result.kind == "other":
            what = result.reason
            if self._sniff.startswith(_H2C_PREFACE):
                what = "plain-text HTTP/2 (h2c); HTTP/2 is mediated over TLS (https://) only"
            self._deny_connection(
                f"only HTTP/1.x and TLS are mediated; this flow is {what}", "not-http"
            )
            return
        first = bytes(self._sniff)
        self._sniff = bytearray()
        if result.kind == "http":
            self._phase = "http"
            self._deadline = None
            self._http = HttpInterceptor(
                "http",
                authority=self.host,
                port=self.dst_port,
                budget=self._body_budget,
                clock=self._clock,
            )
            self._feed_http(first)
            if self._eof:
                self._deliver_http_eof()
            return
        hello = result.client_hello
        assert hello is not None
        name = hello.server_name or str(self.dst_ip)
        self._server_name = name
        try:
            context = self._ca.ssl_context_for(name, alpn=_ALPN)
        except NetworkPolicyError as exc:
            self._deny_connection(
                f"cannot present a certificate for {name!r}: {exc}", "tls", scheme="https"
            )
            return
        self._phase = "handshake"
        self._tls = context.wrap_bio(self._tls_in, self._tls_out, server_side=True)
        self._tls_in.write(first)
        if self._eof:
            self._tls_in.write_eof()
        self._pump_tls()

    def _deliver_http_eof(self) -> None:
        """Tell a plain-HTTP interceptor the guest is done, once it is not owed a response."""
        assert self._http is not None
        if self._http.wants_data:
            self._feed_http(b"")
        elif self.verdict is None:
            self._eof_pending = True  # delivered by respond()

    def _feed_http(self, data: bytes) -> None:
        http = self._http
        assert http is not None
        self._collect(http.receive_data(data))
        self._after_http()

    def _collect(self, events: list[RequestReceived | RequestRefused]) -> None:
        for event in events:
            if isinstance(event, RequestReceived):
                self._requests.append(event)
            else:
                self._records.append(event.exchange)

    def _after_http(self) -> None:
        http = self._http
        assert http is not None
        out = http.data_to_send()
        if out:
            # Take the interceptor's buffer over when ours is empty: a large
            # response is then never copied on its way to the stack.
            if self._tls is not None:
                if self._plain_out:
                    self._plain_out += out
                else:
                    self._plain_out = out
            elif self._wire_out:
                self._wire_out += out
            else:
                self._wire_out = out
        if http.closed and self.verdict is None:
            self._set_verdict("close")
