"""QEMU's process is started without transparent huge pages; this process keeps its own setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gondolin.vm.no_huge_pages import (
    PR_GET_THP_DISABLE,
    _prctl,
    children_without_huge_pages,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _thp_enabled(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("THP_enabled:"):
            return line.split()[1]
    pytest.skip("this kernel does not say THP_enabled in /proc/PID/status")


def test_a_child_spawned_inside_has_them_off_and_this_process_keeps_them() -> None:
    before = _thp_enabled(os.getpid())
    with children_without_huge_pages():
        inside = subprocess.Popen(["sleep", "30"])
    outside = subprocess.Popen(["sleep", "30"])
    try:
        assert _thp_enabled(inside.pid) == "0"
        assert _thp_enabled(outside.pid) == before
        assert _prctl(PR_GET_THP_DISABLE, 0) == 0
    finally:
        for child in (inside, outside):
            child.kill()
            child.wait()
