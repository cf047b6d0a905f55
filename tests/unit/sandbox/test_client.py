"""The host side of the worker protocol (``sandbox/client.py``) against a scripted worker.

No process, no VM: :class:`~tests.unit.sandbox._wire.FakeTransport` plays
the worker's lines.  Every hostile line is a ``WorkerProtocolError`` (the
worker killed), never anything else; crashes and timeouts become failures
naming their cause; the client's lifecycle is its transition table, and a
method called in the wrong state is a ``StateError``.
"""

from __future__ import annotations

import json

import pytest

from pytest_gondolin.errors import AgentError, StateError, WorkerProtocolError
from pytest_gondolin.sandbox.client import WORKER_TRANSITIONS, WorkerClient, WorkerState
from pytest_gondolin.sandbox.messages import Collected, WarningRecord
from pytest_gondolin.sandbox.outcome import Failure
from pytest_gondolin.statemachine import sources
from tests.unit.sandbox._wire import (
    COLLECTED,
    DONE,
    NODEID,
    FakeTransport,
    Script,
    line,
    mutated,
    report_line,
    serialized_report,
    started,
    without,
)


def test_a_clean_run_returns_reports_and_warnings() -> None:
    warning = {
        "t": "warning",
        "message": "w",
        "category": "builtins.UserWarning",
        "nodeid": NODEID,
        "filename": "f.py",
        "lineno": 3,
    }
    client, transport = started(
        [
            report_line(when="setup"),
            report_line(outcome="failed"),
            line(warning),
            report_line(when="teardown"),
            DONE,
        ]
    )
    outcome = client.run(NODEID, seed=7, timeout=5)
    assert outcome.failure is None
    assert [(r["when"], r["outcome"]) for r in outcome.reports] == [
        ("setup", "passed"),
        ("call", "failed"),
        ("teardown", "passed"),
    ]
    assert outcome.reports[1]["location"] == ("test_m.py", 0, "test_f")
    assert outcome.warnings == (WarningRecord("w", "builtins.UserWarning", NODEID, "f.py", 3),)
    assert json.loads(transport.sent[0]) == {"t": "run", "nodeid": NODEID, "seed": 7}
    assert client.state is WorkerState.READY


def test_ping_echoes_the_nonce_and_a_wrong_one_is_rejected() -> None:
    def pong(sent: list[bytes]) -> bytes:
        return line({"t": "pong", "nonce": json.loads(sent[-1])["nonce"]})

    client, _ = started([pong, line({"t": "pong", "nonce": "stale"})])
    client.ping(1.0)
    with pytest.raises(WorkerProtocolError, match="expected pong"):
        client.ping(1.0)
    assert client.state is WorkerState.DEAD


@pytest.mark.parametrize(
    ("script", "headline"),
    [
        pytest.param([None], "worker crashed (exit code 3)", id="eof"),
        pytest.param(
            [report_line(when="setup"), b'{"t":"rep'],
            "worker crashed (exit code 3)",
            id="eof-mid-line",
        ),
        pytest.param(
            [ConnectionResetError("reset")], "worker crashed (exit code 3)", id="link-error"
        ),
    ],
)
def test_a_dead_worker_becomes_a_crash_failure(script: list[Script], headline: str) -> None:
    client, transport = started(script)
    outcome = client.run(NODEID, seed=0, timeout=5)
    assert outcome.failure is not None
    assert (outcome.failure.kind, outcome.failure.headline) == ("crash", headline)
    assert "worker stderr line" in outcome.failure.detail
    assert transport.killed and client.state is WorkerState.DEAD


def test_a_broken_pipe_on_send_is_a_crash_and_signals_are_named() -> None:
    client, transport = started([], exit_code=-9)
    transport.broken_pipe = True
    failure = client.run(NODEID, seed=0, timeout=5).failure
    assert failure is not None
    assert failure == Failure(
        "crash", "worker crashed (killed by SIGKILL)", transport.tail, failure.duration
    )


def test_a_timeout_interrupts_then_kills() -> None:
    client, transport = started(
        [report_line(when="setup"), TimeoutError()],
        dump='Thread 0x1 (most recent call first):\n  File "t.py", line 2 in test_f\n',
    )
    outcome = client.run(NODEID, seed=0, timeout=0.5)
    assert outcome.failure is not None
    assert outcome.failure.kind == "timeout"
    assert outcome.failure.headline == "Timeout > 0.5s"
    assert "line 2 in test_f" in outcome.failure.detail
    assert "worker stderr line" not in outcome.failure.detail  # only what the dump added
    assert len(outcome.reports) == 1
    assert transport.interrupted and transport.killed


def test_an_error_message_fails_the_item_but_keeps_the_worker() -> None:
    client, _ = started([line({"t": "error", "message": "not collected in the worker: x"}), DONE])
    outcome = client.run(NODEID, seed=0, timeout=5)
    assert outcome.failure is not None
    assert outcome.failure.kind == "error"
    assert "not collected" in outcome.failure.detail
    assert client.state is WorkerState.READY


