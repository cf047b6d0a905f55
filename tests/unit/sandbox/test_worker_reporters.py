"""Whatever a worker sends, the host's own reporters never crash on it (issue 14.1).

Each example is a pytest run (pytester, in-process) with ``-v -rA
--junitxml``: every test item is "run" by a :class:`WorkerClient` over a
scripted transport that plays hostile lines -- real reports from
``_worker_reports`` with any JSON put anywhere in them, extra attributes,
arbitrary JSON as a report, raw bytes -- and the outcome is replayed with
:func:`replay_item` exactly as the plugin does.  The run must end with
exit code 0 or 1 (never INTERNALERROR), every item must appear in the
terminal output and in the junit XML, an item whose lines broke protocol
must show a ``WorkerProtocolError`` naming it, and every replayed report
must serialize the way xdist sends it on (JSON).

The negative control bypasses the checks for one item (the raw report goes
straight to ``pytest_report_from_serializable``) and shows that this very
harness sees the crash the bug report describes.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.unit.sandbox._worker_reports import SCENARIOS, collect_error, scenario

N_ITEMS = 4
TEST_FILE = "test_hostile.py"
NODEIDS = [f"{TEST_FILE}::test_{i}" for i in range(N_ITEMS)]

#: The host side of one inner run: a router like tests/plugin/_local_worker,
#: with a scripted transport instead of a worker process.
CONFTEST = """
import json
from pathlib import Path

import pytest

from pytest_gondolin.errors import GondolinError, WorkerProtocolError
from pytest_gondolin.sandbox.client import WorkerClient
from pytest_gondolin.sandbox.outcome import Failure
from pytest_gondolin.sandbox.replay import replay_collect_errors, replay_item

HERE = Path(__file__).parent
SCRIPT = json.loads((HERE / "script.json").read_text())
RESULTS = {}
CONFIG = []


class Scripted:
    def __init__(self, lines):
        self.lines = [line.encode("latin-1") for line in lines]

    def send(self, data, timeout=None):
        pass

    def recv_line(self, timeout):
        return self.lines.pop(0) if self.lines else None

    def wait(self, timeout):
        return 0

    def interrupt(self, timeout):
        return None

    def kill(self):
        pass

    def stderr_tail(self):
        return ""


def pytest_configure(config):
    CONFIG.append(config)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if item.name in SCRIPT["unchecked"]:  # the negative control: no checks at all
        data = json.loads(SCRIPT["unchecked"][item.name])
        report = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True
    client = WorkerClient(Scripted([SCRIPT["collected"], *SCRIPT["runs"][item.name]]))
    try:
        collected = client.start(1.0)
        if item.name == "test_0":
            replay_collect_errors(item.config, collected, set())
        outcome = client.run(item.nodeid, seed=0, timeout=30.0)
    except GondolinError as exc:
        RESULTS[item.nodeid] = type(exc).__name__ + ": " + str(exc)
        replay_item(item, Failure.from_exception(exc))
    else:
        RESULTS[item.nodeid] = "ok"
        replay_item(item, outcome)
    return True


def pytest_runtest_logreport(report):
    # What an xdist worker does with every report: serialize it for execnet.
    config = CONFIG[0]
    json.dumps(config.hook.pytest_report_to_serializable(config=config, report=report))


def pytest_sessionfinish(session):
    (HERE / "results.json").write_text(json.dumps(RESULTS))
