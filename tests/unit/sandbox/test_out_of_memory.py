"""``out_of_memory``: a crashed run's failure names memory only when the guest's kernel says so."""

from __future__ import annotations

import pytest

from pytest_gondolin.sandbox.outcome import Failure, out_of_memory

CRASH = Failure("crash", "worker crashed (killed by SIGKILL)", "stderr tail", 1.5)
VMSTAT = "nr_free_pages 1234\noom_kill {}\nnuma_pte_updates 0\n"


def test_an_oom_kill_is_named_with_the_memory_and_the_option() -> None:
    failure = out_of_memory(CRASH, VMSTAT.format(1), 256)
    assert failure.kind == "crash"
    assert failure.headline == "worker crashed (killed by SIGKILL): out of memory"
    assert failure.detail.startswith("the guest ran out of memory (256 MiB;")
    assert "--gondolin-memory" in failure.detail and failure.detail.endswith("\nstderr tail")
    assert failure.duration == 1.5


@pytest.mark.parametrize(
    "vmstat",
    [
        VMSTAT.format(0),  # control: the kernel killed nothing
        "",
        "oom_kill\n",
        "oom_kill -1\n",
        "oom_kill 1x\n",
        "xoom_kill 3\n",
        "oom_kill " + "9" * 40 + "\n",  # not a counter the kernel writes
        "\x00" * 10_000,
    ],
)
def test_no_oom_kill_leaves_the_failure_as_it_was(vmstat: str) -> None:
    assert out_of_memory(CRASH, vmstat, 256) is CRASH


def test_other_failures_are_left_alone() -> None:
    timeout = Failure("timeout", "Timeout > 5s")
    assert out_of_memory(timeout, VMSTAT.format(2), 256) is timeout
