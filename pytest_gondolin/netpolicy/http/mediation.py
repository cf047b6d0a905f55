"""The per-request pipeline: what the host answers to one guest HTTP request.

In the order the modules' authors asked for: a stub registered on the
recorder -> ``policy.decide`` -> ``secrets.apply`` (all in
:func:`plan_request`, no I/O, on the packet thread) -> ``resolve_upstream``
-> ``fetch_upstream`` (:func:`run_upstream`, blocking, on a worker thread).

Every outcome is a response for the guest plus an
:class:`~.recorder.Exchange` carrying the guest's own headers
(placeholders, never secret values). Reasons end with ``[rule: <rule>]``,
the format the interceptor uses for its own refusals, so tests can match
on the rule.

Secret values never come back. Every response (upstream, replayed, stub)
is redacted before the guest, the recorder or a cassette sees it, so an
upstream echoing a credential back cannot leak it. Redaction
(:meth:`~.secrets.SecretStore.redact`) finds the value's bytes and every
common faithful encoding of them (JSON, HTML and percent escapes, UTF-16,
base64, hex: :mod:`.secret_forms`), in the body, the reason and every
header's bytes. It needs the whole value in one piece, in clear; hence
(:func:`screen_response`, with :mod:`.content_coding`):

* a request that carries a substituted secret goes upstream with
  ``Accept-Encoding: identity`` whatever the guest asked for, and without
  the fields that ask an honest server for a piece or a transformation of
  the representation (:data:`SLICING_REQUEST_FIELDS`: ``Range`` and
  ``If-Range``, digest requests, ``Accept-Charset``, ``TE``). The guest's
  own headers are what is recorded;
* a partial response to it all the same (``206`` or ``Content-Range``,
  RFC 9110 §14.4, §15.3.7: a ``multipart/byteranges`` body splits the
  value across parts) is never passed on: the guest gets a 502 with
  ``X-Gondolin-Error: range``, recorded as "allowed" with the reason.
  Digest fields (``Digest``, ``Content-Digest``, ``Repr-Digest``,
  ``Content-MD5``) are dropped from every response to it: computed over a
  body that held the value, they would let the guest test guesses of it;
* if the response to it is content-coded all the same, the host decodes it
  (gzip, deflate, br when available, stacked), bounded by
  :data:`~.messages.MAX_BODY_BYTES`, and the guest gets the decoded, redacted
  body without ``Content-Encoding`` (the framing recomputes
  ``Content-Length``; digests and ``ETag`` of the encoded body are
  dropped). A coding the host cannot decode, corrupt data or a
  decompression bomb is never passed on: the guest gets a 502 with
  ``X-Gondolin-Error: content-encoding``, recorded as "allowed" (the
  request did reach the upstream) with the reason;
* the response to any other request is decoded only to look: if the
  decoded body holds a value (a stateful upstream returning what an
  earlier request sent), the guest gets it decoded and redacted,
  otherwise the upstream's bytes unchanged. A body it cannot decode is
  passed on as before (raw bytes redacted): such a request never carried
  a value, so this is defence in depth, not the guarantee.

Transfer codings need nothing extra: the upstream client (h11) removes
``chunked`` and refuses any other, so redaction sees the whole body, a
value split across chunks included. An upstream that transforms the value
in a way :mod:`.secret_forms` does not list (hashes or encrypts it,
compresses without saying so, escapes its letters) defeats any
redaction: send secrets only to hosts you trust with them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.cassette import CassettePlayer
from pytest_gondolin.netpolicy.http.cassette_values import CassetteError
from pytest_gondolin.netpolicy.http.content_coding import ContentCodingError
from pytest_gondolin.netpolicy.http.messages import (
    HttpRequest,
    HttpResponse,
    denial_response,
    make_exchange,
)
from pytest_gondolin.netpolicy.http.policy import Decision, NetworkPolicy, resolve_upstream
from pytest_gondolin.netpolicy.http.recorder import Exchange, ExchangeDecision, Recorder
from pytest_gondolin.netpolicy.http.screening import (
    SLICING_REQUEST_FIELDS,
    PartialContentError,
    redact_response,
    screen_response,
    secret_request_headers,
)
from pytest_gondolin.netpolicy.http.secrets import SecretLeak, SecretStore
from pytest_gondolin.netpolicy.http.upstream import DEFAULT_UPSTREAM_TIMEOUT, fetch_upstream
from pytest_gondolin.netpolicy.http.upstream_h2 import fetch_upstream_h2
from pytest_gondolin.netpolicy.http.websocket import (
    SECRET_REFUSAL,
    Upgraded,
    is_websocket,
    open_websocket,
    secret_host_refusal,
)

__all__ = [
    "SLICING_REQUEST_FIELDS",
    "Mediated",
    "MediationContext",
    "PartialContentError",
    "UpstreamJob",
    "error_response",
    "internal_error",
    "plan_request",
    "run_upstream",
    "screen_response",
    "secret_request_headers",
    "with_rule",
]

log = logging.getLogger(__name__)


def error_response(status: int, message: str, *, kind: str) -> HttpResponse:
    """A ``text/plain`` response for a request the host could not complete.

    Unlike :func:`~.messages.denial_response` (a policy refusal) this is for an
    allowed request that failed on the way (upstream down, TLS verification
    failed): ``X-Gondolin-Error`` names the ``kind``.
    """
    body = f"pytest-gondolin could not complete this request: {message}\n"
    safe_kind = "".join(c if " " <= c <= "~" else "?" for c in kind)[:100]
    return HttpResponse(
        status=status,
        headers=(
            ("Content-Type", "text/plain; charset=utf-8"),
            ("X-Gondolin-Error", safe_kind),
            ("Cache-Control", "no-store"),
        ),
        body=body.encode("utf-8", "replace"),
    )


def with_rule(reason: str, rule: str | None) -> str:
    """The record's ``reason``: the sentence, then the rule as the interceptor writes it."""
    return f"{reason} [rule: {rule or 'none'}]"


