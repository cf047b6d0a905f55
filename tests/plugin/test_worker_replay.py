"""Running items in a worker process and replaying their reports on the host, end to end.

Through pytester: the test-only router in ``_local_worker`` sends
``remote_local`` items to a real worker subprocess
(``pytest_gondolin.guest.worker``) and replays the reports, and the host's
output, outcomes, ``-x``, ``-k``, ``--lf`` and junitxml must be what an
in-process run gives.  The byte-level protocol (messages, the client
against a scripted worker, replay onto one item) is unit-tested without a
process in ``tests/unit/sandbox/``.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import pytest

pytest_plugins = ("pytester",)

ROUTER = ("-p", "tests.plugin._local_worker", "-p", "no:gondolin")

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
