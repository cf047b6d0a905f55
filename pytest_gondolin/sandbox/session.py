"""The sandboxed-test feature for one pytest session: one plugin object owns its state.

:class:`SandboxSession` is registered by ``plugin.pytest_configure`` under
:data:`PLUGIN_NAME` (pytest-xdist's ``DSession`` pattern). It owns, for the
whole session:

* the validated options of every sandboxed item, built once at collection
  (:func:`~.options.sandbox_options`);
* the prepared guest workers, one per guest key (:class:`~.guest_worker.GuestWorker`);
* the guest keys whose worker could not be prepared, with the failure every
  later item of that key reports without paying for another boot;
* the collection errors already reported, so a re-prepared worker does not
  repeat them.

Its ``pytest_runtest_protocol`` runs a sandboxed item in its guest and
replays the outcome (:mod:`.replay`); other items are left to pytest.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import pytest

from pytest_gondolin.config import Settings
from pytest_gondolin.errors import (
    AgentError,
    ConfigError,
    ExecError,
    GondolinError,
    WorkerProtocolError,
)
from pytest_gondolin.fixtures import ACTIVE_VM_KEY, GuestKey, get_factory
from pytest_gondolin.image.recipe import load_recipe
from pytest_gondolin.sandbox.coverage import HostCoverage
from pytest_gondolin.sandbox.debugger import debugger_notice
from pytest_gondolin.sandbox.guest_worker import GuestWorker
from pytest_gondolin.sandbox.options import SandboxOptions, sandbox_options
from pytest_gondolin.sandbox.outcome import Failure, RunOutcome
from pytest_gondolin.sandbox.replay import (
    IN_GUEST,
    WorkerFailureRepr,
    replay_collect_errors,
    replay_item,
)
from pytest_gondolin.sandbox.rerun_plugin import Reruns, mark_attempt, plugin_reruns

__all__ = ["MARKER", "PLUGIN_NAME", "SandboxSession"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "gondolin-sandbox"
MARKER = "sandboxed"

#: Preparation errors the guest's side caused: its test worker (a start-up or
#: collection failure of the guest's pytest, a bad line), its agent, a command
#: run there. The rest (QEMU, the image, the host's pip) happened on the host.
GUEST_SIDE_ERRORS = (AgentError, WorkerProtocolError, ExecError)


def _preparation_failure(exc: Exception) -> Failure:
    """What every item of a guest key whose worker could not be prepared reports.

    Headed ``in the guest:`` when the guest's side failed; a traceback as the
    detail for what is not a :class:`GondolinError` (a bug, a broken host).
    """
    failure = Failure.from_exception(exc)
    if not isinstance(exc, GondolinError):
        return Failure(failure.kind, failure.headline, "".join(traceback.format_exception(exc)))
    if isinstance(exc, GUEST_SIDE_ERRORS):
        return Failure(failure.kind, f"{IN_GUEST} {failure.headline}", failure.detail)
    return failure


class SandboxSession:
    """Runs ``@pytest.mark.sandboxed`` items in guest workers; the owner of their state."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        #: node id -> its options, or why its marker is invalid (built at collection).
        self.options: dict[str, SandboxOptions | str] = {}
        #: The prepared worker of each guest key.
        self.workers: dict[GuestKey, GuestWorker] = {}
        #: Guest keys whose worker could not be prepared, and why.
        self.broken: dict[GuestKey, Failure] = {}
        #: Collection errors of the guest workers already reported (see replay_collect_errors).
        self.seen_collect_errors: set[str] = set()
        #: Image names checked at collection, and why each is bad (None: it is fine).
        self.image_errors: dict[str, str | None] = {}
        #: pytest-cov's measurement, extended to the guest (None: not measured; read once).
        self.coverage: HostCoverage | None = None
        self._coverage_read = False

    # -- collection ----------------------------------------------------------------

    # trylast: after conftests and plugins, which may add the marker in this
    # very hook (a root conftest marking a whole suite ``sandboxed``).
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Validate every sandboxed item's markers and image now, so a bad argument is named
        before anything boots: as a collection error, once per reason (:meth:`_collect_errors`)."""
        sandboxed = 0
        for item in items:
            if item.get_closest_marker(MARKER) is not None:
                self._options_for(item)
                sandboxed += 1
        self._collect_errors(items)
        notice = debugger_notice(self.config, sandboxed)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if notice is not None and reporter is not None:
            reporter.write_line(f"pytest-gondolin: {notice}", yellow=True, bold=True)

    def _collect_errors(self, items: list[pytest.Item]) -> None:
        """Take the items with a bad ``sandboxed`` marker or image out of ``items`` and
        report each reason once, as a collection error (pytest then stops before running
        anything, unless ``--continue-on-collection-errors``)."""
        bad: dict[str, list[pytest.Item]] = {}
        for item in items:
            options = self.options.get(item.nodeid)
            if isinstance(options, SandboxOptions):
                reason = self._image_error(options.guest.image)
            else:
                reason = options
            if reason is not None:
                bad.setdefault(reason, []).append(item)
        if not bad:
            return
        failing = {id(item) for group in bad.values() for item in group}
        items[:] = [item for item in items if id(item) not in failing]
        for reason, group in bad.items():
            first = group[0]
            # The short summary line is "ERROR <nodeid> - <headline>", cut to the
            # terminal's width: no node id twice, the list of choices below.
            headline = reason.removeprefix(f"{first.nodeid}: ").partition("; ")[0]
            detail = reason if headline != reason else ""
            if len(group) > 1:
                names = ", ".join(item.nodeid for item in group[:10])
                more = f" and {len(group) - 10} more" if len(group) > 10 else ""
                detail += f"\n{len(group)} sandboxed tests use it: {names}{more}"
            longrepr = WorkerFailureRepr(
                str(first.path), (first.location[1] or 0) + 1, headline, detail.strip()
            )
            report = pytest.CollectReport(first.nodeid, "failed", longrepr, [])
            self.config.hook.pytest_collectreport(report=report)

    def _image_error(self, image: str) -> str | None:
        """Why ``image`` names no image (a built-in recipe, a recipe folder or a prebuilt
        image's folder), or ``None``; checked once per name, nothing is built."""
        if image not in self.image_errors:
            error: str | None = None
            if not (Path(image) / "manifest.json").is_file():
                try:
                    load_recipe(image)
                except GondolinError as exc:
                    error = str(exc)
            self.image_errors[image] = error
        return self.image_errors[image]

    def _options_for(self, item: pytest.Item) -> SandboxOptions | str:
        """The item's options, built once (or why its marker is invalid)."""
        options = self.options.get(item.nodeid)
        if options is None:
            try:
                options = sandbox_options(item, self.settings)
            except ConfigError as exc:
                options = str(exc)
            self.options[item.nodeid] = options
        return options

    # -- running ---------------------------------------------------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item) -> bool | None:
        """Arm no pytest-timeout timer around a sandboxed item's host-side protocol.

        It would count the guest worker's start-up and, firing, escape the
        protocol as an INTERNALERROR; the item's pytest-timeout value bounds
        its run in the guest instead (:mod:`.timeout_plugin`). ``True`` ends
        pytest-timeout's ``firstresult`` hook before its own implementation.
        """
        return True if item.get_closest_marker(MARKER) is not None else None

    @pytest.hookimpl(optionalhook=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        """Nothing to cancel for a sandboxed item (no timer was armed)."""
        return True if item.get_closest_marker(MARKER) is not None else None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        """Run sandboxed items in a guest and replay their reports; leave the rest to pytest."""
        if item.get_closest_marker(MARKER) is None:
            return None
        self.run_item(item)
        return True

    def run_item(self, item: pytest.Item) -> None:
        """Run ``item`` in its guest worker and replay the outcome; failures become reports."""
        # Built at collection; a marker added later (a plugin's runtest hook) is read now.
        options = self._options_for(item)
        if isinstance(options, str):
            replay_item(item, Failure("error", options))
            return
        try:
            reruns = plugin_reruns(item)
        except ConfigError as exc:
            replay_item(item, Failure("error", str(exc)))
            return
        attempt = 0
        while self._run_attempt(item, options, reruns, attempt):
            # pytest-rerunfailures' rerun: a new run, from a fresh restore.
            attempt += 1
            assert reruns is not None
            time.sleep(reruns.delay_before(attempt))

    def _run_attempt(
        self, item: pytest.Item, options: SandboxOptions, reruns: Reruns | None, attempt: int
    ) -> bool:
        """Run ``item`` once and replay the outcome; ``True`` when pytest-rerunfailures
        would rerun it (its reports of this attempt were marked ``rerun``)."""
        rerun = False

        def mark(reports: Sequence[pytest.TestReport]) -> None:
            nonlocal rerun
            if reruns is not None:
                rerun = mark_attempt(item, reports, attempt, reruns)

        started = time.monotonic()
        worker = self._worker_for(item.session, options.guest)
        # The worker's preparation, when this item is the first of its guest (--durations).
        startup = time.monotonic() - started
        if isinstance(worker, Failure):
            replay_item(item, worker, adjust=mark)
            return rerun
        outcome = worker.run(item.nodeid, options)
        if isinstance(outcome, RunOutcome) and outcome.coverage:
            coverage = self._host_coverage()
            if coverage is not None:
                coverage.merge(item, outcome.coverage)
        if worker.vm is not None:
            # What diagnostics saves as the failure's artifacts (like the vm fixture's VM).
            item.stash[ACTIVE_VM_KEY] = worker.vm
        replay_item(item, outcome, startup=startup, adjust=mark)
        return rerun

    def _host_coverage(self) -> HostCoverage | None:
        """pytest-cov's measurement of this process, read on first use (its
        controller starts at session start under xdist)."""
        if not self._coverage_read:
            self._coverage_read = True
            self.coverage = HostCoverage.of(self.config)
        return self.coverage

    def _worker_for(self, session: pytest.Session, key: GuestKey) -> GuestWorker | Failure:
        """The prepared worker for ``key``: the live one, a new one, or why there is none."""
        if key in self.broken:
            return self.broken[key]
        worker = self.workers.get(key)
        if worker is not None and worker.alive:
            return worker
        worker = GuestWorker(get_factory(self.config), self.config, key, self._files(session, key))
        try:
            collected = worker.prepare()
        except Exception as exc:  # a bug or a broken host must fail these tests, not the session
            worker.close()
            # Later items would fail the same way: don't pay a boot for each of them.
            failure = _preparation_failure(exc)
            self.broken[key] = failure
            return failure
        self.workers[key] = worker
        replay_collect_errors(self.config, collected, self.seen_collect_errors)
        return worker

    def _files(self, session: pytest.Session, key: GuestKey) -> list[str]:
        """Every file holding a selected sandboxed item for ``key``: one worker serves them all."""
        paths: list[str] = []
        for item in session.items:
            options = self.options.get(item.nodeid)
            if isinstance(options, SandboxOptions) and options.guest == key:
                path = str(item.path)
                if path not in paths:
                    paths.append(path)
        return paths

    # -- the end ---------------------------------------------------------------------

    def pytest_unconfigure(self) -> None:
        """Close every worker's lanes (their VMs also close with the factory)."""
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            try:
                worker.close()
            except Exception:  # one worker's close must not keep the others up
                log.exception("closing the guest worker for %s failed", worker.key)
