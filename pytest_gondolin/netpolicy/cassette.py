"""Cassettes: HTTP exchanges recorded at the VM boundary, replayed on later runs.

Sans-IO apart from reading and writing the cassette file itself: the
network driver asks a :class:`CassettePlayer` per guest request whether to
replay, record or refuse, and the plugin saves the player at teardown.

File format (vcrpy-compatible YAML; vcrpy can load what we write and we
load what vcrpy writes)::

    interactions:
    - request:
        body: null                      # text, !!binary (base64) or null
        headers: {Accept: ['*/*'], Authorization: [<FILTERED>]}
        method: GET
        uri: https://api.example.com/v1/items?page=2
      response:
        body: {string: '{"items": []}'} # text, or !!binary for non-text bytes
        headers: {Content-Type: [application/json]}
        status: {code: 200, message: OK}
    version: 1

Keys are sorted and header names grouped (values kept in order), so the
file is stable and diffs well. A body is written as text when it is UTF-8
without control characters that YAML would mangle (multi-line text as a
``|`` block), otherwise as base64 under YAML's standard ``!!binary`` tag.
Loading accepts vcrpy's variants (header values as a string or a list,
``body: {string: ...}`` or a bare string, ``encoding:`` beside ``string``).

Record modes (vcrpy's meanings; ``once`` is the local default, ``none``
when ``$CI`` is set)::

    mode          file    replays  records unmatched   save() writes
    none          any     yes      no  (miss: error)   never
    once          absent  -        yes                 the new interactions
    once          exists  yes      no  (miss: error)   never
    new_episodes  any     yes      yes                 old + new interactions
    all           any     no       yes                 only the new (a rewrite)

Interactions recorded during a run are never replayed in the same run
(vcrpy does the same): a repeated request is fetched and recorded again,
so the cassette replays both, in order. ``save`` writes only when something
was recorded and the bytes differ from the file; the write is atomic.
Unlike vcrpy's ``all`` (which appends), ``all`` here rewrites the file with
this run's interactions only, like pytest-recording's ``rewrite``.

Matching: a request matches an interaction when every configured matcher
(:data:`MATCHERS`; default :data:`DEFAULT_MATCHERS`: method, scheme, host,
port, path, query — never header values, which carry per-session
placeholders) gives equal keys. Each interaction plays **once**, and
identical requests take matching interactions in recorded order. When
they run out the request is unmatched (a miss in the replay-only modes, a
new recording in ``new_episodes``), as vcrpy with
``allow_playback_repeats=False``; ``allow_playback_repeats=True`` replays
the last match again instead.

No secrets in cassettes. The driver hands the player the *guest's* request
(secret placeholders, never values). Before anything is stored or
compared, every request and response goes through the same preparation:

1. :meth:`SecretStore.redact` (belt and braces: a real value, should one
   appear, becomes its placeholder);
2. placeholders lose their random suffix, ``GONDOLIN_SECRET_<NAME>_<hex>``
   -> ``GONDOLIN_SECRET_<NAME>`` (also inside ``Authorization: Basic``), so
   a cassette is stable across sessions and a placeholder in a recorded
   URL or body matches the next session's;
3. request headers in ``filter_headers`` (default: Authorization,
   Proxy-Authorization, Cookie), query parameters in ``filter_query``
   (default: :data:`DEFAULT_FILTER_QUERY`) and response headers in
   ``filter_response_headers`` (default: none) get the value ``<FILTERED>``.
   The live request is filtered the same way before matching.

``Set-Cookie`` is *not* filtered by default: replaying a login flow needs
the cookie the server set (the guest sends it back in ``Cookie``, which is
filtered and not matched on). Add ``"set-cookie"`` to
``filter_response_headers`` when the recorded cookies are long-lived
credentials.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import yaml

from pytest_gondolin.errors import ConfigError, GondolinError, NetworkPolicyError
from pytest_gondolin.netpolicy.http import DEFAULT_PORTS, HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.policy import normalize_host
from pytest_gondolin.netpolicy.secrets import PLACEHOLDER_PREFIX, SecretStore

if TYPE_CHECKING:
    import pytest

__all__ = [
    "DEFAULT_FILTER_HEADERS",
    "DEFAULT_FILTER_QUERY",
    "DEFAULT_MATCHERS",
    "FILTERED",
    "MATCHERS",
    "MAX_CASSETTE_BYTES",
    "MAX_INTERACTIONS",
    "RECORD_MODES",
    "Cassette",
    "CassetteError",
    "CassetteMismatch",
    "CassettePlayer",
    "CassetteRequest",
    "CassetteResponse",
    "Interaction",
    "RecordMode",
    "default_cassette_path",
    "normalize_placeholders",
    "open_cassette",
    "resolve_cassette_option",
]

log = logging.getLogger(__name__)

RecordMode = Literal["none", "once", "new_episodes", "all"]
#: The record modes, as ``--gondolin-record-mode`` accepts them.
RECORD_MODES: Final[tuple[RecordMode, ...]] = ("none", "once", "new_episodes", "all")
#: The value stored in place of a filtered header or query parameter.
FILTERED: Final = "<FILTERED>"
#: Matchers used unless configured (vcrpy's defaults).
DEFAULT_MATCHERS: Final = ("method", "scheme", "host", "port", "path", "query")
#: Every matcher name accepted by :func:`open_cassette`.
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
#: Largest cassette file loaded; bodies are at most 64 MiB each, so this
#: fits a few big downloads while refusing to exhaust memory on a mistake.
MAX_CASSETTE_BYTES: Final = 256 * 1024 * 1024
#: Interactions per cassette; a test recording more is probably looping.
MAX_INTERACTIONS: Final = 10_000
# Closest candidates listed in an unmatched-request message.
_CLOSEST_SHOWN: Final = 3
# Characters of a URI, body or header shown in a message.
_SHOWN: Final = 120
# Miss messages kept for check(); more are only counted.
_MAX_MISSES_KEPT: Final = 100
# Longest file-name stem derived from a test name (most filesystems allow 255 bytes).
_MAX_STEM: Final = 120

Headers = tuple[tuple[str, str], ...]

_HEADER = (
    "# pytest-gondolin cassette (vcrpy format). Secrets appear as GONDOLIN_SECRET_<NAME>,\n"
    f"# filtered values as {FILTERED}.\n"
)
# RFC 9110 §5.6.2 token: methods and header names.
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 §5.5: field values are visible ASCII, obs-text, SP and HTAB (no CR, LF, NUL).
_FIELD_VALUE_RE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_PLACEHOLDER_RE: Final = re.compile(
    re.escape(PLACEHOLDER_PREFIX) + r"([A-Za-z_][A-Za-z0-9_]{0,63})_[0-9a-f]{32}(?![0-9a-f])"
)
_PLACEHOLDER_RE_B: Final = re.compile(_PLACEHOLDER_RE.pattern.encode("ascii"))
_BASIC_RE: Final = re.compile(r"(\s*basic\s+)([A-Za-z0-9+/=]+)(\s*)", re.IGNORECASE)
_CREDENTIAL_HEADERS: Final = frozenset({"authorization", "proxy-authorization"})
# Text that PyYAML cannot round-trip as a string: C0/C1 controls except TAB,
# LF and CR; NEL and the Unicode line/paragraph separators (read back as
# line breaks inside block scalars); BOM and non-characters (refused or
# stripped by the reader); lone surrogates. Such bodies are written as
# !!binary.
_NOT_TEXT_RE: Final = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]"
)


class CassetteError(GondolinError):
    """A cassette could not be read, parsed, written or used as asked.

    ``path`` names the file when there is one.
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        self.path = path
        super().__init__(message)


