"""pdb for a sandboxed test: it runs here, in the guest, on the host's terminal.

Every ``run`` command's environment says whether the host lends its
terminal (:mod:`pytest_gondolin.sandbox.debugger`): ``PYTEST_GONDOLIN_TERMINAL``
(:data:`TERMINAL_ENV`) is ``"1"``, or else the reason there is none.

* ``breakpoint()``, ``pdb.set_trace()`` and ``pytest.set_trace()`` in a run
  (:func:`breakpoints`, around each run) stop the test in pdb on that
  terminal, as pytest's do on the host; ``c`` goes on, ``q`` ends the
  host's session once the test is over (the test fails with ``BdbQuit``
  here; the host shows none of what it reports after the quit). Without a
  terminal, the call fails the test with the host's reason, at once:
  nothing waits for input that cannot come.
* With ``--pdb`` too, the environment holds ``PYTEST_GONDOLIN_PDB=1``
  (:data:`PDB_ENV`): a test that fails gets what pytest's own ``--pdb``
  gives a host-side test: the captured output and the traceback, then
  ``pdb.Pdb`` post-mortem on the failure's traceback.

Either way pdb runs in this process, so ``p``, ``l``, ``up``, ``!expr`` see
the guest's frames. pdb's input and output are :class:`HostTerminal`, which
turns them into worker messages (see :mod:`pytest_gondolin.guest.worker`)::

    {"t": "pdb_output", "data": str}   what pdb, and code it runs, writes (at most CHUNK)
    {"t": "pdb_read"}                  pdb waits for a line; the host answers
                                       {"t": "answer", "ok": true, "data": str}: the line typed
                                       {"t": "answer", "ok": false, ...}: end of input
    {"t": "pdb_end", "quit": bool}     pdb is over (continued, quit, or the run ended);
                                       ``quit``: pdb was quit (``q``, end of input) and
                                       the host ends its session, as pytest's pdb does

The run goes on after ``pdb_end`` (teardown, reports, ``done``) whatever the
user typed: quitting ends the host's session, never the worker's.
Standard library and pytest only: this module runs in the guest.
"""

from __future__ import annotations

import contextlib
import doctest
import os
import pdb
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, Final

import pytest

from pytest_gondolin.guest import hostquery
from pytest_gondolin.guest.hostquery import LinePipe

__all__ = [
    "CHUNK",
    "MAX_LINE",
    "PDB_ENV",
    "TERMINAL_ENV",
    "HostTerminal",
    "breakpoints",
    "enabled",
    "post_mortem",
]

#: Set to "1" in a run's environment when the host runs with ``--pdb`` (and lends its
#: terminal): a failure enters pdb's post-mortem.
PDB_ENV: Final = "PYTEST_GONDOLIN_PDB"
#: "1" in a run's environment when the host lends its terminal to pdb in the guest;
#: otherwise the reason it cannot ("stdin is not a terminal", ...).
TERMINAL_ENV: Final = "PYTEST_GONDOLIN_TERMINAL"
#: Largest ``data`` of one ``pdb_output`` message (the host accepts no more).
CHUNK: Final = 16 * 1024
#: Longest line pdb takes from the host; the rest of a longer one is dropped.
MAX_LINE: Final = 64 * 1024


def enabled() -> bool:
    """Whether the host asked for pdb on failures in this run."""
    return os.environ.get(PDB_ENV) == "1"


