"""pdb for sandboxed tests, on the host: the terminal that pdb in the guest talks to.

A sandboxed test runs in the guest, so its pdb runs there
(:mod:`pytest_gondolin.guest.debugger`) and this module gives it the host's
terminal: the client's run loop (:mod:`.client`) hands :func:`serve` pdb's
output, to write with pytest's capture suspended, and pdb's requests for a
line, to read from the terminal. Two ways in, as on the host: ``--pdb``'s
post-mortem of a failure, and ``breakpoint()`` / ``pdb.set_trace()`` /
``pytest.set_trace()`` in the test (with or without ``--pdb``). The run's
timeout does not count the time spent waiting for the user to type.
Quitting pdb (``q``, end of input) ends the session after the test's
reports are in, as pytest's pdb does on the host
(``pytest.exit("Quitting debugger")``: exit status 2, later tests not run).

There is no terminal to lend when stdin is not a TTY (CI, a pipe) or under
pytest-xdist (``-n``; xdist itself refuses ``--pdb``): :class:`NoTerminal`
then tells each run why, a ``breakpoint()`` there fails its test saying so
(never waits), and :func:`debugger_notice` says it once, up front, under
``--pdb`` (or ``--trace``, not supported for sandboxed tests).
:func:`terminal_debugger` is the one place that decides, once per session.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Final, Protocol

import pytest

from pytest_gondolin.guest.debugger import MAX_LINE, PDB_ENV, TERMINAL_ENV
from pytest_gondolin.sandbox.json_checks import JSONObject
from pytest_gondolin.sandbox.live_output import safe_terminal_text
from pytest_gondolin.sandbox.messages import PdbEnd, PdbOutput, PdbRead
from pytest_gondolin.sandbox.replay import replay_begun, replay_cut

__all__ = [
    "NoTerminal",
    "RunDebugger",
    "TerminalDebugger",
    "debugger_notice",
    "serve",
    "terminal_debugger",
]

log = logging.getLogger(__name__)

#: The session's debugger (a TerminalDebugger, or a NoTerminal saying why there is none).
_DEBUGGER_KEY: Final = pytest.StashKey["TerminalDebugger | NoTerminal"]()
#: What pytest's --pdb says when pdb was quit (``_pytest/debugging.py``: post_mortem).
QUIT_MESSAGE: Final = "Quitting debugger"
#: pdb's quit commands (``do_q = do_exit = do_quit``); the end of input quits too.
QUIT_COMMANDS: Final = frozenset({"q", "quit", "exit"})


class RunDebugger(Protocol):
    """What the worker client needs to serve pdb in the guest during a run."""

    def show(self, text: str) -> None:
        """Write what pdb wrote (guest text: made safe for a terminal by the callee)."""

    def read_line(self) -> str | None:
        """The next line typed, without its newline; ``None`` at the end of input."""

    def ended(self, nodeid: str, *, quit: bool, reports: int = 0) -> None:
        """pdb is over for ``nodeid``; ``quit``: the user quit it, after the run had sent
        ``reports`` reports."""

    def begin(self, nodeid: str, reports: Sequence[JSONObject]) -> None:
        """pdb in ``nodeid``'s run is about to use the terminal; ``reports``: its reports so far."""

    def run_env(self) -> dict[str, str]:
        """What a run's environment says about the terminal (guest/debugger.py)."""


