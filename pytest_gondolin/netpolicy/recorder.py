"""The traffic recorder behind ``vm.http`` and the ``http_traffic`` fixture.

Every exchange the host mediated is recorded as an immutable
:class:`Exchange`: allowed, denied (including connections that never
became HTTP: ``method == ""``), stubbed or replayed. The network driver
thread calls :meth:`Recorder.record` and :meth:`Recorder.find_stub` while the
test thread reads, filters and asserts; one lock guards the state and
readers always get copies.

Bounds (a hostile guest chooses the traffic): bodies are kept up to
``body_limit`` bytes (default :data:`DEFAULT_BODY_LIMIT`, 1 MiB) with a
``*_truncated`` flag, and at most ``max_exchanges`` (default
:data:`DEFAULT_MAX_EXCHANGES`) are kept, oldest dropped first and counted in
:attr:`Recorder.dropped`.

Stubs are canned responses the host answers with itself; the upstream is
never contacted, so a stub needs no ``allow_hosts`` entry (the driver is
expected to consult :meth:`Recorder.find_stub` before the policy).
"""

from __future__ import annotations

import base64
import dataclasses
import json as _json
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, overload
from urllib.parse import urlsplit, urlunsplit

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.policy import format_authority, normalize_host

__all__ = [
    "DEFAULT_BODY_LIMIT",
    "DEFAULT_MAX_EXCHANGES",
    "Exchange",
    "ExchangeDecision",
    "Recorder",
    "Stub",
    "normalize_url",
]

#: Bytes of each body kept in a record (the rest is dropped, flagged).
DEFAULT_BODY_LIMIT: Final = 1 << 20
#: Records kept per recorder; a test making more is probably looping.
DEFAULT_MAX_EXCHANGES: Final = 10_000
#: How many similar requests an assertion failure lists.
_SIMILAR_SHOWN: Final = 20

