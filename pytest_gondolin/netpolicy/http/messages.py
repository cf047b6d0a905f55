"""HTTP messages as the network layer passes them around: immutable values.

:class:`HttpRequest` (a complete guest request, its destination resolved by
the interceptor's rule) and :class:`HttpResponse` (from an upstream, a stub,
a cassette or a denial), the size limits every reader and writer of them
applies, and the helpers that turn them into what the guest sees
(:func:`denial_response`, :func:`strip_hop_by_hop`) or what the recorder
keeps (:func:`make_exchange`). No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pytest_gondolin.netpolicy.http.recorder import Exchange, ExchangeDecision, Headers
from pytest_gondolin.netpolicy.http.rules import DEFAULT_PORTS, format_authority

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "HttpRequest",
    "HttpResponse",
    "denial_response",
    "make_exchange",
    "strip_hop_by_hop",
]

#: Request/response head limit (request line + headers).
MAX_HEADER_BYTES: Final = 64 * 1024
#: Request/response body limit; bodies are buffered whole in memory.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024

# RFC 9110 §7.6.1 hop-by-hop fields, plus framing we recompute ourselves.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)


@dataclass(frozen=True)
class HttpRequest:
    """A complete request from the guest, its destination resolved by :mod:`.interceptor`.

    ``host`` is normalised, ``port`` explicit; ``target`` is the
    request-target as sent, ``path``/``query`` its parts. Headers are
    ``(name, value)`` strings decoded as ISO-8859-1 (lossless), wire order.
    """

    method: str
    target: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    headers: Headers
    body: bytes
    http_version: str = "1.1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple(self.headers))

    @property
    def authority(self) -> str:
        """``host[:port]``, the port omitted when it is the scheme's default."""
        default = DEFAULT_PORTS.get(self.scheme)
        return format_authority(self.host, None if self.port == default else self.port)

    @property
    def url(self) -> str:
        """The absolute URL, e.g. ``https://api.example.com/v1?x=1``."""
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.authority}{self.path}{query}"

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        return next((v for n, v in self.headers if n.lower() == wanted), None)


@dataclass(frozen=True)
class HttpResponse:
    """A response to give the guest (from upstream, a stub or a denial).

    ``trailers`` (RFC 9110 §6.5) come only from an HTTP/2 upstream and reach
    only an HTTP/2 guest stream (:mod:`.h2_server`); HTTP/1.1 drops them.
    """

    status: int
    headers: Headers = ()
    body: bytes = b""
    reason: str = ""
    trailers: Headers = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple(self.headers))
        object.__setattr__(self, "trailers", tuple(self.trailers))

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        return next((v for n, v in self.headers if n.lower() == wanted), None)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop and framing fields (RFC 9110 §7.6.1), incl. those named in Connection."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [(n, v) for n, v in pairs if n.lower() not in _HOP_BY_HOP and n.lower() not in named]


def denial_response(reason: str, rule: str | None, status: int = 403) -> HttpResponse:
    """The response the guest sees when the host refuses a request.

    A short ``text/plain`` body naming the reason and the rule, and an
    ``X-Gondolin-Rule`` header so scripts can tell it from an upstream 403.
    """
    body = f"pytest-gondolin denied this request: {reason}\nrule: {rule or 'none'}\n"
    return HttpResponse(
        status=status,
        headers=(
            ("Content-Type", "text/plain; charset=utf-8"),
            ("X-Gondolin-Rule", _header_safe(rule or "none")),
            ("Cache-Control", "no-store"),
        ),
        body=body.encode("utf-8", "replace"),
    )


def _header_safe(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:200]


def make_exchange(
    request: HttpRequest,
    response: HttpResponse | None,
    decision: ExchangeDecision,
    reason: str,
    *,
    started: float,
    duration: float,
    request_headers: Sequence[tuple[str, str]] | None = None,
) -> Exchange:
    """An :class:`Exchange` for ``request`` and its ``response``.

    Pass ``request_headers`` to record other headers than the request's own
    (e.g. the guest's, with placeholders, rather than the substituted ones).
    """
    return Exchange(
        method=request.method,
        url=request.url,
        scheme=request.scheme,
        host=request.host,
        port=request.port,
        path=request.path,
        query=request.query,
        request_headers=tuple(request.headers if request_headers is None else request_headers),
        request_body=request.body,
        status=None if response is None else response.status,
        response_headers=() if response is None else tuple(response.headers),
        response_body=b"" if response is None else response.body,
        decision=decision,
        reason=reason,
        started=started,
        duration=duration,
        http_version=request.http_version,
    )
