"""Running items in a worker process and replaying their reports on the host.

Two halves:

* end to end through pytester: the test-only router in ``_local_worker``
  sends ``remote_local`` items to a real worker subprocess
  (``pytest_gondolin.guest.worker``) and replays the reports, and the host's
  output, outcomes, ``-x``, ``-k``, ``--lf`` and junitxml must be what an
  in-process run gives;
* the host-side protocol (``pytest_gondolin.runner``) against a scripted fake
  transport: every hostile line is a ``WorkerProtocolError``, never anything else,
  and crashes / timeouts become failures naming their cause.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from _pytest.reports import pytest_report_from_serializable, pytest_report_to_serializable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gondolin.errors import AgentError, WorkerProtocolError
from pytest_gondolin.guest import worker
from pytest_gondolin.runner import (
    Collected,
    DoneMessage,
    Failure,
    PongMessage,
    ReportMessage,
    RunOutcome,
    WarningRecord,
    WorkerClient,
    WorkerState,
    _warning_category,
    check_test_report,
    parse_message,
    replay_item,
    worker_args,
)

pytest_plugins = ("pytester",)

ROUTER = ("-p", "tests.plugin._local_worker", "-p", "no:gondolin")

# --------------------------------------------------------------------------
# end to end (pytester + a real worker subprocess)
# --------------------------------------------------------------------------

CONFTEST = """
    import pytest

    @pytest.fixture
    def from_conftest():
        return "conftest value"
"""

#: One module exercising every outcome; pytestmark routes all of it.
OUTCOMES_MODULE = r"""
    import logging, os, sys, warnings
    import pytest

    pytestmark = pytest.mark.remote_local

    @pytest.fixture
    def broken_setup():
        raise RuntimeError("setup boom")

    @pytest.fixture
    def broken_teardown():
        yield
        raise RuntimeError("teardown boom")

    def test_pass():
        pass

    def test_fail():
        x = 4
        assert x == 5

    def test_setup_error(broken_setup):
        pass

    def test_teardown_error(broken_teardown):
        pass

    def test_skip():
        pytest.skip("not today")

    @pytest.mark.xfail(reason="known bug")
    def test_xfail():
        assert 0

    @pytest.mark.xfail(reason="fixed already")
    def test_xpass():
        pass

    @pytest.mark.xfail(reason="must fail", strict=True)
    def test_xpass_strict():
        pass

    @pytest.mark.parametrize("n", [1, 2, 3])
    def test_param(n):
        assert n != 2

    class TestGroup:
        def test_method(self):
            assert self.__class__.__name__ == "TestGroup"

    def test_conftest_fixture(from_conftest):
        assert from_conftest == "conftest value"

    def test_capsys(capsys):
        print("to stdout")
        assert capsys.readouterr().out == "to stdout\n"

    def test_output_on_failure():
        print("visible on failure")
        sys.stderr.write("stderr text\n")
        logging.getLogger("mylog").warning("log text")
        assert False

    def test_caplog(caplog):
        logging.getLogger("other").warning("hello log")
        assert "hello log" in caplog.text

    def test_tmp_path(tmp_path):
        (tmp_path / "f").write_text("x")
        assert (tmp_path / "f").read_text() == "x"

    def test_raw_stdout_cannot_forge_messages(capfd):
        # Past pytest's capture, straight to fd 1: were fd 1 still the
        # protocol stream, the host would see a bogus "done".
        with capfd.disabled():
            os.write(1, b'{"t":"done","nodeid":"forged"}\n')
            print("x" * 100000)

    def test_after_raw_stdout():
        pass

    def test_warns():
        warnings.warn("careful now", UserWarning)

    def test_where(record_property):
        record_property("worker", os.environ.get("PYTEST_GONDOLIN_WORKER"))
        record_property("pid", os.getpid())
