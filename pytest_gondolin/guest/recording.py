"""Recorded HTTP exchanges and the queries over them, for both sides of the VM.

The host records what it mediated (:class:`pytest_gondolin.netpolicy.http.recorder.Recorder`);
a sandboxed test reads the same records through ``http_traffic`` in the
guest. Both answer ``get_requests`` and ``assert_request_made`` with the
functions here, over one list of :class:`Exchange` values, so a filter or
a failure message is the same on either side. Standard library only: this
module runs in the guest.

An exchange crosses the boundary as :meth:`Exchange.to_dict` JSON and is
rebuilt with :func:`exchange_from_dict`, which trusts nothing it is given.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json as _json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "Exchange",
    "ExchangeDecision",
    "Headers",
    "UrlFilter",
    "assert_request_made",
    "body_json",
    "canonical_host",
    "exchange_from_dict",
    "get_requests",
    "header_pairs",
    "host_key",
]

#: How many similar requests an assertion failure lists.
_SIMILAR_SHOWN: Final = 20

ExchangeDecision = Literal["allowed", "denied", "stubbed", "replayed"]
_DECISIONS: Final = frozenset({"allowed", "denied", "stubbed", "replayed"})
_FLAGS: Final = frozenset({"request_body_truncated", "response_body_truncated", "bodies_dropped"})
_HTTP_VERSIONS: Final = ("", "1.0", "1.1", "2")

Headers = tuple[tuple[str, str], ...]
UrlFilter = str | re.Pattern[str] | None


def header_pairs(
    value: Iterable[tuple[str, str]] | Mapping[str, str] | None, where: str
) -> Headers:
    """``value`` as a tuple of ``(name, value)`` string pairs; ValueError naming ``where`` if not."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out: list[tuple[str, str]] = []
    for item in items:
        if not (
            isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)
        ):
            raise ValueError(f"{where}: expected (name, value) string pairs, got {item!r}")
        out.append(item)
    return tuple(out)


