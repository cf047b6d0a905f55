"""pytest-cov and sandboxed tests: the guest measures each run, the host merges it.

With pytest-cov measuring the host's session (``--cov``), code a sandboxed
test runs in the guest would count as never run. :class:`HostCoverage`
reads pytest-cov's settings (its live controller: ``--cov`` sources,
``--cov-branch``, ``--cov-config``) and hands them to the guest worker
(:func:`HostCoverage.worker_env`), which measures each item's run with the
same settings (:mod:`pytest_gondolin.guest.coverage`) and sends the data
back with the run's reports. :func:`parse_coverage` validates each
``coverage`` message (hostile input, bounded); :meth:`HostCoverage.merge`
writes the accepted data to a parallel data file next to pytest-cov's
(``.coverage.gondolin.<host>.<pid>.<random>``), which pytest-cov combines
with its own at the end of the session -- so the terminal, XML, HTML and
JSON reports, and ``--cov-fail-under``, count it as they count the
host's. Under pytest-xdist each worker process does the same with its own
file; the controller combines them all.

What the host accepts from the guest (the rest is dropped, with one
warning naming the first paths): files by absolute, normalized path inside
the project (the rootdir) or a ``--cov`` source folder that exist on the
host as regular files; line numbers in ``0..MAX_LINENO``, arcs in
``-MAX_LINENO..MAX_LINENO``; data of the kind the host measures (lines, or
arcs with ``--cov-branch``). A guest could still claim lines of a project
file that did not run, or add a project file that ``--cov`` would not
measure; it cannot bring in any other file of the host: under the rootdir
only Python files the project copy gave it count (not a git-ignored
``local_settings.py``), and nowhere a symlink or a file of another kind. Lines are
mapped to the host's file of that path (a test that rewrote the file in
the guest measured its own version).

A run that crashed sends no data: only that test's coverage is lost.
Without pytest-cov, none of this runs and the guest never imports
``coverage``.
"""

from __future__ import annotations

import os
import secrets
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from pytest_gondolin.guest.coverage import CONFIG_ENV, CoverageConfig
from pytest_gondolin.sandbox.json_checks import (
    JSONObject,
    bad_message,
    expect,
    expect_int,
    expect_list,
    expect_str,
)
from pytest_gondolin.sandbox.live_output import safe_host_text
from pytest_gondolin.sandbox.project_files import project_files
from pytest_gondolin.sandbox.report_checks import MAX_NODEID_CHARS

__all__ = [
    "MAX_COVERAGE_VALUES_PER_RUN",
    "MAX_LINENO",
    "CoverageMessage",
    "HostCoverage",
    "parse_coverage",
    "reportable",
    "worker_env",
]

#: pytest-cov's name in the plugin manager.
PLUGIN_NAME: Final = "_cov"
#: Largest line number accepted (coverage.py's arcs use negative ones for exits).
MAX_LINENO: Final = 10_000_000
#: Most files one coverage message may name.
MAX_FILES_PER_MESSAGE: Final = 10_000
#: Longest file path accepted (Linux's PATH_MAX).
MAX_PATH_CHARS: Final = 4096
#: Most numbers one run may send in all (~30 bytes of host memory each until
#: the run is merged): far above a real test's executed lines and arcs.
MAX_COVERAGE_VALUES_PER_RUN: Final = 2_000_000
#: Paths named in the warning about rejected data.
_WARN_PATHS: Final = 5


@dataclass(frozen=True)
class CoverageMessage:
    """One validated ``coverage`` message: line numbers (or arcs) per file, or an error."""

    nodeid: str
    arcs: bool = False
    files: tuple[tuple[str, tuple[int, ...]], ...] = ()
    error: str | None = None

    @property
    def values(self) -> int:
        """How many numbers it holds (for the per-run budget)."""
        return sum(len(numbers) for _, numbers in self.files)


