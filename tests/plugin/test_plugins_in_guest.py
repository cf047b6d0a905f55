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


# --------------------------------------------------------------------------
# plugins the host autoloaded load in the guest (sandbox/guest_plugins.py)
# --------------------------------------------------------------------------

#: The test project's ini: the host's environment carried into the guest (where
#: the plugins come from), pytest-asyncio configured as a user would.
PLUGINS_INI = """
[pytest]
gondolin_host_environment = true
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
"""

ASYNC_AND_MOCK = """
import asyncio
import os

import pytest

@pytest.mark.sandboxed
@pytest.mark.asyncio
async def test_async_in_guest():
    await asyncio.sleep(0.01)
    assert os.environ["GONDOLIN_GUEST"] == "1"

@pytest.mark.asyncio
async def test_async_on_host():
    await asyncio.sleep(0.01)
    assert "GONDOLIN_GUEST" not in os.environ

@pytest.mark.sandboxed
def test_mocker_in_guest(mocker):
    mocker.patch("os.getcwd", return_value="/mocked")
    assert os.getcwd() == "/mocked"

from hypothesis import given, settings, strategies as st

@pytest.mark.sandboxed
@settings(max_examples=25, deadline=None)
@given(st.integers())
def test_hypothesis_in_guest(n):
    assert isinstance(n, int) and os.environ["GONDOLIN_GUEST"] == "1"
"""


def run_inner(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "gondolin", "-v", *args, timeout=INNER_TIMEOUT)


@pytest.fixture
def plugin_project(inner_autoload: pytest.Pytester) -> pytest.Pytester:
    inner_autoload.makeini(PLUGINS_INI)
    inner_autoload.makepyfile(test_plugins=ASYNC_AND_MOCK)
    return inner_autoload


@pytest.fixture
def inner_autoload(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """``inner`` with plugins autoloaded on the host (the guest worker never autoloads)."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")
    return inner


def test_autoloaded_plugins_load_in_the_guest(plugin_project: pytest.Pytester) -> None:
    # pytest-asyncio and pytest-mock, autoloaded on the host, run the sandboxed
    # tests in the guest as on the host.
    result = run_inner(plugin_project, "-rA")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_async_in_guest PASSED (in guest)*"])
    result.stdout.fnmatch_lines(["*test_mocker_in_guest PASSED (in guest)*"])
    result.stdout.fnmatch_lines(["*test_hypothesis_in_guest PASSED (in guest)*"])


def test_a_plugin_off_on_the_host_stays_off_in_the_guest(plugin_project: pytest.Pytester) -> None:
    # Negative control: with pytest-asyncio off on the host, the async test fails in the
    # guest exactly as the host-side one does (pytest has no native async support).
    result = run_inner(
        plugin_project, "-p", "no:asyncio", "-W", "ignore::pytest.PytestConfigWarning"
    )
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    assert re.search(r"test_async_in_guest FAILED \(in guest\)", out), out
    assert out.count("async def functions are not natively supported") >= 2, out
