"""``--pdb`` for sandboxed tests, piece by piece: the messages, the client's loop, the
guest's terminal file and post-mortem, the host's decision. End to end, on a real
pseudo-terminal and real QEMU: tests/plugin/test_pdb.py."""

from __future__ import annotations

import io
import json
import sys
import time
from typing import Any

import pytest

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.guest import debugger as guest_debugger
from pytest_gondolin.guest import hostquery
from pytest_gondolin.guest.debugger import CHUNK, MAX_LINE, PDB_ENV, TERMINAL_ENV, HostTerminal
from pytest_gondolin.sandbox.debugger import (
    QUIT_MESSAGE,
    NoTerminal,
    TerminalDebugger,
    debugger_notice,
    terminal_debugger,
)
from pytest_gondolin.sandbox.messages import PdbEnd, PdbOutput, PdbRead, parse_message
from tests.unit.sandbox._wire import DONE, NODEID, line, report_line, started


def test_pdb_messages_are_validated() -> None:
    assert parse_message(line({"t": "pdb_output", "data": "(Pdb) "})) == PdbOutput("(Pdb) ")
    assert parse_message(line({"t": "pdb_read"})) == PdbRead()
    assert parse_message(line({"t": "pdb_end", "quit": True})) == PdbEnd(True)
    for bad, where in (
        ({"t": "pdb_output", "data": "x" * (CHUNK + 1)}, "pdb_output.data"),
        ({"t": "pdb_output", "data": 5}, "pdb_output.data"),
        ({"t": "pdb_output"}, "pdb_output.data"),
        ({"t": "pdb_end", "quit": 1}, "pdb_end.quit"),
        ({"t": "pdb_end"}, "pdb_end.quit"),
    ):
        with pytest.raises(WorkerProtocolError, match=where):
            parse_message(line(bad))


class FakeDebugger:
    """The host's terminal, scripted: lines to type, each after ``think`` seconds."""

    def __init__(self, lines: list[str | None], think: float = 0.0) -> None:
        self.lines = lines
        self.think = think
        self.shown: list[str] = []
        self.ends: list[tuple[str, bool]] = []
        self.begun: list[tuple[str, list[str]]] = []
        self.reports_at_end: list[int] = []

    def show(self, text: str) -> None:
        self.shown.append(text)

    def read_line(self) -> str | None:
        time.sleep(self.think)
        return self.lines.pop(0)

    def ended(self, nodeid: str, *, quit: bool, reports: int = 0) -> None:
        self.ends.append((nodeid, quit))
        self.reports_at_end.append(reports)

    def run_env(self) -> dict[str, str]:
        return {TERMINAL_ENV: "1", PDB_ENV: "1"}

    def begin(self, nodeid: str, reports: Any) -> None:
        self.begun.append((nodeid, [report["when"] for report in reports]))


PDB_SESSION = [
    report_line(when="setup"),
    report_line(outcome="failed"),
    line({"t": "pdb_output", "data": "> test_m.py(3)\n(Pdb) "}),
    line({"t": "pdb_read"}),
    line({"t": "pdb_output", "data": "'guest value'\n(Pdb) "}),
    line({"t": "pdb_read"}),
    line({"t": "pdb_end", "quit": True}),
    report_line(when="teardown"),
    DONE,
]


def answers(sent: list[bytes]) -> list[dict[str, Any]]:
    commands = [json.loads(data) for data in sent]
    return [command for command in commands if command["t"] == "answer"]


def test_the_client_lends_pdb_the_terminal_and_stops_the_clock_while_the_user_types() -> None:
    client, transport = started(PDB_SESSION)
    debugger = FakeDebugger(["p local_var", None], think=0.4)
    client.debugger = debugger
    # Two reads of 0.4 s each against a 0.5 s run timeout: only pdb's waits pass it.
    outcome = client.run(NODEID, seed=1, timeout=0.5)
    assert outcome.failure is None, outcome.failure
    assert [report["when"] for report in outcome.reports] == ["setup", "call", "teardown"]
    assert debugger.shown == ["> test_m.py(3)\n(Pdb) ", "'guest value'\n(Pdb) "]
    assert debugger.ends == [(NODEID, True)]
    assert debugger.reports_at_end == [2]  # quit after setup and call: teardown not logged
    # Before pdb took the terminal, the host got the reports so far (to log them first).
    assert debugger.begun[0] == (NODEID, ["setup", "call"])
    assert answers(transport.sent) == [
        {"t": "answer", "ok": True, "data": "p local_var"},
        {"t": "answer", "ok": False, "error": "end of input"},
    ]
    assert json.loads(transport.sent[0])["env"] == {TERMINAL_ENV: "1", PDB_ENV: "1"}


