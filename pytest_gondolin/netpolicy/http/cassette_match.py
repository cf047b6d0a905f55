"""How a live request meets a recorded one: preparation and matchers.

Before anything is stored or compared, a request or response goes through
the same preparation (see :mod:`.cassette` for why): real secret values
redacted, placeholders stripped of their random suffix
(:func:`normalize_placeholders`, also inside ``Authorization: Basic``:
:func:`normalize_basic`), filtered headers and query parameters replaced
by ``<FILTERED>`` (:func:`filter_query`). Requests then match when every
configured matcher (:data:`MATCHER_TABLE`) gives equal keys.
:class:`Preparation` applies all of it with one cassette's settings. No I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, unquote_plus

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.http.cassette_values import (
    FILTERED,
    CassetteRequest,
    CassetteResponse,
    shorten,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.secrets import (
    CREDENTIAL_HEADERS,
    PLACEHOLDER_PREFIX,
    SecretStore,
)

__all__ = [
    "DEFAULT_FILTER_HEADERS",
    "DEFAULT_FILTER_QUERY",
    "DEFAULT_MATCHERS",
    "MATCHERS",
    "MATCHER_TABLE",
    "Matcher",
    "Preparation",
    "check_names",
    "filter_query",
    "normalize_basic",
    "normalize_placeholders",
    "normalize_placeholders_bytes",
]

#: Matchers used unless configured (vcrpy's defaults).
DEFAULT_MATCHERS: Final = ("method", "scheme", "host", "port", "path", "query")
#: Every matcher name accepted by :func:`.cassette.open_cassette`.
MATCHERS: Final = (*DEFAULT_MATCHERS, "uri", "body", "headers")
#: Request headers whose values never reach a cassette (case-insensitive).
DEFAULT_FILTER_HEADERS: Final = ("authorization", "proxy-authorization", "cookie")
#: Query parameters whose values never reach a cassette (case-insensitive).
DEFAULT_FILTER_QUERY: Final = (
    "access_token",
    "api_key",
    "apikey",
    "client_secret",
    "password",
    "token",
)

_PLACEHOLDER_RE: Final = re.compile(
    re.escape(PLACEHOLDER_PREFIX) + r"([A-Za-z_][A-Za-z0-9_]{0,63})_[0-9a-f]{32}(?![0-9a-f])"
)
_PLACEHOLDER_RE_B: Final = re.compile(_PLACEHOLDER_RE.pattern.encode("ascii"))
_BASIC_RE: Final = re.compile(r"(\s*basic\s+)([A-Za-z0-9+/=]+)(\s*)", re.IGNORECASE)


# --------------------------------------------------------------------------- preparation


def normalize_placeholders(text: str, store: SecretStore | None = None) -> str:
    """Drop the random suffix of secret placeholders in ``text``.

    ``GONDOLIN_SECRET_<NAME>_<32 hex>`` becomes ``GONDOLIN_SECRET_<NAME>``:
    the store's own placeholders exactly, any other well-formed one by
    pattern. Idempotent.
    """
    if PLACEHOLDER_PREFIX not in text:
        return text
    if store is not None:
        for name in store.names:
            text = text.replace(store.placeholder(name), PLACEHOLDER_PREFIX + name)
    return _PLACEHOLDER_RE.sub(lambda m: PLACEHOLDER_PREFIX + m.group(1), text)


def normalize_placeholders_bytes(data: bytes, store: SecretStore | None) -> bytes:
    prefix = PLACEHOLDER_PREFIX.encode("ascii")
    if prefix not in data:
        return data
    if store is not None:
        for name in store.names:
            data = data.replace(
                store.placeholder(name).encode("ascii"), prefix + name.encode("ascii")
            )
    return _PLACEHOLDER_RE_B.sub(lambda m: prefix + m.group(1), data)


def normalize_basic(value: str, store: SecretStore | None) -> str:
    """Normalise placeholders inside ``Basic base64(user:pass)`` (RFC 7617)."""
    match = _BASIC_RE.fullmatch(value)
    if match is None:
        return value
    try:
        raw = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return value
    normalized = normalize_placeholders_bytes(raw, store)
    if normalized == raw:
        return value
    token = base64.b64encode(normalized).decode("ascii")
    return f"{match.group(1)}{token}{match.group(3)}"


def filter_query(uri: str, names: frozenset[str]) -> str:
    """``uri`` with the values of the query parameters in ``names`` replaced by FILTERED."""
    base, sep, query = uri.partition("?")
    if not sep or not names:
        return uri
    query, hash_sep, fragment = query.partition("#")
    parts = []
    for part in query.split("&"):
        raw_name = part.split("=", 1)[0]
        if unquote_plus(raw_name).lower() in names:
            part = f"{raw_name}={FILTERED}"
        parts.append(part)
    return f"{base}?{'&'.join(parts)}{hash_sep}{fragment}"


# --------------------------------------------------------------------------- matchers


def _query_key(query: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(parse_qsl(query, keep_blank_values=True)))


def _body_key(request: CassetteRequest) -> Hashable:
    """The body, compared as data for JSON and form bodies, as bytes otherwise."""
    ctype = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    body = request.body
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return ("json", json.dumps(json.loads(body), sort_keys=True))
        except (ValueError, RecursionError):
            pass
    elif ctype == "application/x-www-form-urlencoded":
        return ("form", _query_key(body.decode("latin-1")))
    return ("bytes", body)


def _show_body(request: CassetteRequest) -> str:
    return repr(shorten(request.body.decode("utf-8", "replace")))


#: A matcher: the key requests are compared by, and how a key is shown in a miss.
Matcher = tuple[Callable[[CassetteRequest], Hashable], Callable[[CassetteRequest], str]]
#: Every matcher by name (:data:`MATCHERS`).
MATCHER_TABLE: Final[dict[str, Matcher]] = {
    "method": (lambda r: r.method, lambda r: repr(r.method)),
    "scheme": (lambda r: r.scheme, lambda r: repr(r.scheme)),
    "host": (lambda r: r.host, lambda r: repr(r.host)),
    "port": (lambda r: r.port, lambda r: str(r.port)),
    "path": (lambda r: r.path, lambda r: repr(shorten(r.path))),
    "query": (lambda r: _query_key(r.query), lambda r: repr(shorten(r.query))),
    "uri": (
        lambda r: (r.scheme, r.host, r.port, r.path, _query_key(r.query)),
        lambda r: repr(shorten(r.uri)),
    ),
    "body": (_body_key, _show_body),
    "headers": (
        lambda r: tuple(sorted((n.lower(), v) for n, v in r.headers)),
        lambda r: shorten(repr(r.headers)),
    ),
}


def check_names(value: object, what: str, *, known: Sequence[str] | None = None) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"{what}: expected a list of names, got {value!r:.80}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what}: {name!r:.80} is not a name")
        if known is not None and name not in known:
            raise ConfigError(f"{what}: unknown matcher {name!r}; known: {', '.join(known)}")
    return names


@dataclass(frozen=True)
class Preparation:
    """One cassette's preparation (module docstring) and matching key.

    ``filter_*`` are lower-case names; ``matchers`` are names of
    :data:`MATCHER_TABLE` (checked by :func:`check_names` beforehand).
    """

    secret_store: SecretStore | None
    filter_headers: frozenset[str]
    filter_query: frozenset[str]
    filter_response: frozenset[str]
    matchers: tuple[str, ...]

    def clean(self, text: str) -> str:
        """``text`` with secret values redacted and placeholders normalised."""
        if self.secret_store is not None:
            text = self.secret_store.redact(text)
        return normalize_placeholders(text, self.secret_store)

    def _clean_b(self, data: bytes) -> bytes:
        if self.secret_store is not None:
            data = self.secret_store.redact(data)
        return normalize_placeholders_bytes(data, self.secret_store)

    def _clean_header(self, name: str, value: str, filtered: frozenset[str]) -> str:
        lower = name.lower()
        if lower in filtered:
            return FILTERED
        value = self.clean(value)
        if lower in CREDENTIAL_HEADERS:
            value = normalize_basic(value, self.secret_store)
        return value

    def request(self, request: HttpRequest) -> CassetteRequest:
        """``request`` as it would be stored: redacted, normalised, filtered."""
        uri = filter_query(self.clean(request.url), self.filter_query)
        headers = tuple(
            (n, self._clean_header(n, v, self.filter_headers)) for n, v in request.headers
        )
        return CassetteRequest(
            method=request.method, uri=uri, headers=headers, body=self._clean_b(request.body)
        )

    def response(self, response: HttpResponse) -> CassetteResponse:
        """``response`` as it would be stored: redacted, normalised, filtered."""
        return CassetteResponse(
            status=response.status,
            message=self.clean(response.reason),
            headers=tuple(
                (n, self._clean_header(n, v, self.filter_response)) for n, v in response.headers
            ),
            body=self._clean_b(response.body),
        )

    def match_form(self, recorded: CassetteRequest) -> CassetteRequest:
        """A loaded request under these filters and placeholder normalisation.

        A cassette recorded with other filters (or written by hand or by
        vcrpy) still matches the live request, which is prepared the same way.
        """
        uri = filter_query(normalize_placeholders(recorded.uri), self.filter_query)
        headers = tuple(
            (n, FILTERED if n.lower() in self.filter_headers else normalize_placeholders(v))
            for n, v in recorded.headers
        )
        body = normalize_placeholders_bytes(recorded.body, None)
        if (uri, headers, body) == (recorded.uri, recorded.headers, recorded.body):
            return recorded
        return CassetteRequest(recorded.method, uri, headers, body)

    def key(self, request: CassetteRequest) -> Hashable:
        """What the configured matchers compare of ``request``."""
        return tuple(MATCHER_TABLE[m][0](request) for m in self.matchers)
