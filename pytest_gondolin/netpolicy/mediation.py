"""The per-request pipeline: what the host answers to one guest HTTP request.

In the order the modules' authors asked for: a stub registered on the
recorder -> ``policy.decide`` -> ``secrets.apply`` (all in
:func:`plan_request`, no I/O, on the packet thread) -> ``resolve_upstream``
-> ``fetch_upstream`` (:func:`run_upstream`, blocking, on a worker thread).

Every outcome is a response for the guest plus an
:class:`~.recorder.Exchange` carrying the guest's own headers
(placeholders, never secret values). Responses are redacted before the
guest sees them, so an upstream echoing a credential back cannot leak it
into the guest either. Reasons end with ``[rule: <rule>]``, the format the
interceptor uses for its own refusals, so tests can match on the rule.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.cassette import CassetteError, CassettePlayer
from pytest_gondolin.netpolicy.http import (
    HttpRequest,
    HttpResponse,
    denial_response,
    make_exchange,
)
from pytest_gondolin.netpolicy.policy import Decision, NetworkPolicy, resolve_upstream
from pytest_gondolin.netpolicy.recorder import Exchange, ExchangeDecision, Recorder
from pytest_gondolin.netpolicy.secrets import SecretLeak, SecretStore
from pytest_gondolin.netpolicy.upstream import DEFAULT_UPSTREAM_TIMEOUT, fetch_upstream

__all__ = [
    "Mediated",
    "MediationContext",
    "UpstreamJob",
    "error_response",
    "internal_error",
    "plan_request",
    "run_upstream",
    "with_rule",
]

log = logging.getLogger(__name__)


def error_response(status: int, message: str, *, kind: str) -> HttpResponse:
    """A ``text/plain`` response for a request the host could not complete.

    Unlike :func:`~.http.denial_response` (a policy refusal) this is for an
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


@dataclass(frozen=True)
class UpstreamJob:
    """An allowed request to fetch upstream (on a worker thread, see :func:`run_upstream`).

    ``request`` is the guest's (placeholders), ``outgoing`` the one sent
    upstream (secrets substituted).
    """

    request: HttpRequest
    outgoing: HttpRequest
    started: float
    decision: Decision
    context: MediationContext


def _redact(response: HttpResponse, secrets: SecretStore | None) -> HttpResponse:
    if secrets is None or not secrets.names:
        return response
    return dataclasses.replace(
        response,
        headers=tuple((n, secrets.redact(v)) for n, v in response.headers),
        body=secrets.redact(response.body),
        reason=secrets.redact(response.reason),
    )


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
    response = _redact(response, context.secrets)
    exchange = make_exchange(
        request,
        response,
        decision,
        reason,
        started=started,
        duration=max(0.0, clock() - started),
    )
    log.debug("%s %s -> %d (%s)", request.method, request.url, response.status, decision)
    return Mediated(response, exchange)


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
        return _finish(
            request,
            denial_response(decision.reason, decision.rule),
            "denied",
            with_rule(decision.reason, decision.rule),
            started=started,
            context=context,
            clock=clock,
        )
    outgoing = request
    if context.secrets is not None and context.secrets.names:
        try:
            headers, _url = context.secrets.apply(
                request.host, request.headers, request.url, request.body, port=request.port
            )
        except NetworkPolicyError as exc:
            rule = "secrets" if isinstance(exc, SecretLeak) else "secrets-encoding"
            return _finish(
                request,
                denial_response(str(exc), rule),
                "denied",
                with_rule(str(exc), rule),
                started=started,
                context=context,
                clock=clock,
            )
        outgoing = dataclasses.replace(request, headers=tuple(headers))
    player = context.cassette
    if player is not None:
        # After policy and secrets: a denied request stays denied, replayed or not.
        replay = player.lookup(request)
        if replay is not None:
            return _finish(
                request,
                replay,
                "replayed",
                f"replayed from cassette {player.path.name}",
                started=started,
                context=context,
                clock=clock,
            )
        if not player.should_record(request):
            message = player.unmatched(request)
            return _finish(
                request,
                denial_response(message, "cassette"),
                "denied",
                with_rule(message, "cassette"),
                started=started,
                context=context,
                clock=clock,
            )
    return UpstreamJob(request, outgoing, started, decision, context)


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
    "allowed" with the reason. Never raises for I/O or policy failures.
    """
    request, context = job.request, job.context
    allowed_reason = with_rule(job.decision.reason, job.decision.rule)
    try:
        addr, port = resolve_upstream(request.host, request.port, context.policy)
    except NetworkPolicyError as exc:
        message = str(exc)
        if "block_internal" in message:  # resolve_upstream's internal-address refusal
            return _finish(
                request,
                denial_response(message, "block_internal"),
                "denied",
                with_rule(message, "block_internal"),
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
    try:
        response = fetch_upstream(
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
    if context.cassette is not None and context.cassette.should_record(request):
        try:
            context.cassette.record(request, response)  # the guest's request: placeholders only
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
    )