def test_the_clock_runs_for_the_guest_itself() -> None:
    """Negative control: a guest that is slow on its own still times out."""
    slow_guest = [*PDB_SESSION[:3], _after(0.7, PDB_SESSION[3]), *PDB_SESSION[4:]]
    client, _ = started(slow_guest)
    client.debugger = FakeDebugger(["c", "c"])
    outcome = client.run(NODEID, seed=1, timeout=0.5)
    assert outcome.failure is not None and outcome.failure.kind == "timeout"


def _after(seconds: float, data: bytes) -> Any:
    def late(sent: list[bytes]) -> bytes:
        time.sleep(seconds)
        return data

    return late


def test_without_a_debugger_pdb_gets_the_end_of_input_and_the_run_goes_on() -> None:
    client, transport = started(PDB_SESSION)
    outcome = client.run(NODEID, seed=1, timeout=5)
    assert outcome.failure is None and len(outcome.reports) == 3
    assert [answer["ok"] for answer in answers(transport.sent)] == [False, False]
    assert "env" not in json.loads(transport.sent[0])


class FakePipe:
    """The worker's pipe to the host, scripted: the replies to pdb's reads."""

    def __init__(self, replies: list[dict[str, Any] | None]) -> None:
        self.replies = replies
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def recv(self) -> dict[str, Any] | None:
        return self.replies.pop(0) if self.replies else None


def typed(text: object) -> dict[str, Any]:
    return {"t": "answer", "ok": True, "data": text}


def test_the_guests_terminal_file_sends_output_and_reads_lines_from_the_host() -> None:
    pipe = FakePipe(
        [typed("p x"), typed("a\nb"), typed("y" * (MAX_LINE + 10)), typed(5), {"t": "pong"}, None]
    )
    terminal = HostTerminal(pipe)
    terminal.write("(Pdb) ")
    assert terminal.readline() == "p x\n"
    assert pipe.sent == [{"t": "pdb_output", "data": "(Pdb) "}, {"t": "pdb_read"}]
    assert terminal.readline() == "a b\n"  # one command per read, however it was sent
    assert terminal.readline() == "y" * MAX_LINE + "\n"
    for _ in range(3):  # not a string, not an answer, the host gone: the end of input
        assert terminal.readline() == ""
    terminal.write("z" * (2 * CHUNK + 1))
    terminal.flush()
    sizes = [len(m["data"]) for m in pipe.sent if m["t"] == "pdb_output"][-3:]
    assert sizes == [CHUNK, CHUNK, 1]


def _failure() -> tuple[pytest.CallInfo[None], pytest.TestReport, pytest.Item]:
    def test_it() -> None:
        secret_in_guest = "only-here"
        assert secret_in_guest == "elsewhere"

    call = pytest.CallInfo.from_call(test_it, when="call")

    class Report:
        capstdout, capstderr, caplog = "printed\n", "", ""

        def toterminal(self, writer: Any) -> None:
            writer.line("E   AssertionError: the failure")

    class Node:
        class config:  # stands in for pytest.Config
            @staticmethod
            def getoption(name: str, default: object = None) -> object:
                return "all"

    return call, Report(), Node()  # type: ignore[return-value]


def test_post_mortem_in_the_guest_shows_the_failure_and_sees_its_frame() -> None:
    call, report, node = _failure()
    pipe = FakePipe([typed("p secret_in_guest"), typed("q")])
    assert guest_debugger.post_mortem(pipe, node, call, report) is True
    output = "".join(m["data"] for m in pipe.sent if m["t"] == "pdb_output")
    assert output.index("captured stdout") < output.index("traceback") < output.index("(Pdb)")
    assert "AssertionError: the failure" in output
    assert "'only-here'" in output
    assert pipe.sent[-1] == {"t": "pdb_end", "quit": True}


def test_continuing_post_mortem_does_not_quit() -> None:
    call, report, node = _failure()
    pipe = FakePipe([typed("c")])
    assert guest_debugger.post_mortem(pipe, node, call, report) is False
    assert pipe.sent[-1] == {"t": "pdb_end", "quit": False}


