"""The traffic recorder behind ``vm.http`` and the ``http_traffic`` fixture.

Every exchange the host mediated is recorded as an immutable
:class:`Exchange`: allowed, denied (including connections that never
became HTTP: ``method == ""``), stubbed or replayed. The network driver
thread calls :meth:`Recorder.record` and :meth:`Recorder.find_stub` while the
test thread reads, filters and asserts; one lock guards the state and
readers always get copies.

Bounds (a hostile guest chooses the traffic, and a recorder lives as long
as one test: the VM's restore brings a fresh one). Sizes are the recorder's
estimate of the memory a record holds (its strings, headers and bodies plus
a fixed allowance per object), never less than the real size:

* each body is kept up to ``body_limit`` bytes (:data:`DEFAULT_BODY_LIMIT`,
  1 MiB), the rest dropped and ``*_truncated`` set;
* exchanges are kept whole while the records total at most ``body_budget``
  (:data:`DEFAULT_BODY_BUDGET`, 32 MiB); from the first one that does not
  fit until :meth:`Recorder.clear`, exchanges are recorded without their
  bodies (``Exchange.bodies_dropped``) -- method, URL, headers, status,
  decision and reason are all still there;
* the records never total more than ``max_bytes``
  (:data:`DEFAULT_MAX_RECORDED_BYTES`, 48 MiB) nor number more than
  ``max_exchanges`` (:data:`DEFAULT_MAX_EXCHANGES`); past either, the oldest
  are dropped and counted in :attr:`Recorder.dropped`;
* stubs a sandboxed test registers (:meth:`Recorder.stub_from_guest`):
  each body at most :data:`MAX_STUB_BODY_BYTES`, at most
  :data:`MAX_STUBS` of them totalling :data:`MAX_STUB_BYTES` per recorder
  (registering past a limit is a :class:`ConfigError` naming it).

Stubs are canned responses the host answers with itself; the upstream is
never contacted, so a stub needs no ``allow_hosts`` entry (the driver is
expected to consult :meth:`Recorder.find_stub` before the policy).

:class:`Exchange` and the queries over exchanges (``get_requests``,
``assert_request_made``) live in :mod:`pytest_gondolin.guest.recording`,
because ``http_traffic`` answers them inside the guest too; the recorder
keeps the writing side, the stubs (:mod:`.stubs`) and the bounds.
"""

from __future__ import annotations

import dataclasses
import json as _json
import re
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol, overload

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.guest import recording
from pytest_gondolin.guest.recording import Exchange as Exchange
from pytest_gondolin.guest.recording import ExchangeDecision as ExchangeDecision
from pytest_gondolin.guest.recording import Headers as Headers
from pytest_gondolin.guest.recording import UrlFilter as UrlFilter
from pytest_gondolin.guest.recording import body_json
from pytest_gondolin.guest.recording import exchange_from_dict as exchange_from_dict
from pytest_gondolin.netpolicy.http.stubs import (
    MAX_STUB_BODY_BYTES,
    MAX_STUB_BYTES,
    MAX_STUBS,
    Stub,
    normalize_url,
)
from pytest_gondolin.netpolicy.http.tcp_record import TcpFlow, TcpFlowLog

__all__ = [
    "DEFAULT_BODY_BUDGET",
    "DEFAULT_BODY_LIMIT",
    "DEFAULT_MAX_EXCHANGES",
    "DEFAULT_MAX_RECORDED_BYTES",
    "MAX_STUBS",
    "MAX_STUB_BODY_BYTES",
    "MAX_STUB_BYTES",
    "Exchange",
    "ExchangeDecision",
    "Recorder",
    "Stub",
    "normalize_url",
    "record_size",
]