ExchangeDecision = Literal["allowed", "denied", "stubbed", "replayed"]
_DECISIONS: Final = frozenset({"allowed", "denied", "stubbed", "replayed"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

Headers = tuple[tuple[str, str], ...]


def _headers(value: Iterable[tuple[str, str]] | Mapping[str, str] | None, where: str) -> Headers:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out: list[tuple[str, str]] = []
    for item in items:
        if not (
            isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)
        ):
            raise ConfigError(f"{where}: expected (name, value) string pairs, got {item!r}")
        out.append(item)
    return tuple(out)


def _find_header(headers: Headers, name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


@dataclass(frozen=True)
class Exchange:
    """One mediated request (or refused connection), as the host saw it.

    Headers are tuples of ``(name, value)`` strings in wire order (bytes
    decoded as ISO-8859-1, which round-trips); use :meth:`request_header` /
    :meth:`response_header` for case-insensitive lookup. ``status`` is
    ``None`` when no response was produced. ``started`` is the wall-clock
    time (``time.time()``) the request began, ``duration`` seconds.
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

    def __post_init__(self) -> None:
        if self.decision not in _DECISIONS:
            raise ValueError(f"decision must be one of {sorted(_DECISIONS)}, got {self.decision!r}")
        object.__setattr__(
            self, "request_headers", _headers(self.request_headers, "request_headers")
        )
        object.__setattr__(
            self, "response_headers", _headers(self.response_headers, "response_headers")
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
                value = _body_json(value)
            elif f.name.endswith("_headers"):
                value = [list(pair) for pair in value]
            out[f.name] = value
        return out


def exchange_from_dict(data: Mapping[str, Any]) -> Exchange:
    """Rebuild an :class:`Exchange` from :meth:`Exchange.to_dict` output.

    Raises ValueError for anything else (the data may come across the VM boundary).
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
        kwargs[f.name] = value
    return Exchange(**kwargs)


def _body_json(body: bytes) -> dict[str, str]:
    try:
        return {"text": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(body).decode("ascii")}


def normalize_url(url: str) -> str:
    """Lower-case scheme, IDNA-normalise the host, drop the default port and fragment.

    Raises :class:`ConfigError` for something that is not an absolute
    http(s) URL.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"{url!r} is not an absolute http:// or https:// URL")
    try:
        host = normalize_host(parts.hostname)
    except NetworkPolicyError:
        raise ConfigError(f"{url!r} does not name a valid host") from None
    netloc = format_authority(host, None if port == _DEFAULT_PORTS[scheme] else port)
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


@dataclass(frozen=True)
class Stub:
    """A canned response: ``method`` (``"*"`` for any) and ``url`` to match.

    A stub URL without a query string matches the URL whatever its query;
    with one, the query must be identical.
    """

    method: str
    url: str
    status: int
    body: bytes
    headers: Headers = field(default=())

    def matches(self, method: str, url: str) -> bool:
        """Whether a request ``method url`` gets this stub (``url`` normalised or not)."""
        if self.method != "*" and self.method != method.upper():
            return False
        try:
            wanted = normalize_url(url)
        except ConfigError:
            return False
        if "?" in self.url:
            return wanted == self.url
        return wanted.split("?", 1)[0] == self.url


UrlFilter = str | re.Pattern[str] | None


def _host_key(host: str) -> str:
    """``host`` normalised for comparison (IDNA, case, brackets), best effort."""
    try:
        return normalize_host(host)
    except NetworkPolicyError:
        return host.lower().rstrip(".")


def _match_text(value: str, wanted: str | re.Pattern[str]) -> bool:
    if isinstance(wanted, re.Pattern):
        return wanted.search(value) is not None
    return value == wanted


class _Redactor(Protocol):
    @overload
    def redact(self, data: str) -> str: ...
    @overload
    def redact(self, data: bytes) -> bytes: ...


class Recorder:
    """Thread-safe record of mediated traffic, plus stubs.

    ``redactor`` (e.g. a :class:`~pytest_gondolin.netpolicy.secrets.SecretStore`)
    is applied to the URL, headers, bodies and reason of every record, so
    real secret values never reach a record or an artifact.
    """

    def __init__(
        self,
        *,
        body_limit: int = DEFAULT_BODY_LIMIT,
        max_exchanges: int = DEFAULT_MAX_EXCHANGES,
        redactor: _Redactor | None = None,
    ) -> None:
        if body_limit < 0 or max_exchanges < 1:
            raise ConfigError("Recorder: body_limit must be >= 0 and max_exchanges >= 1")
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._stubs: list[Stub] = []
        self._body_limit = body_limit
        self._max_exchanges = max_exchanges
        self._redactor = redactor
        self._dropped = 0

    # ------------------------------------------------------------------ writing

    def record(self, exchange: Exchange) -> Exchange:
        """Store ``exchange`` (bodies capped, secrets redacted) and return what was stored."""
        stored = self._prepare(exchange)
        with self._lock:
            self._exchanges.append(stored)
            overflow = len(self._exchanges) - self._max_exchanges
            if overflow > 0:
                del self._exchanges[:overflow]
                self._dropped += overflow
        return stored

    def _prepare(self, ex: Exchange) -> Exchange:
        changes: dict[str, Any] = {}
        limit = self._body_limit
        if len(ex.request_body) > limit:
            changes["request_body"] = ex.request_body[:limit]
            changes["request_body_truncated"] = True
        if len(ex.response_body) > limit:
            changes["response_body"] = ex.response_body[:limit]
            changes["response_body_truncated"] = True
        red = self._redactor
        if red is not None:
            changes["url"] = red.redact(ex.url)
            changes["path"] = red.redact(ex.path)
            changes["query"] = red.redact(ex.query)
            changes["reason"] = red.redact(ex.reason)
            changes["request_headers"] = tuple((n, red.redact(v)) for n, v in ex.request_headers)
            changes["response_headers"] = tuple((n, red.redact(v)) for n, v in ex.response_headers)
            changes["request_body"] = red.redact(changes.get("request_body", ex.request_body))
            changes["response_body"] = red.redact(changes.get("response_body", ex.response_body))
        return dataclasses.replace(ex, **changes) if changes else ex

    def stub(
        self,
        method: str,
        url: str,
        status: int = 200,
        body: bytes | str = b"",
        json: Any = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> Stub:
        """Answer ``method url`` on the host with a canned response.

        ``json`` (mutually exclusive with ``body``) is serialised and sets
        ``Content-Type: application/json`` unless ``headers`` sets one. The
        latest stub registered for a request wins. Raises :class:`ConfigError`
        for a bad method, URL, status or body.
        """
        if not isinstance(method, str) or not (
            method == "*" or re.fullmatch(r"[A-Za-z]{1,32}", method)
        ):
            raise ConfigError(f"stub: method {method!r} is not an HTTP method (or '*')")
        if not isinstance(status, int) or not 200 <= status <= 599:
            raise ConfigError(f"stub: status {status!r} must be an int in 200..599")
        extra = list(_headers(headers, "stub: headers"))
        if json is not None:
            if body:
                raise ConfigError("stub: pass either body= or json=, not both")
            try:
                payload = _json.dumps(json).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"stub: json= is not JSON-serialisable: {exc}") from exc
            if not any(n.lower() == "content-type" for n, _ in extra):
                extra.append(("Content-Type", "application/json"))
        elif isinstance(body, str):
            payload = body.encode("utf-8")
        elif isinstance(body, bytes | bytearray | memoryview):
            payload = bytes(body)
        else:
            raise ConfigError(f"stub: body must be bytes or str, got {type(body).__name__}")
        new = Stub(
            method=method.upper(),
            url=normalize_url(url),
            status=status,
            body=payload,
            headers=tuple(extra),
        )
        with self._lock:
            self._stubs.append(new)
        return new

    def find_stub(self, method: str, url: str) -> Stub | None:
        """The most recently registered stub matching ``method url``, if any."""
        with self._lock:
            stubs = list(self._stubs)
        for candidate in reversed(stubs):
            if candidate.matches(method, url):
                return candidate
        return None

    def clear(self, *, stubs: bool = False) -> None:
        """Forget recorded exchanges (and the stubs too with ``stubs=True``)."""
        with self._lock:
            self._exchanges.clear()
            self._dropped = 0
            if stubs:
                self._stubs.clear()

    # ------------------------------------------------------------------ reading

    @property
    def requests(self) -> list[Exchange]:
        """A copy of every recorded exchange, oldest first."""
        with self._lock:
            return list(self._exchanges)

    @property
    def stubs(self) -> list[Stub]:
        """A copy of the registered stubs, oldest first."""
        with self._lock:
            return list(self._stubs)

    @property
    def dropped(self) -> int:
        """How many old exchanges were discarded to respect ``max_exchanges``."""
        with self._lock:
            return self._dropped

    def get_requests(
        self,
        method: str | None = None,
        url: UrlFilter = None,
        host: str | None = None,
        path: UrlFilter = None,
    ) -> list[Exchange]:
        """Recorded exchanges matching every given filter.

        ``method`` and ``host`` compare case-insensitively; ``url`` and
        ``path`` (without the query) compare exactly, or by ``re.search``
        when given a compiled pattern. Denied connections (``method ""``)
        are included.
        """
        wanted_method = None if method is None else method.upper()
        wanted_host = None if host is None else _host_key(host)
        out: list[Exchange] = []
        for ex in self.requests:
            if wanted_method is not None and ex.method.upper() != wanted_method:
                continue
            if wanted_host is not None and _host_key(ex.host) != wanted_host:
                continue
            if url is not None and not _match_text(ex.url, url):
                continue
            if path is not None and not _match_text(ex.path, path):
                continue
            out.append(ex)
        return out

    def assert_request_made(
        self,
        method: str | None = None,
        url: UrlFilter = None,
        host: str | None = None,
        path: UrlFilter = None,
        count: int | None = 1,
    ) -> list[Exchange]:
        """Assert exactly ``count`` matching requests (``None``: at least one).

        Returns the matches. The :class:`AssertionError` lists similar
        requests (same host or same path) to show what happened instead.
        """
        found = self.get_requests(method=method, url=url, host=host, path=path)
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
        everything = self.requests
        matched = {id(ex) for ex in found}
        similar = [
            ex
            for ex in everything
            if id(ex) not in matched
            and (
                (host is not None and _host_key(ex.host) == _host_key(host))
                or (path is not None and _match_text(ex.path, path))
            )
        ]
        if similar:
            lines.append("similar requests (same host or path):")
            lines.extend(f"  {ex.summary()}" for ex in similar[:_SIMILAR_SHOWN])
            if len(similar) > _SIMILAR_SHOWN:
                lines.append(f"  ... and {len(similar) - _SIMILAR_SHOWN} more")
        elif everything:
            lines.append(f"no similar requests; {len(everything)} recorded in all:")
            lines.extend(f"  {ex.summary()}" for ex in everything[:_SIMILAR_SHOWN])
        else:
            lines.append("no requests were recorded at all")
        raise AssertionError("\n".join(lines))

    def to_json(self, *, indent: int | None = 2) -> str:
        """All exchanges (and stubs) as a JSON document for test artifacts."""
        with self._lock:
            exchanges = list(self._exchanges)
            stubs = list(self._stubs)
            dropped = self._dropped
        doc = {
            "exchanges": [ex.to_dict() for ex in exchanges],
            "dropped": dropped,
            "stubs": [
                {
                    "method": s.method,
                    "url": s.url,
                    "status": s.status,
                    "headers": [list(h) for h in s.headers],
                    "body": _body_json(s.body),
                }
                for s in stubs
            ],
        }
        return _json.dumps(doc, indent=indent)
