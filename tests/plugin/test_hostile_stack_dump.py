"""A hostile guest stops reading its channel, then hangs past the test's timeout.

At the timeout the host asks the guest for the worker's stack dump (a
``kill -USR1`` run through the agent). Test code is root in the guest and
can stop the agent's reader (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` on
PID 1, as in ``test_hostile_stops_reading.py``), so that request is never
taken. Before the fix the host waited a fixed 10 s for it, then another
2 s for a dump that was never asked for, whatever the test's ``timeout``:
a test of ``timeout=3`` held the session ~15 s. Now the request gets no
longer than the test's own timeout, nothing more is waited for when it was
not taken, and the failure says the guest did not take it. The next test,
in a restored VM, passes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_gondolin.sandbox.transports import INTERRUPT_TIMEOUT
from tests.plugin.test_isolation import TableRun, run_table

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

#: The hostile test's own timeout; far below ``INTERRUPT_TIMEOUT``.
TEST_TIMEOUT = 3

HANGER = f"""
import ctypes
import time

import pytest

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207


@pytest.mark.sandboxed
def test_warm():
    pass


def test_clock_before():
    print(f"HOST-CLOCK before {{time.monotonic():.3f}}")


@pytest.mark.sandboxed(timeout={TEST_TIMEOUT})
def test_hangs_deaf():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    # Stop the agent's main thread (the port's only reader); its pumps go on.
    assert libc.ptrace(PTRACE_SEIZE, 1, None, None) == 0, ctypes.get_errno()
    assert libc.ptrace(PTRACE_INTERRUPT, 1, None, None) == 0, ctypes.get_errno()
    print("HANGER: agent reader stopped", flush=True)
    time.sleep(3600)


def test_clock_after():
    print(f"HOST-CLOCK after {{time.monotonic():.3f}}")


@pytest.mark.sandboxed
def test_after():
    pass
"""

#: The host's clock, printed by plain tests run right before and after the hostile one
#: (a report's duration says the timeout, not what the host spent after it).
_CLOCK = re.compile(r"^HOST-CLOCK (?P<when>before|after) (?P<secs>[\d.]+)$", re.M)


@pytest.fixture(scope="module")
def hanger(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> TableRun:
    root = tmp_path_factory.mktemp("hangs-deaf")
    return run_table(root, gondolin_cache, HANGER, "vm")


def test_a_deaf_guest_costs_no_more_than_the_test_s_timeout_after_it(hanger: TableRun) -> None:
    text = hanger.text
    assert hanger.statuses.get("test_hangs_deaf") == "FAILED", text
    assert f"Timeout > {TEST_TIMEOUT}s" in text, text
    assert "the guest did not take the request for a stack dump" in text, text
    clock = {m["when"]: float(m["secs"]) for m in _CLOCK.finditer(text)}
    assert set(clock) == {"before", "after"}, text
    print(f"the hostile test held the session {clock['after'] - clock['before']:.1f} s")
    # Generous for a loaded host (measured ~6 s), yet below what the fixed 10 s
    # wait alone cost before (measured ~15 s).
    assert clock["after"] - clock["before"] < TEST_TIMEOUT + INTERRUPT_TIMEOUT, text


def test_the_next_test_runs_in_a_guest_that_reads(hanger: TableRun) -> None:
    assert hanger.statuses.get("test_after") == "PASSED", hanger.text