#: Bytes of each body kept in a record (the rest is dropped, flagged).
DEFAULT_BODY_LIMIT: Final = 1 << 20
#: Records kept per recorder; a test making more is probably looping.
DEFAULT_MAX_EXCHANGES: Final = 10_000
#: Records kept whole (bodies included) up to this many bytes per recorder.
#: 32 MiB: every record then still fits in one answer to the guest's
#: ``http_traffic`` (a worker line is at most 64 MiB, and a body that is not
#: text crosses as base64, a third larger).
DEFAULT_BODY_BUDGET: Final = 32 << 20
#: All records of a recorder, bodies or not. The 16 MiB above the body
#: budget hold 10,000 ordinary records without bodies (about 1.5 KiB each),
#: so only records with huge URLs or headers make old ones go before
#: :data:`DEFAULT_MAX_EXCHANGES` does.
DEFAULT_MAX_RECORDED_BYTES: Final = 48 << 20

# The memory estimate of a record: Python's allowance for the Exchange and
# its small fields, for one header pair (a tuple and two str objects), and
# for one str or bytes object, on top of their characters. Measured with
# tracemalloc: about 640 bytes for an ordinary record, 120 per header
# (tests/unit/netpolicy_app/test_recorder_bounds.py keeps it an overestimate).
_RECORD_OVERHEAD: Final = 1024
_HEADER_OVERHEAD: Final = 200
_OBJECT_OVERHEAD: Final = 64


def _headers_size(headers: Headers) -> int:
    return sum(len(name) + len(value) + _HEADER_OVERHEAD for name, value in headers)


def record_size(ex: Exchange) -> int:
    """The recorder's estimate of the bytes ``ex`` holds (never below the real size)."""
    text = (
        len(ex.method)
        + len(ex.url)
        + len(ex.scheme)
        + len(ex.host)
        + len(ex.path)
        + len(ex.query)
        + len(ex.reason)
    )
    return (
        _RECORD_OVERHEAD
        + text
        + _headers_size(ex.request_headers)
        + _headers_size(ex.response_headers)
        + len(ex.request_body)
        + len(ex.response_body)
        + 2 * _OBJECT_OVERHEAD
    )


def _without_bodies(ex: Exchange) -> Exchange:
    return dataclasses.replace(
        ex,
        request_body=b"",
        response_body=b"",
        request_body_truncated=ex.request_body_truncated or bool(ex.request_body),
        response_body_truncated=ex.response_body_truncated or bool(ex.response_body),
        bodies_dropped=True,
    )


