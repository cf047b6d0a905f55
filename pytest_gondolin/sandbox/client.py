"""The host side of the worker protocol: :class:`WorkerClient` drives one test worker.

The far side is the worker of :mod:`pytest_gondolin.guest.worker` (its
docstring defines the wire protocol).  The client sends commands and reads
the worker's lines through a :class:`~.worker_transport.WorkerTransport`
(a local subprocess or a guest process, :mod:`.transports`; the contract a
transport meets is in :mod:`.worker_transport`); every line goes through
:func:`~.messages.parse_message` and every run through a
:class:`~.outcome.RunTally`, so what comes back is a bounded, validated
:class:`~.outcome.RunOutcome`.

The client is not thread-safe; one thread drives one worker.

Lifecycle of a :class:`WorkerClient` (:class:`WorkerState`), changed only by
``WorkerClient._set_state`` against :data:`WORKER_TRANSITIONS`; public
methods say with ``@require`` which states they need (calling one in
another state is a caller's bug: :class:`~pytest_gondolin.errors.StateError`)::

    NEW --start / adopt--> READY --run--> RUNNING --done--> READY
     |                       |               +--crash / timeout / protocol error--> DEAD
     +--start failed--> DEAD +--ping failed--> DEAD --rewind (a VM restore)--> READY
    any --close--> CLOSED

Errors the guest side causes keep their types: a worker that exits or
hangs before collecting, or stops answering pings, is an
:class:`~pytest_gondolin.errors.AgentError`; a malformed line is a
:class:`~pytest_gondolin.errors.WorkerProtocolError` (the worker is then
killed).  A test that crashes or hangs the worker is not an error of the
client: ``run`` returns an outcome whose ``failure`` says so.
"""

from __future__ import annotations

import enum
import functools
import logging
import secrets
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import pytest_gondolin.sandbox.stack_dump as stack_dump
from pytest_gondolin.errors import AgentError, GondolinError, WorkerProtocolError
from pytest_gondolin.guest.worker import MAX_COMMAND_LINE, MAX_WORKER_LINE, encode_line
from pytest_gondolin.logtail import tail_lines
from pytest_gondolin.sandbox.debugger import RunDebugger, serve
from pytest_gondolin.sandbox.json_checks import JSONObject
from pytest_gondolin.sandbox.live_output import (
    LIVE_TRUNCATED,
    MAX_LIVE_CHARS_PER_RUN,
    safe_terminal_text,
    show_live_output,
)
from pytest_gondolin.sandbox.messages import (
    Collected,
    Configured,
    DoneMessage,
    ErrorMessage,
    OutputMessage,
    PdbEnd,
    PdbOutput,
    PdbRead,
    PongMessage,
    QueryMessage,
    SealMessage,
    WorkerMessage,
    parse_message,
)
from pytest_gondolin.sandbox.outcome import Failure, RunOutcome, RunTally
from pytest_gondolin.sandbox.report_checks import MAX_NODEID_CHARS
from pytest_gondolin.sandbox.worker_transport import WorkerTransport
from pytest_gondolin.statemachine import Transitions, require, transition

__all__ = [
    "WORKER_TRANSITIONS",
    "RunDebugger",
    "WorkerClient",
    "WorkerState",
    "WorkerTransport",
]

log = logging.getLogger(__name__)

#: Waiting for the worker to import pytest and collect: a cold Python start
#: under TCG takes ~5 s, collecting a large project much longer.
DEFAULT_START_TIMEOUT: Final = 120.0
#: A pong is a round trip through an idle worker (~1 ms on virtio-serial).
DEFAULT_PING_TIMEOUT: Final = 10.0
#: After EOF, how long the worker gets to finish exiting so its exit code
#: can be reported (it is already past writing its last line).
EXIT_WAIT: Final = 5.0
#: How long ``close`` lets the worker finish its session after ``quit``.
DEFAULT_QUIT_TIMEOUT: Final = 5.0
#: Most bytes one run may send: bounds its parsing work (well under a second
#: per 64 MiB); host memory is bounded by MAX_KEPT_PER_TEST instead.
MAX_BYTES_PER_RUN: Final = 256 * 1024 * 1024
#: Lines of the worker's stderr quoted in an error message.
STDERR_TAIL_LINES: Final = 60


