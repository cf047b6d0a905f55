"""A passing VM test's teardown is quiet: QEMU quitting as asked logs no error.

QEMU answers QMP ``quit`` and then closes the monitor, often with a reset;
qemu.qmp logged that as ``ERROR qemu.qmp.protocol...: Task.Reader:
ConnectionResetError`` under "Captured log teardown" of the session's last
test. A real inner session (a VM restored from the warm snapshot, then
closed at session end) at INFO, with ``-rA`` so every captured log is
shown. The filter itself, and that an unplanned hang-up still logs, are in
``tests/unit/test_qmp_hangup.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_gondolin import paths
from pytest_gondolin.image.info import image_status

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

#: One VM restore (or a cold boot after a code change) and its shutdown under TCG.
INNER_TIMEOUT = 300.0


@pytest.fixture(scope="session")
def gondolin_cache() -> Path:
    """The outer session's cache (resolved before pytester points HOME at a temp dir)."""
    return paths.cache_dir()


def test_a_planned_qemu_exit_logs_no_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, gondolin_cache: Path
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(gondolin_cache))
    if not image_status("bookworm").built:
        pytest.skip("the guest image is not built (gondolin image build)")
    pytester.makepyfile(
        """
        def test_vm(vm):
            assert vm.exec("true").returncode == 0

        def test_factory(vm_factory):
            vm = vm_factory()
            assert vm.exec("true").returncode == 0
            vm.close()  # in the test: its teardown is this test's
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "gondolin", "-rA", "--log-level=INFO", timeout=INNER_TIMEOUT
    )
    result.assert_outcomes(passed=2)
    output = result.stdout.str() + result.stderr.str()
    assert "ConnectionResetError" not in output, output
    assert not re.search(r"^(ERROR|CRITICAL)\s+qemu\.qmp", output, re.MULTILINE), output
    # The session's teardown (where the VMs stop) was shown: an error there would be too.
    assert "Captured log teardown" in output
