"""``--pdb`` for sandboxed tests, on the host: the terminal that pdb in the guest talks to.

pytest's ``--pdb`` enters pdb's post-mortem when a test fails. A sandboxed
test fails in the guest, so pdb runs there (:mod:`pytest_gondolin.guest.debugger`)
and this module gives it the host's terminal: the client's run loop
(:mod:`.client`) hands it pdb's output, to write with pytest's capture
suspended, and pdb's requests for a line, to read from the terminal. The
run's timeout does not count the time spent waiting for the user to type.
Quitting pdb (``q``, end of input) ends the session after the test's
reports are in, as pytest's ``--pdb`` does on the host
(``pytest.exit("Quitting debugger")``: exit status 2, later tests not run).

There is no debugger to give without a terminal: when stdin is not a TTY
(CI, a pipe), under pytest-xdist (``-n``; xdist itself refuses ``--pdb``),
or with ``--trace`` (not supported for sandboxed tests), :func:`debugger_notice`
says so once, up front, and sandboxed failures are reported as usual.
:func:`terminal_debugger` is the one place that decides, once per session.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Final

import pytest

from pytest_gondolin.guest.debugger import MAX_LINE
from pytest_gondolin.sandbox.live_output import safe_terminal_text

__all__ = ["TerminalDebugger", "debugger_notice", "terminal_debugger"]

log = logging.getLogger(__name__)

#: The session's TerminalDebugger, or why there is none under --pdb (both None: --pdb is off).
_DEBUGGER_KEY: Final = pytest.StashKey["tuple[TerminalDebugger | None, str | None]"]()
#: What pytest's --pdb says when pdb was quit (``_pytest/debugging.py``: post_mortem).
QUIT_MESSAGE: Final = "Quitting debugger"


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
                return None
        if not line:
            return None
        if not line.endswith("\n"):
            # Longer than MAX_LINE: pdb gets the start, the rest of the line is dropped.
            with self._terminal(), contextlib.suppress(OSError, ValueError):
                while (more := sys.stdin.readline(MAX_LINE)) and not more.endswith("\n"):
                    pass
        return line.rstrip("\r\n")

    def ended(self, nodeid: str, *, quit: bool) -> None:
        """pdb is over for ``nodeid``; ``quit``: end the session once its reports are in."""
        if quit:
            self._quit.add(nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        if nodeid in self._quit:
            self._quit.discard(nodeid)
            pytest.exit(QUIT_MESSAGE)


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


def terminal_debugger(config: pytest.Config) -> TerminalDebugger | None:
    """The session's debugger for sandboxed tests, or ``None`` (decided once, then kept)."""
    return _decide(config)[0]


def _decide(config: pytest.Config) -> tuple[TerminalDebugger | None, str | None]:
    """The session's debugger, or why there is none under ``--pdb``; decided once."""
    if _DEBUGGER_KEY not in config.stash:
        decision: tuple[TerminalDebugger | None, str | None] = (None, None)
        if getattr(config.option, "usepdb", False):
            reason = _unavailable(config)
            if reason is None:
                debugger = TerminalDebugger(config)
                config.pluginmanager.register(debugger, "gondolin-debugger")
                decision = (debugger, None)
            else:
                decision = (None, reason)
        config.stash[_DEBUGGER_KEY] = decision
    return config.stash[_DEBUGGER_KEY]


def debugger_notice(config: pytest.Config, sandboxed: int) -> str | None:
    """What to say up front when ``--pdb`` / ``--trace`` cannot enter ``sandboxed``
    sandboxed items (``None``: nothing to say)."""
    if not sandboxed:
        return None
    reasons = []
    why_not = _decide(config)[1]
    if why_not is not None:
        reasons.append(f"--pdb does not enter sandboxed tests ({sandboxed} here): {why_not}")
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
