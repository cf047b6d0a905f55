"""A ``-n 2`` run (pytest-xdist) killed while both workers run a sandboxed test leaves nothing behind.

Ctrl-C (SIGINT to the whole process group: the controller and both
workers) and CI killing the controller alone (SIGKILL, SIGTERM: its
workers are orphaned; execnet interrupts them 5 s after their channel
closes, and they close their VMs). Then, as in ``test_interrupted_runs.py``:
no QEMU runs (after a grace period), no lock is held, the next ``-n 2``
run passes running the edited tests, and leaves no VM folder and no file
of a dead writer.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_interrupted_runs import (
    ENDINGS,
    EXIT_TIMEOUT,
    WORKER_LOGS,
    Project,
    assert_no_lock_held,
    assert_no_qemu_left,
)

TESTS = """
    import time

    import pytest

    @pytest.mark.sandboxed
    def {name}_a():
        time.sleep({sleep})

    @pytest.mark.sandboxed
    def {name}_b():
        time.sleep({sleep})
"""
XDIST = ("-n", "2")


class Edits:
    def __init__(self, project: Project) -> None:
        self.project = project
        self.count = 0
        project.write("conftest.py", WORKER_LOGS)

    def edit(self, *, sleep: int = 0) -> str:
        self.count += 1
        self.name = f"test_edit_{self.count}"
        self.project.write("test_x.py", TESTS.format(name=self.name, sleep=sleep))
        return self.name


@pytest.fixture(scope="module")
def edits(gondolin_cache: Path) -> Iterator[Edits]:
    project = Project(gondolin_cache)
    try:
        yield Edits(project)
    finally:
        project.close()


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGINT, True), (signal.SIGKILL, False), (signal.SIGTERM, False)],
    ids=["ctrl-c", "controller-SIGKILL", "controller-SIGTERM"],
)
def test_a_signal_to_an_xdist_run_leaves_nothing_behind(
    edits: Edits, sig: signal.Signals, group: bool
) -> None:
    project = edits.project
    edits.edit(sleep=3600)
    killed = project.start(*XDIST)
    # Each worker's log says when its test runs in its guest.
    killed.wait_for(r"\|test worker: ready -> running", count=2)
    killed.signal(sig, group=group)
    code = killed.finish(EXIT_TIMEOUT)
    assert code in ENDINGS[sig], f"exit {code}:\n{killed.output()[-3000:]}"
    assert_no_qemu_left(project)
    assert_no_lock_held(project)

    name = edits.edit()
    code, out = project.run(*XDIST)
    assert code == 0, out
    for test in (f"{name}_a", f"{name}_b"):
        # xdist's line: "[gw1] [ 50%] PASSED (in guest) test_x.py::<test>"
        assert re.search(rf"^\[gw\d\] .*PASSED.* test_x\.py::{test}\s*$", out, re.M), out
    assert project.vm_folders() == [], "a VM folder outlived the next run"
    assert project.writers_files() == [], "a file of a dead writer outlived the next run"
    assert_no_qemu_left(project)