def parse_coverage(msg: JSONObject) -> CoverageMessage:
    """Validate a ``coverage`` message; raise ``WorkerProtocolError`` for a malformed one."""
    nodeid = expect_str(msg.get("nodeid"), "coverage.nodeid", MAX_NODEID_CHARS)
    if "error" in msg:
        return CoverageMessage(nodeid, error=expect_str(msg["error"], "coverage.error", 4000))
    arcs = msg.get("arcs")
    if not isinstance(arcs, bool):
        raise bad_message("coverage.arcs", f"expected bool, got {type(arcs).__name__}")
    files: JSONObject = expect(msg.get("files"), dict, "coverage.files")
    if len(files) > MAX_FILES_PER_MESSAGE:
        raise bad_message("coverage.files", f"more than {MAX_FILES_PER_MESSAGE} files")
    low = -MAX_LINENO if arcs else 0
    out: list[tuple[str, tuple[int, ...]]] = []
    for path, value in files.items():
        if len(path) > MAX_PATH_CHARS:
            raise bad_message("coverage.files", f"a path longer than {MAX_PATH_CHARS} characters")
        where = f"coverage.files[{path[:200]!r}]"
        numbers = tuple(expect_int(n, where, low, MAX_LINENO) for n in expect_list(value, where))
        if arcs and len(numbers) % 2:
            raise bad_message(where, "arcs must come in pairs")
        out.append((path, numbers))
    return CoverageMessage(nodeid, arcs, tuple(out))


def _controller(config: pytest.Config) -> Any | None:
    """pytest-cov's live controller in this process, or ``None`` (not loaded, ``--no-cov``)."""
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None or getattr(plugin, "_disabled", False):
        return None
    controller = getattr(plugin, "cov_controller", None)
    if controller is None or getattr(controller, "cov", None) is None:
        return None
    return controller


#: The files coverage.py measures without a plugin: the only ones a guest may name.
PYTHON_SOURCE_SUFFIXES: Final = (".py", ".pyw")


def reportable(path: str, roots: Iterable[Path]) -> bool:
    """Whether guest data for ``path`` may reach the host's report: an absolute,
    normalized path inside one of ``roots`` naming a regular Python source file on
    the host, reached without a symlink (coverage.py's HTML report renders the text
    of what it names)."""
    return (
        os.path.isabs(path)
        and "\0" not in path
        and os.path.normpath(path) == path
        and path.endswith(PYTHON_SOURCE_SUFFIXES)
        and any(Path(path).is_relative_to(root) for root in roots)
        and os.path.isfile(path)
        and os.path.realpath(path) == path
    )


def worker_env(config: pytest.Config) -> dict[str, str]:
    """The guest worker's environment for measuring each run (empty without pytest-cov)."""
    coverage = HostCoverage.of(config)
    return {} if coverage is None else coverage.worker_env()


