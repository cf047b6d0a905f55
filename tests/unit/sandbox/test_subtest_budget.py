"""A real suite's subtests fit the per-test report budget, and the budget counts what the host keeps.

Found running more-itertools 11.2.1 sandboxed: ``PrimeFunctionTests.test_primes``
sends 9,592 passed subtest reports; at 16 MiB a test and 3.8 KiB charged per
report the host turned it into a ``WorkerProtocolError`` while plain pytest
passed it.  The reports below have the exact shape pytest 9's
``SubtestReport`` serializes to (taken from that run).
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

import pytest
from _pytest.subtests import SubtestReport

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.sandbox.json_checks import Keep
from pytest_gondolin.sandbox.messages import ReportMessage, parse_message
from pytest_gondolin.sandbox.outcome import MAX_KEPT_PER_TEST, REPORT_OVERHEAD, RunTally
from pytest_gondolin.sandbox.report_checks import check_test_report

NODEID = "tests/test_recipes.py::PrimeFunctionTests::test_primes"
#: Subtests of more-itertools' test_primes (the largest of its suite).
REAL_SUBTESTS = 9_592


def _subtest(n: int) -> dict[str, Any]:
    return {
        "location": ["tests/test_recipes.py", 1431, "PrimeFunctionTests.test_primes"],
        "keywords": {
            "test_primes": 1,
            "PrimeFunctionTests": 1,
            "test_recipes.py": 1,
            "tests": 1,
            "more_itertools-11.2.1": 1,
            "": 1,
        },
        "outcome": "passed",
        "longrepr": None,
        "when": "call",
        "user_properties": [],
        "sections": [],
        "duration": 0,
        "start": 0,
        "stop": 0,
        "nodeid": NODEID,
        "_report_type": "SubTestReport",
        "_subtest.context": {"msg": None, "kwargs": {"n": str(n)}},
    }


def _message(n: int) -> ReportMessage:
    msg = parse_message(json.dumps({"t": "report", "data": _subtest(n)}).encode() + b"\n")
    assert isinstance(msg, ReportMessage)
    return msg


def test_a_real_suites_subtests_fit_one_tests_budget() -> None:
    tally = RunTally(NODEID)
    for n in range(REAL_SUBTESTS):
        tally.add(_message(n))
    assert len(tally.reports) == REAL_SUBTESTS
    assert tally.kept <= MAX_KEPT_PER_TEST


def test_past_the_budget_subtests_still_fail_the_test() -> None:
    """Negative control: the budget still stops a flood of subtest reports."""
    tally = RunTally(NODEID)
    with pytest.raises(WorkerProtocolError, match="would keep more than"):
        for n in range(4 * REAL_SUBTESTS):
            tally.add(_message(n))
    assert REAL_SUBTESTS < len(tally.reports) < 2 * REAL_SUBTESTS


def test_the_charge_covers_what_the_host_keeps_of_a_subtest_report() -> None:
    """What a replayed report really holds (tracemalloc) is within what it is charged."""
    count = 2_000
    kept: list[SubtestReport] = []
    charged = 0
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            keep = Keep()
            data = check_test_report(json.loads(json.dumps(_subtest(n))), keep=keep)
            charged += keep.used + REPORT_OVERHEAD
            kept.append(SubtestReport._from_json(data))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(kept) == count
    assert held <= charged, f"{held / count:.0f} B held per report, {charged / count:.0f} charged"
