"""Replaying an outcome onto a real host item (``sandbox/replay.py``), in-process, no VM.

The host's verdicts are applied here, to the deserialized reports: a run
cut short by a crash or timeout is completed with failed reports in the
right phase, and a :class:`~pytest_gondolin.sandbox.outcome.HostFailure`
(a cassette miss) fails the call report -- while the outcome's serialized
reports stay exactly what the worker sent.
"""

from __future__ import annotations

import copy

import pytest

from pytest_gondolin.sandbox.messages import Collected
from pytest_gondolin.sandbox.outcome import Failure, HostFailure, RunOutcome
from pytest_gondolin.sandbox.replay import (
    GUEST_REPORT_ATTR,
    IN_GUEST,
    GuestErrorRepr,
    replay_begun,
    replay_collect_errors,
    replay_cut,
    replay_item,
    warning_category,
)
from pytest_gondolin.sandbox.report_checks import check_collect_report, check_test_report
from tests.unit.sandbox._wire import serialized_report
from tests.unit.sandbox._worker_reports import collect_error


def _reports_for(item: pytest.Item, *phases: tuple[str, str]) -> tuple[dict[str, object], ...]:
    """Checked serialized reports for ``item``, one per ``(when, outcome)``."""
    reports = []
    for when, outcome in phases:
        data = serialized_report(when=when, outcome=outcome)
        data["nodeid"], data["location"] = item.nodeid, list(item.location)
        reports.append(check_test_report(data))
    return tuple(reports)


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


MISS = HostFailure("cassette", "cassette: 1 request(s) did not match cassette x.yaml")


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param("passed", ("failed", MISS.message, []), id="passed-call-fails"),
        pytest.param(
            "failed", ("failed", "boom", [(MISS.section, MISS.message)]), id="failed-call-noted"
        ),
    ],
)
def test_a_host_failure_fails_the_call_report_not_the_wire_data(
    pytester: pytest.Pytester, call: str, expected: tuple[str, str, list[tuple[str, str]]]
) -> None:
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    reports = _reports_for(item, ("setup", "passed"), ("call", call), ("teardown", "passed"))
    sent = copy.deepcopy(reports)
    outcome = RunOutcome(item.nodeid, reports, host_failure=MISS)
    replay_item(item, outcome)
    replayed = recorder.getreports("pytest_runtest_logreport")
    assert [(r.when, r.outcome) for r in replayed] == [
        ("setup", "passed"),
        ("call", "failed"),
        ("teardown", "passed"),
    ]
    outcome_word, text, extra_sections = expected
    call_report = replayed[1]
    assert call_report.outcome == outcome_word and text in call_report.longreprtext
    gondolin = [s for s in call_report.sections if s[0].startswith("gondolin:")]
    assert gondolin == extra_sections
    assert all(getattr(r, GUEST_REPORT_ATTR) for r in replayed)
    assert outcome.reports == sent  # the verdict never edits what the worker sent
    recorder.finish_recording()


def test_without_a_host_failure_a_passed_run_stays_passed(pytester: pytest.Pytester) -> None:
    """Negative control for the test above: the same reports, no verdict."""
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    reports = _reports_for(item, ("setup", "passed"), ("call", "passed"), ("teardown", "passed"))
    replay_item(item, RunOutcome(item.nodeid, reports))
    replayed = recorder.getreports("pytest_runtest_logreport")
    assert [r.outcome for r in replayed] == ["passed"] * 3
    recorder.finish_recording()


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
    category = warning_category(name)
    assert issubclass(category, expected_base)
    assert category.__name__ == expected_name
    assert category is DeprecationWarning or category.__module__ == name.rpartition(".")[0]


def test_collection_errors_are_reported_once_per_seen_set(pytester: pytest.Pytester) -> None:
    """A worker prepared again repeats its collection errors; the session's set shows them once."""
    config = pytester.parseconfig()
    recorder = pytester.make_hook_recorder(config.pluginmanager)
    collected = Collected((), (check_collect_report(collect_error("test_x.py")),))
    seen: set[str] = set()
    assert replay_collect_errors(config, collected, seen) == 1
    assert replay_collect_errors(config, collected, seen) == 0
    assert replay_collect_errors(config, collected, set()) == 1  # another session's set
    reports = recorder.getreports("pytest_collectreport")
    assert [(r.nodeid, r.outcome) for r in reports] == [("test_x.py", "failed")] * 2
    recorder.finish_recording()


def _collect_error_with_text(nodeid: str, text: str) -> dict[str, object]:
    """A collect report whose longrepr is pytest's plain text (as for an ImportError)."""
    data = collect_error(nodeid)
    data["longrepr"] = text
    return check_collect_report(data)