class HostTerminal:
    """A text file for pdb's ``stdin`` and ``stdout`` that is the host's terminal.

    Writes are buffered and sent as ``pdb_output`` on flush (and before each
    read); :meth:`readline` asks the host for a line and returns it with its
    newline, or ``""`` at the end of input (which pdb takes as ``EOF``: quit).
    """

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, pipe: LinePipe) -> None:
        self._pipe = pipe
        self._parts: list[str] = []
        self._size = 0

    def write(self, text: str) -> int:
        text = str(text)
        self._parts.append(text)
        self._size += len(text)
        if self._size >= CHUNK:
            self.flush()
        return len(text)

    def flush(self) -> None:
        data, self._parts, self._size = "".join(self._parts), [], 0
        for start in range(0, len(data), CHUNK):
            self._pipe.send({"t": "pdb_output", "data": data[start : start + CHUNK]})

    def readline(self, size: int = -1) -> str:
        self.flush()
        self._pipe.send({"t": "pdb_read"})
        reply = self._pipe.recv()
        if not reply or reply.get("t") != "answer" or reply.get("ok") is not True:
            return ""
        line = reply.get("data")
        if not isinstance(line, str):
            return ""
        return line[:MAX_LINE].replace("\n", " ") + "\n"

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("the host's terminal has no file descriptor in the guest")


def _traceback_of(excinfo: pytest.ExceptionInfo[BaseException]) -> types.TracebackType | None:
    """The traceback pdb walks: a doctest's underlying exception's, as pytest's --pdb does."""
    value = excinfo.value
    if isinstance(value, doctest.UnexpectedException):
        tb: types.TracebackType | None = value.exc_info[2]
        return tb
    return excinfo.tb


def _show_failure(terminal: HostTerminal, report: pytest.TestReport, showcapture: str) -> None:
    """What pytest's ``--pdb`` writes before the prompt (``_pytest/debugging.py``)."""
    from _pytest._io import TerminalWriter

    writer = TerminalWriter(terminal)  # type: ignore[arg-type]
    writer.hasmarkup = False
    writer.line()
    for name, content in (
        ("stdout", report.capstdout),
        ("stderr", report.capstderr),
        ("log", report.caplog),
    ):
        if showcapture in (name, "all") and content:
            writer.sep(">", "captured " + name)
            writer.line(content.removesuffix("\n"))
    writer.sep(">", "traceback")
    report.toterminal(writer)
    writer.sep(">", "entering PDB")
    writer.sep(">", "PDB post_mortem (in the guest; IO-capturing turned off)")


def post_mortem(
    pipe: LinePipe, node: pytest.Item, call: pytest.CallInfo[Any], report: pytest.TestReport
) -> bool:
    """Show the failure and run pdb's post-mortem on it with the host's terminal.

    Returns whether pdb was quit (the host then ends its session); the
    ``pdb_end`` message says the same. What the debugged code prints goes to
    the host too (``sys.stdout`` and ``sys.stderr`` are the terminal meanwhile).
    Never raises for a failure of its own: it is shown on the terminal and
    the run goes on.
    """
    terminal = HostTerminal(pipe)
    quitting = False
    try:
        _show_failure(terminal, report, str(node.config.getoption("showcapture", "all")))
        traceback = _traceback_of(call.excinfo) if call.excinfo is not None else None
        if traceback is None:
            terminal.write("pytest-gondolin: no traceback to debug\n")
        else:
            # nosigint: SIGINT is the host's business; readrc: no guest .pdbrc.
            debugger = pdb.Pdb(
                stdin=terminal,  # type: ignore[arg-type]
                stdout=terminal,  # type: ignore[arg-type]
                nosigint=True,
                readrc=False,
            )
            debugger.reset()
            with (
                contextlib.redirect_stdout(terminal),
                contextlib.redirect_stderr(terminal),
            ):
                debugger.interaction(None, traceback)
            quitting = bool(debugger.quitting)
    except Exception as exc:  # a broken debugger must not lose the run's reports
        terminal.write(f"\npytest-gondolin: pdb failed in the guest: {type(exc).__name__}: {exc}\n")
    finally:
        terminal.flush()
        pipe.send({"t": "pdb_end", "quit": quitting})
    return quitting


def _sep(terminal: HostTerminal, title: str) -> None:
    """A ``>>>> title >>>>`` line, as pytest's pdb writes them."""
    from _pytest._io import TerminalWriter

    writer = TerminalWriter(terminal)  # type: ignore[arg-type]
    writer.hasmarkup = False
    writer.line()
    writer.sep(">", title)


