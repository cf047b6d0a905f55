"""The TLS half of :class:`~.mitm.FlowProxy`: the handshake with the guest and its records.

Split from :mod:`.mitm` by concern. :class:`TlsTermination` is the base
that runs the server side of the guest's TLS session over a pair of
``ssl.MemoryBIO`` objects: it finishes the handshake (recording a guest
that does not trust the CA), picks the interceptor the ALPN result asks
for (HTTP/2 or HTTP/1.x), reads plaintext only while the interceptor wants
it, and sends ``close_notify`` once the answer is out. The proxy provides
the state and the HTTP side.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Final, Literal

from pytest_gondolin.netpolicy.http.h2_server import H2Interceptor
from pytest_gondolin.netpolicy.http.interceptor import BodyBudget, HttpInterceptor
from pytest_gondolin.netpolicy.http.mediation import with_rule
from pytest_gondolin.netpolicy.http.recorder import Exchange

__all__ = ["GUEST_READ_CHUNK", "Phase", "TlsTermination", "Verdict"]

log = logging.getLogger(__name__)

#: Guest bytes taken per read once the flow speaks HTTP (the interceptor
#: bounds what it keeps; this only bounds one step of work).
GUEST_READ_CHUNK: Final = 64 * 1024
Verdict = Literal["close", "abort"]
Phase = Literal["sniff", "handshake", "http", "done"]


class TlsTermination:
    """The guest's TLS session, server side; :class:`~.mitm.FlowProxy` provides the state."""

    dst_ip: IPv4Address
    dst_port: int
    verdict: Verdict | None
    _phase: Phase
    _deadline: float | None
    _eof: bool
    _tls: ssl.SSLObject | None
    _tls_out: ssl.MemoryBIO
    _tls_closing: bool
    _server_name: str | None
    _http: HttpInterceptor | H2Interceptor | None
    _body_budget: BodyBudget | None
    _clock: Callable[[], float]
    _plain_out: bytearray
    _wire_out: bytearray
    _records: list[Exchange]

    # The proxy's (its HTTP side and its bookkeeping):
    @property
    def host(self) -> str:
        raise NotImplementedError

    @property
    def protocol(self) -> str:
        raise NotImplementedError

    def _set_verdict(self, verdict: Verdict) -> None:
        raise NotImplementedError

    def _deny_connection(self, reason: str, rule: str, *, scheme: str = "") -> None:
        raise NotImplementedError

    def _feed_http(self, data: bytes) -> None:
        raise NotImplementedError

    def _after_http(self) -> None:
        raise NotImplementedError

    def _drain_tls_out(self) -> None:
        pending = self._tls_out.pending
        if pending:
            self._wire_out += self._tls_out.read(pending)

    def _pump_tls(self) -> None:
        tls = self._tls
        assert tls is not None
        if self._phase == "handshake":
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._drain_tls_out()
                if self._eof:
                    self._deny_connection(
                        "the guest closed the connection during the TLS handshake",
                        "tls-handshake",
                        scheme="https",
                    )
                return
            except (ssl.SSLError, OSError) as exc:
                self._drain_tls_out()  # the alert tells the guest what went wrong
                reason = getattr(exc, "reason", None) or str(exc)
                self._records.append(
                    Exchange.connection_denied(
                        self._server_name or self.host,
                        self.dst_port,
                        with_rule(
                            f"TLS handshake with the guest failed ({reason}); does the "
                            "client trust the pytest-gondolin CA?",
                            "tls-handshake",
                        ),
                        scheme="https",
                        started=self._clock(),
                    )
                )
                self._set_verdict("close")
                return
            self._drain_tls_out()
            self._phase = "http"
            self._deadline = None
            authority = self._server_name or str(self.dst_ip)
            if tls.selected_alpn_protocol() == "h2":
                self._http = H2Interceptor(
                    authority=authority,
                    port=self.dst_port,
                    budget=self._body_budget,
                    clock=self._clock,
                )
                self._after_http()  # the server's SETTINGS go first (RFC 9113 §3.4)
            else:
                self._http = HttpInterceptor(
                    "https",
                    authority=authority,
                    port=self.dst_port,
                    budget=self._body_budget,
                    clock=self._clock,
                )
            log.debug(
                "TLS with the guest established for %s (%s)", self._server_name, self.protocol
            )
        self._read_tls_plaintext()

    def _read_tls_plaintext(self) -> None:
        tls, http = self._tls, self._http
        assert tls is not None and http is not None
        while self.verdict is None and http.wants_data:
            try:
                chunk = tls.read(GUEST_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""  # close_notify, or a ragged EOF: the guest is done either way
            except ssl.SSLError as exc:
                log.debug("TLS error from the guest: %s", exc)
                self._drain_tls_out()
                self._set_verdict("abort")
                return
            self._feed_http(chunk)
            if not chunk:
                break
        self._drain_tls_out()

    def _maybe_close_tls(self) -> None:
        """Send close_notify once the interceptor is done and all plaintext is encrypted."""
        if self._tls is None or self._tls_closing or self.verdict != "close" or self._plain_out:
            return
        if self._http is None:
            return  # the handshake failed: the alert already went out
        self._tls_closing = True
        try:
            self._tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, OSError):
            pass  # close_notify is queued; we do not wait for the guest's
        self._drain_tls_out()