@pytest.mark.parametrize("form", ["text", "traceback"])
def test_a_guest_collection_error_says_it_happened_in_the_guest(
    pytester: pytest.Pytester, form: str
) -> None:
    config = pytester.parseconfig()
    recorder = pytester.make_hook_recorder(config.pluginmanager)
    if form == "text":
        data = _collect_error_with_text(
            "test_x.py", "ImportError while importing test module '/p/test_x.py'.\nTraceback:\n..."
        )
        message = f"{IN_GUEST} ImportError while importing test module '/p/test_x.py'."
    else:
        data = check_collect_report(collect_error("test_x.py"))
        message = f"{IN_GUEST} "
    replay_collect_errors(config, Collected((), (data,)), set())
    (report,) = recorder.getreports("pytest_collectreport")
    assert isinstance(report.longrepr, GuestErrorRepr)
    assert getattr(report, GUEST_REPORT_ATTR) is True
    assert report.longreprtext.startswith(IN_GUEST)  # junitxml's text, xdist's serialization
    assert report.longrepr.reprcrash.message.startswith(message)  # the short summary line
    recorder.finish_recording()


def test_a_guest_test_failure_is_left_as_the_guest_reported_it(pytester: pytest.Pytester) -> None:
    # Test reports are marked "(in guest)" in the verbose status, not rewritten.
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    phases = (("setup", "failed"), ("teardown", "passed"))
    replay_item(item, RunOutcome(item.nodeid, _reports_for(item, *phases)))
    setup = recorder.getreports("pytest_runtest_logreport")[0]
    assert not isinstance(setup.longrepr, GuestErrorRepr)
    assert IN_GUEST not in setup.longreprtext
    recorder.finish_recording()


def test_reports_logged_while_the_run_went_on_are_not_logged_again(
    pytester: pytest.Pytester,
) -> None:
    """``--pdb``: the start and the failed call are logged before pdb takes the terminal
    (``replay_begun``); the replay after the run logs the rest, once."""
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    reports = _reports_for(item, ("setup", "passed"), ("call", "failed"), ("teardown", "passed"))
    replay_begun(item, reports[:2])
    replay_begun(item, reports[:2])  # once per run
    early = recorder.getreports("pytest_runtest_logreport")
    assert [(r.when, r.outcome) for r in early] == [("setup", "passed"), ("call", "failed")]
    assert all(getattr(r, GUEST_REPORT_ATTR) for r in early)
    replay_item(item, RunOutcome(item.nodeid, reports))
    logged = recorder.getreports("pytest_runtest_logreport")
    assert [r.when for r in logged] == ["setup", "call", "teardown"]
    assert len(recorder.getcalls("pytest_runtest_logstart")) == 1
    # The next run of the item (another session's, a rerun) starts afresh.
    replay_item(item, RunOutcome(item.nodeid, reports))
    assert len(recorder.getcalls("pytest_runtest_logstart")) == 2
    assert len(recorder.getreports("pytest_runtest_logreport")) == 6
    recorder.finish_recording()


def test_a_run_that_broke_after_its_early_reports_still_shows_its_failure(
    pytester: pytest.Pytester,
) -> None:
    """The worker broke the protocol after pdb: the host's stand-in reports are all logged."""
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    replay_begun(item, _reports_for(item, ("setup", "passed"), ("call", "failed")))
    replay_item(item, Failure("error", "the worker broke the protocol"))
    failed = [r for r in recorder.getreports("pytest_runtest_logreport") if r.failed]
    assert any("broke the protocol" in r.longreprtext for r in failed)
    recorder.finish_recording()


def test_after_pdb_was_quit_nothing_later_is_logged(pytester: pytest.Pytester) -> None:
    """Quit at a breakpoint in the call: on the host, pytest stops the test there."""
    item = pytester.getitem("def test_func(): pass")
    recorder = pytester.make_hook_recorder(item.config.pluginmanager)
    reports = _reports_for(item, ("setup", "passed"), ("call", "failed"), ("teardown", "passed"))
    replay_cut(item, 1)
    replay_item(item, RunOutcome(item.nodeid, reports, failure=Failure("crash", "gone")))
    assert [r.when for r in recorder.getreports("pytest_runtest_logreport")] == ["setup"]
    # Once: the next run of the item is logged whole.
    replay_item(item, RunOutcome(item.nodeid, reports))
    assert len(recorder.getreports("pytest_runtest_logreport")) == 4
    recorder.finish_recording()
