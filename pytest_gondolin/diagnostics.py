"""What a user sees when something needs explaining: header, guest status, artifacts, kept VMs.

:class:`Diagnostics` is a plugin object (the ``DSession`` pattern of
pytest-xdist) registered by ``plugin.pytest_configure`` under
:data:`PLUGIN_NAME`. Its hooks:

* ``pytest_report_header``: image (and build id, or "not built yet"),
  accelerator choice and reason, cache folder (and why it cannot be
  written, or may be changed by another user), warm snapshot state. It
  never writes: a project without VM tests runs whatever the cache is.
* ``pytest_report_teststatus``: reports replayed from a guest (marked by
  ``replay_item`` with :data:`~pytest_gondolin.sandbox.replay.GUEST_REPORT_ATTR`)
  read ``PASSED (in guest)`` in the ``-v`` progress lines. Only that
  displayed word changes (not the short summary, whose lines tools parse):
  outcome, nodeid and category stay, so junitxml, ``--lf`` and xdist see
  ordinary reports.
* a :class:`~pytest_gondolin.errors.CacheDirError` raised in a test (say
  by ``vm_factory()`` in its body) is reported as its message alone: it
  names the folder and ``GONDOLIN_CACHE_DIR``; a traceback into the plugin
  would add nothing to act on.
* failure artifacts: when a test that used a VM fails (the ``vm`` fixture,
  via ``pytest_runtest_makereport``; a sandboxed test, via the replayed
  ``pytest_runtest_logreport``: either way the VM the test ran in is in
  ``item.stash[ACTIVE_VM_KEY]``), the VM's console log, QEMU log and
  recorded traffic go to ``<artifacts>/<test>/`` and the report gets a
  ``gondolin: artifacts`` section naming that folder.
* ``--gondolin-keep-vm``: the ``vm`` fixture's VM of a failing test is
  detached after the test's teardown and left running for ``gondolin
  attach``; the report says how to reach it.

The terminal summary is built from the report sections it sees, so it also
works on an xdist controller, whose workers own the VMs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

import pytest_gondolin.paths as paths
from pytest_gondolin.config import Settings
from pytest_gondolin.errors import CacheDirError, GondolinError
from pytest_gondolin.fixtures import ACTIVE_VM_KEY, SETTINGS_KEY, get_factory
from pytest_gondolin.image.store import Image
from pytest_gondolin.logtail import read_tail
from pytest_gondolin.sandbox.replay import GUEST_REPORT_ATTR
from pytest_gondolin.vm.accel import AccelChoice
from pytest_gondolin.vm.kept import vm_id
from pytest_gondolin.vm.machine import VM

log = logging.getLogger(__name__)

PLUGIN_NAME = "gondolin-diagnostics"
#: Appended to the verbose status word of a report that came from a guest.
GUEST_SUFFIX = " (in guest)"
#: Each failing VM holds 256 MiB+ of RAM; a run that fails everywhere must not keep them all.
MAX_KEPT_VMS = 3
#: Log bytes copied per artifact file (the tail; console logs are small with ``quiet``).
MAX_LOG_ARTIFACT = 4 * 1024 * 1024
#: Longest per-test folder name (file systems allow 255 bytes).
MAX_DIR_NAME = 120
#: The report section that names the artifacts folder.
ARTIFACTS_SECTION = "gondolin: artifacts"
KEPT_SECTION = "gondolin: kept VM"

_KEEP = pytest.StashKey[VM]()
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_ATTACH = re.compile(r"`gondolin attach ([0-9a-f]+)`")


def header_lines(settings: Settings) -> list[str]:
    """The report header: image state, accelerator, cache. Never builds, never boots."""
    from pytest_gondolin.image.info import image_status, warm_snapshots
    from pytest_gondolin.vm.accel import choose_accel

    choice: AccelChoice | None = None
    try:
        choice = choose_accel(settings.accel)
        accel = f"accel {choice.name} ({choice.reason})"
    except GondolinError as exc:
        accel = f"accel {settings.accel}: {exc}"
    try:
        status = image_status(settings.image)
    except GondolinError as exc:
        image = f"image {settings.image!r} unusable: {exc}"
    else:
        if status.image is not None:
            warm = "no (the first VM boots cold)"
            if choice is not None and _warm_snapshot(settings, status.image, choice.name):
                warm = "yes"
            elif warm_snapshots(status.key):
                warm = "no, only for other settings or agent versions (the first VM boots cold)"
            image = f"image {status.key}, warm snapshot: {warm}"
        else:
            image = f"image {status.key} not built yet (built on first use)"
    return [f"gondolin: {image}; {cache_line()}", f"gondolin: {accel}"]


def cache_line() -> str:
    """``cache <folder>``, and what stands in the way of VMs using it, if anything. Writes nothing."""
    try:
        root = paths.cache_root()
    except GondolinError as exc:
        return f"no cache folder: {exc}"
    line = f"cache {root}"
    problem = paths.cache_write_problem(root)
    if problem is not None and root.is_dir():
        line += f" ({problem}: VMs use what is in it and save nothing there)"
    elif problem is not None:
        line += (
            f" {problem}: tests that need a VM will fail; "
            "set GONDOLIN_CACHE_DIR to a folder this user can write"
        )
    trust = paths.cache_trust_problem(root)
    if trust is not None:
        line += f" (it {trust}: others may replace its images and CA key)"
    return line


def _warm_snapshot(settings: Settings, image: Image, accel: str) -> bool:
    """Whether the ``vm`` fixture / sandboxes would restore a cached ready snapshot (not boot)."""
    from pytest_gondolin.vm.identity import VMConfig, state_key
    from pytest_gondolin.vm.snapshot_paths import warm_snapshot_path

    # Mirrors VMFactory.vm_config for the session's default guest.
    config = VMConfig(
        image=image,
        accel=accel,
        memory_mib=settings.memory_mib,
        cpus=settings.cpus,
        boot_timeout=settings.boot_timeout,
    )
    try:
        key = state_key(config)
    except Exception as exc:  # the header is informational: it must never break a run
        log.debug("no state key for the header: %s", exc)
        return False
    return warm_snapshot_path(key).is_file()


def artifacts_root(config: pytest.Config, settings: Settings) -> Path:
    """``--gondolin-artifacts`` (relative to the invocation folder), else ``<basetemp>/gondolin-artifacts``."""
    if settings.artifacts:
        return config.invocation_params.dir / settings.artifacts
    factory = getattr(config, "_tmp_path_factory", None)  # pytest's tmp_path plugin
    if factory is not None:
        return Path(factory.getbasetemp()) / "gondolin-artifacts"
    return Path(tempfile.gettempdir()) / f"gondolin-artifacts-{os.getpid()}"


def artifact_dir_name(nodeid: str) -> str:
    """A file-name-safe, readable, collision-resistant folder name for ``nodeid``."""
    name = _UNSAFE.sub("_", nodeid).strip("._") or "test"
    # Sanitizing maps "a b" and "a_b" alike: the digest keeps the folders apart.
    digest = hashlib.sha256(nodeid.encode()).hexdigest()[:8]
    return f"{name[: MAX_DIR_NAME - 9]}-{digest}"


def write_artifacts(vm: VM, target: Path, *, nodeid: str) -> list[str]:
    """Write the VM's console log, QEMU log, traffic and a description into ``target``.

    Returns the names written. Raises OSError only if ``target`` cannot be created.
    """
    target.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if vm.rundir is not None:
        for name in ("console.log", "qemu.log"):
            data = read_tail(vm.rundir / name, MAX_LOG_ARTIFACT)
            (target / name).write_bytes(data)
            written.append(name)
    to_json = getattr(vm.http, "to_json", None)
    if callable(to_json):
        try:
            traffic = to_json()
        except (
            Exception
        ) as exc:  # the recorder is another module's; a bug there must not hide the failure
            log.warning("could not serialize the traffic of %s: %s", vm.name, exc)
        else:
            (target / "traffic.json").write_text(str(traffic))
            written.append("traffic.json")
    info: dict[str, Any] = {
        "test": nodeid,
        "vm": vm.name,
        "state": vm.state.value,
        "alive": vm.alive,
        "qemu_pid": vm.pid,
        "image": f"{vm.config.image.name}-{vm.config.image.build_id}",
        "accel": vm.config.accel,
        "memory_mib": vm.config.memory_mib,
        "cpus": vm.config.cpus,
        "boot_seconds": vm.boot_seconds,
        "rundir": str(vm.rundir) if vm.rundir else None,
        "qemu_command": vm.command,
    }
    (target / "vm.json").write_text(json.dumps(info, indent=2))
    written.append("vm.json")
    return written


class Diagnostics:
    """The diagnostics hooks, bound to one session's config."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._current: pytest.Item | None = None
        self._logging: pytest.TestReport | None = None
        self._keep_requests = 0
        #: Summary lines, in order and without repeats, from the reports' sections.
        self._summary: dict[str, None] = {}

    @property
    def settings(self) -> Settings:
        return self.config.stash[SETTINGS_KEY]

    # -- header and status -------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        return header_lines(self.settings)

    @pytest.hookimpl(wrapper=True)
    def pytest_report_teststatus(
        self, report: pytest.TestReport | pytest.CollectReport, config: pytest.Config
    ) -> Generator[None, Any, Any]:
        result = yield
        # Only while the report is logged (the -v progress line), not in the short summary.
        if report is not self._logging or not getattr(report, GUEST_REPORT_ATTR, False):
            return result
        if not result:
            return result
        category, letter, word = result
        if isinstance(word, tuple) and word and word[0]:
            word = (word[0] + GUEST_SUFFIX, *word[1:])
        elif isinstance(word, str) and word:
            word += GUEST_SUFFIX
        return category, letter, word

    # -- artifacts -----------------------------------------------------------------

    def _save(self, vm: VM, report: pytest.TestReport) -> None:
        target = artifacts_root(self.config, self.settings) / artifact_dir_name(report.nodeid)
        try:
            names = write_artifacts(vm, target, nodeid=report.nodeid)
        except OSError as exc:
            report.sections.append((ARTIFACTS_SECTION, f"could not write artifacts: {exc}"))
            return
        report.sections.append((ARTIFACTS_SECTION, f"{target}  ({', '.join(names)})"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        self._current = item
        try:
            return (yield)
        finally:
            self._current = None
            vm = item.stash.get(_KEEP, None)
            if vm is not None:
                self._keep(item, vm)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.excinfo is not None and call.excinfo.errisinstance(CacheDirError):
            # Its message is all there is to act on (which folder, which
            # variable): shown alone, as pytest.fail(pytrace=False) would.
            report.longrepr = call.excinfo.getrepr(style="value", chain=False)
        vm = item.stash.get(ACTIVE_VM_KEY, None)
        if report.failed and vm is not None:
            self._save(vm, report)
            if self.settings.keep_vm and _KEEP not in item.stash:
                self._request_keep(item, vm, report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> Generator[None, None, None]:
        item = self._current
        if (
            report.failed
            and item is not None
            and item.nodeid == report.nodeid
            and item.get_closest_marker("sandboxed") is not None
        ):
            vm = item.stash.get(ACTIVE_VM_KEY, None)  # set by the sandbox session before replay
            if vm is not None:
                self._save(vm, report)  # before any reporter sees the report
        self._note_sections(report)
        self._logging = report
        try:
            return (yield)
        finally:
            self._logging = None

    def _note_sections(self, report: pytest.TestReport) -> None:
        for title, content in report.sections:
            if title == ARTIFACTS_SECTION and not content.startswith("could not"):
                root = Path(content.split("  (", 1)[0]).parent
                self._summary[f"failure artifacts (console, QEMU log, traffic) under {root}"] = None
            elif title == KEPT_SECTION and (m := _ATTACH.search(content)):
                ident = m[1]
                self._summary[
                    f"kept VM {ident} of {report.nodeid}: `gondolin attach {ident}` for a shell, "
                    f"`gondolin kill {ident}` to stop it (the next pytest run removes it)"
                ] = None

    # -- keeping VMs -----------------------------------------------------------------

    def _request_keep(self, item: pytest.Item, vm: VM, report: pytest.TestReport) -> None:
        if not vm.alive or vm.rundir is None:
            report.sections.append((KEPT_SECTION, "not kept: the VM is not running any more"))
            return
        if vm.config.die_with_parent:
            report.sections.append((KEPT_SECTION, "not kept: the VM would die with pytest"))
            return
        if self._keep_requests >= MAX_KEPT_VMS:
            report.sections.append(
                (KEPT_SECTION, f"not kept: already keeping {MAX_KEPT_VMS} VMs in this session")
            )
            return
        self._keep_requests += 1
        item.stash[_KEEP] = vm
        # Now, not after the test: the last test's teardown closes the factory's VMs.
        get_factory(self.config).release(vm)
        ident = vm_id(vm.rundir)
        report.sections.append(
            (
                KEPT_SECTION,
                f"this VM stays up after pytest exits, as the test left it: `gondolin attach "
                f"{ident}` opens a shell in it, `gondolin kill {ident}` stops it; "
                "the next pytest run removes it",
            )
        )

    def _keep(self, item: pytest.Item, vm: VM) -> None:
        from pytest_gondolin.vm.kept import keep

        del item.stash[_KEEP]
        try:
            keep(vm, nodeid=item.nodeid)
        except GondolinError as exc:
            log.warning("could not keep the VM of %s: %s", item.nodeid, exc)
            vm.close()

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self._summary:
            return
        terminalreporter.section("gondolin")
        for line in self._summary:
            terminalreporter.write_line(line)