class NoTerminal:
    """No terminal to lend: pdb in the guest gets none, and each run is told why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def show(self, text: str) -> None:
        pass

    def read_line(self) -> str | None:
        return None

    def ended(self, nodeid: str, *, quit: bool, reports: int = 0) -> None:
        pass

    def begin(self, nodeid: str, reports: Sequence[JSONObject]) -> None:
        pass

    def run_env(self) -> dict[str, str]:
        return {TERMINAL_ENV: self.reason}


class TerminalDebugger:
    """The host's terminal, lent to pdb in the guest; a pytest plugin of the session.

    :meth:`show` and :meth:`read_line` are called by the worker client while
    a run is in pdb; :meth:`ended` when pdb is over. When the user quit pdb,
    the item's ``pytest_runtest_logfinish`` (after its reports were logged)
    ends the session.
    """

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        #: Node ids whose pdb was quit: the session ends when their reports are in.
        self._quit: set[str] = set()
        #: The item being run (to log its reports before pdb takes the terminal).
        self._item: pytest.Item | None = None
        #: Whether the last line pdb got from the user quits it: only then does the
        #: guest's word that pdb was quit end the session (else a guest could end it).
        self._user_quit = False

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        self._item = item
        try:
            return (yield)
        finally:
            self._item = None

    def begin(self, nodeid: str, reports: Sequence[JSONObject]) -> None:
        """With ``--pdb``, log the item's start and reports so far first: its ``FAILED``
        line comes before the post-mortem, as on the host (``replay_begun``). Without
        ``--pdb`` (a ``breakpoint()``), the reports come when the run is over."""
        item = self._item
        if item is not None and item.nodeid == nodeid and self._config.option.usepdb:
            replay_begun(item, reports)

    def run_env(self) -> dict[str, str]:
        """The terminal is lent (breakpoints); with ``--pdb`` a failure enters pdb too."""
        env = {TERMINAL_ENV: "1"}
        if getattr(self._config.option, "usepdb", False):
            env[PDB_ENV] = "1"
        return env

    @contextlib.contextmanager
    def _terminal(self) -> Iterator[None]:
        """The real stdin and stdout within the block (pytest's capture suspended, stdin too),
        as they were afterwards."""
        capman = self._config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            yield
            return
        with capman.global_and_fixture_disabled():
            capman.suspend_global_capture(in_=True)
            try:
                yield
            finally:
                # Back to "suspended, stdin captured", the state between a test's phases.
                capman.resume_global_capture()
                capman.suspend_global_capture(in_=False)

    def show(self, text: str) -> None:
        """Write what pdb in the guest wrote, made safe for a terminal."""
        with self._terminal():
            try:
                sys.stdout.write(safe_terminal_text(text))
                sys.stdout.flush()
            except (OSError, ValueError) as exc:  # a closed terminal loses only the output
                log.debug("pdb output not shown: %s", exc)

    def read_line(self) -> str | None:
        """The next line typed (without its newline, at most ``MAX_LINE`` characters);
        ``None`` at the end of input (pdb then quits)."""
        with self._terminal():
            try:
                line = sys.stdin.readline(MAX_LINE + 1)
            except (OSError, ValueError) as exc:
                log.debug("no line from the terminal for pdb: %s", exc)
                self._user_quit = True  # pdb takes it as the end of input
                return None
        if not line:
            self._user_quit = True
            return None
        self._user_quit = _quits(line)
        if not line.endswith("\n"):
            # Longer than MAX_LINE: pdb gets the start, the rest of the line is dropped.
            with self._terminal(), contextlib.suppress(OSError, ValueError):
                while (more := sys.stdin.readline(MAX_LINE)) and not more.endswith("\n"):
                    pass
        return line.rstrip("\r\n")

    def ended(self, nodeid: str, *, quit: bool, reports: int = 0) -> None:
        """pdb is over for ``nodeid``; ``quit``: end the session once its reports are in.

        On the host, quitting pdb stops the test where it is: nothing after it is
        reported (no call report after a breakpoint, no teardown). The guest finishes
        the run all the same; of its reports, only the ``reports`` sent before the
        quit are logged (``replay_cut``).
        """
        user_quit, self._user_quit = self._user_quit, False
        if quit and not user_quit:
            log.warning("%s: the guest said pdb was quit, but no quit was typed: ignored", nodeid)
        elif quit:
            self._quit.add(nodeid)
            item = self._item
            if item is not None and item.nodeid == nodeid:
                replay_cut(item, reports)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        if nodeid in self._quit:
            self._quit.discard(nodeid)
            pytest.exit(QUIT_MESSAGE)


def _quits(line: str) -> bool:
    """Whether pdb quits on ``line``: a quit command, alone or among ``;;``-chained ones."""
    return any((words := part.split()) and words[0] in QUIT_COMMANDS for part in line.split(";;"))


def _stdin_is_a_terminal(config: pytest.Config) -> bool:
    """Whether the real stdin (behind pytest's capture) is a TTY."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        return sys.stdin is not None and sys.stdin.isatty()
    with capman.global_and_fixture_disabled():
        capman.suspend_global_capture(in_=True)
        try:
            return sys.stdin is not None and sys.stdin.isatty()
        finally:
            capman.resume_global_capture()
            capman.suspend_global_capture(in_=False)


def _unavailable(config: pytest.Config) -> str | None:
    """Why ``--pdb`` cannot enter sandboxed tests in this session (``None``: it can)."""
    if hasattr(config, "workerinput"):
        return "pytest-xdist workers have no terminal"
    try:
        terminal = _stdin_is_a_terminal(config)
    except (OSError, ValueError):
        terminal = False
    if not terminal:
        return "stdin is not a terminal"
    return None


def terminal_debugger(config: pytest.Config) -> TerminalDebugger | NoTerminal:
    """The session's terminal for pdb in the guest, or why there is none (decided once)."""
    if _DEBUGGER_KEY not in config.stash:
        reason = _unavailable(config)
        decision: TerminalDebugger | NoTerminal
        if reason is None:
            decision = TerminalDebugger(config)
            config.pluginmanager.register(decision, "gondolin-debugger")
        else:
            decision = NoTerminal(reason)
        config.stash[_DEBUGGER_KEY] = decision
    return config.stash[_DEBUGGER_KEY]


def debugger_notice(config: pytest.Config, sandboxed: int) -> str | None:
    """What to say up front when ``--pdb`` / ``--trace`` cannot enter ``sandboxed``
    sandboxed items (``None``: nothing to say)."""
    if not sandboxed:
        return None
    reasons = []
    if getattr(config.option, "usepdb", False):
        decided = terminal_debugger(config)
        if isinstance(decided, NoTerminal):
            reasons.append(
                f"--pdb does not enter sandboxed tests ({sandboxed} here): {decided.reason}"
            )
    if getattr(config.option, "trace", False):
        reasons.append(
            f"--trace does not enter sandboxed tests ({sandboxed} here): not supported in the guest"
        )
    if not reasons:
        return None
    return (
        "; ".join(reasons) + ". Their failures are reported as usual, without a debugger. "
        "To debug one, run it with --pdb from a terminal (pdb then runs in the guest), "
        "or without @pytest.mark.sandboxed."
    )


def serve(
    debugger: RunDebugger | None,
    nodeid: str,
    msg: PdbOutput | PdbRead | PdbEnd,
    answer: Callable[[JSONObject], None],
    reports: Sequence[JSONObject] = (),
) -> float:
    """Serve one pdb message of a run with ``debugger``; returns the seconds spent
    waiting for the user (the caller takes them off the run's clock). Without a
    terminal, pdb's output is dropped and its reads get the end of input (pdb then
    quits); ``answer`` sends the reply to a read. ``reports``: the run's so far."""
    if debugger is not None and not isinstance(msg, PdbEnd):
        debugger.begin(nodeid, reports)
    if isinstance(msg, PdbOutput):
        if debugger is not None:
            debugger.show(msg.data)
        return 0.0
    if isinstance(msg, PdbEnd):
        if debugger is not None:
            debugger.ended(nodeid, quit=msg.quit, reports=len(reports))
        return 0.0
    started = time.monotonic()
    line = debugger.read_line() if debugger is not None else None
    waited = time.monotonic() - started
    if line is None:
        answer({"t": "answer", "ok": False, "error": "end of input"})
    else:
        answer({"t": "answer", "ok": True, "data": line})
    return waited
