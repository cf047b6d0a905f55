"""``pytest -n auto`` with VMs: as many xdist workers as CPUs, but no more than memory holds.

pytest-xdist picks one worker per CPU; each worker here runs its own VMs,
so on a big machine with little memory per core the guests would not fit.
:func:`cap_auto_workers` lowers xdist's number to what the host's available
memory holds: each worker may have :data:`VMS_PER_WORKER` guests at once
(a sandbox's two VMs take turns), each its guest memory plus QEMU's own
:data:`QEMU_OVERHEAD_MIB`. An explicit ``PYTEST_XDIST_AUTO_NUM_WORKERS``
is the user's choice and is kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pytest_gondolin.config import parse_memory, raw_value
from pytest_gondolin.errors import ConfigError

__all__ = ["QEMU_OVERHEAD_MIB", "VMS_PER_WORKER", "cap_auto_workers", "workers_for_memory"]

#: QEMU's own resident memory beside the guest's RAM (TCG translation cache,
#: device state): ~60-90 MiB measured here; rounded up.
QEMU_OVERHEAD_MIB = 128
#: A worker's sandboxed tests use two VMs taking turns; a ``vm`` test one.
VMS_PER_WORKER = 2


def available_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's ``MemAvailable`` in MiB, or None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def workers_for_memory(available: int, guest_mib: int) -> int:
    """How many workers' VMs fit in ``available`` MiB (at least one)."""
    return max(1, available // (VMS_PER_WORKER * (guest_mib + QEMU_OVERHEAD_MIB)))


def cap_auto_workers(config: pytest.Config, by_cpu: int) -> int:
    """xdist's ``-n auto`` count ``by_cpu``, capped by memory; says so in one line if it caps."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return by_cpu
    try:
        guest = parse_memory(*raw_value(config, "memory"))
    except ConfigError:
        return by_cpu  # pytest_configure reports the bad value
    available = available_mib()
    if available is None:
        return by_cpu
    fits = workers_for_memory(available, guest)
    if fits < by_cpu:
        print(
            f"gondolin: -n auto: {fits} workers, not {by_cpu}: {available} MiB available memory "
            f"holds {fits} x {VMS_PER_WORKER} VMs of {guest} MiB guest + {QEMU_OVERHEAD_MIB} MiB QEMU",
            file=sys.stderr,
        )
    return min(by_cpu, fits)