class _TracePdb(pdb.Pdb):
    """pdb stopped by ``breakpoint()`` in a run, on the host's terminal.

    While it holds the test (from the breakpoint to ``c`` or ``q``), what the
    test prints goes to the terminal too, as with pytest's capture suspended.
    """

    def __init__(self, terminal: HostTerminal, pipe: LinePipe) -> None:
        # nosigint: SIGINT is the host's business; readrc: no guest .pdbrc.
        super().__init__(stdin=terminal, stdout=terminal, nosigint=True, readrc=False)  # type: ignore[arg-type]
        self._terminal = terminal
        self._pipe = pipe
        self._saved: tuple[Any, Any] | None = None
        self.over = False

    def hold(self) -> None:
        """The test's ``sys.stdout`` / ``sys.stderr`` are the terminal until :meth:`end`."""
        if self._saved is None:
            self._saved = (sys.stdout, sys.stderr)
            sys.stdout = sys.stderr = self._terminal

    def end(self, *, quit: bool) -> None:
        """pdb lets go of the test: output back where it was, the host told (once)."""
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        self._terminal.flush()
        if not self.over:
            self.over = True
            self._pipe.send({"t": "pdb_end", "quit": quit})

    def do_continue(self, arg: str) -> bool | None:
        result = super().do_continue(arg)
        _sep(self._terminal, "PDB continue (in the guest; IO-capturing resumed)")
        self.end(quit=False)
        return result

    do_c = do_cont = do_continue

    def do_quit(self, arg: str) -> bool | None:
        result = super().do_quit(arg)
        self.end(quit=True)
        return result

    do_q = do_exit = do_quit

    def do_EOF(self, arg: str) -> bool | None:
        result = super().do_EOF(arg)
        self.end(quit=True)
        return result


def _no_terminal(reason: str) -> None:
    pytest.fail(
        f"breakpoint() / pdb.set_trace() in a sandboxed test needs the host's terminal, "
        f"and there is none: {reason}. Run this test from a terminal (without -n) to debug it "
        "in the guest, or without @pytest.mark.sandboxed.",
        pytrace=False,
    )


@contextlib.contextmanager
def breakpoints() -> Iterator[None]:
    """Within the block (one run), ``breakpoint()``, ``pdb.set_trace()`` and
    ``pytest.set_trace()`` stop the test in pdb on the host's terminal, or fail it
    when there is none. Outside a run (no channel to the host) nothing changes;
    nor does ``breakpoint()`` when ``PYTHONBREAKPOINT`` names another hook."""
    pipe = hostquery.current()
    if pipe is None:
        yield
        return
    sessions: list[_TracePdb] = []

    def set_trace(*args: object, header: str | None = None, **kwargs: object) -> None:
        lent = os.environ.get(TERMINAL_ENV, "the host lent none")
        if lent != "1":
            _no_terminal(lent)
        terminal = HostTerminal(pipe)
        debugger = _TracePdb(terminal, pipe)
        sessions.append(debugger)
        _sep(terminal, header or "PDB set_trace (in the guest; IO-capturing turned off)")
        debugger.hold()
        debugger.set_trace(sys._getframe(1))

    saved: list[tuple[object, str, object]] = [
        (pdb, "set_trace", pdb.set_trace),
        (pytest, "set_trace", pytest.set_trace),
    ]
    if not os.environ.get("PYTHONBREAKPOINT"):
        saved.append((sys, "breakpointhook", sys.breakpointhook))
    replaced: Callable[..., None] = set_trace
    for owner, name, _ in saved:
        setattr(owner, name, replaced)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        for debugger in sessions:
            if not debugger.over:
                # The run ended with pdb still stepping: stop tracing, tell the host.
                sys.settrace(None)
                debugger.end(quit=False)