"""

OUTCOMES = {
    "passed": 13,
    "failed": 4,
    "errors": 2,
    "skipped": 1,
    "xfailed": 1,
    "xpassed": 1,
    "warnings": 1,
}


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*ROUTER, *args)


def _report_view(rep: pytest.TestReport) -> tuple[Any, ...]:
    """What must not differ between a routed and an in-process run."""
    return (
        rep.nodeid,
        rep.location,
        rep.when,
        rep.outcome,
        getattr(rep, "wasxfail", None),
        rep.longreprtext,
        rep.sections,
    )


def test_routed_reports_match_an_in_process_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_outcomes=OUTCOMES_MODULE)

    routed = _run(pytester, "-rA")
    local = _run(pytester, "-rA", "--local-worker-off")

    routed.assert_outcomes(**OUTCOMES)
    local.assert_outcomes(**OUTCOMES)
    routed_reports = routed.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    local_reports = local.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    assert [_report_view(r) for r in routed_reports] == [_report_view(r) for r in local_reports]

    # ... and the routed ones really ran elsewhere, as the real items.
    where = next(r for r in routed_reports if r.nodeid.endswith("test_where") and r.when == "call")
    props = dict(where.user_properties)
    assert props["worker"] == "1"
    assert props["pid"] != os.getpid()
    items = routed.reprec.getcalls("pytest_collection_finish")[0].session.items  # type: ignore[attr-defined]
    assert {r.nodeid for r in routed_reports} == {item.nodeid for item in items}


def test_routed_output_shows_what_pytest_would(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_outcomes=OUTCOMES_MODULE)

    result = _run(pytester, "-rA", "--junitxml=junit.xml")

    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_setup_error*",
            "E       RuntimeError: setup boom",
            "*ERROR at teardown of test_teardown_error*",
            "E       RuntimeError: teardown boom",
            "*__ test_fail __*",
            ">       assert x == 5",
            "E       assert 4 == 5",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*__ test_output_on_failure __*",
            "*- Captured stdout call -*",
            "visible on failure",
            "*- Captured stderr call -*",
            "stderr text",
            "*- Captured log call -*",
            "WARNING  mylog:*log text",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*UserWarning: careful now*",
            "PASSED test_outcomes.py::test_param[[]1[]]",
            "PASSED test_outcomes.py::TestGroup::test_method",
            "SKIPPED [[]1[]] test_outcomes.py:*: not today",
            "XFAIL test_outcomes.py::test_xfail - known bug",
            "XPASS test_outcomes.py::test_xpass - fixed already",
            "FAILED test_outcomes.py::test_fail - assert 4 == 5",
            "FAILED test_outcomes.py::test_xpass_strict - [[]XPASS(strict)[]] must fail",
            "FAILED test_outcomes.py::test_param[[]2[]] - assert 2 != 2",
        ]
    )
    assert "forged" not in result.stdout.str()

    junit = (pytester.path / "junit.xml").read_text()
    assert re.search(r'<testsuite [^>]*errors="2" failures="4" skipped="2" tests="21"', junit)
    assert re.search(r'<testcase classname="test_outcomes.TestGroup" name="test_method"', junit)
    assert '<failure message="assert 4 == 5">' in junit
    assert "visible on failure" in junit


def test_x_stops_the_host_after_the_first_remote_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_stop="""
        import pytest
        pytestmark = pytest.mark.remote_local
        def test_a(): pass
        def test_b(): assert False
        def test_c(): pass
        """
    )
    result = _run(pytester, "-x")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    assert "test_c" not in result.stdout.str()


def test_k_and_lf_select_on_the_host(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_sel="""
        import pytest
        pytestmark = pytest.mark.remote_local
        def test_one(): pass
        def test_two(): assert False
        def test_three(): pass
        """
    )
    first = _run(pytester, "-k", "two or three")
    first.assert_outcomes(passed=1, failed=1, deselected=1)

    again = _run(pytester, "--lf", "-v")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure*"])
    assert "test_one" not in again.stdout.str()


def test_a_crash_fails_only_that_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_crash="""
        import os, sys, pytest
        pytestmark = pytest.mark.remote_local
        def test_dies(capfd):
            with capfd.disabled():  # captured output dies with the worker
                sys.stderr.write("last words\\n")
            os._exit(3)
        def test_next():
            pass
        """
    )
    result = _run(pytester, "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*__ test_dies __*",
            "worker crashed (exit code 3)",
            "*last words*",
            "PASSED test_crash.py::test_next",
            "FAILED test_crash.py::test_dies - worker crashed (exit code 3)",
        ]
    )
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    dies = [(r.when, r.outcome) for r in reports if r.nodeid.endswith("test_dies")]
    assert dies == [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]


def test_a_hung_test_times_out_with_a_stack_dump(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_hang="""
        import time, pytest
        @pytest.mark.remote_local(timeout=1)
        def test_sleeps():
            time.sleep(60)
        @pytest.mark.remote_local
        def test_next():
            pass
        """
    )
    started = time.monotonic()
    result = _run(pytester, "-rA")
    assert time.monotonic() - started < 30
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*__ test_sleeps __*",
            "Timeout > 1s",
            "*stack dump*",
            '*test_hang.py", line 4 in test_sleeps',
            "PASSED test_hang.py::test_next",
            "FAILED test_hang.py::test_sleeps - Timeout > 1s",
        ]
    )


def test_a_collection_error_in_the_worker_surfaces(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_guestonly="""
        import os, pytest
        if os.environ.get("PYTEST_GONDOLIN_WORKER"):
            raise ImportError("missing only in the worker")
        pytestmark = pytest.mark.remote_local
        def test_x():
            pass
        """
    )
    result = _run(pytester, "-rA")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_guestonly.py*",
            "*ImportError: missing only in the worker*",
            "*not collected in the worker: test_guestonly.py::test_x*",
        ]
    )


def test_worker_survives_strict_warnings_and_never_distributes(pytester: pytest.Pytester) -> None:
    # The ini's addopts reach the worker too: it must neither start xdist
    # workers of its own nor die of a config-time warning under -W error.
    pytester.makeini("[pytest]\naddopts = -n 2\n")
    pytester.makepyfile(
        test_plain="""
        import os, sys, pytest
        @pytest.mark.remote_local
        def test_in_worker():
            # the worker process itself, not an xdist node it spawned
            assert sys.argv[0].endswith(os.path.join("guest", "worker.py"))
        """
    )
    result = pytester.runpytest_subprocess(*ROUTER, "-n", "0", "-W", "error")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("with_ini", [True, False], ids=["ini", "no-ini"])
def test_worker_args_mirror_the_host_session(pytester: pytest.Pytester, with_ini: bool) -> None:
    if with_ini:
        pytester.makeini("[pytest]\n")
    config = pytester.parseconfig(
        "-p", "no:gondolin", "-o", "xfail_strict=true", "-W", "error", "-vv", "--tb=short", "-l"
    )
    args = worker_args(config)
    if with_ini:
        assert args[:3] == [f"--rootdir={config.rootpath}", "-c", str(pytester.path / "tox.ini")]
        assert not any(a.startswith("--confcutdir") for a in args)
    else:
        assert args[:4] == [
            f"--rootdir={config.rootpath}",
            "-c",
            os.devnull,
            f"--confcutdir={config.rootpath}",
        ]
    joined = " ".join(args)
    for expected in (
        "-p no:gondolin",
        "-o xfail_strict=true",
        "-W error",
        "--tb=short",
        "-l",
        "-vv",
    ):
        assert expected in joined


# --------------------------------------------------------------------------
# the host-side protocol against a scripted transport
# --------------------------------------------------------------------------

Script = bytes | BaseException | None | Callable[[list[bytes]], bytes]


class FakeTransport:
    """Plays back *script*: lines, exceptions to raise, ``None`` for EOF.

    A callable entry is called with the commands sent so far (to echo a nonce).
    """

    def __init__(
        self, script: Iterable[Script], *, exit_code: int | None = 3, dump: str = ""
    ) -> None:
        self.script: deque[Script] = deque(script)
        self.sent: list[bytes] = []
        self.exit_code = exit_code
        self.dump = dump
        self.tail = "worker stderr line\n"
        self.interrupted = False
        self.killed = False
        self.broken_pipe = False

    def send(self, data: bytes) -> None:
        if self.broken_pipe:
            raise BrokenPipeError("gone")
        self.sent.append(data)

    def recv_line(self, timeout: float) -> bytes | None:
        if not self.script:
            return None
        entry = self.script.popleft()
        if isinstance(entry, BaseException):
            raise entry
        if callable(entry):
            return entry(self.sent)
        return entry

    def wait(self, timeout: float) -> int | None:
        return self.exit_code

    def interrupt(self) -> None:
        self.interrupted = True
        self.tail += self.dump

    def kill(self) -> None:
        self.killed = True

    def stderr_tail(self) -> str:
        return self.tail


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


NODEID = "test_m.py::test_f"
COLLECTED = line({"t": "collected", "nodeids": [NODEID], "errors": []})
DONE = line({"t": "done", "nodeid": NODEID})


def serialized_report(when: str = "call", outcome: str = "passed", **extra: Any) -> dict[str, Any]:
    """A report as the worker would send it, made by pytest itself."""
    longrepr: Any = None
    if outcome == "failed":
        try:
            raise ValueError("boom")
        except ValueError as exc:
            longrepr = pytest.ExceptionInfo.from_exception(exc).getrepr(style="short")
    rep = pytest.TestReport(
        NODEID,
        ("test_m.py", 0, "test_f"),
        {"test_f": 1},
        outcome,  # type: ignore[arg-type]
        longrepr,
        when,  # type: ignore[arg-type]
        sections=[("Captured stdout call", "out\n")],
        user_properties=[("k", [1, 2])],
        **extra,
    )
    data = pytest_report_to_serializable(rep)
    assert data is not None
    jsonable: dict[str, Any] = json.loads(json.dumps(data))
    return jsonable


def report_line(**kwargs: Any) -> bytes:
    return line({"t": "report", "data": serialized_report(**kwargs)})


def started(script: Iterable[Script], **kwargs: Any) -> tuple[WorkerClient, FakeTransport]:
    transport = FakeTransport([COLLECTED, *script], **kwargs)
    client = WorkerClient(transport, max_line=4096)
    assert client.start(1.0) == Collected((NODEID,), ())
    return client, transport


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
    with pytest.raises(AgentError, match="closed"):
        client.run(NODEID, seed=0, timeout=1)


def test_rewind_makes_a_dead_client_ready_after_a_restore() -> None:
    client, _ = started([None, report_line(when="setup"), DONE])
    assert client.run(NODEID, seed=0, timeout=5).failure is not None
    assert client.state is WorkerState.DEAD
    client.rewind()  # e.g. the VM went back to its post-collection snapshot
    outcome = client.run(NODEID, seed=0, timeout=5)
    assert outcome.failure is None and len(outcome.reports) == 1
    client.close()
    with pytest.raises(AgentError):
        client.rewind()
    with pytest.raises(AgentError):
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


def _mutated(path: tuple[str | int, ...], value: Any, **kwargs: Any) -> bytes:
    data = serialized_report(**kwargs)
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return line({"t": "report", "data": data})


def _without(key: str) -> bytes:
    data = serialized_report()
    del data[key]
    return line({"t": "report", "data": data})


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
    "report-other-node": _mutated(("nodeid",), "test_m.py::other"),
    "report-collect-type": _mutated(("$report_type",), "CollectReport"),
    "report-no-type": _without("$report_type"),
    "report-no-when": _without("when"),
    "report-outcome": _mutated(("outcome",), "exploded"),
    "report-when": _mutated(("when",), "later"),
    "report-location-short": _mutated(("location",), ["test_m.py", 0]),
    "report-location-lineno-str": _mutated(("location",), ["test_m.py", "0", "f"]),
    "report-duration-str": _mutated(("duration",), "fast"),
    "report-duration-bool": _mutated(("duration",), True),
    "report-sections-triple": _mutated(("sections",), [["a", "b", "c"]]),
    "report-keywords-list": _mutated(("keywords",), ["a"]),
    "report-skip-short": _mutated(("longrepr",), ["f.py", 1]),
    "report-longrepr-int": _mutated(("longrepr",), 5),
    "report-longrepr-missing-key": _mutated(
        ("longrepr",), {"reprcrash": None, "reprtraceback": {}}
    ),
    "report-entry-type": _mutated(
        ("longrepr", "reprtraceback", "reprentries", 0, "type"), "Evil", outcome="failed"
    ),
    "report-entry-extra-key": _mutated(
        ("longrepr", "reprtraceback", "reprentries", 0, "data", "evil"), 1, outcome="failed"
    ),
    "report-style": _mutated(("longrepr", "reprtraceback", "style"), "bogus", outcome="failed"),
    "report-crash-lineno": _mutated(("longrepr", "reprcrash", "lineno"), "1", outcome="failed"),
    "report-chain-pair": _mutated(("longrepr", "chain"), [[None, None]], outcome="failed"),
    "report-shadows-method": _mutated(("toterminal",), "x"),
    "report-shadows-property": _mutated(("passed",), True),
    "report-private-attr": _mutated(("_id",), "x"),
    "report-user-property-name": _mutated(("user_properties",), [[1, 2]]),
    "report-wasxfail-int": _mutated(("wasxfail",), 1),
    # issue 14.1: these raised OverflowError / crashed the terminal and junitxml
    "report-duration-overflow": _mutated(("duration",), 10**400),
    "report-skip-without-location": _mutated(("longrepr",), "Skipped", outcome="skipped"),
    "report-failed-without-longrepr": _mutated(("longrepr",), None, outcome="failed"),
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


def test_lone_surrogates_are_replaced_not_passed_on() -> None:
    msg = parse_message(b'{"t":"error","message":"a\\ud800b"}\n')
    assert msg == parse_message(b'{"t":"error","message":"a?b"}\n')


def test_subtest_reports_are_accepted() -> None:
    data = serialized_report()
    del data["$report_type"]
    data["_report_type"] = "SubTestReport"
    data["_subtest.context"] = {"msg": "case", "kwargs": {"i": "1"}}
    msg = parse_message(line({"t": "report", "data": data}))
    assert isinstance(msg, ReportMessage)
    assert msg.data["_subtest.context"] == {"msg": "case", "kwargs": {"i": "1"}}


# Hypothesis: whatever the worker sends, the host gets a message or a
# WorkerProtocolError, and a report that passes validation is one pytest can
# rebuild and print.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_message_on_random_bytes(data: bytes) -> None:
    with contextlib.suppress(WorkerProtocolError):
        parse_message(data)


MESSAGE_SKELETONS: list[dict[str, Any]] = [
    {"t": "collected", "nodeids": [NODEID], "errors": []},
    {
        "t": "warning",
        "message": "w",
        "category": "builtins.UserWarning",
        "nodeid": NODEID,
        "filename": "f",
        "lineno": 1,
    },
    {"t": "done", "nodeid": NODEID},
    {"t": "pong", "nonce": "n"},
    {"t": "error", "message": "m"},
]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_message_on_mutated_messages(data: st.DataObject) -> None:
    skeleton = data.draw(st.sampled_from(MESSAGE_SKELETONS))
    key = data.draw(st.sampled_from(sorted(skeleton)))
    with contextlib.suppress(WorkerProtocolError):
        parse_message(line({**skeleton, key: data.draw(json_values)}))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths(v, (*prefix, i))
    return found


FAILED_REPORT = serialized_report(outcome="failed")
REPORT_PATHS = _paths(FAILED_REPORT)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(REPORT_PATHS), json_values)
def test_a_validated_report_always_deserializes_and_renders(
    path: tuple[Any, ...], value: Any
) -> None:
    data = json.loads(json.dumps(FAILED_REPORT))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        checked = check_test_report(json.loads(json.dumps(data)))
    except WorkerProtocolError:
        return
    report = pytest_report_from_serializable(checked)
    assert isinstance(report, pytest.TestReport)
    assert isinstance(report.longreprtext, str)
    assert isinstance(report.head_line, str | None)
    _ = (report.capstdout, report.capstderr, report.caplog, report.outcome, report.location[0])


# --------------------------------------------------------------------------
# replay of synthetic outcomes onto a real item
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seen", "kind", "expected"),
    [
        ((), "crash", [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]),
        ((), "error", [("setup", "failed"), ("teardown", "passed")]),
        (("setup",), "timeout", [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]),
        (
            ("setup", "call"),
            "crash",
            [("setup", "passed"), ("call", "passed"), ("teardown", "failed")],
        ),
        (
            ("setup", "call", "teardown"),
            "crash",
            [("setup", "passed"), ("call", "passed"), ("teardown", "passed")],
        ),
    ],
)
def test_replay_completes_an_interrupted_run(
    pytester: pytest.Pytester, seen: tuple[str, ...], kind: str, expected: list[tuple[str, str]]
) -> None:
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    reports = []
    for when in seen:
        data = serialized_report(when=when)
        data["nodeid"], data["location"] = item.nodeid, list(item.location)
        reports.append(check_test_report(data))
    failure = Failure(kind, f"{kind} happened", "details here")  # type: ignore[arg-type]
    replay_item(item, RunOutcome(item.nodeid, tuple(reports), failure=failure))
    replayed = recorder.getreports("pytest_runtest_logreport")
    assert [(r.when, r.outcome) for r in replayed] == expected
    failed = [r for r in replayed if r.failed]
    for rep in failed:
        assert f"{kind} happened" in rep.longreprtext and "details here" in rep.longreprtext
    if not failed:  # every phase reported: the failure becomes a warning
        warned = recorder.getcalls("pytest_warning_recorded")
        assert any(f"{kind} happened" in str(c.warning_message.message) for c in warned)
    recorder.finish_recording()


def test_replay_refuses_reports_for_another_item(pytester: pytest.Pytester) -> None:
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    replay_item(item, RunOutcome(item.nodeid, (check_test_report(serialized_report()),)))
    replayed = recorder.getreports("pytest_runtest_logreport")
    assert [(r.nodeid, r.when, r.outcome) for r in replayed] == [
        (item.nodeid, "setup", "failed"),
        (item.nodeid, "teardown", "passed"),
    ]
    assert "unreadable report" in replayed[0].longreprtext
    recorder.finish_recording()


# --------------------------------------------------------------------------
# the worker's side of the wire
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected_type"),
    [
        (b'{"t":"run","nodeid":"a::b","seed":1}\n', "run"),
        (b'{"t":"ping","nonce":"n"}\n', "ping"),
        (b'{"t":"quit"}\n', "quit"),
        (b'{"t":"run","nodeid":"a::b","seed":true}\n', "invalid"),
        (b'{"t":"run","nodeid":1,"seed":1}\n', "invalid"),
        (b'{"t":"ping"}\n', "invalid"),
        (b'{"t":"exec"}\n', "invalid"),
        (b"[]\n", "invalid"),
        (b"\xff\n", "invalid"),
        (b"[" * 5000 + b"\n", "invalid"),
    ],
)
def test_worker_parses_commands(raw: bytes, expected_type: str) -> None:
    assert worker.parse_command(raw)["t"] == expected_type


def test_worker_makes_any_report_jsonable() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    nested: Any = []
    deep = nested
    for _ in range(200):
        deep.append([])
        deep = deep[0]
    value = worker.to_jsonable(
        {"t": (1, 2.5), 3: float("nan"), "o": Odd(), "h": Hostile(), "d": nested}
    )
    encoded = worker.encode_line(value)
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    decoded = json.loads(encoded)
    assert decoded["t"] == [1, 2.5] and decoded["3"] == "nan" and decoded["o"] == "<odd>"
    assert decoded["h"].startswith("<unrepresentable Hostile")


def test_worker_channel_skips_an_oversized_command_and_refuses_oversized_messages() -> None:
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    channel = worker.Channel(cmd_r, out_w, max_out=200)

    def feed() -> None:  # more than a pipe buffer: write from another thread
        with os.fdopen(cmd_w, "wb") as w:
            w.write(b"x" * (worker.MAX_COMMAND_LINE + 10) + b"\n" + b'{"t":"quit"}\n')

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert channel.recv() == {
        "t": "invalid",
        "message": f"command longer than {worker.MAX_COMMAND_LINE} bytes",
    }
    assert channel.recv() == {"t": "quit"}
    assert channel.recv() is None
    writer.join(timeout=5)
    channel.send({"t": "error", "message": "y" * 500})
    channel.send({"t": "done", "nodeid": "a"})
    channel.close()
    channel.send({"t": "done", "nodeid": "dropped"})
    with os.fdopen(out_r, "rb") as r:
        lines = r.read().splitlines()
    first = parse_message(lines[0])
    assert "too large" in getattr(first, "message", "")
    assert parse_message(lines[1]) == DoneMessage("a")
    assert len(lines) == 2
    assert not isinstance(first, PongMessage)


@pytest.mark.parametrize(
    ("name", "expected_base", "expected_name"),
    [
        ("builtins.DeprecationWarning", DeprecationWarning, "DeprecationWarning"),
        ("builtins.open", UserWarning, "open"),
        ("os.system", UserWarning, "system"),
        ("mypkg.sub.MyWarning", UserWarning, "MyWarning"),
    ],
)
def test_warning_categories_are_never_imported(
    name: str, expected_base: type, expected_name: str
) -> None:
    category = _warning_category(name)
    assert issubclass(category, expected_base)
    assert category.__name__ == expected_name
    assert category is DeprecationWarning or category.__module__ == name.rpartition(".")[0]
