"""What a cassette holds: recorded requests and responses, and cassette errors.

Immutable values shared by every cassette module: a :class:`CassetteRequest`
(redacted, normalised and filtered before it is stored; its URI parsed
once into scheme, host, port, path and query), a :class:`CassetteResponse`
and the :class:`Interaction` pairing them. The file format is
:mod:`.cassette_file`; matching and preparation :mod:`.cassette_match`;
record modes :mod:`.cassette`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from pytest_gondolin.errors import GondolinError, NetworkPolicyError
from pytest_gondolin.netpolicy.http.messages import HttpResponse
from pytest_gondolin.netpolicy.http.recorder import Headers
from pytest_gondolin.netpolicy.http.rules import DEFAULT_PORTS, normalize_host

__all__ = [
    "FILTERED",
    "CassetteError",
    "CassetteMismatch",
    "CassetteRequest",
    "CassetteResponse",
    "Interaction",
    "shorten",
]

#: The value stored in place of a filtered header or query parameter.
FILTERED: Final = "<FILTERED>"
# Characters of a URI, body or header shown in a message.
_SHOWN: Final = 120


class CassetteError(GondolinError):
    """A cassette could not be read, parsed, written or used as asked.

    ``path`` names the file when there is one.
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        self.path = path
        super().__init__(message)


class CassetteMismatch(CassetteError):
    """The test's traffic and its cassette disagree.

    Raised by :meth:`~.cassette.CassettePlayer.check`.

    ``misses`` are the unmatched-request messages, ``unused`` the
    interactions never replayed (only when unused ones are an error).
    """

    def __init__(
        self, message: str, *, path: Path, misses: Sequence[str], unused: Sequence[Interaction]
    ) -> None:
        self.misses = list(misses)
        self.unused = list(unused)
        super().__init__(message, path=path)


def shorten(text: str, limit: int = _SHOWN) -> str:
    """``text`` cut to ``limit`` characters (ending in ``...``), for messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- values


def _split_uri(uri: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path, query) of an absolute http(s) URI; ValueError otherwise."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("not an absolute http:// or https:// URI")
    try:
        host = normalize_host(parts.hostname)
    except NetworkPolicyError as exc:
        raise ValueError(str(exc)) from None
    port = parts.port  # ValueError for a bad port
    return (
        scheme,
        host,
        DEFAULT_PORTS[scheme] if port is None else port,
        parts.path or "/",
        parts.query,
    )


def _canonical_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    # Grouped by name, values in their original order: exactly the order a
    # YAML mapping with sorted keys gives back, so a loaded interaction
    # equals the one that was saved.
    return tuple(sorted(((n, v) for n, v in headers), key=lambda pair: pair[0]))


def _header_value(headers: Headers, name: str) -> str | None:
    wanted = name.lower()
    return next((v for n, v in headers if n.lower() == wanted), None)


@dataclass(frozen=True)
class CassetteRequest:
    """A request as stored in a cassette (already redacted, normalised and filtered).

    ``uri`` is absolute; ``scheme``, ``host`` (normalised), ``port``
    (explicit), ``path`` and ``query`` are derived from it. Headers are
    kept grouped by name (see :class:`Cassette`). Raises
    :class:`CassetteError` for a URI that is not absolute http(s).
    """

    method: str
    uri: str
    headers: Headers = ()
    body: bytes = b""
    scheme: str = field(init=False, repr=False, compare=False)
    host: str = field(init=False, repr=False, compare=False)
    port: int = field(init=False, repr=False, compare=False)
    path: str = field(init=False, repr=False, compare=False)
    query: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            parts = _split_uri(self.uri)
        except ValueError as exc:
            raise CassetteError(f"uri {shorten(self.uri)!r}: {exc}") from None
        for name, value in zip(("scheme", "host", "port", "path", "query"), parts, strict=True):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "headers", _canonical_headers(self.headers))
        object.__setattr__(self, "body", bytes(self.body))

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or ``None``."""
        return _header_value(self.headers, name)

    def summary(self) -> str:
        """``METHOD uri``, the URI shortened for messages."""
        return f"{self.method} {shorten(self.uri)}"


@dataclass(frozen=True)
class CassetteResponse:
    """A recorded response; ``message`` is the reason phrase."""

    status: int
    message: str = ""
    headers: Headers = ()
    body: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", _canonical_headers(self.headers))
        object.__setattr__(self, "body", bytes(self.body))

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or ``None``."""
        return _header_value(self.headers, name)

    def to_http(self) -> HttpResponse:
        """The response to give the guest on replay."""
        return HttpResponse(
            status=self.status, headers=self.headers, body=self.body, reason=self.message
        )


@dataclass(frozen=True)
class Interaction:
    """One recorded request and the response it got."""

    request: CassetteRequest
    response: CassetteResponse
