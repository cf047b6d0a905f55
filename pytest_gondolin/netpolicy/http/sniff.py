"""Sans-IO flow sniffing: what a guest TCP flow speaks, from its first bytes.

:func:`sniff` / :func:`classify` look at the first bytes the guest sent on
a TCP flow and say ``"http"`` (an HTTP/1.x request line), ``"tls"`` (a
complete, valid TLS ClientHello, RFC 8446 §4.1.2, with its SNI),
``"other"`` (anything else, including malformed or over-long hellos: deny
the connection) or ``"need_more"``. At most :data:`SNIFF_LIMIT` bytes are
ever examined. :func:`parse_client_hello` reads the hello itself; every
byte of it is hostile input, so it either parses or raises
:class:`ClientHelloError`, never anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.rules import normalize_host

__all__ = [
    "SNIFF_LIMIT",
    "ClientHello",
    "ClientHelloError",
    "FlowKind",
    "Sniff",
    "classify",
    "parse_client_hello",
    "sniff",
]

#: Bytes examined to classify a flow; a ClientHello must fit (real ones are
#: 0.5-2 KiB, post-quantum key shares included).
SNIFF_LIMIT: Final = 8 * 1024

FlowKind = Literal["http", "tls", "other", "need_more"]

# RFC 9110 §5.6.2 token characters, for methods.
_TCHAR: Final = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_REQUEST_LINE_RE: Final = re.compile(
    rb"(" + _TCHAR + rb"{1,32}) ([\x21-\x7e\x80-\xff]+) HTTP/1\.[01]\r?\n"
)
_METHOD_PREFIX_RE: Final = re.compile(_TCHAR + rb"{1,32}")
_TARGET_PREFIX_RE: Final = re.compile(_TCHAR + rb"{1,32} [\x21-\x7e\x80-\xff]*")
_VERSION_PREFIX_RE: Final = re.compile(_TCHAR + rb"{1,32} [\x21-\x7e\x80-\xff]+ (.*)", re.DOTALL)


# --------------------------------------------------------------------------- TLS ClientHello


class ClientHelloError(NetworkPolicyError):
    """The bytes are not a valid TLS ClientHello (or exceed :data:`SNIFF_LIMIT`)."""


@dataclass(frozen=True)
class ClientHello:
    """What the interceptor needs from a ClientHello.

    ``server_name`` is the normalised SNI host name (RFC 6066 §3) or
    ``None``; ``alpn`` the offered protocols (RFC 7301); ``length`` the
    bytes of TLS records the hello occupied.
    """

    server_name: str | None
    alpn: tuple[str, ...]
    length: int


class _Reader:
    """Bounds-checked big-endian reader; every overrun is a ClientHelloError."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise ClientHelloError(
                f"{self._what}: truncated (wanted {n} bytes, {self.remaining} left)"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, minimum: int, maximum: int, what: str) -> _Reader:
        n = self.uint(length_size)
        if not minimum <= n <= maximum:
            raise ClientHelloError(f"{what}: length {n} outside {minimum}..{maximum}")
        return _Reader(self.take(n), what)

    def take_all(self) -> bytes:
        return self.take(self.remaining)

    def done(self) -> None:
        if self.remaining:
            raise ClientHelloError(f"{self._what}: {self.remaining} trailing bytes")