class CassetteMismatch(CassetteError):
    """The test's traffic and its cassette disagree (raised by :meth:`CassettePlayer.check`).

    ``misses`` are the unmatched-request messages, ``unused`` the
    interactions never replayed (only when unused ones are an error).
    """

    def __init__(
        self, message: str, *, path: Path, misses: Sequence[str], unused: Sequence[Interaction]
    ) -> None:
        self.misses = list(misses)
        self.unused = list(unused)
        super().__init__(message, path=path)


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
            raise CassetteError(f"uri {_short(self.uri)!r}: {exc}") from None
        for name, value in zip(("scheme", "host", "port", "path", "query"), parts, strict=True):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "headers", _canonical_headers(self.headers))
        object.__setattr__(self, "body", bytes(self.body))

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or ``None``."""
        return _header_value(self.headers, name)

    def summary(self) -> str:
        """``METHOD uri``, the URI shortened for messages."""
        return f"{self.method} {_short(self.uri)}"


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


# --------------------------------------------------------------------------- YAML


def _is_text(body: bytes) -> str | None:
    """``body`` as a string if it is UTF-8 that YAML round-trips exactly, else ``None``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _NOT_TEXT_RE.search(text) else text


def _body_out(body: bytes) -> str | bytes:
    text = _is_text(body)
    return body if text is None else text  # bytes are dumped as !!binary (base64)


