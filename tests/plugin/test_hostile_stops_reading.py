"""A hostile guest stops reading its channel while the host has something to send it.

The guest's agent (PID 1) reads the virtio-serial port; test code is root in
the guest, so it can stop that reader: ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``
on the agent's main thread leave the agent's output pumps running (its lines
still reach the host) while nothing reads what the host sends. The test then
asks the host many questions (``query`` lines on the worker's channel) and
reads no answer: the answers fill the host's socket, QEMU and the guest's
queues, and the host's next send blocks.

Before the fix the host sat in that one send for ``STDIN_TIMEOUT`` (30 s)
whatever the test's ``timeout``, then called it a crash ("worker connection
lost"). Now a send during a run is bounded by the run's own deadline and the
test fails as a timeout saying the guest stopped reading; the next test, in a
restored VM, passes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_gondolin.vm.agent_process import STDIN_TIMEOUT
from tests.plugin.test_isolation import TableRun, run_table

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

#: The hostile test's own timeout; far below ``STDIN_TIMEOUT``.
TEST_TIMEOUT = 6

STALLER = f"""
import ctypes
import gc
import time

import pytest

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207


def _channel():
    gc.unfreeze()
    found = [o for o in gc.get_objects() if type(o).__name__ == "HostPipe"]
    assert found
    return found[0]


@pytest.mark.sandboxed(timeout={TEST_TIMEOUT})
def test_stops_reading():
    channel = _channel()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    # Stop the agent's main thread (the port's only reader); its pumps go on.
    assert libc.ptrace(PTRACE_SEIZE, 1, None, None) == 0, ctypes.get_errno()
    assert libc.ptrace(PTRACE_INTERRUPT, 1, None, None) == 0, ctypes.get_errno()
    print("STALLER: agent reader stopped", flush=True)
    for _ in range(40000):  # ~4 MiB of answers the guest never reads
        channel.send({{"t": "query", "kind": "k" * 64, "args": {{}}}})
    time.sleep(3600)


@pytest.mark.sandboxed
def test_after():
    pass
"""

_DURATION = re.compile(r"^(?P<secs>[\d.]+)s call\s+test_table\.py::test_stops_reading", re.M)


@pytest.fixture(scope="module")
def staller(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> TableRun:
    root = tmp_path_factory.mktemp("stops-reading")
    return run_table(root, gondolin_cache, STALLER, "vm", "--durations=0", "--durations-min=0")


def test_a_guest_that_stops_reading_fails_at_the_test_s_own_timeout(staller: TableRun) -> None:
    text = staller.text
    assert staller.statuses.get("test_stops_reading") == "FAILED", text
    assert f"Timeout > {TEST_TIMEOUT}s" in text, text
    assert "the guest stopped reading" in text, text
    found = _DURATION.search(text)
    assert found is not None, text
    # Generous for a loaded host, yet below the 30 s one send could hold before.
    assert float(found["secs"]) < STDIN_TIMEOUT - 5, text


def test_the_next_test_runs_in_a_guest_that_reads(staller: TableRun) -> None:
    assert staller.statuses.get("test_after") == "PASSED", staller.text
