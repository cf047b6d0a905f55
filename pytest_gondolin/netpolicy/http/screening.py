"""What the host does to an answer, and to a request, that a secret value may hide in.

Split from :mod:`.mediation` (which plans and runs requests) so each stays
readable: the request fields a secret-carrying request loses upstream
(:func:`secret_request_headers`), the screening of an upstream answer so
redaction can search it (:func:`screen_response`, which refuses partial
content with :class:`PartialContentError`), and the redaction itself
(:func:`redact_response`). No I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from typing import Final

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.content_coding import (
    ContentCodingError,
    accept_identity,
    content_codings,
    decode_content,
)
from pytest_gondolin.netpolicy.http.messages import MAX_BODY_BYTES, HttpResponse
from pytest_gondolin.netpolicy.http.secrets import SecretStore

__all__ = [
    "SLICING_REQUEST_FIELDS",
    "PartialContentError",
    "redact_response",
    "screen_response",
    "secret_request_headers",
]

log = logging.getLogger(__name__)

#: Request fields removed from a request that carries a secret value: each asks
#: an honest server for a piece of the representation, or for a form of it that
#: redaction does not search.
SLICING_REQUEST_FIELDS: Final = frozenset(
    {
        "range",  # RFC 9110 §14.2: the value in pieces, none of them whole
        "if-range",  # RFC 9110 §13.1.5: a condition on Range, meaningless without it
        "want-digest",  # RFC 3230 §4.3.1: a digest of a body that held the value
        "want-repr-digest",  # RFC 9530 §4: the same, of the representation
        "want-content-digest",  # RFC 9530 §4: the same, of the content
        "accept-charset",  # RFC 9110 §12.5.2: UTF-7, EBCDIC, ... are not searched
        "te",  # RFC 9110 §10.1.4: transfer codings (also dropped as hop-by-hop)
    }
)
# Digests of the body or representation (RFC 3230, RFC 9530, RFC 1864):
# computed upstream over the value, they would let the guest test guesses.
_DIGESTS: Final = frozenset({"content-md5", "digest", "content-digest", "repr-digest"})
# Response fields computed from the body's bytes (RFC 9110 §8.6, §8.8.3; RFC
# 9530; RFC 1864): wrong once the body is redacted or decoded.
_BODY_DERIVED: Final = _DIGESTS | {"content-length", "etag"}
# RFC 9110 §5.6.2: a field name is a token.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class PartialContentError(NetworkPolicyError):
    """A partial response (``206``, or one with ``Content-Range``) to a request carrying a secret.

    The host removed ``Range`` from that request; a piece of the
    representation all the same could hold part of the value, which no
    redaction recognises. Carries ``status``.
    """

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(
            f"upstream answered {status} with a part of the representation (Range is "
            "not forwarded with a secret: a piece of the value cannot be redacted)"
        )


def _without(
    headers: Iterable[tuple[str, str]], names: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    return tuple((n, v) for n, v in headers if n.lower() not in names)


def secret_request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` as sent upstream for a request carrying a secret value.

    Without :data:`SLICING_REQUEST_FIELDS`, and with one ``Accept-Encoding:
    identity`` (:func:`~.content_coding.accept_identity`).
    """
    return accept_identity(_without(headers, SLICING_REQUEST_FIELDS))


def _redact_fields(
    fields: Iterable[tuple[str, str]], secrets: SecretStore
) -> list[tuple[str, str]]:
    out = []
    for name, value in fields:
        clean = secrets.redact(name)
        if clean != name and not _TOKEN.fullmatch(clean):
            continue  # a value in a field name, whose redacted form is no field name
        out.append((clean, secrets.redact(value)))
    return out


def redact_response(response: HttpResponse, secrets: SecretStore | None) -> HttpResponse:
    """``response`` with every secret value redacted (head, body, reason, trailers).

    Fields computed from the body go when the body changed (the framing
    adds ``Content-Length`` back); a field whose name held a value is dropped.
    """
    if secrets is None or not secrets.names:
        return response
    headers = _redact_fields(response.headers, secrets)
    trailers = tuple(_redact_fields(response.trailers, secrets))  # HTTP/2 upstreams (gRPC)
    body = secrets.redact(response.body)
    if body != response.body:  # the framing adds Content-Length back
        return dataclasses.replace(
            response,
            headers=_without(headers, _BODY_DERIVED),
            body=body,
            reason=secrets.redact(response.reason),
            trailers=trailers,
        )
    return dataclasses.replace(
        response,
        headers=tuple(headers),
        body=body,
        reason=secrets.redact(response.reason),
        trailers=trailers,
    )


def screen_response(
    response: HttpResponse,
    secrets: SecretStore | None,
    *,
    carries_secret: bool,
    max_decoded_bytes: int = MAX_BODY_BYTES,
) -> HttpResponse:
    """``response`` made searchable wherever a secret value could hide in it.

    With no secrets the response is returned as is. For a request that
    ``carries_secret``, a partial response (``206`` or ``Content-Range``)
    raises :class:`PartialContentError` and digest fields are dropped.
    Then, with no ``Content-Encoding`` or an empty body (HEAD, 204, 304)
    the response is returned as it is by then. Otherwise the body is
    decoded; for a request that ``carries_secret`` the decoded body is
    always what the guest gets, and a body that cannot be decoded within
    ``max_decoded_bytes`` raises :class:`~.content_coding.ContentCodingError`.
    For any other request the decoded body replaces the coded one only when
    it holds a value; undecodable bodies are returned as is. Redaction
    itself is the caller's (:func:`redact_response`).
    """
    if secrets is None or not secrets.names:
        return response
    if carries_secret:
        if response.status == 206 or response.header("Content-Range") is not None:
            raise PartialContentError(response.status)
        if any(n.lower() in _DIGESTS for n, _ in response.headers):
            response = dataclasses.replace(response, headers=_without(response.headers, _DIGESTS))
    if not response.body:
        return response
    codings = content_codings(response.headers)
    if not codings:
        return response
    try:
        body = decode_content(response.body, codings, max_bytes=max_decoded_bytes)
    except ContentCodingError as exc:
        if carries_secret:
            raise
        log.debug("response body not searched for secret values: %s", exc)
        return response
    if not carries_secret and secrets.redact(body) == body:
        return response  # nothing to hide: the upstream's bytes, unchanged
    log.debug("decoded a %s response body to redact it (%d bytes)", "/".join(codings), len(body))
    return dataclasses.replace(
        response,
        headers=_without(response.headers, _BODY_DERIVED | {"content-encoding"}),
        body=body,
    )
