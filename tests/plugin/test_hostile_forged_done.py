"""A hostile sandboxed test ends its own run early to vanish from the host's reports.

The test's code finds the worker's channel (``gc``) and writes ``done`` for
its own node id while it runs: the host has its setup report only. Then it
fails. Before the fix the host took that as a whole run: the test vanished
from the terminal, from junitxml and from the exit code (``1 passed`` for two
tests, exit 0), so a guest could hide a failure -- or a host verdict on its
call, such as a cassette miss. Now a run that is not setup, call, teardown
fails that test (an error in the phase that is missing), and the next test runs as usual.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.plugin.test_isolation import TableRun, run_table

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

HIDER = """
import gc

import pytest

pytestmark = pytest.mark.sandboxed


def _channel():
    gc.unfreeze()
    found = [o for o in gc.get_objects() if type(o).__name__ == "HostPipe"]
    assert found
    return found[0]


def test_hides_its_failure(request):
    _channel().send({"t": "done", "nodeid": request.node.nodeid})
    assert False, "this failure must not vanish"


def test_after():
    pass
"""


@pytest.fixture(scope="module")
def hider(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> tuple[TableRun, Path]:
    root = tmp_path_factory.mktemp("forged-done")
    junit = root / "junit.xml"
    return run_table(root, gondolin_cache, HIDER, "vm", f"--junitxml={junit}"), junit


def test_a_run_ended_early_by_the_test_is_an_error_of_that_test(
    hider: tuple[TableRun, Path],
) -> None:
    run, junit = hider
    assert run.statuses.get("test_hides_its_failure") == "FAILED", run.text
    assert "the worker's reports are not one run of this test" in run.text, run.text
    assert "no call report" in run.text, run.text
    assert "1 failed, 1 passed" in run.text, run.text
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    case = cases["test_hides_its_failure"]
    assert case.find("error") is not None or case.find("failure") is not None, ET.tostring(case)


def test_negative_control_the_next_test_passes(hider: tuple[TableRun, Path]) -> None:
    run, _ = hider
    assert run.statuses.get("test_after") == "PASSED", run.text
