"""pytest-rerunfailures and sandboxed tests: real inner pytest runs against real QEMU guests.

``--reruns N`` and ``@pytest.mark.flaky(reruns=N)`` rerun a failing
sandboxed test, each attempt in a VM restored to the collected snapshot,
with pytest-rerunfailures' ``RERUN`` statuses, counts and summary.
"""

from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)

#: Bound on one inner session (VM restore, copies, guest collection under TCG).
INNER_TIMEOUT = 600.0

#: Each test leaves a file in the guest before failing: an attempt that finds
#: it ran in the guest of an earlier attempt, not in a fresh restore.
TESTS = """
import pathlib
import pytest

def fail_from_a_fresh_guest(name):
    marker = pathlib.Path("/var/tmp") / name
    assert not marker.exists(), "an earlier attempt's guest state survived"
    marker.write_text("attempted")
    assert False, "fails every time"

@pytest.mark.sandboxed
def test_option_reruns():
    fail_from_a_fresh_guest("option")

@pytest.mark.sandboxed
@pytest.mark.flaky(reruns=1)
def test_marker_reruns():
    fail_from_a_fresh_guest("marker")

@pytest.mark.sandboxed
def test_passes():
    pass

@pytest.mark.sandboxed
@pytest.mark.flaky(reruns=3, only_rerun=["ValueError"])
def test_not_rerun_for_this_error():
    fail_from_a_fresh_guest("only")
"""


@pytest.mark.integration
def test_reruns_of_sandboxed_tests(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_flaky=TESTS)
    result = inner.runpytest_subprocess("-v", "-rfER", "--reruns", "2", timeout=INNER_TIMEOUT)
    output = result.stdout.str()
    assert "INTERNALERROR" not in output + result.stderr.str(), output
    outcomes = result.parseoutcomes()
    # --reruns 2 for the first, the marker's 1 for the second, none for the
    # one whose error --only-rerun's pattern does not match.
    assert outcomes == {"failed": 3, "passed": 1, "rerun": 3}, output
    assert output.count("test_flaky.py::test_option_reruns RERUN") == 2, output
    assert output.count("test_flaky.py::test_marker_reruns RERUN") == 1, output
    assert "test_not_rerun_for_this_error RERUN" not in output
    assert "AssertionError: an earlier attempt" not in output
    result.stdout.fnmatch_lines(
        [
            "*rerun test summary info*",
            "RERUN test_flaky.py::test_option_reruns",
            "RERUN test_flaky.py::test_option_reruns",
            "FAILED test_flaky.py::test_option_reruns",
            "RERUN test_flaky.py::test_marker_reruns",
            "FAILED test_flaky.py::test_marker_reruns",
        ]
    )
    result.stdout.fnmatch_lines(["FAILED test_flaky.py::test_option_reruns - *fails every time*"])


# -- the attempt number on a guest's report (no VM) --------------------------------------


def test_a_reports_attempt_number_is_kept_when_valid() -> None:
    from pytest_gondolin.errors import WorkerProtocolError
    from pytest_gondolin.sandbox.report_checks import check_test_report
    from tests.unit.sandbox._wire import serialized_report

    assert check_test_report(serialized_report(rerun=2))["rerun"] == 2
    assert "rerun" not in check_test_report(serialized_report())
    for bad in (-1, "1", 1.5, True, 10**9):
        with pytest.raises(WorkerProtocolError, match="rerun"):
            check_test_report(serialized_report(rerun=bad))
