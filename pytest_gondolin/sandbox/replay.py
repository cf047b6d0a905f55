"""Replay a worker's run on the host, as if the item had run here.

:func:`replay_item` replays a run's reports through the host's hooks the
way pytest-xdist's controller does (``pytest_runtest_logstart``,
``pytest_report_from_serializable`` + ``pytest_runtest_logreport`` per
report, ``pytest_warning_recorded``, ``pytest_runtest_logfinish``), so
terminal output, ``-x``/``--maxfail``, ``--lf``, junitxml and every other
reporter work unchanged.  The host's verdicts are applied here, to the
deserialized reports, never to the wire data: a run that crashed or timed
out becomes a failed report naming the cause (a :class:`WorkerFailureRepr`),
and a :class:`~.outcome.HostFailure` (a cassette miss) fails the call
report.  :func:`replay_collect_errors` does the same for the worker's
collection errors, each headed ``in the guest:`` (:class:`GuestErrorRepr`):
unlike a test's reports, which the verbose status marks ``(in guest)``,
nothing else says where a module failed to import.  The reports come already validated by
:mod:`.messages`; deserializing them is still guarded, and bad report data
never raises out of here.
"""

from __future__ import annotations

import builtins
import copy
import io
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Final, Literal

import pytest
from _pytest._code.code import ReprFileLocation, TerminalRepr
from _pytest._io import TerminalWriter
from _pytest.junitxml import bin_xml_escape

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.sandbox.json_checks import JSONObject
from pytest_gondolin.sandbox.live_output import safe_host_text
from pytest_gondolin.sandbox.messages import Collected, WarningRecord
from pytest_gondolin.sandbox.outcome import Failure, HostFailure, RunOutcome