"""

TESTS = "\n".join(f"def test_{i}():\n    pass\n" for i in range(N_ITEMS))

# -- what a hostile worker may write -----------------------------------------

KEYS = st.sampled_from(
    ["node", "toterminal", "_id", "passed", "gondolin_guest", "rerun", "lines", "type", "x"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            10**400,
            -(10**400),
            2**63,
            -1,
            1e308,
            5e-324,
            "\ud800",
            "\x00\x1b[31m\x0c",
            "a\nb\r",
            "Skipped: x",
            "skip",
            "E   boom",
            "]]>",
        ]
    )
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nest(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


hostile_values = json_values | st.integers(55, 70).map(_nest)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        found.append((*prefix, "\0new"))  # stands for a new key
        for k, v in obj.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def mutated(draw: st.DrawFn, report: dict[str, Any]) -> dict[str, Any]:
    """*report* with one to three values anywhere in it replaced (or added)."""
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(report)))
        target: Any = report
        for key in path[:-1]:
            target = target[key]
        key = path[-1]
        if key == "\0new":
            key = draw(KEYS)
        target[key] = draw(hostile_values)
    return report


def _line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


@st.composite
def run_script(draw: st.DrawFn, nodeid: str) -> list[str]:
    """The lines one run of *nodeid* sends: real reports, one or more made hostile."""
    reports = scenario(draw(st.sampled_from(SCENARIOS)), nodeid)
    lines = [_line({"t": "report", "data": r}) for r in reports]
    for _ in range(draw(st.integers(0, 2))):  # zero: the valid run itself
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["mutate", "mutate", "mutate", "data", "message", "bytes"]))
        if how == "mutate":
            lines[i] = _line({"t": "report", "data": draw(mutated(reports[i]))})
        elif how == "data":
            lines[i] = _line({"t": "report", "data": draw(hostile_values)})
        elif how == "message":
            lines[i] = _line(draw(hostile_values))
        else:
            lines[i] = draw(st.binary(max_size=60)).decode("latin-1") + "\n"
    return [*lines, _line({"t": "done", "nodeid": nodeid})]


@st.composite
def collected_line(draw: st.DrawFn) -> str:
    errors = [collect_error("test_broken.py")]
    if draw(st.integers(0, 4)) == 0:  # rarely: a bad one fails every item at start
        errors[0] = draw(mutated(errors[0]))
    return _line({"t": "collected", "nodeids": NODEIDS, "errors": errors})


# -- the property -------------------------------------------------------------


def _inner_run(
    pytester: pytest.Pytester,
    runs: dict[str, list[str]],
    collected: str,
    unchecked: dict[str, str] | None = None,
) -> tuple[pytest.RunResult, dict[str, str], ET.Element | None]:
    script = {"collected": collected, "runs": runs, "unchecked": unchecked or {}}
    pytester.path.joinpath("script.json").write_text(json.dumps(script))
    result = pytester.runpytest_inprocess(
        "-v", "-rA", "--junitxml=junit.xml", "-p", "no:gondolin", "-p", "no:cacheprovider"
    )
    results_file = pytester.path / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    junit = pytester.path / "junit.xml"
    root = ET.parse(junit).getroot() if junit.exists() else None
    return result, results, root


@pytest.fixture
def hostile_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**{TEST_FILE[:-3]: TESTS})
    return pytester


VALID_RUNS = {
    f"test_{i}": [
        *(_line({"t": "report", "data": r}) for r in scenario("failed", NODEIDS[i])),
        _line({"t": "done", "nodeid": NODEIDS[i]}),
    ]
    for i in range(N_ITEMS)
}
VALID_COLLECTED = _line({"t": "collected", "nodeids": NODEIDS, "errors": []})


def _issue_run(index: int, **changes: Any) -> list[str]:
    """The bug report's runs: a valid run of item *index* whose call report has *changes*."""
    nodeid = NODEIDS[index]
    reports = scenario("passed", nodeid)
    reports[1].update(changes)
    lines = [_line({"t": "report", "data": r}) for r in reports]
    return [*lines, _line({"t": "done", "nodeid": nodeid})]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    runs=st.tuples(*(run_script(n) for n in NODEIDS)).map(
        lambda scripts: {f"test_{i}": s for i, s in enumerate(scripts)}
    ),
    collected=collected_line(),
)
@example(runs={**VALID_RUNS, "test_1": _issue_run(1, duration=10**400)}, collected=VALID_COLLECTED)
@example(runs={**VALID_RUNS, "test_1": _issue_run(1, node={"x": 1})}, collected=VALID_COLLECTED)
def test_any_worker_line_ends_as_a_protocol_error_or_a_report_the_reporters_accept(
    hostile_project: pytest.Pytester, runs: dict[str, list[str]], collected: str
) -> None:
    result, results, junit = _inner_run(hostile_project, runs, collected)
    output = "\n".join(result.outlines + result.errlines)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), output
    assert "INTERNALERROR" not in output
    assert set(results) == set(NODEIDS)  # every item ran: nothing escaped the run loop
    event(f"items accepted by the checks: {sum(r == 'ok' for r in results.values())}")
    assert junit is not None
    cases = {c.get("name"): c for c in junit.iter("testcase")}
    for i, nodeid in enumerate(NODEIDS):
        assert any(ln.startswith(nodeid) for ln in result.outlines), nodeid  # -v status line
        case = cases[f"test_{i}"]
        if results[nodeid] != "ok":
            assert results[nodeid].startswith(("WorkerProtocolError", "AgentError")), results
            if results[nodeid].startswith("WorkerProtocolError"):  # names the test or the start
                assert f"while running {nodeid}:" in results[nodeid] or (
                    "while collecting:" in results[nodeid]
                )
            problem = case.find("error")
            assert problem is not None and results[nodeid].split(":")[0] in (
                problem.get("message") or ""
            )


def test_valid_runs_replay_unchanged_through_the_same_harness(
    hostile_project: pytest.Pytester,
) -> None:
    # Positive control: real reports pass untouched and look as pytest made them.
    runs = {
        f"test_{i}": [
            *(_line({"t": "report", "data": r}) for r in scenario(name, NODEIDS[i])),
            _line({"t": "done", "nodeid": NODEIDS[i]}),
        ]
        for i, name in enumerate(["failed", "skipped", "xfail", "passed"])
    }
    result, results, _ = _inner_run(hostile_project, runs, VALID_COLLECTED)
    assert set(results.values()) == {"ok"}
    result.assert_outcomes(failed=1, skipped=1, xfailed=1, passed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: outer*", "*not today*"])


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"node": {"x": 1}}, id="node-extra"),
        pytest.param({"outcome": "skipped", "longrepr": "Skipped: x"}, id="skip-str"),
    ],
)
def test_negative_control_unchecked_reports_crash_the_reporters(
    hostile_project: pytest.Pytester, change: dict[str, Any]
) -> None:
    # The harness sees the bug: without the checks, the same report is an INTERNALERROR.
    report = scenario("passed", NODEIDS[2])[1]
    report.update(change)
    result, _, _ = _inner_run(
        hostile_project, VALID_RUNS, VALID_COLLECTED, unchecked={"test_2": json.dumps(report)}
    )
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    assert "INTERNALERROR" in "\n".join(result.outlines + result.errlines)
    # ... while the checked path turns it into this test's error and the run goes on.
    result, results, _ = _inner_run(
        hostile_project, {**VALID_RUNS, "test_2": _issue_run(2, **change)}, VALID_COLLECTED
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert set(results) == set(NODEIDS)