class WorkerState(enum.Enum):
    """Where a :class:`WorkerClient` is in its lifecycle (see the module docstring)."""

    NEW = "new"  # the worker is starting: collection not yet reported
    READY = "ready"  # collected and waiting for a command
    RUNNING = "running"  # running one item
    DEAD = "dead"  # killed (crash, timeout, broken protocol); a VM restore revives it
    CLOSED = "closed"  # told to quit and killed; final


WORKER_TRANSITIONS: Transitions[WorkerState] = {
    WorkerState.NEW: {WorkerState.READY, WorkerState.DEAD, WorkerState.CLOSED},
    WorkerState.READY: {WorkerState.RUNNING, WorkerState.DEAD, WorkerState.CLOSED},
    WorkerState.RUNNING: {WorkerState.READY, WorkerState.DEAD, WorkerState.CLOSED},
    WorkerState.DEAD: {WorkerState.READY, WorkerState.CLOSED},
    WorkerState.CLOSED: set(),
}


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker connection lost"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"worker crashed (killed by {name})"
    return f"worker crashed (exit code {code})"


class _LinkDown(Exception):
    """The transport reported the worker gone (internal)."""


class _Stalled(Exception):
    """The worker's side took nothing more of what the host sent before the deadline (internal)."""


class WorkerClient:
    """Drives one worker over a :class:`WorkerTransport`.

    Every method bounds its wait.  ``run`` returns a :class:`RunOutcome` even
    when the test crashed or hung the worker (the worker is then killed and
    the client is DEAD); it raises ``WorkerProtocolError`` when the worker sent
    something malformed (again leaving it killed).  A method called in a
    state that does not allow it raises ``StateError``.
    """

    def __init__(self, transport: WorkerTransport, *, max_line: int = MAX_WORKER_LINE) -> None:
        self._transport = transport
        self._max_line = max_line
        self._state = WorkerState.NEW
        self._collected: Collected | None = None
        self._received = 0
        #: Answers the worker's mid-run queries: ``(kind, args) -> JSON data``; raise
        #: a GondolinError to send an error answer.
        self.on_query: Callable[[str, JSONObject], Any] | None = None
        #: Shows a run's live output ``(stream, text)``: text already bounded and
        #: made safe for a terminal.
        self.on_output: Callable[[str, str], None] = show_live_output
        self._live_left = MAX_LIVE_CHARS_PER_RUN
        #: The host's terminal for pdb in the guest (``breakpoint()``, ``--pdb``), or
        #: why there is none (sandbox/debugger.py); ``None``: pdb gets no terminal.
        self.debugger: RunDebugger | None = None
        #: The last run's seal: the key its ``process``-mode verdict must carry
        #: (guest/process_runs.py); ``None``: the run sent none as its first message.
        self.seal: str | None = None

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def collected(self) -> Collected | None:
        """What ``start`` returned (or ``adopt`` was given), once it has."""
        return self._collected

    def _set_state(self, new: WorkerState) -> None:
        """The only place the client's state changes (see :data:`WORKER_TRANSITIONS`)."""
        old = self._state
        self._state = transition(WORKER_TRANSITIONS, old, new)
        if new is not old:
            log.debug("test worker: %s -> %s", old.value, new.value)

    # -- plumbing -----------------------------------------------------------

    def _send(self, message: JSONObject, deadline: float | None = None) -> None:
        """Send one command; with ``deadline`` (a run's), a guest that stops reading is _Stalled."""
        line = encode_line(message)
        if len(line) > MAX_COMMAND_LINE:
            raise WorkerProtocolError(f"command {message['t']!r} too large ({len(line)} bytes)")
        log.debug("worker <- %.200r", line)
        try:
            if deadline is None:
                self._transport.send(line)
            else:
                self._transport.send(line, max(deadline - time.monotonic(), 0.0))
        except TimeoutError as exc:
            if deadline is None:
                raise _LinkDown(str(exc)) from exc
            raise _Stalled(str(exc)) from exc
        except (OSError, GondolinError) as exc:
            raise _LinkDown(str(exc)) from exc

    def _send_within(self, left: float, message: JSONObject) -> None:
        """Send with *left* seconds from now (a guest that stopped reading is _Stalled)."""
        self._send(message, time.monotonic() + left)

    def _recv(self, timeout: float) -> WorkerMessage | None:
        """Next message, ``None`` at EOF; raises TimeoutError, WorkerProtocolError.

        Adds the line's length to ``self._received``.
        """
        try:
            line = self._transport.recv_line(max(timeout, 0.0))
        except TimeoutError:
            raise
        except (OSError, GondolinError) as exc:
            log.debug("worker link failed: %s", exc)
            return None
        if line is None:
            return None
        if not line.endswith(b"\n") and len(line) <= self._max_line:
            log.debug("worker stream ended mid-line after %d bytes", len(line))
            return None
        log.debug("worker -> %.200r", line)
        self._received += len(line)
        return parse_message(line, max_line=self._max_line)

    def _die(self) -> None:
        self._set_state(WorkerState.DEAD)
        self._transport.kill()

    def _broken(self, exc: WorkerProtocolError) -> WorkerProtocolError:
        tail = self._transport.stderr_tail()
        self._die()
        if tail.strip():
            return WorkerProtocolError(
                f"{exc}\nworker stderr (tail):\n{tail_lines(tail, STDERR_TAIL_LINES)}"
            )
        return exc

    def _exit_detail(self) -> tuple[int | None, str]:
        try:
            code = self._transport.wait(EXIT_WAIT)
        except (OSError, GondolinError):
            code = None
        tail = self._transport.stderr_tail()
        self._die()
        return code, tail

    # -- public API ---------------------------------------------------------

    @require(WorkerState.NEW)
    def start(
        self,
        timeout: float = DEFAULT_START_TIMEOUT,
        *,
        on_configured: Callable[[Configured], None] | None = None,
        resume: bool = False,
    ) -> Collected:
        """Wait for the worker to finish collecting; return what it collected.

        A worker told to pause (``guest/configured.py``) first says
        ``configured``: ``on_configured`` is called with it (the host may
        snapshot the guest then), and the worker is told to collect.
        ``resume``: the worker already waits there (restored so), tell it now.
        Raises ``AgentError`` if the worker exits or does not finish within
        *timeout* (the worker is then killed) and ``WorkerProtocolError`` if its
        first message is not ``collected``.
        """
        deadline = time.monotonic() + timeout
        if resume:
            self._send_collect()
        try:
            msg = self._recv(timeout)
            if isinstance(msg, Configured):
                if on_configured is not None:
                    on_configured(msg)
                self._send_collect()
                msg = self._recv(deadline - time.monotonic())
        except TimeoutError:
            tail = self._transport.stderr_tail()
            self._die()
            raise AgentError(
                f"test worker did not finish collecting within {timeout:g}s\n"
                f"worker stderr (tail):\n{tail_lines(tail, STDERR_TAIL_LINES)}"
            ) from None
        except WorkerProtocolError as exc:
            raise self._broken(WorkerProtocolError(f"while collecting: {exc}")) from exc
        if msg is None:
            code, tail = self._exit_detail()
            raise AgentError(
                f"test worker exited before collecting ({_describe_exit(code)})\n"
                f"worker stderr (tail):\n{tail_lines(tail, STDERR_TAIL_LINES)}"
            )
        if not isinstance(msg, Collected):
            said = f": {msg.message[:2000]}" if isinstance(msg, ErrorMessage) else ""
            raise self._broken(
                WorkerProtocolError(f"expected 'collected' first, got {type(msg).__name__}{said}")
            )
        self._collected = msg
        self._set_state(WorkerState.READY)
        return msg

    def _send_collect(self) -> None:
        try:
            self._send({"t": "collect"})
        except _LinkDown as exc:
            raise AgentError(f"test worker went away before collecting: {exc}") from None

    @require(WorkerState.NEW)
    def adopt(self, collected: Collected) -> None:
        """Declare the worker READY with ``collected``: it is a clone (a VM started from a
        snapshot) of a worker that another client started."""
        self._collected = collected
        self._set_state(WorkerState.READY)

    @require(WorkerState.READY)
    def ping(self, timeout: float = DEFAULT_PING_TIMEOUT) -> None:
        """Check that the worker answers (used after a VM restore).

        Raises ``AgentError`` (worker killed) when it does not answer in
        time or is gone, ``WorkerProtocolError`` when it answers wrongly.
        """
        nonce = secrets.token_hex(8)
        deadline = time.monotonic() + timeout
        try:
            # The send too is bounded by *timeout*: a guest that stopped reading
            # held it for the transport's own 30 s (red team round 3).
            self._send({"t": "ping", "nonce": nonce}, deadline)
            msg = self._recv(deadline - time.monotonic())
        except (_LinkDown, _Stalled, TimeoutError) as exc:
            self._die()
            raise AgentError(f"test worker did not answer a ping within {timeout:g}s") from exc
        except WorkerProtocolError as exc:
            raise self._broken(exc) from exc
        if msg is None:
            code, tail = self._exit_detail()
            raise AgentError(
                f"test worker is gone ({_describe_exit(code)})\n{tail_lines(tail, STDERR_TAIL_LINES)}"
            )
        if not isinstance(msg, PongMessage) or msg.nonce != nonce:
            raise self._broken(WorkerProtocolError(f"expected pong {nonce}, got {msg!r:.200}"))

    @require(WorkerState.READY)
    def run(
        self, nodeid: str, *, seed: int, timeout: float, env: Mapping[str, str] | None = None
    ) -> RunOutcome:
        """Run one item in the worker and collect what it reports.

        Returns when the worker says ``done`` (``failure`` is then ``None``
        unless the worker reported an error), or with ``failure`` set when
        the worker died (``"crash"``) or did not finish within *timeout*
        seconds (``"timeout"``: the worker gets SIGUSR1 for a stack dump,
        then is killed).  Reports for any other node id are a protocol
        violation.  ``env`` is merged into the worker's environment before the item runs.
        With a :attr:`debugger`, pdb in the guest (``breakpoint()``; with
        ``--pdb``, a failure) gets the host's terminal; the time spent waiting
        for the user to type is not counted against *timeout*.
        """
        if not isinstance(nodeid, str) or not 0 < len(nodeid) <= MAX_NODEID_CHARS:
            raise WorkerProtocolError(f"refusing to send node id {nodeid!r:.100}")
        started = time.monotonic()
        deadline = started + timeout
        tally = RunTally(nodeid)
        self._received = 0
        self._live_left = MAX_LIVE_CHARS_PER_RUN
        self.seal = None
        first = True

        def outcome(failure: Failure | None) -> RunOutcome:
            return tally.outcome(failure, time.monotonic() - started)

        def crashed() -> RunOutcome:
            code, tail = self._exit_detail()
            return outcome(Failure("crash", _describe_exit(code), tail, time.monotonic() - started))

        self._set_state(WorkerState.RUNNING)
        try:
            command: JSONObject = {"t": "run", "nodeid": nodeid, "seed": int(seed)}
            env = {**(env or {}), **(self.debugger.run_env() if self.debugger is not None else {})}
            if env:
                command["env"] = env
            self._send(command, deadline)
            while True:
                try:
                    msg = self._recv(deadline - time.monotonic())
                except TimeoutError:
                    return outcome(self._timed_out(timeout, time.monotonic() - started))
                if msg is None:
                    return crashed()
                if self._received > MAX_BYTES_PER_RUN:
                    raise WorkerProtocolError(f"more than {MAX_BYTES_PER_RUN} bytes in one run")
                if isinstance(msg, SealMessage):
                    if not first:  # only the worker's, before the test runs, counts
                        raise WorkerProtocolError("a seal that is not the run's first message")
                    self.seal = msg.key
                elif isinstance(msg, OutputMessage):
                    self._show(msg)
                elif isinstance(msg, PdbOutput | PdbRead | PdbEnd):
                    # pdb's answer gets what is left of the run, the user's typing aside.
                    answer = functools.partial(self._send_within, deadline - time.monotonic())
                    deadline += serve(self.debugger, nodeid, msg, answer, tally.reports)
                else:
                    tally.add(msg)
                if isinstance(msg, QueryMessage):
                    self._answer(msg, deadline)
                elif isinstance(msg, DoneMessage):
                    self._set_state(WorkerState.READY)
                    return outcome(None)
                first = first and isinstance(msg, OutputMessage)
                if time.monotonic() >= deadline:
                    # A worker that always has a line ready never lets recv time out.
                    return outcome(self._timed_out(timeout, time.monotonic() - started))
        except _LinkDown:
            return crashed()
        except _Stalled as exc:
            # The guest cannot take a SIGUSR1 request either: no stack dump, just end it.
            tail = self._transport.stderr_tail()
            self._die()
            detail = (
                f"the guest stopped reading what the host sent it ({exc}); "
                f"worker stderr (tail):\n{tail_lines(tail, STDERR_TAIL_LINES)}"
            )
            headline = f"Timeout > {timeout:g}s: the guest stopped reading"
            return outcome(Failure("timeout", headline, detail, time.monotonic() - started))
        except WorkerProtocolError as exc:
            raise self._broken(WorkerProtocolError(f"while running {nodeid}: {exc}")) from exc

    def _show(self, msg: OutputMessage) -> None:
        """Show live output within the run's budget; past it, one note, then nothing."""
        if self._live_left <= 0:
            return
        text = msg.data[: self._live_left]
        self._live_left -= len(msg.data)
        if self._live_left <= 0:
            text += LIVE_TRUNCATED
        self.on_output(msg.stream, safe_terminal_text(text))

    def _answer(self, query: QueryMessage, deadline: float | None) -> None:
        """Answer a mid-run query with ``on_query`` (no handler or a failure: an error answer)."""
        answer: JSONObject
        if self.on_query is None:
            answer = {
                "t": "answer",
                "ok": False,
                "error": f"the host answers no {query.kind!r} queries",
            }
        else:
            try:
                answer = {"t": "answer", "ok": True, "data": self.on_query(query.kind, query.args)}
            except GondolinError as exc:
                answer = {"t": "answer", "ok": False, "error": str(exc)}
        self._send(answer, deadline)

    def _timed_out(self, timeout: float, elapsed: float) -> Failure:
        """The run's timeout failure, with the worker's stack dump (``stack_dump.py``); kills it."""
        failure = stack_dump.timed_out(self._transport, timeout, elapsed)
        self._die()
        return failure

    @require(WorkerState.READY, WorkerState.RUNNING, WorkerState.DEAD)
    def rewind(self) -> None:
        """Declare the worker READY again: its side was restored to a snapshot
        taken right after ``collected`` (a VM restore), whatever happened
        since -- even a run that crashed or timed out.  The transport must
        have dropped any buffered output.  Raises ``StateError`` before
        ``start`` (or ``adopt``) or after ``close``.
        """
        self._set_state(WorkerState.READY)

    def close(self, timeout: float = DEFAULT_QUIT_TIMEOUT) -> None:
        """Ask the worker to quit, then make sure it is gone.  Idempotent."""
        if self._state is WorkerState.CLOSED:
            return
        if self._state is WorkerState.READY:
            try:
                self._send({"t": "quit"})
                self._transport.wait(timeout)
            except (_LinkDown, OSError, GondolinError) as exc:
                log.debug("worker quit failed: %s", exc)
        self._transport.kill()
        self._set_state(WorkerState.CLOSED)

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