@dataclass(frozen=True)
class MediationContext:
    """The policy, secrets and recorder a request is judged by (captured when it arrives)."""

    policy: NetworkPolicy
    secrets: SecretStore | None
    recorder: Recorder
    #: Replays and records allowed requests (``sandboxed(cassette=...)``); None: live only.
    cassette: CassettePlayer | None = None


@dataclass(frozen=True)
class Mediated:
    """The outcome of one request: what the guest gets and what is recorded."""

    response: HttpResponse
    exchange: Exchange
    #: A WebSocket handshake the server accepted: its connection, for the stream relay.
    upgraded: Upgraded | None = None
    #: The guest request this answers (the very object): an HTTP/2 flow answers
    #: its streams in any order and finds the stream by it (:mod:`.h2_server`).
    request: HttpRequest | None = None


@dataclass(frozen=True)
class UpstreamJob:
    """An allowed request to fetch upstream (on a worker thread, see :func:`run_upstream`).

    ``request`` is the guest's (placeholders), ``outgoing`` the one sent
    upstream (secrets substituted, then :func:`secret_request_headers`);
    ``carries_secret`` says whether a value was substituted.
    """

    request: HttpRequest
    outgoing: HttpRequest
    started: float
    decision: Decision
    context: MediationContext
    carries_secret: bool = False


def _refuse(exc: ContentCodingError | PartialContentError) -> tuple[HttpResponse, str]:
    """The 502 for a response that may hold a secret unsearchably, and the reason to record."""
    message = (
        f"the response to a request carrying a secret could not be searched for it "
        f"and was not passed on: {exc}"
    )
    kind = "range" if isinstance(exc, PartialContentError) else "content-encoding"
    return error_response(502, message, kind=kind), f"response refused: {message}"


def _finish(
    request: HttpRequest,
    response: HttpResponse,
    decision: ExchangeDecision,
    reason: str,
    *,
    started: float,
    context: MediationContext,
    clock: Callable[[], float],
) -> Mediated:
    response = redact_response(response, context.secrets)
    exchange = make_exchange(
        request,
        response,
        decision,
        reason,
        started=started,
        duration=max(0.0, clock() - started),
    )
    log.debug("%s %s -> %d (%s)", request.method, request.url, response.status, decision)
    return Mediated(response, exchange, request=request)