def _headers_out(headers: Headers) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, value in headers:
        grouped.setdefault(name, []).append(value)
    return grouped


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing multi-line text as ``|`` blocks.

    PyYAML falls back to a quoted style whenever a block cannot represent
    the string exactly. The pure-Python dumper is used on purpose: the same
    bytes whether or not libyaml is installed.
    """


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Plain and single-quoted scalars fold NEL / U+2028 / U+2029 (YAML line
    # breaks) into spaces; only the double-quoted style escapes them.
    if _NOT_TEXT_RE.search(value):
        style: str | None = '"'
    else:
        style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _where(source: str, *parts: object) -> str:
    out = source
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _require_mapping(value: object, where: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise CassetteError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _scalar_text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    # Hand-written files may leave numbers and dates unquoted.
    if isinstance(value, int | float | datetime.date) and not isinstance(value, bool):
        return value.isoformat() if isinstance(value, datetime.date) else str(value)
    raise CassetteError(f"{where}: expected a string, got {value!r:.80} (quote it in the YAML)")


def _headers_in(value: object, where: str) -> Headers:
    if value is None:
        return ()
    mapping = _require_mapping(value, where)
    out: list[tuple[str, str]] = []
    for name, values in mapping.items():
        if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
            raise CassetteError(f"{where}: {name!r:.80} is not a valid header name")
        items = values if isinstance(values, list) else [values]
        for i, item in enumerate(items):
            text = _scalar_text(item, _where(where, name, i))
            if not _FIELD_VALUE_RE.fullmatch(text):
                raise CassetteError(
                    f"{_where(where, name, i)}: header value has CR, LF, NUL or non-Latin-1 text"
                )
            out.append((name, text))
    return tuple(out)


def _body_in(value: object, where: str) -> bytes:
    encoding = "utf-8"
    if isinstance(value, Mapping):
        declared = value.get("encoding")
        if declared is not None:
            try:
                encoding = codecs.lookup(_scalar_text(declared, _where(where, "encoding"))).name
            except (LookupError, ValueError):
                raise CassetteError(
                    f"{where}.encoding: unknown encoding {declared!r:.80}"
                ) from None
        value = value.get("string")
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode(encoding)
        except (UnicodeError, LookupError, ValueError):  # LookupError: "rot13" is no text codec
            raise CassetteError(f"{where}: text is not encodable as {encoding}") from None
    raise CassetteError(f"{where}: expected text, !!binary or null, got {type(value).__name__}")


def _request_in(value: object, where: str) -> CassetteRequest:
    data = _require_mapping(value, where)
    method = data.get("method")
    if not isinstance(method, str) or not _TOKEN_RE.fullmatch(method) or len(method) > 32:
        raise CassetteError(f"{where}.method: {method!r:.80} is not an HTTP method")
    uri = data.get("uri")
    if not isinstance(uri, str):
        raise CassetteError(f"{where}.uri: expected a string, got {uri!r:.80}")
    headers = _headers_in(data.get("headers"), _where(where, "headers"))
    body = _body_in(data.get("body"), _where(where, "body"))
    try:
        return CassetteRequest(method=method, uri=uri, headers=headers, body=body)
    except CassetteError as exc:
        raise CassetteError(f"{where}.{exc}") from None


def _response_in(value: object, where: str) -> CassetteResponse:
    data = _require_mapping(value, where)
    status = data.get("status")
    message: object = ""
    if isinstance(status, Mapping):
        message = status.get("message") or ""
        status = status.get("code")
    # 1xx cannot be replayed as a final response (RFC 9110 §15.2).
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise CassetteError(f"{where}.status.code: {status!r:.80} is not a status in 200..599")
    reason = _scalar_text(message, _where(where, "status", "message"))
    if not _FIELD_VALUE_RE.fullmatch(reason):
        raise CassetteError(f"{where}.status.message: has CR, LF, NUL or non-Latin-1 text")
    return CassetteResponse(
        status=status,
        message=reason,
        headers=_headers_in(data.get("headers"), _where(where, "headers")),
        body=_body_in(data.get("body"), _where(where, "body")),
    )


@dataclass(frozen=True)
class Cassette:
    """An ordered, immutable list of interactions and its YAML form.

    ``Cassette.from_yaml(c.to_yaml()) == c`` for every cassette (headers
    are kept grouped by name, the order YAML gives back).
    """

    interactions: tuple[Interaction, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "interactions", tuple(self.interactions))

    def to_dict(self) -> dict[str, Any]:
        """The vcrpy-shaped document (bodies as ``str`` text or ``bytes``)."""
        return {
            "interactions": [
                {
                    "request": {
                        "body": _body_out(i.request.body) if i.request.body else None,
                        "headers": _headers_out(i.request.headers),
                        "method": i.request.method,
                        "uri": i.request.uri,
                    },
                    "response": {
                        "body": {"string": _body_out(i.response.body)},
                        "headers": _headers_out(i.response.headers),
                        "status": {"code": i.response.status, "message": i.response.message},
                    },
                }
                for i in self.interactions
            ],
            "version": 1,
        }

    def to_yaml(self) -> str:
        """The file's text: stable (sorted keys, fixed header comment) for clean diffs."""
        body: str = yaml.dump(
            self.to_dict(),
            Dumper=_Dumper,
            sort_keys=True,
            allow_unicode=True,
            default_flow_style=False,
        )
        return _HEADER + body

    @classmethod
    def from_yaml(cls, text: str | bytes, *, source: str = "cassette") -> Cassette:
        """Parse a cassette (ours or vcrpy's); :class:`CassetteError` for anything else.

        Never raises another exception, whatever ``text`` holds.
        """
        if len(text) > MAX_CASSETTE_BYTES:
            raise CassetteError(f"{source}: larger than {MAX_CASSETTE_BYTES} bytes")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CassetteError(f"{source}: not UTF-8 text: {exc}") from None
        try:
            doc = yaml.load(text, Loader=_Loader)  # a SafeLoader (C or Python)
        except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
            raise CassetteError(f"{source}: not valid YAML: {_short(str(exc), 400)}") from None
        data = _require_mapping(doc, source)
        version = data.get("version", 1)
        if version != 1:
            raise CassetteError(f"{source}: cassette version {version!r:.40} is not supported (1)")
        items = data.get("interactions")
        if not isinstance(items, list):
            raise CassetteError(f"{source}: expected an 'interactions:' list")
        if len(items) > MAX_INTERACTIONS:
            raise CassetteError(f"{source}: more than {MAX_INTERACTIONS} interactions")
        out: list[Interaction] = []
        for index, item in enumerate(items):
            where = _where(source, "interactions", index)
            entry = _require_mapping(item, where)
            out.append(
                Interaction(
                    request=_request_in(entry.get("request"), f"{where}.request"),
                    response=_response_in(entry.get("response"), f"{where}.response"),
                )
            )
        return cls(tuple(out))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Cassette:
        """Read and parse the file at ``path`` (:class:`CassetteError` if missing or invalid)."""
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = fh.read(MAX_CASSETTE_BYTES + 1)
        except OSError as exc:
            raise CassetteError(f"cannot read cassette {p}: {exc}", path=p) from exc
        try:
            return cls.from_yaml(data, source=str(p))
        except CassetteError as exc:
            raise CassetteError(str(exc), path=p) from None

    def save(self, path: str | os.PathLike[str]) -> bool:
        """Write the cassette to ``path`` atomically; ``False`` if the file already held it.

        The file is replaced in one ``rename``: readers (and a crash) see
        the old or the new cassette, never a mix. Parent folders are
        created. Raises :class:`CassetteError` if the write fails; the old
        file is then untouched.
        """
        p = Path(path)
        data = self.to_yaml().encode("utf-8")
        try:
            if p.read_bytes() == data:
                return False
        except OSError:
            pass  # absent (or unreadable: the write below reports it)
        _atomic_write(p, data)
        log.info("wrote cassette %s (%d interactions)", p, len(self.interactions))
        return True