class HostCoverage:
    """pytest-cov's measurement in this process, extended to sandboxed tests."""

    def __init__(self, config: pytest.Config, controller: Any) -> None:
        self.config = config
        self.controller = controller
        self.topdir = Path(controller.topdir)
        cov_config = controller.cov.config
        self.branch = bool(cov_config.branch)
        self.data_file = self.topdir / cov_config.data_file
        source = controller.cov_source
        self.guest_config = CoverageConfig(
            source=None if source is None else tuple(str(s) for s in source),
            branch=controller.cov_branch,
            config_file=controller.cov_config,
        )
        plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
        self.contexts = getattr(getattr(plugin, "options", None), "cov_context", None) == "test"
        roots = [config.rootpath.resolve()]
        for folder in source or ():
            candidate = self.topdir / folder
            if candidate.is_dir():
                roots.append(candidate.resolve())
        self.roots = tuple(roots)
        self._project_root = roots[0]
        #: The files the project copy gives the guest (absolute), read on first use.
        self._given: frozenset[str] | None = None
        self._data: Any = None
        self._allowed: dict[str, bool] = {}
        self._rejected: list[str] = []
        self._warned: set[str] = set()

    @classmethod
    def of(cls, config: pytest.Config) -> HostCoverage | None:
        """The host's coverage, when pytest-cov measures this process; else ``None``."""
        controller = _controller(config)
        return None if controller is None else cls(config, controller)

    def worker_env(self) -> dict[str, str]:
        """What the guest worker's environment needs to measure each run."""
        return {CONFIG_ENV: self.guest_config.to_json()}

    # -- merging ---------------------------------------------------------------------

    def merge(self, item: pytest.Item, messages: Iterable[CoverageMessage]) -> None:
        """Add one run's guest data to this process's coverage data (see the module docstring)."""
        lines: dict[str, set[int]] = {}
        arcs: dict[str, set[tuple[int, int]]] = {}
        for msg in messages:
            if msg.error is not None:
                error = safe_host_text(msg.error)  # guest text in the host's warning
                self._warn_once(item, "error", f"the guest could not measure it: {error}")
                continue
            if msg.arcs != self.branch:
                self._warn_once(item, "kind", "the guest measured lines and arcs inconsistently")
                continue
            for path, numbers in msg.files:
                if not self._accepts(path):
                    self._rejected.append(path)
                elif msg.arcs:
                    pairs = zip(numbers[::2], numbers[1::2], strict=True)
                    arcs.setdefault(path, set()).update(pairs)
                else:
                    lines.setdefault(path, set()).update(numbers)
        if self._rejected and "paths" not in self._warned:
            shown = ", ".join(repr(p[:300]) for p in self._rejected[:_WARN_PATHS])
            self._warn_once(
                item,
                "paths",
                f"data for files outside the project or missing on the host was dropped: {shown}",
            )
        if lines or arcs:
            data = self._target()
            if self.contexts:
                data.set_context(f"{item.nodeid}|run")
            if arcs:
                data.add_arcs(arcs)
            if lines:
                data.add_lines(lines)

    def _accepts(self, path: str) -> bool:
        allowed = self._allowed.get(path)
        if allowed is None:
            allowed = reportable(path, self.roots) and self._was_given(path)
            if len(self._allowed) < 100_000:
                self._allowed[path] = allowed
        return allowed

    def _was_given(self, path: str) -> bool:
        """Under the rootdir, only a file the project copy gave the guest: not one it
        withholds (git-ignored, a virtualenv, ``.git``), which the guest never saw."""
        if not Path(path).is_relative_to(self._project_root):
            return True  # a --cov source folder outside the project
        if self._given is None:
            root = self._project_root
            self._given = frozenset(str(root / rel) for rel in project_files(root))
        return path in self._given

    def _target(self) -> Any:
        """The parallel data file pytest-cov combines at the end (created on first use)."""
        if self._data is None:
            from coverage import CoverageData  # pytest-cov is loaded: so is coverage

            suffix = f"gondolin.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
            self._data = CoverageData(basename=str(self.data_file), suffix=suffix)
        return self._data

    def _warn_once(self, item: pytest.Item, key: str, text: str) -> None:
        """One warning per kind of problem and session, in pytest's warnings summary."""
        if key in self._warned:
            return
        self._warned.add(key)
        message = f"pytest-gondolin: coverage of sandboxed tests: {text}"
        if key == "error":
            message += (
                "; their lines count as not run. The guest needs coverage importable: "
                "carry the host's environment (gondolin_host_environment = true) "
                "or add coverage to gondolin_requirements"
            )
        category = pytest.PytestWarning
        record = warnings.WarningMessage(
            category(message), category, str(item.path), (item.location[1] or 0) + 1
        )
        item.config.hook.pytest_warning_recorded.call_historic(
            kwargs={
                "warning_message": record,
                "when": "runtest",
                "nodeid": item.nodeid,
                "location": None,
            }
        )