def _deny(
    request: HttpRequest,
    message: str,
    rule: str | None,
    *,
    started: float,
    context: MediationContext,
    clock: Callable[[], float],
) -> Mediated:
    """A refusal: the guest's 403 names ``message`` and ``rule``; recorded as "denied"."""
    return _finish(
        request,
        denial_response(message, rule),
        "denied",
        with_rule(message, rule),
        started=started,
        context=context,
        clock=clock,
    )


def plan_request(
    request: HttpRequest,
    started: float,
    context: MediationContext,
    *,
    clock: Callable[[], float] = time.time,
) -> Mediated | UpstreamJob:
    """Decide ``request`` without I/O: a stub, a denial, or a job for the upstream.

    Order (first wins): a stub registered on the recorder (no policy needed:
    the upstream is never contacted); ``policy.decide``; secrets
    substitution, which refuses a placeholder headed anywhere but its
    secret's hosts. Never raises.
    """
    stub = context.recorder.find_stub(request.method, request.url)
    if stub is not None:
        response = HttpResponse(status=stub.status, headers=stub.headers, body=stub.body)
        return _finish(
            request,
            response,
            "stubbed",
            f"matched stub {stub.method} {stub.url}",
            started=started,
            context=context,
            clock=clock,
        )
    decision = context.policy.decide(request.host, request.port, request.scheme)
    if not decision.allowed:
        return _deny(
            request, decision.reason, decision.rule, started=started, context=context, clock=clock
        )
    outgoing = request
    carries_secret = False
    if context.secrets is not None and context.secrets.names:
        try:
            headers, _url = context.secrets.apply(
                request.host, request.headers, request.url, request.body, port=request.port
            )
        except NetworkPolicyError as exc:
            rule = "secrets" if isinstance(exc, SecretLeak) else "secrets-encoding"
            return _deny(request, str(exc), rule, started=started, context=context, clock=clock)
        carries_secret = headers != list(request.headers)
        if carries_secret:
            # A coded or partial response would hide an echoed value from redaction.
            headers = secret_request_headers(headers)
        outgoing = dataclasses.replace(request, headers=tuple(headers))
    websocket = is_websocket(request.headers)
    bound = (
        context.secrets.names_for(request.host) if websocket and context.secrets is not None else ()
    )
    if websocket and (carries_secret or bound):
        refusal = SECRET_REFUSAL if carries_secret else secret_host_refusal(bound, request.host)
        return _deny(request, refusal, "websocket", started=started, context=context, clock=clock)
    player = context.cassette
    if player is not None:
        # After policy and secrets: a denied request stays denied, replayed or not.
        replay = player.lookup(request)
        if replay is not None and websocket:
            message = (
                f"cassette {player.path.name} holds only the handshake of this WebSocket "
                "(a cassette cannot replay a session); record it again "
                "(--gondolin-record-mode=all) to reach the server"
            )
            return _deny(
                request, message, "cassette", started=started, context=context, clock=clock
            )
        if replay is not None:
            reason = f"replayed from cassette {player.path.name}"
            try:  # a cassette written before this screening may hold a coded value
                replay = screen_response(replay, context.secrets, carries_secret=carries_secret)
            except (ContentCodingError, PartialContentError) as exc:
                replay, refused = _refuse(exc)
                reason = f"{reason}; {refused}"
            return _finish(
                request,
                replay,
                "replayed",
                reason,
                started=started,
                context=context,
                clock=clock,
            )
        if not player.should_record(request):
            message = player.unmatched(request)
            return _deny(
                request, message, "cassette", started=started, context=context, clock=clock
            )
    return UpstreamJob(request, outgoing, started, decision, context, carries_secret)


