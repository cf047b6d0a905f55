"""A hostile ``process``-isolated test forges the worker's verdict on kernel state.

The test process shares the worker's channel to the host (it sends its own
reports and ``done``), so its code can write any line there. This module
plays that attacker: the test changes a kernel parameter (what namespaces
cannot hold, so the lane must be restored) and, right after its real
``done``, writes the clean verdict ``{"t": "settled", "reason": ""}`` that
only the worker may send. The next test in the same lane must still start
from a clean kernel and pass; the host must still restore the VM.

Before the fix the forged verdict was taken: the VM was not restored, and
the worker's real verdict, arriving next, failed the *next* test
(``WorkerProtocolError: unknown type 'settled'``). Now a verdict must carry
the key the worker sends as the run's first message (``seal``), made after
the test process was forked, so the test never holds it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gondolin.sandbox.isolation import UNSEALED
from tests.plugin.test_isolation import RESTORE_LOG, TableRun, run_table

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

FORGER = """
import gc
import pathlib

import pytest

pytestmark = pytest.mark.sandboxed
SWAPPINESS = pathlib.Path("/proc/sys/vm/swappiness")


def _process_runs():
    gc.unfreeze()  # the worker froze its objects before the fork: this is our copy
    found = [o for o in gc.get_objects() if type(o).__name__ == "ProcessRuns"]
    assert len(found) == 1, found
    return found[0]


def test_a1_forges_a_clean_verdict():
    SWAPPINESS.write_text("13")
    runs = _process_runs()
    real_send = runs._send

    def send(message):
        real_send(message)
        if message.get("t") == "done":
            real_send({"t": "settled", "reason": ""})  # the worker's word, forged

    runs._send = send


def test_a2_next_test_starts_clean():
    assert SWAPPINESS.read_text().strip() != "13"


def test_b1_forges_done_for_another_test_and_a_verdict():
    SWAPPINESS.write_text("13")
    real_send = _process_runs()._send
    real_send({"t": "done", "nodeid": "test_table.py::test_b2_next_test_starts_clean"})
    real_send({"t": "settled", "reason": ""})


def test_b2_next_test_starts_clean():
    assert SWAPPINESS.read_text().strip() != "13"


def test_c1_forges_a_seal_of_its_own():
    SWAPPINESS.write_text("13")
    _process_runs()._send({"t": "seal", "key": "chosen-by-the-test"})


def test_c2_next_test_starts_clean():
    assert SWAPPINESS.read_text().strip() != "13"
"""


@pytest.fixture(scope="module")
def forged(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> TableRun:
    root = tmp_path_factory.mktemp("forged")
    return run_table(root, gondolin_cache, FORGER, "process", one_lane=True)


def test_a_forged_clean_verdict_does_not_spare_the_restore(forged: TableRun) -> None:
    """The attack ran (its test passed) and the next test on that VM saw a clean kernel."""
    assert forged.statuses.get("test_a1_forges_a_clean_verdict") == "PASSED", forged.text
    assert forged.statuses.get("test_a2_next_test_starts_clean") == "PASSED", forged.text
    assert forged.same_vm("test_a1_forges_a_clean_verdict", "test_a2_next_test_starts_clean"), (
        forged.text
    )
    restores = [line for line in forged.text.splitlines() if RESTORE_LOG in line]
    assert restores, forged.text
    assert UNSEALED in restores[0], restores


def test_a_seal_mid_run_costs_only_the_forger(forged: TableRun) -> None:
    """The key is the run's first message, sent before the test runs: a later one is refused."""
    assert forged.statuses.get("test_c1_forges_a_seal_of_its_own") in {"FAILED", "ERROR"}
    assert "a seal that is not the run's first message" in forged.text, forged.text
    assert forged.statuses.get("test_c2_next_test_starts_clean") == "PASSED", forged.text


def test_a_forged_done_and_verdict_cost_only_the_forger(forged: TableRun) -> None:
    """A ``done`` naming the next test, then a verdict, mid-test: the forger's run fails alone."""
    assert forged.statuses.get("test_b2_next_test_starts_clean") == "PASSED", forged.text
    assert forged.statuses.get("test_b1_forges_done_for_another_test_and_a_verdict") in {
        "FAILED",
        "ERROR",
    }, forged.text
