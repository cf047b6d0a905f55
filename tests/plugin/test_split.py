"""pytest-split (the real one, from PyPI) over a suite with sandboxed tests.

One run with ``--store-durations`` records each test's duration; sandboxed
tests must record what they really took (a test that sleeps 1.5 s in the
guest is stored at 1.5 s or more, not the host's bookkeeping time; the first
one without its guest's start-up, which every group pays). Then
``--splits 2 --group 1`` and ``--group 2``, each its own session with its
own guest: together they run every test exactly once.

``-n auto`` (pytest-xdist) is capped by the host's memory and the guest
memory option, with one line saying so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pytest_gondolin.workers import QEMU_OVERHEAD_MIB, available_mib, workers_for_memory

pytest_plugins = ("pytester",)

#: Each inner run starts one guest worker (~8-10 s under TCG, more on a busy host).
INNER_TIMEOUT = 600.0
SLEEP = 1.5

PROJECT = f"""
import time

import pytest


@pytest.mark.sandboxed
def test_a_first():
    pass


@pytest.mark.sandboxed
def test_b_sleeps():
    time.sleep({SLEEP})


@pytest.mark.sandboxed
@pytest.mark.parametrize("n", range(4))
def test_c_quick(n):
    assert n < 4


def test_d_plain():
    time.sleep(0.2)
"""
ARGS = ("-p", "gondolin", "-p", "no:randomly", "-p", "no:cacheprovider", "-rA")


def _passed(result: pytest.RunResult) -> list[str]:
    return [m[1] for line in result.outlines if (m := re.match(r"PASSED (\S+)", line))]


@pytest.mark.integration
def test_split_runs_every_sandboxed_test_once_by_its_real_duration(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(test_project=PROJECT)
    durations = inner.path / ".test_durations"
    stored = inner.runpytest_subprocess(
        *ARGS, "--store-durations", f"--durations-path={durations}", timeout=INNER_TIMEOUT
    )
    stored.assert_outcomes(passed=7)
    everything = sorted(_passed(stored))
    assert len(everything) == 7

    recorded = json.loads(durations.read_text())
    assert sorted(recorded) == everything
    # What it took in the guest: the sleep and a little emulated overhead, no start-up.
    assert SLEEP <= recorded["test_project.py::test_b_sleeps"] < SLEEP + 10
    for n in range(4):  # not the first sandboxed test: no guest start-up in it
        assert recorded[f"test_project.py::test_c_quick[{n}]"] < SLEEP, recorded
    assert recorded["test_project.py::test_d_plain"] >= 0.2
    # The first sandboxed test's guest started up (seconds under TCG), but every group
    # pays its own start-up: the stored duration is only what the test took.
    assert recorded["test_project.py::test_a_first"] < SLEEP, recorded
    stored.stdout.fnmatch_lines(["*start-up*not in its stored duration (--store-durations)*"])

    groups = []
    for group in (1, 2):
        result = inner.runpytest_subprocess(
            *ARGS,
            "--splits=2",
            f"--group={group}",
            f"--durations-path={durations}",
            timeout=INNER_TIMEOUT,
        )
        assert result.ret == 0, result.stdout.str()
        result.stdout.fnmatch_lines([f"*Running group {group}/2*"])
        groups.append(_passed(result))
    assert all(groups), groups  # both groups ran something
    assert sorted(groups[0] + groups[1]) == everything  # each test exactly once


@pytest.mark.parametrize(
    ("available", "guest", "workers"),
    [
        (100, 256, 1),  # never fewer than one
        (2 * (256 + QEMU_OVERHEAD_MIB), 256, 1),
        (64 * 2 * (256 + QEMU_OVERHEAD_MIB), 256, 64),
        (5 * 2 * (4096 + QEMU_OVERHEAD_MIB) + 1, 4096, 5),
    ],
)
def test_workers_that_fit_in_memory(available: int, guest: int, workers: int) -> None:
    assert workers_for_memory(available, guest) == workers


def test_available_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemAvailable:   4194304 kB\n")
    assert available_mib(meminfo) == 4096
    meminfo.write_text("MemTotal: 1 kB\n")
    assert available_mib(meminfo) is None


def test_n_auto_is_capped_by_guest_memory(pytester: pytest.Pytester) -> None:
    """A guest as big as the host's memory: ``-n auto`` starts one worker and says why."""
    available = available_mib()
    if available is None:
        pytest.skip("no MemAvailable in /proc/meminfo")
    pytester.makepyfile(test_plain="def test_one():\n    pass\n")
    guest = f"{max(128, min(available, 64 * 1024))}M"
    result = pytester.runpytest_subprocess(
        "-p", "gondolin", "-p", "no:randomly", "-n", "auto", f"--gondolin-memory={guest}",
        timeout=120,
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    result.stderr.fnmatch_lines(["gondolin: -n auto: 1 workers, not *: * MiB available memory *"])
    result.stdout.fnmatch_lines(["*created: 1/1 worker*"])