def test_quitting_pdb_ends_the_session_once_the_tests_reports_are_in(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    debugger = TerminalDebugger(pytester.parseconfig())
    debugger.ended("other", quit=False)
    debugger.pytest_runtest_logfinish("other")  # continued: nothing happens
    monkeypatch.setattr("sys.stdin", io.StringIO("q\n"))
    assert debugger.read_line() in ("q", None)  # the user quit (test_hostile_pdb_quit.py)
    debugger.ended(NODEID, quit=True)
    with pytest.raises(pytest.exit.Exception, match=QUIT_MESSAGE):
        debugger.pytest_runtest_logfinish(NODEID)


def test_no_debugger_without_a_terminal_or_under_xdist(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig("--pdb")
    # This test's stdin is pytest's capture, not a TTY.
    decided = terminal_debugger(config)
    assert isinstance(decided, NoTerminal)
    # Each run is told why, so a breakpoint() there fails saying so.
    assert decided.run_env() == {TERMINAL_ENV: "stdin is not a terminal"}
    assert "(3 here): stdin is not a terminal" in (debugger_notice(config, 3) or "")
    worker = pytester.parseconfig("--pdb")
    worker.workerinput = {}  # type: ignore[attr-defined]
    assert "(1 here): pytest-xdist workers have no terminal" in (debugger_notice(worker, 1) or "")
    assert terminal_debugger(worker).run_env() == {
        TERMINAL_ENV: "pytest-xdist workers have no terminal"
    }
    assert debugger_notice(pytester.parseconfig(), 3) is None
    assert isinstance(terminal_debugger(pytester.parseconfig()), NoTerminal)


def test_a_lent_terminal_says_so_to_each_run_and_enables_post_mortem_only_with_pdb(
    pytester: pytest.Pytester,
) -> None:
    assert TerminalDebugger(pytester.parseconfig()).run_env() == {TERMINAL_ENV: "1"}
    assert TerminalDebugger(pytester.parseconfig("--pdb")).run_env() == {
        TERMINAL_ENV: "1",
        PDB_ENV: "1",
    }


def _stops_at_a_breakpoint() -> str:
    only_in_this_frame = "guest-local"
    breakpoint()
    print("AFTER-BREAKPOINT")
    return only_in_this_frame


@pytest.mark.parametrize("entry", ["breakpoint", "pdb.set_trace", "pytest.set_trace"])
def test_a_breakpoint_in_a_run_stops_in_pdb_on_the_hosts_terminal(
    monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    import pdb

    monkeypatch.setenv(TERMINAL_ENV, "1")
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    pipe = FakePipe([typed("p only_in_this_frame"), typed("c")])

    def stop() -> str:
        marker = "in-stop"
        {
            "breakpoint": breakpoint,
            "pdb.set_trace": pdb.set_trace,
            "pytest.set_trace": pytest.set_trace,
        }[entry]()
        return marker

    before = (sys.breakpointhook, pdb.set_trace, pytest.set_trace)
    with hostquery.active(pipe), guest_debugger.breakpoints():
        assert _stops_at_a_breakpoint() if entry == "breakpoint" else stop()
    # Put back after the run.
    assert (sys.breakpointhook, pdb.set_trace, pytest.set_trace) == before
    output = "".join(m["data"] for m in pipe.sent if m["t"] == "pdb_output")
    assert "PDB set_trace (in the guest" in output
    if entry == "breakpoint":
        assert "'guest-local'" in output, output
        # What the test printed after "c" is not the terminal's (capture is back).
        assert "AFTER-BREAKPOINT\n" not in output
    assert "PDB continue (in the guest" in output
    assert [m for m in pipe.sent if m["t"] == "pdb_end"] == [{"t": "pdb_end", "quit": False}]


def test_quitting_at_a_breakpoint_tells_the_host_and_stops_the_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bdb

    monkeypatch.setenv(TERMINAL_ENV, "1")
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    pipe = FakePipe([typed("q")])
    with hostquery.active(pipe), guest_debugger.breakpoints(), pytest.raises(bdb.BdbQuit):
        _stops_at_a_breakpoint()
    assert sys.gettrace() is None or "pdb" not in repr(sys.gettrace())
    assert pipe.sent[-1] == {"t": "pdb_end", "quit": True}


def test_without_a_terminal_a_breakpoint_fails_the_test_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TERMINAL_ENV, "stdin is not a terminal")
    monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    pipe = FakePipe([typed("c")])
    with (
        hostquery.active(pipe),
        guest_debugger.breakpoints(),
        pytest.raises(pytest.fail.Exception, match="there is none: stdin is not a terminal"),
    ):
        _stops_at_a_breakpoint()
    assert pipe.sent == []  # nothing was asked of the host: no wait


def test_outside_a_run_breakpoints_change_nothing() -> None:
    before = sys.breakpointhook
    with guest_debugger.breakpoints():
        assert sys.breakpointhook is before
