"""A hostile worker sends its test's phases out of order, twice, or not at all.

Each report on its own is valid (it passes ``report_checks``), and each
names the running test: what is forged is the *run*. pytest reports
``setup``, then ``call`` when setup passed, then ``teardown``, each once; a
test's code in the guest can write ``done`` early (the worker's channel is
reachable with ``gc``, see ``tests/plugin/test_hostile_stops_reading.py``) or
extra reports. Before the fix a run of only ``setup`` + ``done`` made the
test vanish from the terminal, from junitxml and from the exit code, a
failing test included, and a run without a ``call`` report shed the host's
verdict on it (a cassette miss). Now the reports are cut to the longest
prefix that is one run and the rest is filled in as an error of that test.

Driven through the scripted-worker harness of ``test_worker_reporters.py``
(a real in-process pytest run with ``-v -rA --junitxml``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_gondolin.sandbox.outcome import HostFailure, RunOutcome
from pytest_gondolin.sandbox.replay import replay_item
from pytest_gondolin.sandbox.report_checks import check_test_report
from tests.unit.sandbox._wire import serialized_report
from tests.unit.sandbox._worker_reports import scenario
from tests.unit.sandbox.test_worker_reporters import CONFTEST, TEST_FILE, TESTS, VALID_COLLECTED

NODEIDS = [f"{TEST_FILE}::test_{i}" for i in range(4)]
#: The one order pytest reports a run in, for setup passed / failed.
WHOLE = (["setup", "call", "teardown"], ["setup", "teardown"])


def _line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _phase(nodeid: str, when: str, outcome: str) -> dict[str, Any]:
    """A valid serialized report of ``nodeid`` for phase ``when``."""
    name = "setup-error" if when == "setup" and outcome == "failed" else outcome
    found = [r for r in scenario(name, nodeid) if r["when"] == when]
    return found[0]


def _script(nodeid: str, phases: list[tuple[str, str]]) -> list[str]:
    lines = [_line({"t": "report", "data": _phase(nodeid, w, o)}) for w, o in phases]
    return [*lines, _line({"t": "done", "nodeid": nodeid})]


def _run(
    pytester: pytest.Pytester, runs: dict[str, list[str]]
) -> tuple[pytest.RunResult, ET.Element]:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**{TEST_FILE[:-3]: TESTS})
    script = {"collected": VALID_COLLECTED, "runs": runs, "unchecked": {}}
    pytester.path.joinpath("script.json").write_text(json.dumps(script))
    result = pytester.runpytest_inprocess(
        "-v", "-rA", "--junitxml=junit.xml", "-p", "no:gondolin", "-p", "no:cacheprovider"
    )
    return result, ET.parse(pytester.path / "junit.xml").getroot()


PHASES = st.lists(
    st.tuples(
        st.sampled_from(["setup", "call", "teardown"]), st.sampled_from(["passed", "failed"])
    ),
    max_size=5,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(runs=st.lists(PHASES, min_size=4, max_size=4))
@example(
    runs=[
        [("setup", "passed")],
        [],
        [("setup", "passed"), ("teardown", "passed")],
        [("setup", "passed"), ("call", "passed"), ("call", "failed"), ("teardown", "passed")],
    ]
)
def test_a_forged_run_never_hides_its_test(
    pytester: pytest.Pytester, runs: list[list[tuple[str, str]]]
) -> None:
    pytester.path.joinpath("junit.xml").unlink(missing_ok=True)
    scripts = {f"test_{i}": _script(NODEIDS[i], phases) for i, phases in enumerate(runs)}
    result, junit = _run(pytester, scripts)
    output = "\n".join(result.outlines + result.errlines)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), output
    assert "INTERNALERROR" not in output
    cases = [c.get("name") for c in junit.iter("testcase")]
    for i, phases in enumerate(runs):
        # Every test is in junitxml (twice when its call failed and its teardown
        # errored, as pytest writes it for a plain test), and has its -v status line.
        assert 1 <= cases.count(f"test_{i}") <= 2, (i, phases, cases, output)
        assert any(ln.startswith(NODEIDS[i] + " ") for ln in result.outlines), (i, output)
        whens = [w for w, _ in phases]
        setup_ok = bool(phases) and phases[0] == ("setup", "passed")
        expected = WHOLE[0 if setup_ok else 1]
        whole = whens == expected
        # Reports after a whole run only cost a warning: the test's phases are all there.
        ended = whens[: len(expected)] == expected
        kept = phases[: len(expected)] if ended else phases
        failed = any(_phase(NODEIDS[i], w, o)["outcome"] == "failed" for w, o in kept)
        if not ended or failed:  # never counted as passed, and the session fails
            assert result.ret == pytest.ExitCode.TESTS_FAILED, output
            case = next(c for c in junit.iter("testcase") if c.get("name") == f"test_{i}")
            assert case.find("failure") is not None or case.find("error") is not None, (
                i,
                phases,
                ET.tostring(case),
            )
        if not whole:
            assert "not one run of this test" in output, (i, phases, output)


def test_negative_control_whole_runs_replay_as_pytest_made_them(pytester: pytest.Pytester) -> None:
    runs = {
        "test_0": _script(
            NODEIDS[0], [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
        ),
        "test_1": _script(
            NODEIDS[1], [("setup", "passed"), ("call", "failed"), ("teardown", "passed")]
        ),
        "test_2": _script(NODEIDS[2], [("setup", "failed"), ("teardown", "passed")]),
        "test_3": _script(
            NODEIDS[3], [("setup", "passed"), ("call", "passed"), ("teardown", "passed")]
        ),
    }
    result, _ = _run(pytester, runs)
    result.assert_outcomes(passed=2, failed=1, errors=1)
    assert "not one run of this test" not in result.stdout.str()


MISS = HostFailure("cassette", "cassette: 1 request(s) did not match cassette x.yaml")


@pytest.mark.parametrize(
    "phases",
    [
        pytest.param([("setup", "passed"), ("teardown", "passed")], id="call-left-out"),
        pytest.param([("setup", "passed")], id="done-after-setup"),
    ],
)
def test_leaving_the_call_out_does_not_shed_the_host_s_verdict(
    pytester: pytest.Pytester, phases: list[tuple[str, str]]
) -> None:
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    reports = []
    for when, outcome in phases:
        data = serialized_report(when=when, outcome=outcome)
        data["nodeid"], data["location"] = item.nodeid, list(item.location)
        reports.append(check_test_report(data))
    replay_item(item, RunOutcome(item.nodeid, tuple(reports), host_failure=MISS))
    replayed = recorder.getreports("pytest_runtest_logreport")
    assert [(r.when, r.outcome) for r in replayed] == [
        ("setup", "passed"),
        ("call", "failed"),
        ("teardown", "passed"),
    ]
    call = replayed[1]
    assert "not one run of this test" in call.longreprtext
    assert (MISS.section, MISS.message) in call.sections
    recorder.finish_recording()