__all__ = [
    "GUEST_REPORT_ATTR",
    "IN_GUEST",
    "GuestErrorRepr",
    "WorkerFailureRepr",
    "replay_begun",
    "replay_collect_errors",
    "replay_cut",
    "replay_item",
    "warning_category",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# replay on the host
# --------------------------------------------------------------------------


class WorkerFailureRepr(TerminalRepr):
    """The longrepr of a report the host made up for a crashed or hung run."""

    def __init__(self, path: str, lineno: int, headline: str, detail: str) -> None:
        self.reprcrash = ReprFileLocation(path, lineno, headline)
        self.headline = headline
        self.detail = detail

    def toterminal(self, tw: TerminalWriter) -> None:
        tw.line(self.headline, red=True, bold=True)
        if self.detail.strip():
            tw.line("")
            for line in self.detail.rstrip("\n").splitlines():
                tw.line(line)


#: What the host's account of an error that happened in the guest starts with.
IN_GUEST = "in the guest:"


class GuestErrorRepr(TerminalRepr):
    """The longrepr of a collection error the guest reported, headed ``in the guest:`` on the host.

    ``inner`` is the guest's own longrepr (pytest's text for an import error,
    or a deserialized traceback), shown unchanged after the heading, so the
    guest's ``--tb`` style holds.  ``reprcrash`` carries the heading too, for
    the short summary line (``ERROR x.py - in the guest: ...``); ``str()``
    starts with it (junitxml's text, pytest-xdist's serialization of a
    host worker's report).
    """

    def __init__(self, inner: TerminalRepr | str, path: str, lineno: int) -> None:
        self.inner = inner
        crash = getattr(inner, "reprcrash", None)
        if isinstance(crash, ReprFileLocation):
            message, path, lineno = crash.message, crash.path, crash.lineno
        else:
            message = str(inner).strip().partition("\n")[0]
        # Guest text on the host's own summary line: no raw control characters.
        self.reprcrash = ReprFileLocation(path, lineno, f"{IN_GUEST} {safe_host_text(message)}")

    def toterminal(self, tw: TerminalWriter) -> None:
        if isinstance(self.inner, str):
            tw.line(f"{IN_GUEST} {safe_host_text(self.inner)}")
        else:
            tw.line(IN_GUEST, bold=True)
            # Guest text under the host's heading: rendered plain, control characters visible.
            text = io.StringIO()
            plain = TerminalWriter(file=text)
            plain.hasmarkup, plain.fullwidth = False, tw.fullwidth
            self.inner.toterminal(plain)
            for line in safe_host_text(text.getvalue()).rstrip("\n").split("\n"):
                tw.line(line)


def _head_in_guest(report: pytest.CollectReport) -> None:
    """Head a failed guest collect report's longrepr ``in the guest:`` (no-op for any other)."""
    longrepr = report.longrepr
    headed = isinstance(longrepr, GuestErrorRepr)
    if report.failed and isinstance(longrepr, str | TerminalRepr) and not headed:
        report.longrepr = GuestErrorRepr(longrepr, report.fspath, 0)


def _deserialize(
    config: pytest.Config, data: JSONObject
) -> pytest.TestReport | pytest.CollectReport:
    # pytest's deserializer mutates nested dicts and raises KeyError /
    # TypeError / AssertionError on shapes it does not know; we validated
    # the shape already, this is the last line of defence.
    try:
        report = config.hook.pytest_report_from_serializable(
            config=config, data=copy.deepcopy(data)
        )
    except Exception as exc:
        raise WorkerProtocolError(
            f"pytest could not deserialize a worker report: {exc!r:.300}"
        ) from exc
    if not isinstance(report, pytest.TestReport | pytest.CollectReport):
        raise WorkerProtocolError("no plugin could deserialize a worker report")
    return report


def _synthetic(
    item: pytest.Item,
    when: Literal["setup", "call", "teardown"],
    failure: Failure | None,
) -> pytest.TestReport:
    now = time.time()
    longrepr = None
    if failure is not None:
        lineno = (item.location[1] or 0) + 1
        longrepr = WorkerFailureRepr(str(item.path), lineno, failure.headline, failure.detail)
    return pytest.TestReport(
        nodeid=item.nodeid,
        location=item.location,
        keywords=dict.fromkeys(item.keywords, 1),
        outcome="passed" if failure is None else "failed",
        longrepr=longrepr,
        when=when,
        duration=failure.duration if failure is not None and when == "call" else 0.0,
        start=now,
        stop=now,
    )


def _one_run(
    reports: Sequence[pytest.TestReport], *, call_optional: bool = False
) -> tuple[list[pytest.TestReport], str | None]:
    """The longest prefix of *reports* that is one run as pytest reports it, and what
    was wrong past it (``None``: all of it is one whole run).

    A run is ``setup``, then ``call`` when setup passed, then ``teardown``, each
    once and in that order (subtest reports, not plain ``TestReport`` objects, come
    between). The worker is hostile: a run that ended early (a forged ``done``),
    repeated a phase or left one out must not make the test vanish from the
    host's reporters, nor shed the host's verdict on its call.
    """
    expected: tuple[str, ...] = ("setup",)
    for at, report in enumerate(reports):
        if type(report) is not pytest.TestReport:
            continue
        if report.when not in expected:
            wanted = " or ".join(expected) if expected else "nothing"
            return list(reports[:at]), f"a {report.when} report where pytest reports {wanted}"
        if report.when == "setup" and report.passed:
            expected = ("call", "teardown") if call_optional else ("call",)
        elif report.when == "teardown":
            expected = ()
        else:
            expected = ("teardown",)
    if expected:
        return list(reports), f"no {expected[0]} report"
    return list(reports), None


def _fill_in(
    item: pytest.Item, reports: Sequence[pytest.TestReport], failure: Failure
) -> list[pytest.TestReport]:
    """Reports that complete an interrupted run with *failure* in the right phase."""
    # Subtest reports are extra "call" reports; only plain reports say
    # which phases the run got through.
    phases = {r.when: r for r in reports if type(r) is pytest.TestReport}
    if "teardown" in phases:
        return []
    setup = phases.get("setup")
    if "call" in phases or (setup is not None and not setup.passed):
        return [_synthetic(item, "teardown", failure)]
    if setup is None and failure.kind == "error":
        return [_synthetic(item, "setup", failure), _synthetic(item, "teardown", None)]
    made = [] if setup is not None else [_synthetic(item, "setup", None)]
    return [*made, _synthetic(item, "call", failure), _synthetic(item, "teardown", None)]


def warning_category(name: str) -> type[Warning]:
    """The class a replayed warning is shown under: a builtin by name, else a stand-in."""
    module, _, qualname = name.rpartition(".")
    if module == "builtins":
        candidate = getattr(builtins, qualname, None)
        if isinstance(candidate, type) and issubclass(candidate, Warning):
            return candidate
    # Never import what the worker names: stand in a UserWarning subclass
    # that prints under the worker's class name.
    short = qualname.rpartition(".")[2] or "UserWarning"
    return type(
        short, (UserWarning,), {"__module__": module or "builtins", "__qualname__": qualname}
    )


def _replay_warning(item: pytest.Item, record: WarningRecord) -> None:
    category = warning_category(record.category)
    message = warnings.WarningMessage(
        category(record.message), category, record.filename, record.lineno
    )
    item.config.hook.pytest_warning_recorded.call_historic(
        kwargs={
            "warning_message": message,
            "when": "runtest",
            "nodeid": item.nodeid,
            "location": None,
        }
    )


def _apply_host_failure(reports: Sequence[pytest.TestReport], verdict: HostFailure) -> None:
    """Fail the call report with the host's verdict, or note it there if it failed anyway."""
    # Subtest reports are extra "call" reports: the verdict is the test's own.
    call = next((r for r in reports if type(r) is pytest.TestReport and r.when == "call"), None)
    if call is None:
        return
    if call.passed:
        call.outcome = "failed"
        call.longrepr = verdict.message
    else:
        call.sections.append((verdict.section, verdict.message))


#: Attribute set to True on reports that ran in a guest (serialized by xdist like any other).
GUEST_REPORT_ATTR = "gondolin_guest"


#: A start-up longer than this (a worker prepared for this item, not just a
#: restore) is named in a section of the item's setup report.
STARTUP_SECTION_AFTER: Final = 1.0
#: The section that says where the first sandboxed test's time went.
STARTUP_SECTION: Final = "gondolin: start-up"


def _add_startup(
    reports: Sequence[pytest.TestReport], startup: float, *, in_duration: bool = True
) -> None:
    """Count the host's start-up time for this item in its setup report (``--durations``),
    and say so in a section of its call report (shown by ``-rA`` and with a failure).

    With ``in_duration`` false (pytest-split's ``--store-durations``) the
    section is written but the duration stays what the test took: a stored
    duration balances groups, and every group pays its own start-up."""
    plain = {r.when: r for r in reports if type(r) is pytest.TestReport}
    setup = plain.get("setup")
    if setup is None or startup <= 0:
        return
    if in_duration:
        setup.duration += startup
    if startup >= STARTUP_SECTION_AFTER:
        plain.get("call", setup).sections.append(
            (
                STARTUP_SECTION,
                f"{startup:.2f} s of this setup were the guest worker's start-up on the host "
                "(VM boot or restore, project copy, the guest's pytest start-up and collection), "
                "paid by the first sandboxed test of its guest"
                + ("" if in_duration else "; not in its stored duration (--store-durations)"),
            )
        )


def _make_host_own(item: pytest.Item, report: pytest.TestReport) -> None:
    """What the host sets on a guest's report before any reporter sees it: the host
    item's location, the "(in guest)" mark, and ``user_properties`` names XML can carry
    (junitxml escapes a property's value but not its name, so one ``\\x01`` from the
    guest would make the whole session's junit file unreadable)."""
    report.location = item.location
    setattr(report, GUEST_REPORT_ATTR, True)  # for the verbose "(in guest)" status
    report.user_properties = [
        (bin_xml_escape(name), value) for name, value in report.user_properties
    ]


#: How many of an item's reports :func:`replay_begun` logged while its run went on.
_LOGGED_EARLY: Final = pytest.StashKey[int]()


def replay_begun(item: pytest.Item, data: Sequence[JSONObject]) -> None:
    """Log a running item's start and its reports so far (``--pdb``: before pdb takes the
    terminal, as pytest logs a failure before its post-mortem); :func:`replay_item` then
    logs only the rest. At most once per run; a report that cannot be read stops it."""
    if _LOGGED_EARLY in item.stash:
        return
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    logged = 0
    for one in data:
        try:
            report = _deserialize(item.config, one)
        except WorkerProtocolError:
            break
        if not isinstance(report, pytest.TestReport) or report.nodeid != item.nodeid:
            break
        _make_host_own(item, report)
        ihook.pytest_runtest_logreport(report=report)
        logged += 1
    item.stash[_LOGGED_EARLY] = logged


#: How many of an item's reports :func:`replay_item` logs at most (pdb was quit).
_CUT: Final = pytest.StashKey[int]()


def replay_cut(item: pytest.Item, count: int) -> None:
    """Log at most the first ``count`` of the running item's reports: pdb was quit after
    them, and on the host pytest stops a test there (``pytest.exit``)."""
    item.stash[_CUT] = max(count, 0)


def replay_item(
    item: pytest.Item,
    outcome: RunOutcome | Failure,
    *,
    startup: float = 0.0,
    adjust: Callable[[Sequence[pytest.TestReport]], None] | None = None,
) -> None:
    """Report *outcome* for *item* through the host's hooks, as if it ran here.

    Calls ``pytest_runtest_logstart``, then ``pytest_runtest_logreport`` for
    each report (deserialized with ``pytest_report_from_serializable``, its
    location set to the host item's, the call report failed by the
    outcome's ``host_failure``), then the reports that stand in for
    phases a crash or timeout cut off, ``pytest_warning_recorded`` for each
    warning, and ``pytest_runtest_logfinish``.  Failures are counted by the
    session as usual, so ``-x``/``--maxfail`` stop the host's loop.  A bare
    :class:`Failure` means the item never ran.  Never raises for bad report
    data: an unreadable report turns into a failure of kind ``"error"``.
    ``startup`` (seconds the host spent preparing the guest worker for this
    item) is added to the setup report's duration, so ``--durations``
    shows where the first sandboxed test's time went. ``adjust`` sees every
    report before it is logged (pytest-rerunfailures' marks on an attempt).
    """
    if isinstance(outcome, Failure):
        outcome = RunOutcome(nodeid=item.nodeid, failure=outcome, duration=outcome.duration)
    if outcome.nodeid != item.nodeid:
        raise ValueError(f"outcome for {outcome.nodeid!r} replayed for {item.nodeid!r}")
    config = item.config
    failure = outcome.failure
    reports: list[pytest.TestReport] = []
    for data in outcome.reports:
        try:
            report = _deserialize(config, data)
            if not isinstance(report, pytest.TestReport) or report.nodeid != item.nodeid:
                raise WorkerProtocolError(
                    f"report for {report.nodeid!r:.200} replayed for {item.nodeid!r}"
                )
        except WorkerProtocolError as exc:
            log.warning("dropping a worker report for %s: %s", item.nodeid, exc)
            if failure is None:
                failure = Failure("error", "the worker sent an unreadable report", str(exc))
            continue
        _make_host_own(item, report)
        reports.append(report)
    cut = item.stash.get(_CUT, None)
    if cut is not None:
        del item.stash[_CUT]
        reports = reports[:cut]
        failure = None  # what happened after the quit is not reported, as on the host
    else:
        setup_only = bool(getattr(config.option, "setuponly", False))
        reports, wrong = _one_run(reports, call_optional=setup_only)
        if wrong is not None and failure is None:
            failure = Failure("error", "the worker's reports are not one run of this test", wrong)
    extra: list[pytest.TestReport] = []
    late: Failure | None = None
    if failure is not None:
        extra = _fill_in(item, reports, failure)
        if not extra:
            late = failure
    if outcome.host_failure is not None:  # also on a call the host had to stand in for
        _apply_host_failure([*reports, *extra], outcome.host_failure)
    storing = bool(getattr(config.option, "store_durations", False))  # pytest-split
    _add_startup([*reports, *extra], startup, in_duration=not storing)
    if adjust is not None:
        adjust([*reports, *extra])
    ihook = item.ihook
    # Logged already while the run went on (replay_begun): the start and the first reports.
    early = item.stash.get(_LOGGED_EARLY, None)
    if early is None:
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    else:
        del item.stash[_LOGGED_EARLY]
    # Only the worker's own reports were logged early, never the host's stand-ins.
    for report in (*reports[early or 0 :], *extra):
        ihook.pytest_runtest_logreport(report=report)
    for record in outcome.warnings:
        _replay_warning(item, record)
    if late is not None:
        # Every phase reported, yet the run did not end cleanly: say so
        # without inventing a second teardown report.
        _replay_warning(
            item,
            WarningRecord(
                f"{late.headline} after the test finished\n{late.detail}".rstrip(),
                "pytest.PytestWarning",
                item.nodeid,
                str(item.path),
                (item.location[1] or 0) + 1,
            ),
        )
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def replay_collect_errors(config: pytest.Config, collected: Collected, seen: set[str]) -> int:
    """Report the worker's collection errors on the host, each at most once per ``seen``.

    A worker restarted after a crash collects again and repeats its errors;
    the caller keeps one ``seen`` set per session (it is updated here), so
    they are shown once.  Returns how many were reported now.
    """
    count = 0
    for data in collected.errors:
        try:
            report = _deserialize(config, data)
        except WorkerProtocolError as exc:
            log.warning("dropping a worker collect report: %s", exc)
            continue
        key = f"{report.nodeid}\0{report.longrepr}"
        if key in seen:
            continue
        seen.add(key)
        setattr(report, GUEST_REPORT_ATTR, True)
        if isinstance(report, pytest.CollectReport):
            _head_in_guest(report)
        config.hook.pytest_collectreport(report=report)
        count += 1
    return count