def _find_header(headers: Headers, name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


# C0 controls but tab, LF and CR: JSON writes each as six characters
# (``\u0000``), so a body of them would grow sixfold; base64 grows by 4/3.
_CONTROL_BYTES: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def body_json(body: bytes) -> dict[str, str]:
    """A body as JSON: ``{"text": ...}`` when it is UTF-8 text, else ``{"base64": ...}``.

    Text means valid UTF-8 without control characters (tab, LF and CR
    allowed): anything else would be escaped character by character, which
    costs more than base64 and reads no better.
    """
    if _CONTROL_BYTES.search(body) is None:
        try:
            return {"text": body.decode("utf-8")}
        except UnicodeDecodeError:
            pass
    return {"base64": base64.b64encode(body).decode("ascii")}


@dataclass(frozen=True)
class Exchange:
    """One mediated request (or refused connection), as the host saw it.

    Headers are tuples of ``(name, value)`` strings in wire order (bytes
    decoded as ISO-8859-1, which round-trips); use :meth:`request_header` /
    :meth:`response_header` for case-insensitive lookup. ``status`` is
    ``None`` when no response was produced. ``started`` is the wall-clock
    time (``time.time()``) the request began, ``duration`` seconds.

    A body longer than the recorder keeps is cut, with ``*_truncated`` set.
    ``bodies_dropped`` says the recorder had spent its byte budget for this
    test when the exchange happened: both bodies were left out (empty, with
    ``*_truncated`` set for each that was not empty); everything else was
    recorded as usual.

    ``http_version`` is the HTTP version the guest spoke: ``"1.1"`` or
    ``"1.0"`` (as the request line said), ``"2"`` for an HTTP/2 stream, or
    ``""`` for a connection refused before any request was read.
    """

    method: str
    url: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    request_headers: Headers
    request_body: bytes
    status: int | None
    response_headers: Headers
    response_body: bytes
    decision: ExchangeDecision
    reason: str
    request_body_truncated: bool = False
    response_body_truncated: bool = False
    started: float = 0.0
    duration: float = 0.0
    bodies_dropped: bool = False
    http_version: str = ""

    def __post_init__(self) -> None:
        if self.decision not in _DECISIONS:
            raise ValueError(f"decision must be one of {sorted(_DECISIONS)}, got {self.decision!r}")
        object.__setattr__(
            self, "request_headers", header_pairs(self.request_headers, "request_headers")
        )
        object.__setattr__(
            self, "response_headers", header_pairs(self.response_headers, "response_headers")
        )

    @classmethod
    def connection_denied(
        cls, host: str, port: int, reason: str, *, scheme: str = "", started: float | None = None
    ) -> Exchange:
        """A record for a connection refused before any HTTP request was seen."""
        return cls(
            method="",
            url="",
            scheme=scheme,
            host=host,
            port=port,
            path="",
            query="",
            request_headers=(),
            request_body=b"",
            status=None,
            response_headers=(),
            response_body=b"",
            decision="denied",
            reason=reason,
            started=time.time() if started is None else started,
        )

    def request_header(self, name: str) -> str | None:
        """The first request header called ``name`` (case-insensitive), or ``None``."""
        return _find_header(self.request_headers, name)

    def response_header(self, name: str) -> str | None:
        """The first response header called ``name`` (case-insensitive), or ``None``."""
        return _find_header(self.response_headers, name)

    def header(self, name: str) -> str | None:
        """Alias of :meth:`request_header`."""
        return self.request_header(name)

    def json(self) -> Any:
        """The response body parsed as JSON (``ValueError`` if it is not JSON)."""
        return _json.loads(self.response_body)

    def summary(self) -> str:
        """One line: ``GET https://host/path -> 200 (allowed)``."""
        if not self.method:
            target = f"connection to {self.host}:{self.port}"
        else:
            target = f"{self.method} {self.url}"
        status = "-" if self.status is None else str(self.status)
        return f"{target} -> {status} ({self.decision}: {self.reason})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; bodies as ``{"text": ...}`` or ``{"base64": ...}``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bytes):
                value = body_json(value)
            elif f.name.endswith("_headers"):
                value = [list(pair) for pair in value]
            out[f.name] = value
        return out


def exchange_from_dict(data: Mapping[str, Any]) -> Exchange:
    """Rebuild an :class:`Exchange` from :meth:`Exchange.to_dict` output.

    Raises ValueError for anything else (the data may come across the VM
    boundary). Fields it does not know are ignored and missing fields that
    have a default take it, so either side may be the newer one.
    """
    if not isinstance(data, Mapping):
        raise ValueError("an exchange must be an object")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(Exchange):
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                raise ValueError(f"exchange field {f.name!r} is missing")
            continue
        value = data[f.name]
        if f.name.endswith("_body"):
            if not isinstance(value, Mapping):
                raise ValueError(f"exchange field {f.name!r} must be an object")
            if "base64" in value:
                value = base64.b64decode(str(value["base64"]), validate=True)
            else:
                value = str(value.get("text", "")).encode("utf-8")
        elif f.name.endswith("_headers"):
            if not isinstance(value, list) or not all(
                isinstance(h, list) and len(h) == 2 for h in value
            ):
                raise ValueError(f"exchange field {f.name!r} must be a list of pairs")
            value = tuple((str(k), str(v)) for k, v in value)
        elif f.name in _FLAGS and not isinstance(value, bool):
            raise ValueError(f"exchange field {f.name!r} must be true or false")
        elif f.name == "http_version" and value not in _HTTP_VERSIONS:
            raise ValueError(f"exchange field 'http_version' must be one of {_HTTP_VERSIONS}")
        kwargs[f.name] = value
    return Exchange(**kwargs)


# --------------------------------------------------------------------------- queries

# RFC 1035 §2.3.4 / RFC 1123 §2.1: labels of at most 63 octets, names of at
# most 253 characters in text form. Underscores are tolerated because real
# service names use them (RFC 2181 §11 allows any octet in DNS itself).
_LABEL_RE: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MAX_NAME_LENGTH: Final = 253


def canonical_host(host: str) -> str | None:
    """The canonical form of a host name or IP literal, or ``None`` if it is neither.

    A canonical IP literal (IPv6 unbracketed, compressed, no scope id) or a
    lower-case ASCII name of valid labels (IDNA A-labels, no trailing dot).
    The one copy of these rules: the host's policy
    (``netpolicy/http/rules.py``, ``normalize_host``) is built on it, since
    the guest cannot import host code.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            ip6 = ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return None
        return None if ip6.scope_id is not None else str(ip6)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            return None
        return str(ip)
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > _MAX_NAME_LENGTH * 4:
        return None
    try:
        name = text.lower().encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(name) > _MAX_NAME_LENGTH or not all(_LABEL_RE.fullmatch(lb) for lb in labels):
        return None
    # RFC 3696 §2: a top-level label is never all-numeric. Refusing it also
    # refuses "127.1" and friends, which inet_aton would turn into 127.0.0.1.
    return None if labels[-1].isdigit() else name


def host_key(host: str) -> str:
    """``host`` as exchanges are compared by host name.

    The canonical form of a valid name or IP literal (IDNA A-labels, lower
    case, no trailing dot, IPv6 unbracketed and compressed), as the host's
    policy normalises it; anything else lower-cased without trailing dots.
    """
    canonical = canonical_host(host)
    return canonical if canonical is not None else host.lower().rstrip(".")


def _match_text(value: str, wanted: str | re.Pattern[str]) -> bool:
    if isinstance(wanted, re.Pattern):
        return wanted.search(value) is not None
    return value == wanted


def get_requests(
    exchanges: Iterable[Exchange],
    method: str | None = None,
    url: UrlFilter = None,
    host: str | None = None,
    path: UrlFilter = None,
) -> list[Exchange]:
    """The exchanges matching every given filter, in order.

    ``method`` and ``host`` compare case-insensitively (``host`` by
    :func:`host_key`); ``url`` and ``path`` (without the query) compare
    exactly, or by ``re.search`` when given a compiled pattern. Denied
    connections (``method ""``) are included.
    """
    wanted_method = None if method is None else method.upper()
    wanted_host = None if host is None else host_key(host)
    out: list[Exchange] = []
    for ex in exchanges:
        if wanted_method is not None and ex.method.upper() != wanted_method:
            continue
        if wanted_host is not None and host_key(ex.host) != wanted_host:
            continue
        if url is not None and not _match_text(ex.url, url):
            continue
        if path is not None and not _match_text(ex.path, path):
            continue
        out.append(ex)
    return out


def assert_request_made(
    exchanges: Sequence[Exchange],
    method: str | None = None,
    url: UrlFilter = None,
    host: str | None = None,
    path: UrlFilter = None,
    count: int | None = 1,
) -> list[Exchange]:
    """Assert exactly ``count`` matching exchanges (``None``: at least one); return them.

    The :class:`AssertionError` lists similar requests (same host or same
    path) to show what happened instead.
    """
    found = get_requests(exchanges, method=method, url=url, host=host, path=path)
    if (count is None and found) or len(found) == count:
        return found
    criteria = (
        ", ".join(
            f"{k}={v.pattern if isinstance(v, re.Pattern) else v!r}"
            for k, v in (("method", method), ("url", url), ("host", host), ("path", path))
            if v is not None
        )
        or "any"
    )
    expected = "at least 1" if count is None else str(count)
    lines = [f"expected {expected} request(s) matching {criteria}, found {len(found)}"]
    for ex in found[:_SIMILAR_SHOWN]:
        lines.append(f"  matched: {ex.summary()}")
    matched = {id(ex) for ex in found}
    similar = [
        ex
        for ex in exchanges
        if id(ex) not in matched
        and (
            (host is not None and host_key(ex.host) == host_key(host))
            or (path is not None and _match_text(ex.path, path))
        )
    ]
    if similar:
        lines.append("similar requests (same host or path):")
        lines.extend(f"  {ex.summary()}" for ex in similar[:_SIMILAR_SHOWN])
        if len(similar) > _SIMILAR_SHOWN:
            lines.append(f"  ... and {len(similar) - _SIMILAR_SHOWN} more")
    elif exchanges:
        lines.append(f"no similar requests; {len(exchanges)} recorded in all:")
        lines.extend(f"  {ex.summary()}" for ex in exchanges[:_SIMILAR_SHOWN])
    else:
        lines.append("no requests were recorded at all")
    raise AssertionError("\n".join(lines))
