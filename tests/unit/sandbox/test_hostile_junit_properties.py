"""A hostile worker's ``user_properties`` name makes the session's junit XML unreadable.

pytest's junitxml escapes a property's *value* (``bin_xml_escape``) but
writes its *name* as it is, and ElementTree does not refuse characters XML
1.0 forbids: one report whose property name holds ``\\x01`` (a test's
``record_property``) makes the whole file unparseable, so CI loses the
results of every test of the session, not just the guest's. On the host
that is the test author's own doing; from a guest it is an attack on the
other tests' results. Before the fix the name crossed as the guest sent it;
now the host escapes it as junitxml escapes values (``#x01``).

Driven through the scripted-worker harness of ``test_worker_reporters.py``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from tests.unit.sandbox._worker_reports import scenario
from tests.unit.sandbox.test_worker_reporters import (
    CONFTEST,
    NODEIDS,
    TEST_FILE,
    TESTS,
    VALID_COLLECTED,
    VALID_RUNS,
)

NAMES = ["na\x01me", "nul\x00", "esc\x1b[2J", "\ufffe", "ok name"]


def _line(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _report() -> dict[str, object]:
    report = scenario("passed", NODEIDS[1])[2]  # junitxml writes the teardown's properties
    report["user_properties"] = [[name, "v"] for name in NAMES]
    return report


def _run(pytester: pytest.Pytester, runs: dict[str, list[str]], unchecked: dict[str, str]) -> str:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**{TEST_FILE[:-3]: TESTS})
    script = {"collected": VALID_COLLECTED, "runs": runs, "unchecked": unchecked}
    pytester.path.joinpath("script.json").write_text(json.dumps(script))
    result = pytester.runpytest_inprocess(
        "-rA", "--junitxml=junit.xml", "-p", "no:gondolin", "-p", "no:cacheprovider"
    )
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.outlines
    return (pytester.path / "junit.xml").read_text(errors="surrogateescape")


def test_a_guest_s_property_names_leave_the_junit_xml_readable(pytester: pytest.Pytester) -> None:
    scripts = [_line({"t": "report", "data": r}) for r in scenario("passed", NODEIDS[1])]
    scripts[2] = _line({"t": "report", "data": _report()})
    runs = {**VALID_RUNS, "test_1": [*scripts, _line({"t": "done", "nodeid": NODEIDS[1]})]}
    root = ET.fromstring(_run(pytester, runs, {}))
    assert len(list(root.iter("testcase"))) == len(NODEIDS)
    names = [p.get("name") for p in root.iter("property")]
    assert "na#x01me" in names and "ok name" in names, names
    assert all("\x01" not in (n or "") and "\x1b" not in (n or "") for n in names), names


def test_negative_control_the_same_report_unchecked_breaks_the_file(
    pytester: pytest.Pytester,
) -> None:
    text = _run(pytester, VALID_RUNS, {"test_1": json.dumps(_report())})
    with pytest.raises(ET.ParseError):
        ET.fromstring(text)