_TLS_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_MAX_RECORD: Final = 1 << 14  # RFC 8446 §5.1: TLSPlaintext.length <= 2^14
_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the TLS ClientHello at the start of ``data``.

    Returns ``None`` while more bytes are needed, a :class:`ClientHello`
    once it is complete, and raises :class:`ClientHelloError` for anything
    malformed or larger than :data:`SNIFF_LIMIT` — never another exception.
    The hello may span several handshake records (RFC 8446 §5.1).
    """
    data = bytes(data[: SNIFF_LIMIT + 1])
    handshake = bytearray()
    pos = 0
    while True:
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                raise ClientHelloError(
                    f"first handshake message has type {handshake[0]}, not ClientHello"
                )
            body_len = int.from_bytes(handshake[1:4], "big")
            if 4 + body_len > SNIFF_LIMIT:
                raise ClientHelloError(
                    f"ClientHello of {body_len} bytes exceeds the {SNIFF_LIMIT}-byte sniff limit"
                )
            if len(handshake) >= 4 + body_len:
                if len(handshake) > 4 + body_len:
                    raise ClientHelloError("unexpected handshake bytes after the ClientHello")
                server_name, alpn = _parse_hello_body(bytes(handshake[4:]))
                return ClientHello(server_name=server_name, alpn=alpn, length=pos)
        if pos + 5 > len(data):
            if len(data) > SNIFF_LIMIT:
                raise ClientHelloError(f"no complete ClientHello within {SNIFF_LIMIT} bytes")
            return None
        content_type = data[pos]
        major, minor = data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type != _TLS_HANDSHAKE:
            raise ClientHelloError(
                f"record type {content_type} where a handshake record was expected"
            )
        if major != 3 or minor > 4:
            raise ClientHelloError(f"record version {major}.{minor} is not TLS")
        if not 1 <= length <= _MAX_RECORD:
            raise ClientHelloError(f"record length {length} outside 1..{_MAX_RECORD}")
        if pos + 5 + length > SNIFF_LIMIT:
            raise ClientHelloError(f"ClientHello records exceed the {SNIFF_LIMIT}-byte sniff limit")
        if pos + 5 + length > len(data):
            return None
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length


def _parse_hello_body(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    r = _Reader(body, "ClientHello")
    version = r.uint(2)
    if version >> 8 != 3:
        raise ClientHelloError(f"ClientHello legacy_version {version:#06x} is not TLS")
    r.take(32)  # random
    r.vector(1, 0, 32, "legacy_session_id")
    suites = r.vector(2, 2, 0xFFFE, "cipher_suites")
    if suites.remaining % 2:
        raise ClientHelloError("cipher_suites: odd length")
    r.vector(1, 1, 0xFF, "legacy_compression_methods")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if r.remaining == 0:  # TLS 1.2 allows a hello without extensions
        return server_name, alpn
    extensions = r.vector(2, 0, 0xFFFF, "extensions")
    r.done()
    seen: set[int] = set()
    while extensions.remaining:
        ext_type = extensions.uint(2)
        ext = extensions.vector(2, 0, 0xFFFF, f"extension {ext_type}")
        if ext_type in seen:  # RFC 8446 §4.2: at most one of each type
            raise ClientHelloError(f"extension {ext_type} appears twice")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_sni(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return server_name, alpn


def _parse_sni(ext: _Reader) -> str:
    names = ext.vector(2, 1, 0xFFFF, "server_name_list")
    ext.done()
    host: str | None = None
    while names.remaining:
        name_type = names.uint(1)
        if name_type != 0:  # RFC 6066 §3: host_name(0) is the only type
            raise ClientHelloError(f"server_name type {name_type} is unknown")
        raw = names.vector(2, 1, 0xFFFF, "host_name").take_all()
        if host is not None:  # RFC 6066 §3: one name per type
            raise ClientHelloError("more than one host_name in server_name")
        try:
            text = raw.decode("ascii")
            host = normalize_host(text)
        except (UnicodeDecodeError, NetworkPolicyError):
            raise ClientHelloError(f"server_name {raw[:80]!r} is not a valid host name") from None
        if text.startswith("[") or ":" in host or _is_ipv4(host):
            # RFC 6066 §3: "Literal IPv4 and IPv6 addresses are not permitted"
            raise ClientHelloError(f"server_name {text!r} is an IP literal")
    if host is None:
        raise ClientHelloError("server_name extension has no host_name")
    return host


def _is_ipv4(host: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", host))


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, 2, 0xFFFF, "protocol_name_list")
    ext.done()
    out: list[str] = []
    while protocols.remaining:
        out.append(protocols.vector(1, 1, 0xFF, "protocol_name").take_all().decode("latin-1"))
    return tuple(out)


@dataclass(frozen=True)
class Sniff:
    """The result of :func:`sniff`: the flow kind and, for TLS, the hello."""

    kind: FlowKind
    client_hello: ClientHello | None = None
    reason: str = ""


def sniff(data: bytes) -> Sniff:
    """Classify the first bytes of a guest TCP flow (see :func:`classify`).

    Total: returns for any input, looking at no more than
    :data:`SNIFF_LIMIT` (+1) bytes. ``reason`` explains an ``"other"``.
    """
    data = bytes(data[: SNIFF_LIMIT + 1])
    if not data:
        return Sniff("need_more")
    if data[0] == _TLS_HANDSHAKE:
        try:
            hello = parse_client_hello(data)
        except ClientHelloError as exc:
            return Sniff("other", reason=f"not a valid TLS ClientHello: {exc}")
        return Sniff("need_more") if hello is None else Sniff("tls", hello)
    newline = data.find(b"\n", 0, SNIFF_LIMIT)
    if newline < 0:
        if len(data) >= SNIFF_LIMIT:
            return Sniff("other", reason=f"no request line within {SNIFF_LIMIT} bytes")
        return (
            Sniff("need_more")
            if _plausible_request_prefix(data)
            else Sniff("other", reason="not HTTP/1.x or TLS")
        )
    if _REQUEST_LINE_RE.fullmatch(data[: newline + 1]):
        return Sniff("http")
    return Sniff("other", reason="not HTTP/1.x or TLS")


def _plausible_request_prefix(data: bytes) -> bool:
    if _METHOD_PREFIX_RE.fullmatch(data) or _TARGET_PREFIX_RE.fullmatch(data):
        return True
    m = _VERSION_PREFIX_RE.fullmatch(data)
    if m is None:
        return False
    rest = m.group(1)
    return any(full.startswith(rest) for full in (b"HTTP/1.0\r", b"HTTP/1.1\r"))


def classify(first_bytes: bytes) -> FlowKind:
    """``"http"``, ``"tls"``, ``"other"`` or ``"need_more"`` for a flow's first bytes.

    ``"tls"`` means a complete, valid ClientHello (get it with
    :func:`sniff`); ``"http"`` a complete HTTP/1.0 or 1.1 request line.
    """
    return sniff(first_bytes).kind
