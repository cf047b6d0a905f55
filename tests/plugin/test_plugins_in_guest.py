"""Host pytest plugins and sandboxed tests: real inner pytest runs against real QEMU guests.

pytest-timeout: its ``--timeout`` option and ``timeout`` marker bound a
sandboxed test's run in the guest (the guest worker's start-up excluded) and
end as that test's failure with the guest's stack, never an INTERNALERROR.
Its plugin is loaded with ``-p timeout`` (autoload may be off).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_gondolin import paths

pytest_plugins = ("pytester",)
pytestmark = pytest.mark.integration

#: Bound on one inner session: VM restore, project copy and guest collection
#: take ~25 s under TCG on a busy 2-core host; room for a cold snapshot rebuild.
INNER_TIMEOUT = 600.0

SLOW_AND_FAST = """
import time
import pytest

@pytest.mark.sandboxed
def test_slow():
    time.sleep(30)

@pytest.mark.sandboxed
def test_fast():
    pass
"""


@pytest.fixture(scope="session")
def gondolin_cache() -> Path:
    """The outer session's cache (resolved before pytester points HOME at a temp dir)."""
    return paths.cache_dir()


@pytest.fixture
def inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, gondolin_cache: Path
) -> pytest.Pytester:
    """A pytester whose runs share the real image cache, with no outer options leaking in."""
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(gondolin_cache))
    for name in ("PYTEST_ADDOPTS", "PYTEST_TIMEOUT", "CI", "BUILD_NUMBER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PY_COLORS", "0")
    return pytester


def run_with_timeout_plugin(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "gondolin", "-p", "timeout", "-v", *args, timeout=INNER_TIMEOUT
    )


def assert_slow_timed_out_in_guest(result: pytest.RunResult, source: str, seconds: str) -> None:
    """``test_slow`` FAILED on its timeout with the guest's stack; ``test_fast`` passed."""
    sleep_line = source.strip().splitlines().index("    time.sleep(30)") + 1
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # The host's verdict ("Timeout > Ns" and the worker's faulthandler dump) or, if
    # pytest-timeout also runs in the guest and fires first, its failure there:
    # either way a timeout failure whose stack is the guest's, at the sleep.
    result.stdout.fnmatch_lines(["*_ test_slow _*", "*Timeout*"])
    result.stdout.fnmatch_lines([f"FAILED test_slow.py::test_slow - *Timeout*{seconds}*s*"])
    stack = rf'test_slow\.py(", line |:){sleep_line}\b'
    assert re.search(stack, result.stdout.str()), result.stdout.str()


def test_timeout_option_fails_only_the_hanging_sandboxed_test(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_slow=SLOW_AND_FAST)
    result = run_with_timeout_plugin(inner, "--timeout=3")
    assert_slow_timed_out_in_guest(result, SLOW_AND_FAST, "3")


def test_timeout_marker_fails_only_its_sandboxed_test(inner: pytest.Pytester) -> None:
    # The marker (2 s) wins over --timeout, and over a longer sandboxed(timeout=...):
    # the smaller bound applies. --strict-markers: the guest knows the marker too.
    source = SLOW_AND_FAST.replace(
        "@pytest.mark.sandboxed\ndef test_slow",
        "@pytest.mark.timeout(2)\n@pytest.mark.sandboxed(timeout=60)\ndef test_slow",
    )
    inner.makepyfile(test_slow=source)
    result = run_with_timeout_plugin(inner, "--timeout=600", "--strict-markers")
    assert_slow_timed_out_in_guest(result, source, "2")


def test_timeout_option_excludes_guest_start_up(inner: pytest.Pytester) -> None:
    # The guest worker's start-up and collection take seconds; only the run counts.
    inner.makepyfile(
        test_quick="""
        import pytest

        @pytest.mark.sandboxed
        def test_quick():
            pass

        def test_on_host():
            pass
        """
    )
    result = run_with_timeout_plugin(inner, "--timeout=1")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=2)