def _stub_size(stub: Stub) -> int:
    return len(stub.body) + len(stub.url) + _headers_size(stub.headers) + _RECORD_OVERHEAD


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
        body_budget: int = DEFAULT_BODY_BUDGET,
        max_bytes: int = DEFAULT_MAX_RECORDED_BYTES,
        redactor: _Redactor | None = None,
    ) -> None:
        if body_limit < 0 or max_exchanges < 1:
            raise ConfigError("Recorder: body_limit must be >= 0 and max_exchanges >= 1")
        if not 0 <= body_budget <= max_bytes:
            raise ConfigError("Recorder: need 0 <= body_budget <= max_bytes")
        self._lock = threading.Lock()
        self._exchanges: deque[tuple[Exchange, int]] = deque()  # with record_size()
        self._held = 0  # sum of the sizes in _exchanges
        self._stubs: list[Stub] = []
        self._stub_bytes = 0
        self._body_limit = body_limit
        self._max_exchanges = max_exchanges
        self._body_budget = body_budget
        self._max_bytes = max_bytes
        self._redactor = redactor
        self._dropped = 0
        self._bodies_off = False  # the body budget was spent: no bodies until clear()
        #: Raw TCP streams (tcp= services, VM.forward): :mod:`.tcp_record`.
        self.tcp_log = TcpFlowLog()

    # ------------------------------------------------------------------ writing

    def record(self, exchange: Exchange) -> Exchange:
        """Store ``exchange`` (bodies capped, secrets redacted) and return what was stored.

        Past the body budget the stored exchange has no bodies
        (``bodies_dropped``); see the module docstring for every bound.
        """
        stored = self._prepare(exchange)
        size = record_size(stored)
        with self._lock:
            if self._bodies_off or self._held + size > self._body_budget:
                self._bodies_off = True
                if stored.request_body or stored.response_body:
                    stored = _without_bodies(stored)
                    size = record_size(stored)
            self._exchanges.append((stored, size))
            self._held += size
            while len(self._exchanges) > 1 and (
                len(self._exchanges) > self._max_exchanges or self._held > self._max_bytes
            ):
                _, old_size = self._exchanges.popleft()
                self._held -= old_size
                self._dropped += 1
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
        for a bad method, URL, status or body. Host code is trusted: its
        stubs are not size-limited (a guest's are, :meth:`stub_from_guest`).
        """
        return self._stub(method, url, status, body, json, headers, limited=False)

    def stub_from_guest(
        self,
        method: str,
        url: str,
        status: int = 200,
        body: bytes | str = b"",
        json: Any = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> Stub:
        """:meth:`stub`, for a stub a sandboxed test registered: within the stub limits.

        Each body at most :data:`MAX_STUB_BODY_BYTES`, at most
        :data:`MAX_STUBS` stubs holding :data:`MAX_STUB_BYTES` in all;
        ConfigError naming the limit otherwise.
        """
        return self._stub(method, url, status, body, json, headers, limited=True)

    def _stub(
        self,
        method: str,
        url: str,
        status: int,
        body: bytes | str,
        json: Any,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None,
        *,
        limited: bool,
    ) -> Stub:
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
        if limited and len(payload) > MAX_STUB_BODY_BYTES:
            raise ConfigError(
                f"stub: a body of {len(payload)} bytes exceeds the limit of "
                f"{MAX_STUB_BODY_BYTES} bytes per stub (MAX_STUB_BODY_BYTES)"
            )
        new = Stub(
            method=method.upper(),
            url=normalize_url(url),
            status=status,
            body=payload,
            headers=tuple(extra),
        )
        size = _stub_size(new)
        with self._lock:
            # The same method and URL again replaces the old stub, which could never match again.
            same = [s for s in self._stubs if (s.method, s.url) == (new.method, new.url)]
            freed = sum(_stub_size(s) for s in same)
            count = len(self._stubs) - len(same) + 1
            if limited and count > MAX_STUBS:
                raise ConfigError(
                    f"stub: at most {MAX_STUBS} stubs at once (MAX_STUBS); "
                    f"clear(stubs=True) removes them"
                )
            if limited and self._stub_bytes - freed + size > MAX_STUB_BYTES:
                raise ConfigError(
                    f"stub: the stubs would hold {self._stub_bytes - freed + size} "
                    f"bytes, over the limit of {MAX_STUB_BYTES} (MAX_STUB_BYTES); "
                    f"clear(stubs=True) removes them"
                )
            if same:
                self._stubs = [s for s in self._stubs if s not in same]
            self._stubs.append(new)
            self._stub_bytes += size - freed
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
        """Forget recorded exchanges and streams (and the stubs too with ``stubs=True``)."""
        self.tcp_log.clear()
        with self._lock:
            self._exchanges.clear()
            self._held = 0
            self._dropped = 0
            self._bodies_off = False
            if stubs:
                self._stubs.clear()
                self._stub_bytes = 0

    # ------------------------------------------------------------------ reading

    @property
    def requests(self) -> list[Exchange]:
        """A copy of every recorded exchange, oldest first."""
        with self._lock:
            return [ex for ex, _ in self._exchanges]

    @property
    def tcp_flows(self) -> list[TcpFlow]:
        """A copy of the raw TCP stream records (:class:`.TcpFlow`), oldest first."""
        return self.tcp_log.flows

    @property
    def stubs(self) -> list[Stub]:
        """A copy of the registered stubs, oldest first."""
        with self._lock:
            return list(self._stubs)

    @property
    def dropped(self) -> int:
        """How many old exchanges were discarded to respect ``max_exchanges`` or ``max_bytes``."""
        with self._lock:
            return self._dropped

    @property
    def held_bytes(self) -> int:
        """The estimated bytes the records hold now (at most ``max_bytes``, bar one record)."""
        with self._lock:
            return self._held

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
            exchanges = [ex for ex, _ in self._exchanges]
            stubs = list(self._stubs)
            dropped = self._dropped
        doc = {
            "exchanges": [ex.to_dict() for ex in exchanges],
            "dropped": dropped,
            "tcp_flows": [flow.to_dict() for flow in self.tcp_flows],
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
