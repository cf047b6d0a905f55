"""Killed and interrupted runs leave nothing behind, and the next run follows the tree.

A real ``python -m pytest -p gondolin`` of a small project of sandboxed
tests gets SIGINT (Ctrl-C: its whole process group), SIGTERM or SIGKILL
(CI killing the job: pytest alone) in each phase of a sandboxed session:
while its VM is restored, while the guest collects, while a test runs,
while the collected snapshot is saved or kept, while the VM closes and the
edit-run loop gives its cached file back (``sandbox/worker_disk.py``).
Then

1. no QEMU of it runs (after a grace period: the parent-death signal, an
   orphaned xdist worker's interrupt), no lock is held (the cache folder's,
   QEMU's on a cached disk);
2. the test file is edited and the next run passes, running the edited
   test (a cached worker of another tree would not know its name);
3. after it, no VM folder is left in the runtime folder and no file named
   after a dead writer (``.taken-<pid>``, ``.<pid>.tmp``) in the cache.

A :class:`Project` has a runtime folder and collected-worker cache of its
own (the rest of the cache is the shared one, linked), so what a killed
run leaves is seen, and only its own. Runs write a DEBUG log outside the
tree; a signal is sent once the log line (or the file, or the process
exit) that starts its phase is seen, never after a fixed sleep. With
``-n 2``: ``test_interrupted_xdist.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import filelock
import pytest

from conftest import INNER_ADDOPTS, inner_env_changes
from pytest_gondolin.sandbox import collected_files

#: A whole inner run under TCG on a loaded 2-core host (a cold boot and layer builds included).
RUN_TIMEOUT = 600.0
#: A phase's log line: the run before it may build layers and boot cold.
PHASE_TIMEOUT = 300.0
#: An interrupted run closes its VMs (each ``quit``, then SIGTERM, SIGKILL after 3 s).
EXIT_TIMEOUT = 120.0
#: QEMU dies with its parent at once (parent-death signal); an orphaned xdist
#: worker is interrupted by execnet after 5 s, then closes its VMs.
QEMU_GRACE = 60.0

#: A log line: milliseconds since the run started, process (xdist workers have theirs), logger.
LOG_FORMAT = "%(relativeCreated)d|%(process)d|%(name)s|%(message)s"


#: A conftest giving each xdist worker a log file of its own (``--log-file`` opens the
#: same file in every process, each writing over the others).
WORKER_LOGS = """
    def pytest_configure(config):
        worker = getattr(config, "workerinput", {}).get("workerid")
        if worker and config.option.log_file:
            config.option.log_file = f"{config.option.log_file}.{worker}"