def test_lifecycle_is_guarded_and_close_is_idempotent() -> None:
    client, transport = started([None])
    client.close()
    client.close()
    assert json.loads(transport.sent[-1]) == {"t": "quit"}
    assert transport.killed and client.state is WorkerState.CLOSED
    # Running a closed client is the caller's bug, not the worker's failure.
    with pytest.raises(StateError, match="closed") as excinfo:
        client.run(NODEID, seed=0, timeout=1)
    assert excinfo.value.state is WorkerState.CLOSED
    assert excinfo.value.required == (WorkerState.READY,)


def test_rewind_makes_a_dead_client_ready_after_a_restore() -> None:
    client, _ = started([None, report_line(when="setup"), DONE])
    assert client.run(NODEID, seed=0, timeout=5).failure is not None
    assert client.state is WorkerState.DEAD
    client.rewind()  # e.g. the VM went back to its post-collection snapshot
    outcome = client.run(NODEID, seed=0, timeout=5)
    assert outcome.failure is None and len(outcome.reports) == 1
    client.close()
    with pytest.raises(StateError):
        client.rewind()
    with pytest.raises(StateError):
        WorkerClient(FakeTransport([])).rewind()


@pytest.mark.parametrize(
    ("script", "match"),
    [
        pytest.param([None], "exited before collecting", id="eof"),
        pytest.param([TimeoutError()], "did not finish collecting", id="timeout"),
    ],
)
def test_start_failures_are_agent_errors(script: list[Script], match: str) -> None:
    transport = FakeTransport(script)
    with pytest.raises(AgentError, match=match) as excinfo:
        WorkerClient(transport).start(0.1)
    assert not isinstance(excinfo.value, WorkerProtocolError)
    assert transport.killed


HOSTILE_RUN_LINES = {
    "oversized": b'{"t":"error","message":"' + b"x" * 5000 + b'"}\n',
    "oversized-unterminated": b"x" * 5000,
    "not-json": b"hello\n",
    "not-utf8": b'{"t":"done","nodeid":"\xff"}\n',
    "nan": b'{"t":"done","nodeid":NaN}\n',
    "deep": b'{"t":"done","nodeid":' + b"[" * 3000 + b"]" * 3000 + b"}\n",
    "array": b"[1, 2]\n",
    "no-type": line({"nodeid": NODEID}),
    "type-not-str": line({"t": 5}),
    "unknown-type": line({"t": "exec", "cmd": "rm -rf /"}),
    "collected-mid-run": COLLECTED,
    "pong-mid-run": line({"t": "pong", "nonce": "x"}),
    "done-other-node": line({"t": "done", "nodeid": "test_m.py::other"}),
    "done-nodeid-int": line({"t": "done", "nodeid": 1}),
    "error-not-str": line({"t": "error", "message": ["x"]}),
    "warning-lineno-str": line(
        {
            "t": "warning",
            "message": "w",
            "category": "builtins.UserWarning",
            "nodeid": NODEID,
            "filename": "f",
            "lineno": "3",
        }
    ),
    "warning-lineno-bool": line(
        {
            "t": "warning",
            "message": "w",
            "category": "builtins.UserWarning",
            "nodeid": NODEID,
            "filename": "f",
            "lineno": True,
        }
    ),
    "warning-lineno-negative": line(
        {
            "t": "warning",
            "message": "w",
            "category": "builtins.UserWarning",
            "nodeid": NODEID,
            "filename": "f",
            "lineno": -1,
        }
    ),
    "warning-category-code": line(
        {
            "t": "warning",
            "message": "w",
            "category": "__import__('os')",
            "nodeid": NODEID,
            "filename": "f",
            "lineno": 1,
        }
    ),
    "report-data-list": line({"t": "report", "data": []}),
    "report-other-node": mutated(("nodeid",), "test_m.py::other"),
    "report-collect-type": mutated(("$report_type",), "CollectReport"),
    "report-no-type": without("$report_type"),
    "report-no-when": without("when"),
    "report-outcome": mutated(("outcome",), "exploded"),
    "report-when": mutated(("when",), "later"),
    "report-location-short": mutated(("location",), ["test_m.py", 0]),
    "report-location-lineno-str": mutated(("location",), ["test_m.py", "0", "f"]),
    "report-duration-str": mutated(("duration",), "fast"),
    "report-duration-bool": mutated(("duration",), True),
    "report-sections-triple": mutated(("sections",), [["a", "b", "c"]]),
    "report-keywords-list": mutated(("keywords",), ["a"]),
    "report-skip-short": mutated(("longrepr",), ["f.py", 1]),
    "report-longrepr-int": mutated(("longrepr",), 5),
    "report-longrepr-missing-key": mutated(("longrepr",), {"reprcrash": None, "reprtraceback": {}}),
    "report-entry-type": mutated(
        ("longrepr", "reprtraceback", "reprentries", 0, "type"), "Evil", outcome="failed"
    ),
    "report-entry-extra-key": mutated(
        ("longrepr", "reprtraceback", "reprentries", 0, "data", "evil"), 1, outcome="failed"
    ),
    "report-style": mutated(("longrepr", "reprtraceback", "style"), "bogus", outcome="failed"),
    "report-crash-lineno": mutated(("longrepr", "reprcrash", "lineno"), "1", outcome="failed"),
    "report-chain-pair": mutated(("longrepr", "chain"), [[None, None]], outcome="failed"),
    "report-shadows-method": mutated(("toterminal",), "x"),
    "report-shadows-property": mutated(("passed",), True),
    "report-private-attr": mutated(("_id",), "x"),
    "report-user-property-name": mutated(("user_properties",), [[1, 2]]),
    "report-wasxfail-int": mutated(("wasxfail",), 1),
    # issue 14.1: these raised OverflowError / crashed the terminal and junitxml
    "report-duration-overflow": mutated(("duration",), 10**400),
    "report-skip-without-location": mutated(("longrepr",), "Skipped", outcome="skipped"),
    "report-failed-without-longrepr": mutated(("longrepr",), None, outcome="failed"),
}


