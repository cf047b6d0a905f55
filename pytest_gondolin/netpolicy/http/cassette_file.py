"""Cassette files: the on-disk format, read and written as YAML.

A cassette is an ordered, immutable list of recorded HTTP exchanges
(:class:`Cassette` of :class:`~.cassette_values.Interaction`, each a
:class:`~.cassette_values.CassetteRequest` and a
:class:`~.cassette_values.CassetteResponse`). This module only turns one
into YAML and back; record modes live in :mod:`.cassette`, matching and
secret preparation in :mod:`.cassette_match`.

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

A cassette file is hostile input (hand-edited, written by another tool,
truncated): :meth:`Cassette.from_yaml` uses YAML's safe loader only, bounds
the size (:data:`MAX_CASSETTE_BYTES`) and the interaction count
(:data:`MAX_INTERACTIONS`), and validates every field (RFC 9110 tokens for
methods and header names, no CR/LF/NUL in header values and reason
phrases, statuses 200..599 or 101 (a WebSocket handshake, replayed as a
refusal), absolute http(s) URIs). Anything else raises
:class:`CassetteError`, never another exception. :meth:`Cassette.save`
replaces the file atomically.
"""

from __future__ import annotations

import codecs
import datetime
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from pytest_gondolin.netpolicy.http.cassette_values import (
    FILTERED,
    CassetteError,
    CassetteRequest,
    CassetteResponse,
    Interaction,
    shorten,
)
from pytest_gondolin.netpolicy.http.recorder import Headers

__all__ = ["MAX_CASSETTE_BYTES", "MAX_INTERACTIONS", "Cassette"]

log = logging.getLogger(__name__)

#: Largest cassette file loaded; bodies are at most 64 MiB each, so this
#: fits a few big downloads while refusing to exhaust memory on a mistake.
MAX_CASSETTE_BYTES: Final = 256 * 1024 * 1024
#: Interactions per cassette; a test recording more is probably looping.
MAX_INTERACTIONS: Final = 10_000

_HEADER = (
    "# pytest-gondolin cassette (vcrpy format). Secrets appear as GONDOLIN_SECRET_<NAME>,\n"
    f"# filtered values as {FILTERED}.\n"
)
# RFC 9110 §5.6.2 token: methods and header names.
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 §5.5: field values are visible ASCII, obs-text, SP and HTAB (no CR, LF, NUL).
_FIELD_VALUE_RE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# Text that PyYAML cannot round-trip as a string: C0/C1 controls except TAB,
# LF and CR; NEL and the Unicode line/paragraph separators (read back as
# line breaks inside block scalars); BOM and non-characters (refused or
# stripped by the reader); lone surrogates. Such bodies are written as
# !!binary.
_NOT_TEXT_RE: Final = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]"
)


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
    if (
        not isinstance(status, int)
        or isinstance(status, bool)
        or not (200 <= status <= 599 or status == 101)
    ):
        raise CassetteError(
            f"{where}.status.code: {status!r:.80} is not a status in 200..599 (or 101)"
        )
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
            raise CassetteError(f"{source}: not valid YAML: {shorten(str(exc), 400)}") from None
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
