"""Cassettes: HTTP exchanges recorded at the VM boundary, replayed on later runs.

Sans-IO apart from reading and writing the cassette file itself: the
network driver asks a :class:`CassettePlayer` per guest request whether to
replay, record or refuse, and the plugin saves the player at teardown.

The file format (vcrpy-compatible YAML) and its parser are in
:mod:`.cassette_file`, the values it holds in :mod:`.cassette_values`, the
preparation and matchers below in :mod:`.cassette_match`, and where a
test's cassette lives in :mod:`.cassette_paths`.

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

import logging
import os
import threading
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Final, Literal

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.netpolicy.http.cassette_file import MAX_INTERACTIONS, Cassette
from pytest_gondolin.netpolicy.http.cassette_match import (
    DEFAULT_FILTER_HEADERS,
    DEFAULT_FILTER_QUERY,
    DEFAULT_MATCHERS,
    MATCHER_TABLE,
    MATCHERS,
    Preparation,
    check_names,
)
from pytest_gondolin.netpolicy.http.cassette_values import (
    CassetteError,
    CassetteMismatch,
    CassetteRequest,
    CassetteResponse,
    Interaction,
    shorten,
)
from pytest_gondolin.netpolicy.http.messages import HttpRequest, HttpResponse
from pytest_gondolin.netpolicy.http.secrets import SecretStore

__all__ = [
    "RECORD_MODES",
    "CassettePlayer",
    "RecordMode",
    "open_cassette",
]

log = logging.getLogger(__name__)

RecordMode = Literal["none", "once", "new_episodes", "all"]
#: The record modes, as ``--gondolin-record-mode`` accepts them.
RECORD_MODES: Final[tuple[RecordMode, ...]] = ("none", "once", "new_episodes", "all")
# Closest candidates listed in an unmatched-request message.
_CLOSEST_SHOWN: Final = 3
# Miss messages kept for check(); more are only counted.
_MAX_MISSES_KEPT: Final = 100

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
        self._prep = Preparation(
            secret_store,
            frozenset(n.lower() for n in filter_headers),
            frozenset(n.lower() for n in filter_query),
            frozenset(n.lower() for n in filter_response_headers),
            self.matchers,
        )
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
        # Misses :meth:`check` has not reported yet (a VM's player outlives its tests).
        self._unreported: list[str] = []
        self._unreported_count = 0
        self._dirty = False
        if self._replays:
            for index, interaction in enumerate(self._loaded):
                key = self._prep.key(self._prep.match_form(interaction.request))
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

    def prepare_request(self, request: HttpRequest) -> CassetteRequest:
        """``request`` as it would be stored: redacted, normalised, filtered."""
        return self._prep.request(request)

    def prepare_response(self, response: HttpResponse) -> CassetteResponse:
        """``response`` as it would be stored: redacted, normalised, filtered."""
        return self._prep.response(response)

    def _try_prepare(self, request: HttpRequest) -> CassetteRequest | None:
        try:
            return self.prepare_request(request)
        except CassetteError as exc:  # the interceptor validated the URL: not expected
            log.debug("cassette %s: cannot prepare %s: %s", self.path, request.method, exc)
            return None

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
        key = self._prep.key(live)
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
            shown = f"{request.method} {shorten(self._prep.clean(request.url))}"
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
        key_fns = [(m, *MATCHER_TABLE[m]) for m in self.matchers]
        live_keys = [fn(live) for _, fn, _ in key_fns]
        candidates: list[tuple[int, int, list[str]]] = []
        exhausted = 0
        for index, interaction in enumerate(self._loaded if self._replays else ()):
            recorded = self._prep.match_form(interaction.request)
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
            self._unreported_count += 1
            if len(self._misses) < _MAX_MISSES_KEPT:
                self._misses.append(message)
            if len(self._unreported) < _MAX_MISSES_KEPT:
                self._unreported.append(message)
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
        """Raise :class:`CassetteMismatch` if a request missed the cassette since the last check.

        Each miss is reported by one call only: a VM's player outlives the
        test that made a request, and the miss belongs to that test.
        With ``allow_unused=False`` interactions never replayed are an
        error too (pytest-httpx's "mocked but not requested").
        """
        with self._lock:
            misses, self._unreported = self._unreported, []
            count, self._unreported_count = self._unreported_count, 0
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
    names = check_names(matchers, "cassette matchers", known=MATCHERS)
    if not names:
        raise ConfigError("cassette matchers: empty; every request would match the first one")
    filters = {
        what: check_names(value, what)
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
