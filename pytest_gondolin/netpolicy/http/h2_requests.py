"""HTTP/2 header blocks to and from the values the pipeline takes; pure functions.

:func:`stream_request` turns one guest stream's header block (already
validated by h2: pseudo-headers first and once, lower-case names, no
connection-specific fields) and body into an :class:`~.messages.HttpRequest`
by the destination rule of :mod:`.destination` (RFC 9113 §8.3.1:
``:authority`` names the destination and must equal the TLS server name;
its port, explicit or 443, the flow's), or raises :class:`StreamRefused`
with the status and rule the HTTP/1.1 interceptor would use.
:func:`refusal_record` is the "denied" :class:`~.recorder.Exchange` of
such a refusal, and :func:`response_blocks` the header block, body and
trailer block of a response on a stream.
"""

from __future__ import annotations

import re
from typing import Final

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.messages import (
    HttpRequest,
    HttpResponse,
    denial_response,
    strip_hop_by_hop,
)
from pytest_gondolin.netpolicy.http.recorder import Exchange, Headers
from pytest_gondolin.netpolicy.http.rules import normalize_host, split_host_port

__all__ = ["StreamRefused", "refusal_record", "response_blocks", "stream_request"]

# Refusal reasons go into records and the guest's error page: keep them short.
_MAX_REASON: Final = 300
# RFC 9113 §8.2.2: connection-specific fields must not appear in HTTP/2.
_CONNECTION_FIELDS: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}
)

# RFC 9110 §5.6.2 (a token, lower-case in HTTP/2) and §5.5 / RFC 9113 §8.2.1
# (no CR, LF or NUL in a value): h2 does not check what it sends.
_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE: Final = re.compile(r"[\r\n\x00]")

Fields = list[tuple[str, str]]


class StreamRefused(Exception):
    """Answer this stream with an error ``status``; ``reason`` and ``rule`` are recorded."""

    def __init__(self, status: int, reason: str, rule: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason[:_MAX_REASON]
        self.rule = rule


def _split(fields: Fields) -> tuple[dict[str, str], Headers]:
    pseudo = {n: v for n, v in fields if n.startswith(":")}
    return pseudo, tuple((n, v) for n, v in fields if not n.startswith(":"))


def stream_request(fields: Fields, body: bytes, *, authority: str, port: int) -> HttpRequest:
    """The request a stream carries; :class:`StreamRefused` if it may not be mediated."""
    pseudo, regular = _split(fields)
    method = pseudo.get(":method", "")
    if method == "CONNECT":
        raise StreamRefused(
            405, "CONNECT tunnels are not allowed (the host is the only network peer)", "connect"
        )
    if pseudo.get(":scheme") != "https":
        raise StreamRefused(
            400, f"unsupported :scheme {pseudo.get(':scheme', '')[:50]!r}", "http-protocol"
        )
    hosts = [v for n, v in regular if n == "host"]
    named = pseudo.get(":authority") or (hosts[0] if len(hosts) == 1 else "")
    if not named or any(h != named for h in hosts):
        raise StreamRefused(
            400, "expected one :authority (or Host) naming the destination", "host-header"
        )
    try:
        raw_host, raw_port = split_host_port(named)
        if "@" in raw_host or not raw_host:
            raise NetworkPolicyError("userinfo or empty host")
        host = normalize_host(raw_host)
    except NetworkPolicyError:
        raise StreamRefused(400, f"invalid :authority {named[:100]!r}", "host-header") from None
    stated_port = 443 if raw_port is None else raw_port
    target = pseudo.get(":path", "")
    if not target.startswith("/"):
        raise StreamRefused(400, f"unsupported request target {target[:100]!r}", "http-protocol")
    if "#" in target:
        raise StreamRefused(400, "a fragment in the request target", "http-protocol")
    if stated_port != port:
        raise StreamRefused(
            421,
            f"authority port {stated_port} differs from the connection's port {port}",
            "misdirected",
        )
    if host != authority:
        raise StreamRefused(
            421,
            f"authority {host!r} differs from the TLS server name {authority!r}",
            "misdirected",
        )
    path, _, query = target.partition("?")
    return HttpRequest(
        method=method,
        target=target,
        scheme="https",
        host=host,
        port=port,
        path=path,
        query=query,
        headers=regular,
        body=body,
        http_version="2",
    )


def refusal_record(
    fields: Fields,
    body_kept: bytes,
    refusal: StreamRefused,
    *,
    authority: str,
    port: int,
    started: float,
    now: float,
) -> Exchange:
    """The "denied" record of ``refusal``, its response (:func:`denial_response`) included."""
    response = denial_response(refusal.reason, refusal.rule, refusal.status)
    pseudo, regular = _split(fields)
    target = pseudo.get(":path", "")
    path, _, query = target.partition("?")
    try:
        raw_host, raw_port = split_host_port(pseudo.get(":authority", ""))
        host = normalize_host(raw_host)
    except NetworkPolicyError:
        host, raw_port = authority, None
    shown = pseudo.get(":authority", host)
    return Exchange(
        method=pseudo.get(":method", ""),
        url=f"https://{shown}{target}" if target.startswith("/") else "",
        scheme="https",
        host=host,
        port=port if raw_port is None else raw_port,
        path=path,
        query=query,
        request_headers=regular,
        request_body=body_kept,
        status=refusal.status,
        response_headers=response.headers,
        response_body=response.body,
        decision="denied",
        reason=f"{refusal.reason} [rule: {refusal.rule}]",
        started=started,
        duration=max(0.0, now - started),
        http_version="2",
    )


def response_blocks(
    method: str, response: HttpResponse
) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:
    """(header block, body, trailer block) of ``response`` to ``method`` on a stream.

    Names lower-case, hop-by-hop and connection-specific fields dropped
    (RFC 9113 §8.2.2), ``content-length`` recomputed (RFC 9110 §8.6: HEAD
    and 304 keep the stated one, 204 none) except with trailers (gRPC
    servers send none, and a client may stop reading at the length, before
    the trailers come). Raises ``ValueError`` (``UnicodeEncodeError``
    included) for a field HTTP/2 cannot carry: a name that is not a token, a
    value with CR, LF or NUL, text that is not ISO-8859-1.
    """
    headers = [(n.lower(), v) for n, v in strip_hop_by_hop(response.headers)]
    headers = [(n, v) for n, v in headers if n not in _CONNECTION_FIELDS]
    body = response.body
    if method == "HEAD" or response.status in (204, 304):
        length = response.header("content-length")
        if length is not None and response.status != 204 and length.strip().isdigit():
            headers.append(("content-length", length.strip()))
        body = b""
    elif not response.trailers:
        headers.append(("content-length", str(len(body))))
    trailers = [
        (n.lower(), v)
        for n, v in response.trailers
        if not n.startswith(":") and n.lower() not in _CONNECTION_FIELDS
    ]
    block = [(":status", str(response.status)), *headers]
    return _encode(block), body, _encode(trailers)


def _encode(fields: Fields) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in fields:
        if not (name == ":status" or _NAME.fullmatch(name)) or _BAD_VALUE.search(value):
            raise ValueError(f"a field HTTP/2 cannot carry: {name[:50]!r}: {value[:50]!r}")
        out.append((name.encode("latin-1"), value.strip(" \t").encode("latin-1")))
    return out