"""


class Run:
    """One ``python -m pytest -p gondolin`` of a :class:`Project`, in a session of its own."""

    def __init__(self, project: Project, args: tuple[str, ...]) -> None:
        self.project = project
        project.runs += 1
        self.log = project.root / f"run{project.runs}.log"
        self.output_path = project.root / f"run{project.runs}.out"
        self._output = self.output_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "gondolin",
                "-p",
                "no:cacheprovider",
                "-v",
                f"--log-file={self.log}",
                "--log-file-level=DEBUG",
                f"--log-file-format={LOG_FORMAT}",
                *args,
            ],
            cwd=project.tree,
            env=project.env,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches it and its children
        )

    def log_text(self) -> str:
        """The run's log, and its xdist workers' (``<log>.gw0``, ...: see :data:`WORKER_LOGS`)."""
        texts: list[str] = []
        for path in sorted(self.log.parent.glob(f"{self.log.name}*")):
            try:
                texts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                continue
        return "\n".join(texts)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``done`` every 5 ms until it holds; AssertionError if the run ends first or never."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the run ended ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:g} s:\n{self.output()[-3000:]}")
            time.sleep(0.005)

    def wait_for(self, pattern: str, count: int = 1) -> None:
        """Wait until the log holds ``count`` lines matching ``pattern``."""
        regex = re.compile(pattern, re.MULTILINE)
        self.wait_until(
            lambda: len(regex.findall(self.log_text())) >= count,
            f"log line {pattern!r}",
            PHASE_TIMEOUT,
        )

    def signal(self, sig: signal.Signals, *, group: bool) -> None:
        """``sig`` to pytest alone (CI killing the job's process), or its group (Ctrl-C at a terminal)."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._output.close()
        return code

    def kill_leftovers(self) -> None:
        """Cleanup after a failed test: the run's whole group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._output.close()


class Project:
    """A project of sandboxed tests with its own runtime folder and collected-worker cache."""

    def __init__(self, shared_cache: Path) -> None:
        # Short: the runtime root holds sockets (at most 107 bytes a path).
        self.root = Path(tempfile.mkdtemp(prefix="gk-"))
        self.tree = self.root / "tree"
        self.tree.mkdir()
        self.runtime_base = self.root / "run"
        self.runtime_base.mkdir(mode=0o700)
        self.cache = self.root / "cache"
        self.cache.mkdir()
        for entry in shared_cache.iterdir():
            if entry.name == "ca":
                shutil.copytree(entry, self.cache / "ca")  # its folder must be private
            elif entry.name != collected_files.collected_dir().name:
                (self.cache / entry.name).symlink_to(entry)
        self.env = {**os.environ}
        for name, value in inner_env_changes(self.cache).items():
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.env["PYTEST_ADDOPTS"] = INNER_ADDOPTS
        self.env["XDG_RUNTIME_DIR"] = str(self.runtime_base)
        self.runs = 0
        self.started: list[Run] = []

    def write(self, name: str, source: str) -> None:
        (self.tree / name).write_text(textwrap.dedent(source).lstrip())

    def start(self, *args: str) -> Run:
        run = Run(self, args)
        self.started.append(run)
        return run

    def run(self, *args: str) -> tuple[int, str]:
        """A whole run: its exit code and output."""
        run = self.start(*args)
        code = run.finish()
        return code, run.output()

    def close(self) -> None:
        for run in self.started:
            run.kill_leftovers()
        for pid in self.qemus():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what is left -----------------------------------------------------------

    @property
    def worker_cache(self) -> Path:
        return self.cache / collected_files.collected_dir().name

    def qemus(self) -> list[int]:
        """Live QEMU processes whose command line names this project's runtime folder."""
        found: list[int] = []
        needle = os.fsencode(self.runtime_base)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if b"qemu-system" in cmdline and needle in cmdline and state != "Z":
                found.append(int(entry.name))
        return found

    def vm_folders(self) -> list[Path]:
        """The VM folders (``<pid>-<id>``) under this project's runtime roots."""
        return [
            folder
            for root in self.runtime_base.glob("gondolin-*")
            for folder in root.iterdir()
            if re.fullmatch(r"\d+-[0-9a-f]+", folder.name)
        ]

    def writers_files(self) -> list[str]:
        """Files in the collected-worker cache named after their writer: taken or temporary."""
        return sorted(
            path.name
            for path in self.worker_cache.glob(".*")
            if ".taken-" in path.name or path.name.endswith(".tmp")
        )

    def cached_disks(self) -> list[Path]:
        return sorted(self.worker_cache.glob("*.qcow2"))


def assert_no_qemu_left(project: Project) -> None:
    """No QEMU of the project runs once :data:`QEMU_GRACE` has passed."""
    deadline = time.monotonic() + QEMU_GRACE
    while project.qemus():
        assert time.monotonic() < deadline, (
            f"QEMU {project.qemus()} still runs {QEMU_GRACE:g} s after its run was killed"
        )
        time.sleep(0.1)


def assert_no_lock_held(project: Project) -> None:
    """The cache folder's lock can be taken, and no cached disk is locked by a QEMU."""
    lock = filelock.FileLock(str(project.worker_cache / "worker-snapshots.lock"))
    with lock.acquire(timeout=10):
        pass
    for disk in project.cached_disks():
        # Without -U, qemu-img takes the image's shared lock: it fails while a QEMU writes it.
        info = subprocess.run(
            ["qemu-img", "info", str(disk)], capture_output=True, text=True, timeout=60
        )
        assert info.returncode == 0, f"{disk} is locked: {info.stderr}"


# -- the project -------------------------------------------------------------

#: One file's test, renamed by each edit: a worker that collected another tree cannot run it.
TEST_FILE = """
    import time

    import pytest

    @pytest.mark.sandboxed
    def {name}():
        time.sleep({sleep})
"""
OTHER_FILE = """
    import pytest

    @pytest.mark.sandboxed
    def test_other():
        pass
"""
#: A session of one test (the edit-run loop: its cached worker used in place), and of two.
ONE_TEST = ("test_x.py",)
TWO_TESTS = ("test_x.py", "test_y.py")


class Edits:
    """The project's test file, edited between runs: a new test name each time."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.count = 0
        #: The arguments of the last run that completed on the current tree (it cached its worker).
        self.cached_for: tuple[str, ...] | None = None
        project.write("test_y.py", OTHER_FILE)
        self.edit()

    def edit(self, *, sleep: int = 0) -> str:
        self.count += 1
        self.name = f"test_edit_{self.count}"
        self.project.write("test_x.py", TEST_FILE.format(name=self.name, sleep=sleep))
        self.cached_for = None
        return self.name

    def run_passes(self, args: tuple[str, ...]) -> None:
        """A complete run of ``args`` passes, running the current test (the edited one)."""
        code, out = self.project.run(*args)
        assert code == 0, out
        assert f"test_x.py::{self.name} PASSED" in out, out
        self.cached_for = args

    def ensure_cached(self, args: tuple[str, ...]) -> None:
        if self.cached_for != args:
            self.run_passes(args)


@pytest.fixture(scope="module")
def edits(gondolin_cache: Path) -> Iterator[Edits]:
    """One project for the module: each test's next run leaves the cache warm for the next test."""
    project = Project(gondolin_cache)
    try:
        yield Edits(project)
    finally:
        project.close()


@dataclass(frozen=True)
class Case:
    phase: str
    sig: signal.Signals
    #: The killed run's arguments, and the next run's.
    args: tuple[str, ...] = ONE_TEST
    next_args: tuple[str, ...] = ONE_TEST

    def __str__(self) -> str:
        return f"{self.phase}-{self.sig.name}" + (
            "-then-two" if self.next_args != self.args else ""
        )


#: Where each phase starts, in the run's log.
PHASE_LINES = {
    "restoring": r"\|sandbox1: starting QEMU",
    "copying": r"\|sandbox1: copying the project tree",
    "collecting": r"\|sandbox1: collecting in the started guest test worker",
    "running": r"\|test worker: ready -> running",
    "saving": r"savevm gondolin-worker",
}

#: SIGTERM ends pytest as SIGKILL does (it has no handler): once, not in every phase.
CASES = [
    Case("restoring", signal.SIGINT),
    # The cached file taken for the run stays: a two-test run does not take one.
    Case("restoring", signal.SIGKILL, next_args=TWO_TESTS),
    Case("copying", signal.SIGKILL),
    Case("collecting", signal.SIGINT),
    Case("collecting", signal.SIGTERM),
    Case("running", signal.SIGINT),
    Case("running", signal.SIGKILL),
    Case("saving", signal.SIGINT),
    Case("saving", signal.SIGKILL),
    Case("closing", signal.SIGINT),
    Case("closing", signal.SIGKILL),
    # A two-test session copies its collected snapshot into the cache (a temporary file).
    Case("storing", signal.SIGKILL, args=TWO_TESTS, next_args=TWO_TESTS),
]

#: How a run ends on each signal: pytest handles SIGINT (exit 2, or the signal
#: itself when it lands after pytest stopped handling it: in the terminal
#: summary); SIGTERM and SIGKILL end the process at once.
ENDINGS = {
    signal.SIGINT: {pytest.ExitCode.INTERRUPTED, -signal.SIGINT},
    signal.SIGTERM: {-signal.SIGTERM},
    signal.SIGKILL: {-signal.SIGKILL},
}


def aim(run: Run, phase: str) -> None:
    """Return once ``run`` is in ``phase``."""
    project = run.project
    if phase in PHASE_LINES:
        run.wait_for(PHASE_LINES[phase])
    elif phase == "closing":
        # The test has run; the VM closes once QEMU has quit, then gives its file back.
        run.wait_for(r"\|test worker: running -> ready")
        qemus = project.qemus()
        run.wait_until(lambda: not set(qemus) & set(project.qemus()), "QEMU's exit", EXIT_TIMEOUT)
    elif phase == "storing":
        run.wait_until(
            lambda: any(project.worker_cache.glob(".*.tmp")),
            "a temporary file in the collected-worker cache",
            PHASE_TIMEOUT,
        )
    else:
        raise AssertionError(f"unknown phase {phase!r}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_signal_leaves_nothing_behind(edits: Edits, case: Case) -> None:
    project = edits.project
    if case.phase in ("restoring", "closing"):
        edits.ensure_cached(case.args)  # the run restores (and gives back) the cached worker
    else:
        edits.edit(sleep=3600 if case.phase == "running" else 0)  # the run collects
    killed = project.start(*case.args)
    aim(killed, case.phase)
    killed.signal(case.sig, group=case.sig == signal.SIGINT)
    code = killed.finish(EXIT_TIMEOUT)
    assert code in ENDINGS[case.sig], f"exit {code}:\n{killed.output()[-3000:]}"
    assert_no_qemu_left(project)
    assert_no_lock_held(project)

    edits.edit()
    edits.run_passes(case.next_args)
    assert project.vm_folders() == [], "a VM folder outlived the next run"
    assert project.writers_files() == [], "a file of a dead writer outlived the next run"
    assert_no_qemu_left(project)
