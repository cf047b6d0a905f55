"""``--pdb`` for a sandboxed test: pdb's post-mortem runs here, in the guest, on the host's terminal.

When the host runs with ``--pdb`` and has a terminal to give
(:mod:`pytest_gondolin.sandbox.debugger`), every ``run`` command's
environment holds ``PYTEST_GONDOLIN_PDB=1`` (:data:`PDB_ENV`). A test that
fails then gets what pytest's own ``--pdb`` gives a host-side test: the
captured output and the traceback, then ``pdb.Pdb`` post-mortem on the
failure's traceback -- in this process, so ``p``, ``l``, ``up``, ``!expr``
see the guest's frames. pdb's input and output are :class:`HostTerminal`,
which turns them into worker messages (see :mod:`pytest_gondolin.guest.worker`)::

    {"t": "pdb_output", "data": str}   what pdb, and code it runs, writes (at most CHUNK)
    {"t": "pdb_read"}                  pdb waits for a line; the host answers
                                       {"t": "answer", "ok": true, "data": str}: the line typed
                                       {"t": "answer", "ok": false, ...}: end of input
    {"t": "pdb_end", "quit": bool}     the post-mortem is over; ``quit``: pdb was quit (``q``,
                                       end of input) and the host ends its session, as
                                       pytest's ``--pdb`` does

The run goes on after ``pdb_end`` (teardown, reports, ``done``) whatever the
user typed: quitting ends the host's session, never the worker's.
Standard library and pytest only: this module runs in the guest.
"""

from __future__ import annotations

import contextlib
import doctest
import os
import pdb
import types
from typing import Any, Final

import pytest

from pytest_gondolin.guest.hostquery import LinePipe

__all__ = ["CHUNK", "MAX_LINE", "PDB_ENV", "HostTerminal", "enabled", "post_mortem"]

#: Set to "1" in a run's environment when the host proxies its terminal for pdb.
PDB_ENV: Final = "PYTEST_GONDOLIN_PDB"
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