def run_upstream(
    job: UpstreamJob,
    *,
    timeout: float = DEFAULT_UPSTREAM_TIMEOUT,
    clock: Callable[[], float] = time.time,
) -> Mediated:
    """Resolve and fetch ``job`` upstream (blocking; run it off the packet thread).

    ``resolve_upstream`` re-checks ``block_internal`` on the addresses DNS
    actually returns; a refusal there is a 403 "denied". A failure to reach
    or verify the upstream is a 502 (504 for a timeout) recorded as
    "allowed" with the reason, and so is a coded response to a request
    carrying a secret that cannot be decoded (:func:`screen_response`).
    The cassette records the screened response. Never raises for I/O or
    policy failures.
    """
    request, context = job.request, job.context
    allowed_reason = with_rule(job.decision.reason, job.decision.rule)
    try:
        addr, port = resolve_upstream(request.host, request.port, context.policy)
    except NetworkPolicyError as exc:
        message = str(exc)
        if "block_internal" in message:  # resolve_upstream's internal-address refusal
            return _deny(
                request,
                message,
                "block_internal",
                started=job.started,
                context=context,
                clock=clock,
            )
        return _finish(
            request,
            error_response(502, message, kind="resolve"),
            "allowed",
            f"{allowed_reason}; upstream failed: {message}",
            started=job.started,
            context=context,
            clock=clock,
        )
    if is_websocket(request.headers):
        return _run_websocket(job, addr, port, timeout=timeout, clock=clock)
    # An HTTP/2 stream goes upstream in HTTP/2 when the upstream offers it (trailers).
    fetch = fetch_upstream_h2 if request.http_version == "2" else fetch_upstream
    try:
        response = fetch(
            job.outgoing,
            addr,
            port,
            tls=request.scheme == "https",
            server_hostname=request.host,
            ca_file=context.policy.upstream_ca,
            timeout=timeout,
        )
    except NetworkPolicyError as exc:
        message = str(exc)
        if context.secrets is not None:
            message = context.secrets.redact(message)
        status = 504 if "timed out" in message else 502
        return _finish(
            request,
            error_response(status, message, kind="upstream"),
            "allowed",
            f"{allowed_reason}; upstream failed: {message}",
            started=job.started,
            context=context,
            clock=clock,
        )
    try:
        response = screen_response(response, context.secrets, carries_secret=job.carries_secret)
    except (ContentCodingError, PartialContentError) as exc:
        refusal, refused = _refuse(exc)
        return _finish(
            request,
            refusal,
            "allowed",
            f"{allowed_reason}; {refused}",
            started=job.started,
            context=context,
            clock=clock,
        )
    if context.cassette is not None and context.cassette.should_record(request):
        try:
            # The guest's request (placeholders only) and the screened response.
            context.cassette.record(request, response)
        except CassetteError as exc:
            log.warning("%s", exc)
    return _finish(
        request,
        response,
        "allowed",
        allowed_reason,
        started=job.started,
        context=context,
        clock=clock,
    )


def _run_websocket(
    job: UpstreamJob, addr: str, port: int, *, timeout: float, clock: Callable[[], float]
) -> Mediated:
    """The handshake upstream; a 101 comes back with its connection (see :mod:`.websocket`)."""
    request, context = job.request, job.context
    allowed_reason = with_rule(job.decision.reason, job.decision.rule)
    upgraded = None
    try:
        response, upgraded = open_websocket(
            job.outgoing,
            addr,
            port,
            timeout=timeout,
            tls=request.scheme == "https",
            ca_file=context.policy.upstream_ca,
        )
        reason = allowed_reason
        if upgraded is None:  # declined: an ordinary answer, screened like any other
            response = screen_response(response, context.secrets, carries_secret=False)
    except NetworkPolicyError as exc:
        message = str(exc)
        status = 504 if "timed out" in message else 502
        response = error_response(status, message, kind="upstream")
        reason = f"{allowed_reason}; upstream failed: {message}"
    except (ContentCodingError, PartialContentError) as exc:
        response, refused = _refuse(exc)
        reason = f"{allowed_reason}; {refused}"
    if context.cassette is not None and context.cassette.should_record(request):
        try:  # the handshake only: a session cannot be replayed
            context.cassette.record(request, dataclasses.replace(response, body=b""))
        except CassetteError as exc:
            log.warning("%s", exc)
    outcome = _finish(
        request, response, "allowed", reason, started=job.started, context=context, clock=clock
    )
    return dataclasses.replace(outcome, upgraded=upgraded)


def internal_error(job: UpstreamJob, exc: BaseException) -> Mediated:
    """The outcome for a request whose handling hit a bug: a 502 naming the exception type."""
    response = error_response(502, f"internal error: {type(exc).__name__}", kind="internal")
    return Mediated(
        response,
        make_exchange(
            job.request,
            response,
            "allowed",
            f"internal error in pytest-gondolin: {type(exc).__name__}",
            started=job.started,
            duration=max(0.0, time.time() - job.started),
        ),
        request=job.request,
    )
