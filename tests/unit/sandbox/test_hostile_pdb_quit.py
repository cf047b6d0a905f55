"""A guest cannot end the host's session by saying pdb was quit when nobody quit it.

``pdb_end`` with ``quit: true`` makes the host stop the session after the
test (``pytest.exit("Quitting debugger")``, as pytest's pdb does). The host
honours it only when the last line it read from the user for pdb quits pdb
(``q``, ``quit``, ``exit``, also after ``;;``) or was the end of input.
"""

from __future__ import annotations

import io

import pytest

from pytest_gondolin.sandbox.debugger import QUIT_MESSAGE, TerminalDebugger

NODEID = "test_x.py::test_x"


def _debugger(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, typed: str
) -> TerminalDebugger:
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    return TerminalDebugger(pytester.parseconfig())


def test_a_quit_nobody_typed_is_ignored(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    debugger = _debugger(pytester, monkeypatch, "p 1\n")
    debugger.ended(NODEID, quit=True)  # no line read at all
    debugger.pytest_runtest_logfinish(NODEID)
    assert debugger.read_line() == "p 1"
    debugger.ended(NODEID, quit=True)  # the user typed something else
    debugger.pytest_runtest_logfinish(NODEID)


@pytest.mark.parametrize("typed", ["q\n", "  quit  \n", "exit\n", "p 1;;q\n", ""])
def test_a_typed_quit_or_the_end_of_input_ends_the_session(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, typed: str
) -> None:
    """Control: what pdb quits on still ends the session, once the reports are in."""
    debugger = _debugger(pytester, monkeypatch, typed)
    debugger.read_line()
    debugger.ended(NODEID, quit=True)
    with pytest.raises(pytest.exit.Exception, match=QUIT_MESSAGE):
        debugger.pytest_runtest_logfinish(NODEID)


def test_a_quit_counts_once(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    debugger = _debugger(pytester, monkeypatch, "q\n")
    debugger.read_line()
    debugger.ended(NODEID, quit=False)  # continued after all: the typed q is used up
    debugger.ended(NODEID, quit=True)
    debugger.pytest_runtest_logfinish(NODEID)
