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

:class:`Exchange` and the queries over exchanges (``get_requests``,
``assert_request_made``) live in :mod:`pytest_gondolin.guest.recording`,
because ``http_traffic`` answers them inside the guest too; the recorder
keeps the writing side, the stubs and the bounds.
"""

from __future__ import annotations

import dataclasses
import json as _json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, overload
from urllib.parse import urlsplit, urlunsplit

from pytest_gondolin.errors import ConfigError, NetworkPolicyError
from pytest_gondolin.guest import recording
from pytest_gondolin.guest.recording import Exchange as Exchange
from pytest_gondolin.guest.recording import ExchangeDecision as ExchangeDecision
from pytest_gondolin.guest.recording import Headers as Headers
from pytest_gondolin.guest.recording import UrlFilter as UrlFilter
from pytest_gondolin.guest.recording import body_json
from pytest_gondolin.guest.recording import exchange_from_dict as exchange_from_dict
from pytest_gondolin.netpolicy.http.rules import DEFAULT_PORTS, format_authority, normalize_host

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
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"{url!r} is not an absolute http:// or https:// URL")
    try:
        host = normalize_host(parts.hostname)
    except NetworkPolicyError:
        raise ConfigError(f"{url!r} does not name a valid host") from None
    netloc = format_authority(host, None if port == DEFAULT_PORTS[scheme] else port)
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


class _Redactor(Protocol):
    @overload
    def redact(self, data: str) -> str: ...
    @overload
    def redact(self, data: bytes) -> bytes: ...


class Recorder:
    """Thread-safe record of mediated traffic, plus stubs.

    ``redactor`` (e.g. a :class:`~pytest_gondolin.netpolicy.http.secrets.SecretStore`)
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
        try:
            extra = list(recording.header_pairs(headers, "stub: headers"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
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
        return recording.get_requests(self.requests, method, url, host, path)

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
        return recording.assert_request_made(self.requests, method, url, host, path, count)

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
                    "body": body_json(s.body),
                }
                for s in stubs
            ],
        }
        return _json.dumps(doc, indent=indent)
