"""What one run of an item in the worker comes to: reports, warnings and verdicts, bounded.

Sans-IO. :class:`RunTally` takes the parsed messages of one run
(:mod:`.messages`) and keeps them within the per-test memory budget;
:meth:`RunTally.outcome` gives the :class:`RunOutcome` that
:mod:`.replay` reports on the host.  A run that ended abnormally carries a
:class:`Failure` (crash, timeout, error); the host's verdict on a run that
ended normally (a cassette miss) is a :class:`HostFailure`.  Both are
fields of the outcome, applied when it is replayed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from pytest_gondolin.errors import WorkerProtocolError
from pytest_gondolin.sandbox.coverage import MAX_COVERAGE_VALUES_PER_RUN, CoverageMessage
from pytest_gondolin.sandbox.json_checks import JSONObject, truncation_mark
from pytest_gondolin.sandbox.live_output import safe_host_text
from pytest_gondolin.sandbox.messages import (
    DoneMessage,
    ErrorMessage,
    QueryMessage,
    ReportMessage,
    WarningRecord,
    WorkerMessage,
)

__all__ = [
    "MAX_KEPT_PER_TEST",
    "MAX_MESSAGES_PER_RUN",
    "MAX_WARNINGS_PER_RUN",
    "Failure",
    "FailureKind",
    "HostFailure",
    "RunOutcome",
    "RunTally",
    "out_of_memory",
]

FailureKind: TypeAlias = Literal["timeout", "crash", "error"]


@dataclass(frozen=True)
class Failure:
    """Why a run produced no (or not all) reports.

    ``kind`` is ``"timeout"`` (the host gave up), ``"crash"`` (the worker
    died) or ``"error"`` (the item could not be run: the worker refused it,
    broke protocol, or was never available).  ``headline`` becomes the
    report's one-line message, ``detail`` (stack dump, stderr or console
    tail) the text below it.
    """

    kind: FailureKind
    headline: str
    detail: str = ""
    duration: float = 0.0

    def __post_init__(self) -> None:
        # Both hold guest text (its errors, its stderr): never raw control characters.
        object.__setattr__(self, "headline", safe_host_text(self.headline))
        object.__setattr__(self, "detail", safe_host_text(self.detail))

    @classmethod
    def from_exception(cls, exc: BaseException, *, duration: float = 0.0) -> Failure:
        """A failure of kind ``"error"`` describing *exc* (e.g. a VM that would not restore)."""
        text = str(exc) or type(exc).__name__
        first, _, rest = text.partition("\n")
        return cls("error", f"{type(exc).__name__}: {first}", rest, duration)


def out_of_memory(failure: Failure, vmstat: str, memory_mib: int) -> Failure:
    """``failure`` (a crashed run) saying the guest ran out of memory, if its kernel says so.

    ``vmstat`` is the guest's ``/proc/vmstat`` read after the crash (hostile
    text: only a well-formed ``oom_kill N`` line counts).  The run starts
    from a snapshot taken before any test ran, so a non-zero count means the
    kernel's OOM killer ended the worker (or something it needed) during
    this run: a bare "killed by SIGKILL" would leave the user guessing (found
    marking more-itertools' suite, whose 100-thread ``concurrent_tee`` test
    needs more than the default guest has).  Any other ``failure`` is returned
    unchanged.
    """
    if failure.kind != "crash":
        return failure
    kills = 0
    for line in vmstat.splitlines()[:_VMSTAT_MAX_LINES]:
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.isdigit() and len(value) < 20:
            kills = int(value)
    if kills == 0:
        return failure
    note = (
        f"the guest ran out of memory ({memory_mib} MiB; its kernel's OOM killer ran): "
        'give it more with sandboxed(memory="1G"), --gondolin-memory or gondolin_memory'
    )
    detail = f"{note}\n{failure.detail}" if failure.detail else note
    return Failure("crash", f"{failure.headline}: out of memory", detail, failure.duration)


#: ``/proc/vmstat`` has ~180 lines on Linux 6.1; more is not the kernel's.
_VMSTAT_MAX_LINES: Final = 1_000


@dataclass(frozen=True)
class HostFailure:
    """The host's verdict against a run the guest may have passed.

    A request the test's cassette could not answer is one: the guest saw a
    refusal, the test may still have passed.  Replay fails the call report
    with ``message`` if it passed, or adds ``message`` to it as the section
    ``gondolin: <topic>`` if it had failed already.
    """

    topic: str
    message: str

    @property
    def section(self) -> str:
        """The report section title ``message`` goes under when the call failed anyway."""
        return f"gondolin: {self.topic}"


@dataclass(frozen=True)
class RunOutcome:
    """What one ``run`` produced: validated serialized reports and warnings, and verdicts.

    ``failure`` is set when the run ended abnormally (the worker crashed or
    hung, or could not run the item); the reports that did arrive before
    that are kept (e.g. a passed setup before a crash).  ``host_failure`` is
    the host's own verdict on a run that ended normally (a cassette miss).
    The reports are exactly what the worker sent (validated): every verdict
    is applied when the run is replayed (:mod:`.replay`), never by editing them.
    """

    nodeid: str
    reports: tuple[JSONObject, ...] = ()
    warnings: tuple[WarningRecord, ...] = ()
    failure: Failure | None = None
    duration: float = 0.0
    host_failure: HostFailure | None = None
    #: The run's coverage, measured in the guest (pytest-cov active on the host).
    coverage: tuple[CoverageMessage, ...] = ()


# --------------------------------------------------------------------------
# one run, bounded
# --------------------------------------------------------------------------

#: Most messages one run may produce (reports + warnings + errors + queries);
#: a real run sends three reports, subtests add one per subtest.
MAX_MESSAGES_PER_RUN: Final = 20_000
#: Warnings beyond this many in one run are dropped (and counted).
MAX_WARNINGS_PER_RUN: Final = 1_000
#: Estimated bytes of host memory everything one test sends may keep until
#: the session ends (the terminal reporter holds every report, as it does
#: without pytest-gondolin).  Eight reports at MAX_REPORT_KEPT, or ~11,000
#: small subtest reports; beyond it the test fails with a WorkerProtocolError
#: instead of growing the host.  Sized for real suites: more-itertools'
#: ``test_primes`` sends 9,592 subtest reports (~26 MiB at this estimate).
MAX_KEPT_PER_TEST: Final = 32 * 1024 * 1024
#: What one report costs the host beyond the estimate of its data: the
#: ``TestReport`` object and the reporters' bookkeeping.  Measured for a small
#: passed subtest report: 2.5 KiB in all, of which the data estimate is 1.8 KiB
#: (tests/unit/sandbox/test_subtest_budget.py checks the estimate covers it).
REPORT_OVERHEAD: Final = 1024
#: Same for a warning or error message (the record and the replayed warning).
_MESSAGE_OVERHEAD: Final = 512
#: Copies the host makes of a warning's or error's text: the record, the
#: replayed warning and pytest's formatted one for the summary (measured:
#: ~2.4x in tests/plugin/test_worker_flood.py).
_MESSAGE_COPIES: Final = 3


class RunTally:
    """Collects the messages of one ``run`` into a :class:`RunOutcome`, within bounds.

    Sans-IO: :meth:`add` takes each parsed message of the run and raises
    ``WorkerProtocolError`` for one that breaks the protocol (another node id,
    a message that has no place in a run, more than
    :data:`MAX_MESSAGES_PER_RUN`) or whose reports would keep more than
    :data:`MAX_KEPT_PER_TEST`.  Warnings and error texts past the budget
    are dropped and counted instead: they are not worth failing a test for.
    """

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.reports: list[JSONObject] = []
        self.warnings: list[WarningRecord] = []
        self.errors: list[str] = []
        self.messages = 0
        self.kept = 0
        self.dropped_warnings = 0
        self.dropped_errors = 0
        self.coverage: list[CoverageMessage] = []
        self.coverage_values = 0

    def add(self, msg: WorkerMessage) -> None:
        """Account for *msg*; raise ``WorkerProtocolError`` if it breaks the protocol or the bounds."""
        self.messages += 1
        if self.messages > MAX_MESSAGES_PER_RUN:
            raise WorkerProtocolError(f"more than {MAX_MESSAGES_PER_RUN} messages in one run")
        if isinstance(msg, ReportMessage):
            if msg.nodeid != self.nodeid:
                raise WorkerProtocolError(
                    f"report for {msg.nodeid!r:.200} while running {self.nodeid!r}"
                )
            if self.kept + msg.kept + REPORT_OVERHEAD > MAX_KEPT_PER_TEST:
                raise WorkerProtocolError(
                    f"the reports of one test would keep more than "
                    f"{MAX_KEPT_PER_TEST // 2**20} MiB of host memory"
                )
            self.kept += msg.kept + REPORT_OVERHEAD
            self.reports.append(msg.data)
        elif isinstance(msg, WarningRecord):
            if len(self.warnings) >= MAX_WARNINGS_PER_RUN or not self._afford(msg.message):
                self.dropped_warnings += 1
            else:
                self.warnings.append(msg)
        elif isinstance(msg, ErrorMessage):
            if self._afford(msg.message):
                self.errors.append(msg.message)
            else:
                self.dropped_errors += 1
        elif isinstance(msg, DoneMessage):
            if msg.nodeid != self.nodeid:
                raise WorkerProtocolError(
                    f"done for {msg.nodeid!r:.200} while running {self.nodeid!r}"
                )
        elif isinstance(msg, CoverageMessage):
            self._add_coverage(msg)
        elif not isinstance(msg, QueryMessage):
            raise WorkerProtocolError(f"unexpected {type(msg).__name__} during a run")

    def _add_coverage(self, msg: CoverageMessage) -> None:
        if msg.nodeid != self.nodeid:
            raise WorkerProtocolError(
                f"coverage for {msg.nodeid!r:.200} while running {self.nodeid!r}"
            )
        self.coverage_values += msg.values
        if self.coverage_values > MAX_COVERAGE_VALUES_PER_RUN:
            raise WorkerProtocolError(
                f"more than {MAX_COVERAGE_VALUES_PER_RUN} coverage numbers in one run"
            )
        self.coverage.append(msg)

    def _afford(self, text: str) -> bool:
        cost = _MESSAGE_COPIES * sys.getsizeof(text) + _MESSAGE_OVERHEAD
        if self.kept + cost > MAX_KEPT_PER_TEST:
            return False
        self.kept += cost
        return True

    def outcome(self, failure: Failure | None, duration: float) -> RunOutcome:
        """The outcome so far; with no *failure*, error messages make one of kind ``"error"``.

        Dropped warnings are announced by one more warning, so they are not
        lost silently.
        """
        if failure is None and (self.errors or self.dropped_errors):
            detail = "\n".join(self.errors)
            if self.dropped_errors:
                detail += "\n" + truncation_mark(self.dropped_errors, "error messages")
            failure = Failure("error", "the worker could not run this item", detail, duration)
        warnings = self.warnings
        if self.dropped_warnings:
            path = self.nodeid.partition("::")[0]
            mark = truncation_mark(self.dropped_warnings, "warnings")
            warnings = [
                *warnings,
                WarningRecord(mark, "pytest.PytestWarning", self.nodeid, path, 1),
            ]
        return RunOutcome(
            nodeid=self.nodeid,
            reports=tuple(self.reports),
            warnings=tuple(warnings),
            failure=failure,
            duration=duration,
            coverage=tuple(self.coverage),
        )