def _atomic_write(path: Path, data: bytes) -> None:
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise CassetteError(f"cannot write cassette {path}: {exc}", path=path) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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


def _normalize_placeholders_b(data: bytes, store: SecretStore | None) -> bytes:
    prefix = PLACEHOLDER_PREFIX.encode("ascii")
    if prefix not in data:
        return data
    if store is not None:
        for name in store.names:
            data = data.replace(
                store.placeholder(name).encode("ascii"), prefix + name.encode("ascii")
            )
    return _PLACEHOLDER_RE_B.sub(lambda m: prefix + m.group(1), data)


def _normalize_basic(value: str, store: SecretStore | None) -> str:
    """Normalise placeholders inside ``Basic base64(user:pass)`` (RFC 7617)."""
    match = _BASIC_RE.fullmatch(value)
    if match is None:
        return value
    try:
        raw = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return value
    normalized = _normalize_placeholders_b(raw, store)
    if normalized == raw:
        return value
    token = base64.b64encode(normalized).decode("ascii")
    return f"{match.group(1)}{token}{match.group(3)}"


def _filter_query(uri: str, names: frozenset[str]) -> str:
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


def _short(text: str, limit: int = _SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    return repr(_short(request.body.decode("utf-8", "replace")))


_Matcher = tuple[Callable[[CassetteRequest], Hashable], Callable[[CassetteRequest], str]]
_MATCHER_TABLE: Final[dict[str, _Matcher]] = {
    "method": (lambda r: r.method, lambda r: repr(r.method)),
    "scheme": (lambda r: r.scheme, lambda r: repr(r.scheme)),
    "host": (lambda r: r.host, lambda r: repr(r.host)),
    "port": (lambda r: r.port, lambda r: str(r.port)),
    "path": (lambda r: r.path, lambda r: repr(_short(r.path))),
    "query": (lambda r: _query_key(r.query), lambda r: repr(_short(r.query))),
    "uri": (
        lambda r: (r.scheme, r.host, r.port, r.path, _query_key(r.query)),
        lambda r: repr(_short(r.uri)),
    ),
    "body": (_body_key, _show_body),
    "headers": (
        lambda r: tuple(sorted((n.lower(), v) for n, v in r.headers)),
        lambda r: _short(repr(r.headers)),
    ),
}


def _check_names(
    value: object, what: str, *, known: Sequence[str] | None = None
) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(f"{what}: expected a list of names, got {value!r:.80}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what}: {name!r:.80} is not a name")
        if known is not None and name not in known:
            raise ConfigError(f"{what}: unknown matcher {name!r}; known: {', '.join(known)}")
    return names


# --------------------------------------------------------------------------- player


class CassettePlayer:
    """Replays and records one cassette for one test (see the module docstring).

    Thread-safe: the driver calls :meth:`lookup`, :meth:`should_record`,
    :meth:`unmatched` and :meth:`record` from its threads while the test
    thread calls :meth:`save`, :meth:`unused` and :meth:`check`. Build it
    with :func:`open_cassette`.
    """

    def __init__(
        self,
        path: Path,
        mode: RecordMode,
        loaded: Cassette | None,
        *,
        matchers: Sequence[str] = DEFAULT_MATCHERS,
        filter_headers: Iterable[str] = DEFAULT_FILTER_HEADERS,
        filter_query: Iterable[str] = DEFAULT_FILTER_QUERY,
        filter_response_headers: Iterable[str] = (),
        secret_store: SecretStore | None = None,
        allow_playback_repeats: bool = False,
        max_interactions: int = MAX_INTERACTIONS,
    ) -> None:
        self.path = path
        self.mode: RecordMode = mode
        self.matchers = tuple(matchers)
        self.secret_store = secret_store
        self.allow_playback_repeats = allow_playback_repeats
        self.existed = loaded is not None
        self._filter_headers = frozenset(n.lower() for n in filter_headers)
        self._filter_query = frozenset(n.lower() for n in filter_query)
        self._filter_response = frozenset(n.lower() for n in filter_response_headers)
        self._max = max_interactions
        self._loaded: tuple[Interaction, ...] = () if loaded is None else loaded.interactions
        self._replays = mode in ("none", "new_episodes") or (mode == "once" and self.existed)
        self._records = mode in ("new_episodes", "all") or (mode == "once" and not self.existed)
        self._lock = threading.Lock()
        self._new: list[Interaction] = []
        self._played: set[int] = set()
        self._queues: dict[Hashable, deque[int]] = {}
        self._last: dict[Hashable, int] = {}
        self._misses: list[str] = []
        self._miss_count = 0
        self._dirty = False
        if self._replays:
            for index, interaction in enumerate(self._loaded):
                key = self._key(self._match_form(interaction.request))
                self._queues.setdefault(key, deque()).append(index)

    # ------------------------------------------------------------------ state

    @property
    def replays(self) -> bool:
        """Whether recorded interactions are replayed in this mode."""
        return self._replays

    @property
    def records(self) -> bool:
        """Whether unmatched requests go upstream and are recorded in this mode."""
        return self._records

    @property
    def interactions(self) -> tuple[Interaction, ...]:
        """The interactions loaded from the file (empty in ``all`` mode)."""
        return self._loaded

    @property
    def recorded(self) -> list[Interaction]:
        """A copy of the interactions recorded in this run, in order."""
        with self._lock:
            return list(self._new)

    @property
    def misses(self) -> list[str]:
        """The messages :meth:`unmatched` returned so far (the first 100)."""
        with self._lock:
            return list(self._misses)

    # ------------------------------------------------------------------ preparation

    def _clean(self, text: str) -> str:
        if self.secret_store is not None:
            text = self.secret_store.redact(text)
        return normalize_placeholders(text, self.secret_store)

    def _clean_b(self, data: bytes) -> bytes:
        if self.secret_store is not None:
            data = self.secret_store.redact(data)
        return _normalize_placeholders_b(data, self.secret_store)

    def _clean_header(self, name: str, value: str, filtered: frozenset[str]) -> str:
        lower = name.lower()
        if lower in filtered:
            return FILTERED
        value = self._clean(value)
        if lower in _CREDENTIAL_HEADERS:
            value = _normalize_basic(value, self.secret_store)
        return value

    def prepare_request(self, request: HttpRequest) -> CassetteRequest:
        """``request`` as it would be stored: redacted, normalised, filtered."""
        uri = _filter_query(self._clean(request.url), self._filter_query)
        headers = tuple(
            (n, self._clean_header(n, v, self._filter_headers)) for n, v in request.headers
        )
        return CassetteRequest(
            method=request.method, uri=uri, headers=headers, body=self._clean_b(request.body)
        )

    def prepare_response(self, response: HttpResponse) -> CassetteResponse:
        """``response`` as it would be stored: redacted, normalised, filtered."""
        return CassetteResponse(
            status=response.status,
            message=self._clean(response.reason),
            headers=tuple(
                (n, self._clean_header(n, v, self._filter_response)) for n, v in response.headers
            ),
            body=self._clean_b(response.body),
        )

    def _match_form(self, recorded: CassetteRequest) -> CassetteRequest:
        """A loaded request under this player's filters and placeholder normalisation.

        A cassette recorded with other filters (or written by hand or by
        vcrpy) still matches the live request, which is prepared the same way.
        """
        uri = _filter_query(normalize_placeholders(recorded.uri), self._filter_query)
        headers = tuple(
            (n, FILTERED if n.lower() in self._filter_headers else normalize_placeholders(v))
            for n, v in recorded.headers
        )
        body = _normalize_placeholders_b(recorded.body, None)
        if (uri, headers, body) == (recorded.uri, recorded.headers, recorded.body):
            return recorded
        return CassetteRequest(recorded.method, uri, headers, body)

    def _try_prepare(self, request: HttpRequest) -> CassetteRequest | None:
        try:
            return self.prepare_request(request)
        except CassetteError as exc:  # the interceptor validated the URL: not expected
            log.debug("cassette %s: cannot prepare %s: %s", self.path, request.method, exc)
            return None

    def _key(self, request: CassetteRequest) -> Hashable:
        return tuple(_MATCHER_TABLE[m][0](request) for m in self.matchers)

    # ------------------------------------------------------------------ per request

    def lookup(self, request: HttpRequest) -> HttpResponse | None:
        """The recorded response to replay for ``request``, or ``None``.

        Marks the interaction played; identical requests get matching
        interactions in recorded order. Always ``None`` in ``all`` mode and
        for a new cassette in ``once`` mode.
        """
        if not self._replays:
            return None
        live = self._try_prepare(request)
        if live is None:
            return None
        key = self._key(live)
        with self._lock:
            queue = self._queues.get(key)
            if queue:
                index = queue.popleft()
                self._played.add(index)
                self._last[key] = index
            elif self.allow_playback_repeats and key in self._last:
                index = self._last[key]
            else:
                return None
        log.debug("cassette %s: replaying #%d for %s", self.path, index, request.method)
        return self._loaded[index].response.to_http()

    def should_record(self, request: HttpRequest) -> bool:
        """Whether a request :meth:`lookup` did not answer may go upstream and be recorded.

        ``False`` in ``none`` mode, in ``once`` mode on an existing
        cassette, and once the cassette holds ``max_interactions``: the
        driver must then refuse the request with :meth:`unmatched`.
        """
        if not self._records:
            return False
        with self._lock:
            return self._has_room()

    def record(self, request: HttpRequest, response: HttpResponse) -> Interaction:
        """Store the guest's ``request`` and the upstream's ``response``; return what was stored.

        Pass the request the guest sent (placeholders), not the one with
        secrets substituted; values are redacted anyway. Raises
        :class:`CassetteError` in a mode that does not record or past
        ``max_interactions`` (check :meth:`should_record` first).
        """
        if not self._records:
            raise CassetteError(
                f"cassette {self.path}: record mode {self.mode!r} does not record here",
                path=self.path,
            )
        interaction = Interaction(self.prepare_request(request), self.prepare_response(response))
        with self._lock:
            if not self._has_room():
                raise CassetteError(
                    f"cassette {self.path}: more than {self._max} interactions", path=self.path
                )
            self._new.append(interaction)
            self._dirty = True
        log.debug(
            "cassette %s: recorded %s -> %d",
            self.path,
            interaction.request.summary(),
            response.status,
        )
        return interaction

    def _has_room(self) -> bool:
        # The caller holds the lock.
        kept = len(self._loaded) if self.mode == "new_episodes" else 0
        return kept + len(self._new) < self._max

    def unmatched(self, request: HttpRequest) -> str:
        """Why ``request`` cannot be answered, naming the closest recorded requests.

        The message says what the record mode allows, how many matching
        interactions were already played, and for the closest candidates
        which matcher differed (recorded vs. got). It is also kept for
        :meth:`check`. Never contains a secret value.
        """
        live = self._try_prepare(request)
        if live is None:
            shown = f"{request.method} {_short(self._clean(request.url))}"
            return self._miss(f"{shown} cannot be matched against cassette {self.path}")
        lines = [f"{live.summary()} is not in cassette {self.path}"]
        if not self.existed and self.mode != "all":
            lines.append(
                "  the cassette file does not exist; record it with "
                "--gondolin-record-mode=once (or new_episodes)"
            )
        elif self.mode == "none":
            lines.append(
                "  record mode 'none' only replays; re-run with "
                "--gondolin-record-mode=new_episodes to record this request"
            )
        elif self.mode == "once":
            lines.append(
                "  record mode 'once' only replays an existing cassette; delete it to "
                "re-record, or use --gondolin-record-mode=new_episodes to add this request"
            )
        if self._records and not self.should_record(request):
            lines.append(f"  the cassette holds its maximum of {self._max} interactions")
        key_fns = [(m, *_MATCHER_TABLE[m]) for m in self.matchers]
        live_keys = [fn(live) for _, fn, _ in key_fns]
        candidates: list[tuple[int, int, list[str]]] = []
        exhausted = 0
        for index, interaction in enumerate(self._loaded if self._replays else ()):
            recorded = self._match_form(interaction.request)
            diffs = [
                f"{name}: recorded {show(recorded)}, got {show(live)}"
                for (name, fn, show), want in zip(key_fns, live_keys, strict=True)
                if fn(recorded) != want
            ]
            if diffs:
                candidates.append((len(diffs), index, diffs))
            else:
                exhausted += 1
        if exhausted:
            lines.append(
                f"  {exhausted} recorded interaction(s) match it but were already played "
                "(each plays once, in recorded order; allow_playback_repeats=True replays "
                "the last one again)"
            )
        if not self._loaded:
            lines.append("  the cassette has no recorded interactions")
        elif candidates and not exhausted:
            lines.append(f"  closest recorded requests (matchers: {', '.join(self.matchers)}):")
            for _, index, diffs in sorted(candidates)[:_CLOSEST_SHOWN]:
                summary = self._loaded[index].request.summary()
                lines.append(f"    #{index} {summary}: differs in {'; '.join(diffs)}")
        return self._miss("\n".join(lines))

    def _miss(self, message: str) -> str:
        with self._lock:
            self._miss_count += 1
            if len(self._misses) < _MAX_MISSES_KEPT:
                self._misses.append(message)
        log.debug("cassette miss: %s", message)
        return message

    # ------------------------------------------------------------------ after the test

    def unused(self) -> list[Interaction]:
        """Loaded interactions never replayed, in file order (none unless replaying)."""
        if not self._replays:
            return []
        with self._lock:
            played = set(self._played)
        return [i for n, i in enumerate(self._loaded) if n not in played]

    def save(self) -> bool:
        """Write the cassette if this run recorded something; ``True`` if the file changed.

        ``new_episodes`` writes the loaded interactions followed by the new
        ones; ``once`` (new cassette) and ``all`` write only the new ones.
        Idempotent: a second call writes nothing new. Raises
        :class:`CassetteError` if the write fails.
        """
        with self._lock:
            if not self._dirty:
                return False
            kept = self._loaded if self.mode == "new_episodes" else ()
            cassette = Cassette((*kept, *self._new))
            written = cassette.save(self.path)
            self._dirty = False
        return written

    def check(self, *, allow_unused: bool = True) -> None:
        """Raise :class:`CassetteMismatch` if a request missed the cassette.

        With ``allow_unused=False`` interactions never replayed are an
        error too (pytest-httpx's "mocked but not requested").
        """
        with self._lock:
            misses = list(self._misses)
            count = self._miss_count
        unused = [] if allow_unused else self.unused()
        if not misses and not unused:
            return
        parts = []
        if misses:
            parts.append(f"{count} request(s) did not match cassette {self.path}:")
            parts.extend(misses)
            if count > len(misses):
                parts.append(f"... and {count - len(misses)} more")
        if unused:
            parts.append(f"{len(unused)} recorded interaction(s) in {self.path} were never used:")
            parts.extend(f"  {i.request.summary()}" for i in unused[:20])
            if len(unused) > 20:
                parts.append(f"  ... and {len(unused) - 20} more")
        raise CassetteMismatch("\n".join(parts), path=self.path, misses=misses, unused=unused)


def open_cassette(
    path: str | os.PathLike[str],
    mode: str,
    *,
    matchers: Sequence[str] = DEFAULT_MATCHERS,
    filter_headers: Iterable[str] = DEFAULT_FILTER_HEADERS,
    filter_query: Iterable[str] = DEFAULT_FILTER_QUERY,
    filter_response_headers: Iterable[str] = (),
    secret_store: SecretStore | None = None,
    allow_playback_repeats: bool = False,
    max_interactions: int = MAX_INTERACTIONS,
) -> CassettePlayer:
    """Open the cassette at ``path`` for one test in record ``mode``.

    Loads the file unless ``mode`` is ``all`` (which rewrites it). Raises
    :class:`ConfigError` for a bad mode, matcher or filter list and
    :class:`CassetteError` for an unreadable or invalid file.
    """
    if mode not in RECORD_MODES:
        raise ConfigError(f"record mode must be one of {', '.join(RECORD_MODES)}, got {mode!r}")
    names = _check_names(matchers, "cassette matchers", known=MATCHERS)
    if not names:
        raise ConfigError("cassette matchers: empty; every request would match the first one")
    filters = {
        what: _check_names(value, what)
        for what, value in (
            ("filter_headers", filter_headers),
            ("filter_query", filter_query),
            ("filter_response_headers", filter_response_headers),
        )
    }
    if not isinstance(max_interactions, int) or max_interactions < 1:
        raise ConfigError(f"max_interactions must be a positive int, got {max_interactions!r}")
    p = Path(path)
    loaded: Cassette | None = None
    if mode != "all" and (p.exists() or p.is_symlink()):
        loaded = Cassette.load(p)  # "all" rewrites the file: never read it
    player = CassettePlayer(
        p,
        mode,  # narrowed by the RECORD_MODES check above
        loaded,
        matchers=names,
        filter_headers=filters["filter_headers"],
        filter_query=filters["filter_query"],
        filter_response_headers=filters["filter_response_headers"],
        secret_store=secret_store,
        allow_playback_repeats=bool(allow_playback_repeats),
        max_interactions=max_interactions,
    )
    log.debug(
        "cassette %s opened in mode %s (%d interactions, replays=%s, records=%s)",
        p,
        mode,
        len(player.interactions),
        player.replays,
        player.records,
    )
    return player


# --------------------------------------------------------------------------- paths

_UNSAFE_CHARS: Final = re.compile(r"[^A-Za-z0-9._\-\[\]=+,@]")
# Device names Windows refuses as file names, whatever the extension.
_WINDOWS_RESERVED: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
)


