"""The destination rule: which host, port and path an HTTP/1.1 request names.

This module owns the rule, identical for every flow:
    The request's **Host header** names the destination (RFC 9112 §3.2;
    for an absolute-form target, the target's authority, which must then
    equal the Host header). Its port, explicit or the scheme's default
    (80/443), must equal the TCP destination port of the flow when the
    driver knows it. **For TLS, the SNI picks the certificate and the Host
    name must equal the SNI** (a client that sends no SNI, as for an IP
    literal, is matched against the flow's destination address, which the
    driver passes as ``authority``); otherwise the request is refused with
    421 Misdirected Request (RFC 9110 §15.5.20). The driver therefore uses
    ``request.host``/``request.port`` for the policy decision and the
    upstream, and never the raw SNI.

Each violation raises :class:`~.guest_requests.Refusal` with the status
and rule the interceptor's table gives (400 ``host-header`` or
``http-protocol``, 421 ``misdirected``). Sans-IO, pure functions.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import h11

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.guest_requests import Refusal
from pytest_gondolin.netpolicy.http.rules import DEFAULT_PORTS, normalize_host, split_host_port

__all__ = ["host_header", "resolve_destination"]


def _decode(value: bytes) -> str:
    return value.decode("latin-1")


def host_header(head: h11.Request, scheme: str) -> tuple[str, int]:
    """The normalised host and port (explicit or default) of the one Host header."""
    hosts = [_decode(v) for n, v in head.headers if n == b"host"]
    if len(hosts) != 1:
        raise Refusal(400, f"expected one Host header, got {len(hosts)}", "host-header")
    try:
        raw_host, raw_port = split_host_port(hosts[0])
        if "@" in raw_host or not raw_host:
            raise NetworkPolicyError("userinfo or empty host")
        host = normalize_host(raw_host)
    except NetworkPolicyError:
        raise Refusal(400, f"invalid Host header {hosts[0][:100]!r}", "host-header") from None
    return host, DEFAULT_PORTS[scheme] if raw_port is None else raw_port


def resolve_destination(
    head: h11.Request, *, scheme: str, authority: str, flow_port: int | None
) -> tuple[str, int, str, str]:
    """(host, port, path, query) of ``head`` by the destination rule (module docstring)."""
    host, port = host_header(head, scheme)
    hosts = [_decode(v) for n, v in head.headers if n == b"host"]
    default = DEFAULT_PORTS[scheme]
    target = _decode(head.target)
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif re.match(r"(?i)https?://", target):
        # RFC 9112 §3.2.2: absolute-form; its authority must agree with Host.
        try:
            parts = urlsplit(target)
            t_port = parts.port
            t_host = normalize_host(parts.hostname or "")
        except (ValueError, NetworkPolicyError):
            raise Refusal(400, f"invalid request target {target[:100]!r}", "host-header") from None
        if (
            parts.scheme.lower() != scheme
            or parts.username is not None
            or (t_host, t_port or default) != (host, port)
        ):
            raise Refusal(
                400,
                f"request target {target[:100]!r} disagrees with Host {hosts[0][:100]!r}",
                "host-header",
            )
        path, query = parts.path or "/", parts.query
    else:
        raise Refusal(400, f"unsupported request target {target[:100]!r}", "http-protocol")
    if "#" in target:
        raise Refusal(400, "a fragment in the request target", "http-protocol")
    if flow_port is not None and port != flow_port:
        raise Refusal(
            421,
            f"Host port {port} differs from the connection's port {flow_port}",
            "misdirected",
        )
    if scheme == "https" and host != authority:
        raise Refusal(
            421,
            f"Host {host!r} differs from the TLS server name {authority!r}",
            "misdirected",
        )
    return host, port, path, query