@pytest.mark.parametrize("hostile", HOSTILE_RUN_LINES.values(), ids=HOSTILE_RUN_LINES.keys())
def test_hostile_lines_during_a_run_are_protocol_errors(hostile: bytes) -> None:
    client, transport = started([report_line(when="setup"), hostile, DONE])
    with pytest.raises(WorkerProtocolError):
        client.run(NODEID, seed=0, timeout=5)
    assert transport.killed and client.state is WorkerState.DEAD


HOSTILE_FIRST_LINES = {
    "report-first": report_line(),
    "nodeids-not-list": line({"t": "collected", "nodeids": NODEID, "errors": []}),
    "nodeid-not-str": line({"t": "collected", "nodeids": [1], "errors": []}),
    "errors-missing": line({"t": "collected", "nodeids": []}),
    "error-is-test-report": line(
        {"t": "collected", "nodeids": [], "errors": [serialized_report()]}
    ),
    "collect-error-with-result": line(
        {
            "t": "collected",
            "nodeids": [],
            "errors": [
                {
                    "$report_type": "CollectReport",
                    "nodeid": "",
                    "outcome": "failed",
                    "longrepr": "x",
                    "result": [1],
                }
            ],
        }
    ),
}


@pytest.mark.parametrize("hostile", HOSTILE_FIRST_LINES.values(), ids=HOSTILE_FIRST_LINES.keys())
def test_hostile_first_lines_are_protocol_errors(hostile: bytes) -> None:
    transport = FakeTransport([hostile])
    with pytest.raises(WorkerProtocolError):
        WorkerClient(transport).start(1.0)
    assert transport.killed


# --------------------------------------------------------------------------
# the lifecycle as a table
# --------------------------------------------------------------------------


def test_every_state_is_in_the_table_and_closed_is_final() -> None:
    assert set(WORKER_TRANSITIONS) == set(WorkerState)
    assert not WORKER_TRANSITIONS[WorkerState.CLOSED]
    # Only a restore (rewind) brings a dead worker back, and only to READY.
    assert set(WORKER_TRANSITIONS[WorkerState.DEAD]) == {WorkerState.READY, WorkerState.CLOSED}
    assert sources(WORKER_TRANSITIONS, WorkerState.RUNNING) == (WorkerState.READY,)


@pytest.mark.parametrize(
    ("call", "state"),
    [
        pytest.param(lambda c: c.run(NODEID, seed=0, timeout=1), WorkerState.NEW, id="run-new"),
        pytest.param(lambda c: c.ping(1.0), WorkerState.NEW, id="ping-new"),
        pytest.param(lambda c: c.rewind(), WorkerState.NEW, id="rewind-new"),
        pytest.param(lambda c: c.start(1.0), WorkerState.READY, id="start-ready"),
        pytest.param(lambda c: c.adopt(Collected(())), WorkerState.READY, id="adopt-ready"),
        pytest.param(lambda c: c.run(NODEID, seed=0, timeout=1), WorkerState.DEAD, id="run-dead"),
    ],
)
def test_a_call_in_the_wrong_state_is_a_state_error(call: object, state: WorkerState) -> None:
    """Negative control for the guards: nothing is sent, the state does not move."""
    script: list[Script] = [COLLECTED] if state is not WorkerState.NEW else []
    transport = FakeTransport([*script, None])
    client = WorkerClient(transport)
    if state is not WorkerState.NEW:
        client.start(1.0)
    if state is WorkerState.DEAD:
        assert client.run(NODEID, seed=0, timeout=1).failure is not None
    assert client.state is state
    sent = list(transport.sent)
    with pytest.raises(StateError) as excinfo:
        call(client)  # type: ignore[operator]
    assert excinfo.value.state is state
    assert client.state is state and transport.sent == sent


def test_a_clone_adopts_what_the_original_collected() -> None:
    client = WorkerClient(FakeTransport([report_line(when="setup"), DONE]))
    client.adopt(Collected((NODEID,)))
    assert client.state is WorkerState.READY and client.collected == Collected((NODEID,))
    assert client.run(NODEID, seed=1, timeout=5).failure is None