def _safe_stem(name: str) -> str:
    """A portable file-name stem for ``name``; distinct names give distinct stems.

    Characters outside ``[A-Za-z0-9._-[]=+,@]`` become ``_``; whenever
    anything was changed (or shortened) a hash of the original is appended,
    so ``test[a b]`` and ``test[a/b]`` do not collide.
    """
    safe = _UNSAFE_CHARS.sub("_", name).strip(".")
    changed = (
        safe != name
        or not safe
        or len(safe) > _MAX_STEM
        or safe.split(".", 1)[0].upper() in _WINDOWS_RESERVED
    )
    if changed:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{safe[:_MAX_STEM].rstrip('.')}-{digest}" if safe else digest
    return safe


def default_cassette_path(item: pytest.Item) -> Path:
    """``<test dir>/cassettes/<module>/<Class.>test_name[id].yaml``, like pytest-recording.

    Parametrize ids are kept when they are portable file-name characters,
    else sanitised with a short hash (see :func:`_safe_stem`).
    """
    import pytest

    classes = [node.name for node in item.listchain() if isinstance(node, pytest.Class)]
    name = ".".join([*classes, item.name])
    module = Path(item.path)
    return module.parent / "cassettes" / _safe_stem(module.stem) / f"{_safe_stem(name)}.yaml"


def resolve_cassette_option(
    value: object,
    *,
    where: str,
    item: pytest.Item | None = None,
    base_dir: Path | None = None,
) -> Path | None:
    """The cassette path a ``cassette=`` marker / ``vm_factory`` argument stands for.

    ``None``/``False``: no cassette. ``True``: :func:`default_cassette_path`
    (needs ``item``). A path: relative ones are resolved against
    ``base_dir``, else the test file's folder, else the working directory;
    ``.yaml`` is added when there is no suffix. Raises :class:`ConfigError`
    naming ``where`` for anything else.
    """
    if value is None or value is False:
        return None
    if value is True:
        if item is None:
            raise ConfigError(f"{where}: cassette=True needs a test; pass a file path instead")
        return default_cassette_path(item)
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(f"{where}: cassette must be True or a file path, got {value!r:.80}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise ConfigError(f"{where}: cassette path must be text, got {value!r:.80}")
    path = Path(text).expanduser()
    if not path.is_absolute():
        if base_dir is None and item is not None:
            base_dir = Path(item.path).parent
        path = (base_dir or Path.cwd()) / path
    if not path.suffix:
        path = path.with_suffix(".yaml")
    return path
