"""Content codings (RFC 9110 §8.4): read them off a response and undo them, bounded.

Sans-IO. :mod:`.mediation` uses it so that a secret's real value cannot
hide from redaction inside a compressed response body: redaction compares
bytes, and ``gzip(b"... s3cret ...")`` does not contain ``b"s3cret"``.

:func:`content_codings` lists the codings a response's ``Content-Encoding``
fields say were applied, in order; :func:`decode_content` undoes them, last
applied first. Decoded:

=============  ============================================================
``identity``   nothing to do (also: empty list elements)
``gzip``       RFC 1952, ``x-gzip`` too (RFC 9110 §8.4.1.3); several
               members are decoded in turn, like ``gzip -d``
``deflate``    the zlib format (RFC 1950), as RFC 9110 §8.4.1.2 specifies,
               or the raw RFC 1951 stream some servers send instead
``br``         RFC 7932, only when a ``brotli`` module (1.2 or later: its
               decoder can bound its output) is importable
=============  ============================================================

Anything else (``compress``, ``zstd``, an unknown token), corrupt or
truncated data, trailing bytes after the last stream, or an output larger
than ``max_bytes`` (a decompression bomb) raises
:class:`ContentCodingError`, never another exception: the caller decides
what to do with a body it cannot read.

:func:`accept_identity` is the request side: the ``Accept-Encoding`` that
asks the upstream not to encode at all.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Final

from pytest_gondolin.errors import NetworkPolicyError

__all__ = [
    "DECODABLE",
    "ContentCodingError",
    "accept_identity",
    "content_codings",
    "decode_content",
]

# RFC 9110 §8.4.1: x-gzip (and x-compress) are aliases kept for old software.
_ALIASES: Final = {"x-gzip": "gzip", "x-compress": "compress"}
# Output asked of the brotli decoder per call: progress stays visible to the cap.
_BROTLI_STEP: Final = 1 << 20


def _brotli() -> Any:
    """The ``brotli`` module if it is there and bounds its output (``>= 1.2``), else None."""
    try:
        module = importlib.import_module("brotli")
    except ImportError:
        return None
    decompressor = getattr(module, "Decompressor", None)
    if decompressor is None or not hasattr(decompressor, "can_accept_more_data"):
        return None  # < 1.2: process() has no output_buffer_limit, so no bomb cap
    return module


_BROTLI: Final = _brotli()
#: The codings :func:`decode_content` can undo in this process.
DECODABLE: Final = frozenset({"gzip", "deflate"} | ({"br"} if _BROTLI is not None else set()))


class ContentCodingError(NetworkPolicyError):
    """A body the host cannot (or will not) decode.

    Carries ``coding`` (the token, lower-cased) and ``bomb`` (True when the
    decoded body would exceed the cap).
    """

    def __init__(self, coding: str, message: str, *, bomb: bool = False) -> None:
        self.coding = coding
        self.bomb = bomb
        super().__init__(f"Content-Encoding {coding!r}: {message}")


def content_codings(headers: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The codings named by every ``Content-Encoding`` field, in the order they were applied.

    Lower-cased, aliases resolved, ``identity`` and empty list elements
    dropped (RFC 9110 §5.3: repeated fields form one comma-separated list).
    """
    out: list[str] = []
    for name, value in headers:
        if name.lower() != "content-encoding":
            continue
        for token in value.split(","):
            coding = token.strip().lower()
            coding = _ALIASES.get(coding, coding)
            if coding and coding != "identity":
                out.append(coding)
    return tuple(out)


def accept_identity(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with every ``Accept-Encoding`` replaced by one ``Accept-Encoding: identity``.

    Added even when the request had none: a request without the field
    accepts any coding (RFC 9110 §12.5.3).
    """
    out = [(n, v) for n, v in headers if n.lower() != "accept-encoding"]
    out.append(("Accept-Encoding", "identity"))
    return out


def decode_content(body: bytes, codings: Sequence[str], *, max_bytes: int) -> bytes:
    """``body`` with ``codings`` (as from :func:`content_codings`) undone, last first.

    Every intermediate and the final result hold at most ``max_bytes``
    bytes; more raises :class:`ContentCodingError` with ``bomb=True``
    before more than about that much memory is used. An empty ``body``
    stays empty for any decodable coding.
    """
    for coding in reversed(codings):
        if coding == "gzip":
            body = _gunzip(body, max_bytes)
        elif coding == "deflate":
            body = _inflate_deflate(body, max_bytes)
        elif coding == "br" and _BROTLI is not None:
            body = _unbrotli(_BROTLI, body, max_bytes)
        elif coding == "br":
            raise ContentCodingError(
                coding, "no bounded brotli decoder here (install brotli >= 1.2 to decode it)"
            )
        else:
            raise ContentCodingError(coding, "not a coding the host can decode")
    return body


def _bomb(coding: str, max_bytes: int) -> ContentCodingError:
    return ContentCodingError(
        coding, f"decodes to more than {max_bytes} bytes (a decompression bomb?)", bomb=True
    )


def _inflate(data: bytes, wbits: int, coding: str, remaining: int) -> tuple[bytes, bytes]:
    """One complete zlib/gzip/raw-deflate stream at the start of ``data``: (output, the rest)."""
    decoder = zlib.decompressobj(wbits)
    try:
        # max_length stops the bomb early; 0 would mean "unbounded", hence the + 1.
        out = decoder.decompress(data, remaining + 1)
    except zlib.error as exc:
        raise ContentCodingError(coding, f"corrupt data ({exc})") from None
    if len(out) > remaining:
        raise _bomb(coding, remaining)
    if not decoder.eof:
        raise ContentCodingError(coding, "truncated data")
    return out, decoder.unused_data


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    out = bytearray()
    rest = body
    while rest:
        member, rest = _inflate(rest, 16 + zlib.MAX_WBITS, "gzip", max_bytes - len(out))
        out += member
        if not rest.strip(b"\0"):
            break  # gzip(1) tolerates zero padding after the last member
    return bytes(out)


def _looks_like_zlib(data: bytes) -> bool:
    # RFC 1950 §2.2: CM = 8 (deflate), CINFO <= 7, and CMF*256 + FLG a multiple of 31.
    return (
        len(data) >= 2
        and data[0] & 0x0F == 8
        and data[0] >> 4 <= 7
        and ((data[0] << 8) | data[1]) % 31 == 0
    )


def _inflate_deflate(body: bytes, max_bytes: int) -> bytes:
    if not body:
        return b""
    wbits = zlib.MAX_WBITS if _looks_like_zlib(body) else -zlib.MAX_WBITS
    out, rest = _inflate(body, wbits, "deflate", max_bytes)
    if rest:
        raise ContentCodingError("deflate", f"{len(rest)} bytes after the end of the stream")
    return out


def _unbrotli(module: Any, body: bytes, max_bytes: int) -> bytes:
    if not body:
        return b""
    decoder = module.Decompressor()
    step = min(_BROTLI_STEP, max_bytes + 1)
    try:
        out = bytearray(decoder.process(body, output_buffer_limit=step))
        while len(out) <= max_bytes and not decoder.is_finished():
            more = decoder.process(b"", output_buffer_limit=step)
            if not more:
                break
            out += more
    except module.error as exc:
        raise ContentCodingError("br", f"corrupt data ({exc})") from None
    if len(out) > max_bytes:
        raise _bomb("br", max_bytes)
    if not decoder.is_finished():
        raise ContentCodingError("br", "truncated data")
    return bytes(out)
