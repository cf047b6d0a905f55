"""Run pytest items in another process and replay their reports on the host.

The far side is the worker of :mod:`pytest_gondolin.guest.worker` (its
docstring defines the wire protocol).  This module is the host side:

* :class:`WorkerTransport` — the duplex byte pipe to a worker, a Protocol
  with six methods.  :class:`SubprocessTransport` implements it over a local
  child process; the VM transport implements it over the guest agent.
* :func:`~pytest_gondolin.worker_messages.parse_message` and
  :class:`~pytest_gondolin.worker_messages.RunTally` (sans-IO) — one
  hostile line in, one validated, size-bounded message out (or
  :class:`~pytest_gondolin.errors.WorkerProtocolError`); one run's messages
  in, a :class:`RunOutcome` within the per-test memory bound out.
* :class:`WorkerClient` — drives one worker: ``start`` (wait for
  collection), ``ping``, ``run`` (one item), ``close``.
* :func:`~pytest_gondolin.replay.replay_item` — replays a run's reports
  through the host's hooks as pytest-xdist's controller does.

Names that moved out of this module are re-exported here.

Transport contract (what :class:`WorkerClient` needs from a transport)
----------------------------------------------------------------------

``send(data: bytes) -> None``
    Write *data* (whole protocol lines) to the worker's stdin.  May raise
    ``OSError`` or a ``GondolinError`` when the worker is gone.
``recv_line(timeout: float) -> bytes | None``
    Return the next line from the worker's protocol stream *including* its
    ``b"\\n"``; ``None`` once the stream has ended.  Raise ``TimeoutError``
    if no whole line arrives within *timeout* seconds.  Never buffer more
    than about ``MAX_WORKER_LINE + 1`` bytes for one line: when a line is
    longer, return what was read (no terminator, longer than the limit) and
    stop reading.  A chunk without terminator that is *not* over the limit
    means the stream ended mid-line.  May raise ``OSError`` or a
    ``GondolinError`` for a broken link (the client treats it as a crash).
``wait(timeout: float) -> int | None``
    Wait up to *timeout* for the worker process to exit; return its exit
    status (negative: killed by that signal) or ``None`` if unknown.
``interrupt() -> None``
    Ask the worker for a stack dump (SIGUSR1 to the worker process); the
    dump appears in ``stderr_tail()``.  Best effort, never raises.
``kill() -> None``
    End the worker now and release everything.  Idempotent, never raises.
``stderr_tail() -> str``
    The last few KiB of the worker's stderr (what pytest, faulthandler and
    stray prints wrote), decoded leniently.

The client is not thread-safe; one thread drives one worker.

Lifecycle of a :class:`WorkerClient` (see :class:`WorkerState`)::

    NEW --start--> READY --run--> RUNNING --done--> READY --close--> CLOSED
                     |               |
                     |               +--crash/timeout/protocol error--> DEAD --rewind--> READY
                     +--ping failure---------------------------------> DEAD
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Final, Protocol

import pytest

from pytest_gondolin.errors import AgentError, GondolinError, WorkerProtocolError
from pytest_gondolin.guest.worker import (
    MAX_COMMAND_LINE,
    MAX_WORKER_LINE,
    WORKER_MODULE,
    encode_line,
)
from pytest_gondolin.logtail import tail_lines
from pytest_gondolin.replay import GUEST_REPORT_ATTR as GUEST_REPORT_ATTR
from pytest_gondolin.replay import WorkerFailureRepr as WorkerFailureRepr
from pytest_gondolin.replay import _warning_category as _warning_category
from pytest_gondolin.replay import replay_collect_errors as replay_collect_errors
from pytest_gondolin.replay import replay_item as replay_item
from pytest_gondolin.worker_messages import MAX_COLLECTED_ITEMS as MAX_COLLECTED_ITEMS
from pytest_gondolin.worker_messages import MAX_KEPT_PER_TEST as MAX_KEPT_PER_TEST
from pytest_gondolin.worker_messages import MAX_MESSAGES_PER_RUN as MAX_MESSAGES_PER_RUN
from pytest_gondolin.worker_messages import MAX_NODEID_CHARS as MAX_NODEID_CHARS
from pytest_gondolin.worker_messages import MAX_WARNINGS_PER_RUN as MAX_WARNINGS_PER_RUN
from pytest_gondolin.worker_messages import Collected as Collected
from pytest_gondolin.worker_messages import DoneMessage as DoneMessage
from pytest_gondolin.worker_messages import ErrorMessage as ErrorMessage
from pytest_gondolin.worker_messages import Failure as Failure
from pytest_gondolin.worker_messages import FailureKind as FailureKind
from pytest_gondolin.worker_messages import JSONObject as JSONObject
from pytest_gondolin.worker_messages import PongMessage as PongMessage
from pytest_gondolin.worker_messages import QueryMessage as QueryMessage
from pytest_gondolin.worker_messages import ReportMessage as ReportMessage
from pytest_gondolin.worker_messages import RunOutcome as RunOutcome
from pytest_gondolin.worker_messages import RunTally as RunTally
from pytest_gondolin.worker_messages import WarningRecord as WarningRecord
from pytest_gondolin.worker_messages import WorkerMessage as WorkerMessage
from pytest_gondolin.worker_messages import check_collect_report as check_collect_report
from pytest_gondolin.worker_messages import check_test_report as check_test_report
from pytest_gondolin.worker_messages import parse_message as parse_message

__all__ = [
    "MAX_WORKER_LINE",
    "Collected",
    "Failure",
    "RunOutcome",
    "SubprocessTransport",
    "WarningRecord",
    "WorkerClient",
    "WorkerState",
    "WorkerTransport",
    "parse_message",
    "replay_collect_errors",
    "replay_item",
    "worker_args",
    "worker_command",
]

log = logging.getLogger(__name__)

#: Waiting for the worker to import pytest and collect: a cold Python start
#: under TCG takes ~5 s, collecting a large project much longer.
DEFAULT_START_TIMEOUT: Final = 120.0
#: A pong is a round trip through an idle worker (~1 ms on virtio-serial).
DEFAULT_PING_TIMEOUT: Final = 10.0
#: After SIGUSR1, faulthandler writes the dump at once; this bounds how long
#: we wait for it to stop growing before killing the worker.
STACK_DUMP_GRACE: Final = 2.0
#: The dump is considered complete once stderr has been quiet this long.
_STACK_DUMP_QUIET: Final = 0.2
#: After EOF, how long the worker gets to finish exiting so its exit code
#: can be reported (it is already past writing its last line).
EXIT_WAIT: Final = 5.0
#: How long ``close`` lets the worker finish its session after ``quit``.
DEFAULT_QUIT_TIMEOUT: Final = 5.0
#: Most bytes one run may send: bounds its parsing work (well under a second
#: per 64 MiB); host memory is bounded by MAX_KEPT_PER_TEST instead.
MAX_BYTES_PER_RUN: Final = 256 * 1024 * 1024
#: Bytes of worker stderr kept for crash reports and stack dumps.
STDERR_TAIL_BYTES: Final = 64 * 1024
#: Lines of that stderr quoted in an error message.
STDERR_TAIL_LINES: Final = 60


# --------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------


class WorkerState(enum.Enum):
    """Where a :class:`WorkerClient` is in its lifecycle."""

    NEW = "new"
    READY = "ready"
    RUNNING = "running"
    DEAD = "dead"
    CLOSED = "closed"


class WorkerTransport(Protocol):
    """A duplex line pipe to one worker process; contract in the module docstring."""

    def send(self, data: bytes) -> None: ...

    def recv_line(self, timeout: float) -> bytes | None: ...

    def wait(self, timeout: float) -> int | None: ...

    def interrupt(self) -> None: ...

    def kill(self) -> None: ...

    def stderr_tail(self) -> str: ...


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


class WorkerClient:
    """Drives one worker over a :class:`WorkerTransport`.

    Every method bounds its wait.  ``run`` returns a :class:`RunOutcome` even
    when the test crashed or hung the worker (the worker is then killed and
    the client is DEAD); it raises ``WorkerProtocolError`` when the worker sent
    something malformed (again leaving it killed) and ``AgentError`` when
    called on a worker that is not READY.
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

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def collected(self) -> Collected | None:
        """What ``start`` returned, once it has."""
        return self._collected

    # -- plumbing -----------------------------------------------------------

    def _require(self, *states: WorkerState) -> None:
        if self._state not in states:
            raise AgentError(f"test worker is {self._state.value}, not {states[0].value}")

    def _send(self, message: JSONObject) -> None:
        line = encode_line(message)
        if len(line) > MAX_COMMAND_LINE:
            raise WorkerProtocolError(f"command {message['t']!r} too large ({len(line)} bytes)")
        log.debug("worker <- %.200r", line)
        try:
            self._transport.send(line)
        except (OSError, GondolinError) as exc:
            raise _LinkDown(str(exc)) from exc

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
        self._state = WorkerState.DEAD
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

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> Collected:
        """Wait for the worker to finish collecting; return what it collected.

        Raises ``AgentError`` if the worker exits or does not finish within
        *timeout* (the worker is then killed) and ``WorkerProtocolError`` if its
        first message is not ``collected``.
        """
        self._require(WorkerState.NEW)
        try:
            msg = self._recv(timeout)
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
        self._state = WorkerState.READY
        self._collected = msg
        return msg

    def ping(self, timeout: float = DEFAULT_PING_TIMEOUT) -> None:
        """Check that the worker answers (used after a VM restore).

        Raises ``AgentError`` (worker killed) when it does not answer in
        time or is gone, ``WorkerProtocolError`` when it answers wrongly.
        """
        self._require(WorkerState.READY)
        nonce = secrets.token_hex(8)
        try:
            self._send({"t": "ping", "nonce": nonce})
            msg = self._recv(timeout)
        except (_LinkDown, TimeoutError) as exc:
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
        """
        self._require(WorkerState.READY)
        if not isinstance(nodeid, str) or not 0 < len(nodeid) <= MAX_NODEID_CHARS:
            raise WorkerProtocolError(f"refusing to send node id {nodeid!r:.100}")
        started = time.monotonic()
        deadline = started + timeout
        tally = RunTally(nodeid)
        self._received = 0

        def outcome(failure: Failure | None) -> RunOutcome:
            return tally.outcome(failure, time.monotonic() - started)

        self._state = WorkerState.RUNNING
        try:
            command: JSONObject = {"t": "run", "nodeid": nodeid, "seed": int(seed)}
            if env:
                command["env"] = dict(env)
            self._send(command)
            while True:
                try:
                    msg = self._recv(deadline - time.monotonic())
                except TimeoutError:
                    return outcome(self._timed_out(timeout, time.monotonic() - started))
                if msg is None:
                    code, tail = self._exit_detail()
                    return outcome(
                        Failure("crash", _describe_exit(code), tail, time.monotonic() - started)
                    )
                if self._received > MAX_BYTES_PER_RUN:
                    raise WorkerProtocolError(f"more than {MAX_BYTES_PER_RUN} bytes in one run")
                tally.add(msg)
                if isinstance(msg, QueryMessage):
                    self._answer(msg)
                elif isinstance(msg, DoneMessage):
                    self._state = WorkerState.READY
                    return outcome(None)
                if time.monotonic() >= deadline:
                    # A worker that always has a line ready never lets recv time out.
                    return outcome(self._timed_out(timeout, time.monotonic() - started))
        except _LinkDown:
            code, tail = self._exit_detail()
            return outcome(Failure("crash", _describe_exit(code), tail, time.monotonic() - started))
        except WorkerProtocolError as exc:
            raise self._broken(WorkerProtocolError(f"while running {nodeid}: {exc}")) from exc

    def _answer(self, query: QueryMessage) -> None:
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
        self._send(answer)

    def _timed_out(self, timeout: float, elapsed: float) -> Failure:
        before = self._transport.stderr_tail()
        try:
            self._transport.interrupt()
        except (OSError, GondolinError) as exc:  # the contract says it never raises; be sure
            log.debug("interrupting the worker failed: %s", exc)
        dump = _await_quiet(self._transport.stderr_tail, before)
        self._die()
        if dump.startswith(before):
            dump = dump[len(before) :]
        if dump.strip():
            detail = "stack dump of the worker (SIGUSR1):\n" + dump
        else:
            detail = "no stack dump arrived; worker stderr (tail):\n" + tail_lines(
                before, STDERR_TAIL_LINES
            )
        return Failure("timeout", f"Timeout > {timeout:g}s", detail, elapsed)

    def adopt(self, collected: Collected) -> None:
        """Declare the worker READY with ``collected``: it is a clone (a VM started from a
        snapshot) of a worker that another client started."""
        self._require(WorkerState.NEW)
        self._collected = collected
        self._state = WorkerState.READY

    def rewind(self) -> None:
        """Declare the worker READY again: its side was restored to a snapshot
        taken right after ``collected`` (a VM restore), whatever happened
        since -- even a run that crashed or timed out.  The transport must
        have dropped any buffered output.  Raises ``AgentError`` if ``start``
        never succeeded or the client was closed.
        """
        if self._collected is None or self._state is WorkerState.CLOSED:
            raise AgentError(f"cannot rewind a test worker that is {self._state.value}")
        self._state = WorkerState.READY

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
        self._state = WorkerState.CLOSED

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _await_quiet(read: Callable[[], str], before: str) -> str:
    """Poll *read* until its value changed and then held still, or the grace ends."""
    deadline = time.monotonic() + STACK_DUMP_GRACE
    last, last_change = before, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, last_change = now, time.monotonic()
        elif last != before and time.monotonic() - last_change >= _STACK_DUMP_QUIET:
            break
    return last


# --------------------------------------------------------------------------
# a transport over a local subprocess
# --------------------------------------------------------------------------


def worker_command(args: Sequence[str], *, python: str = sys.executable) -> list[str]:
    """The argv that starts a worker with pytest arguments *args*."""
    return [python, "-m", WORKER_MODULE, *args]


class SubprocessTransport:
    """:class:`WorkerTransport` over a local child process with pipes.

    The child runs in its own session, so :meth:`kill` also ends whatever
    the tests started.  stdout lines are handed over by a reader thread
    (one line in flight: a worker cannot make the host buffer more than
    about three maximum-size lines); stderr is drained by another thread
    into a tail buffer of ``tail_bytes``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_line: int = MAX_WORKER_LINE,
        tail_bytes: int = STDERR_TAIL_BYTES,
    ) -> None:
        self.argv = list(argv)
        self._max_line = max_line
        self._tail_bytes = tail_bytes
        self._tail = bytearray()
        self._tail_lock = threading.Lock()
        self._lines: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
        self._eof = False
        self._closing = threading.Event()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            raise AgentError(f"cannot start test worker {self.argv[0]!r}: {exc}") from exc
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._threads = [
            threading.Thread(
                target=self._read_stdout,
                args=(self._proc.stdout,),
                name="gondolin-worker-out",
                daemon=True,
            ),
            threading.Thread(
                target=self._drain_stderr,
                args=(self._proc.stderr,),
                name="gondolin-worker-err",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
        log.debug("started worker pid %d: %s", self._proc.pid, self.argv)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _put(self, item: bytes | None) -> bool:
        while not self._closing.is_set():
            try:
                self._lines.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_stdout(self, stream: IO[bytes]) -> None:
        try:
            while True:
                line = stream.readline(self._max_line + 1)
                if not line:
                    break
                if not self._put(line) or not line.endswith(b"\n"):
                    return  # closing, oversized or cut short: stop reading
        except (OSError, ValueError):
            pass
        finally:
            self._put(None)

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        read = getattr(stream, "read1", stream.read)
        try:
            while chunk := read(65536):
                with self._tail_lock:
                    self._tail += chunk
                    del self._tail[: -self._tail_bytes]
        except (OSError, ValueError):
            pass

    def send(self, data: bytes) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(data)  # OSError (BrokenPipeError) means the worker is gone
        stdin.flush()

    def recv_line(self, timeout: float) -> bytes | None:
        if self._eof:
            return None
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line from the worker within {timeout:g}s") from None
        if line is None:
            self._eof = True
        return line

    def wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def interrupt(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.send_signal(signal.SIGUSR1)

    def kill(self) -> None:
        self._closing.set()
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except OSError:
                self._proc.kill()
        try:
            self._proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            log.warning("test worker pid %d did not die after SIGKILL", self._proc.pid)
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        for thread in self._threads:
            # A grandchild that left the session and holds stderr open keeps
            # the drain thread alive; it is a daemon, so do not wait long.
            thread.join(timeout=0.5)
        if not self._threads[1].is_alive() and self._proc.stderr is not None:
            with contextlib.suppress(OSError):
                self._proc.stderr.close()

    def stderr_tail(self) -> str:
        with self._tail_lock:
            return self._tail.decode("utf-8", "replace")


def worker_args(config: pytest.Config) -> list[str]:
    """pytest arguments that make a worker's session match the host's.

    Names the host's rootdir, inifile (``-c /dev/null`` when there is none,
    so the worker does not find one of its own) and conftest boundary
    explicitly, and repeats
    the command-line options that change how reports look or which plugins
    and conftests load: ``-p``, ``-o``, ``-W``, ``--tb``, ``-l``, verbosity,
    ``--import-mode``, ``--assert``, ``--noconftest``, ``--strict-markers``.
    Selection options (``-k``, ``-m``, ``--lf``, ``-x``) and reporting
    options (``--junitxml``) stay on the host.  The caller appends what to
    collect (files or node ids).
    """
    option = config.option
    args = [f"--rootdir={config.rootpath}", "-c", str(config.inipath or os.devnull)]
    # pytest stops looking for conftest.py files at the inifile's directory,
    # or at the rootdir when there is none; with "-c /dev/null" it would
    # stop at /dev, i.e. nowhere, so name the host's boundary explicitly.
    confcutdir = getattr(option, "confcutdir", None)
    if confcutdir is None and config.inipath is None:
        confcutdir = config.rootpath
    if confcutdir is not None:
        args.append(f"--confcutdir={confcutdir}")
    for plugin in getattr(option, "plugins", None) or []:
        args += ["-p", plugin]
    for override in getattr(option, "override_ini", None) or []:
        args += ["-o", override]
    for spec in getattr(option, "pythonwarnings", None) or []:
        args += ["-W", spec]
    tbstyle = getattr(option, "tbstyle", "auto")
    if tbstyle and tbstyle != "auto":
        args.append(f"--tb={tbstyle}")
    if getattr(option, "showlocals", False):
        args.append("-l")
    verbose = int(getattr(option, "verbose", 0) or 0)
    if verbose:
        args.append("-" + ("v" * verbose if verbose > 0 else "q" * -verbose))
    importmode = getattr(option, "importmode", None)
    if importmode:
        args.append(f"--import-mode={importmode}")
    if getattr(option, "assertmode", "rewrite") != "rewrite":
        args.append(f"--assert={option.assertmode}")
    if getattr(option, "noconftest", False):
        args.append("--noconftest")
    if getattr(option, "strict_markers", False):
        args.append("--strict-markers")
    return args
