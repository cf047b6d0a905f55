"""What the guest-facing HTTP servers hand the network driver, and what they share.

Both servers -- HTTP/1.1 (:class:`~.interceptor.HttpInterceptor`) and
HTTP/2 (:class:`~.h2_server.H2Server`) -- emit :class:`RequestReceived`
for a complete request the driver must answer and :class:`RequestRefused`
for one they refused themselves; both hold request bodies against one
:class:`BodyBudget` per guest. :class:`Refusal` aborts an HTTP/1.1 request
(the interceptor and :mod:`.destination` raise it).
Sans-IO values, no behaviour beyond the budget's arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_gondolin.errors import NetworkPolicyError
from pytest_gondolin.netpolicy.http.messages import HttpRequest
from pytest_gondolin.netpolicy.http.recorder import Exchange

__all__ = ["BodyBudget", "HttpEvent", "Refusal", "RequestReceived", "RequestRefused"]


@dataclass(frozen=True)
class RequestReceived:
    """A complete request; the driver must answer with :meth:`HttpInterceptor.respond`."""

    request: HttpRequest
    started: float


@dataclass(frozen=True)
class RequestRefused:
    """The interceptor refused a request itself; its response is already queued."""

    exchange: Exchange


HttpEvent = RequestReceived | RequestRefused


class Refusal(Exception):
    """Abort the current request with an error response (``status``, ``reason``, ``rule``)."""

    def __init__(self, status: int, reason: str, rule: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.rule = rule


class BodyBudget:
    """Request-body bytes the interceptors of one guest may hold at once.

    Each interceptor holds its request's body from the first byte (or, with
    ``Content-Length``, from the head) until the request is answered, refused
    or its flow closed (:meth:`HttpInterceptor.close`); a body that would
    take the total past ``limit`` is refused. Without it, one guest could
    make the host hold ``max_body_bytes`` per open flow. Not thread-safe:
    the interceptors sharing one run on one thread.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise NetworkPolicyError(f"BodyBudget: limit {limit} must be >= 0")
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes as held, if they fit; return whether they did."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        """Count ``n`` bytes, taken before, as no longer held."""
        self.held = max(0, self.held - n)
