"""Nothing outlives pytest: killed runs, Ctrl-C, the reaper, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_gondolin import paths

KILL_SELF = """
import os, signal, time
from pathlib import Path

def test_killed(vm_factory):
    vm = vm_factory()
    Path("qemu.pid").write_text(f"{vm.pid} {vm.rundir}")
    os.kill(os.getpid(), signal.SIGKILL)
"""

INTERRUPTED = """
import time
from pathlib import Path

def test_interrupted(vm_factory):
    vm = vm_factory()
    Path("qemu.pid").write_text(f"{vm.pid} {vm.rundir}")
    time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _wait_for(path: Path, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_sigkilled_pytest_leaves_no_qemu(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(KILL_SELF)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "gondolin", "-q"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.wait(timeout=180) == -signal.SIGKILL
    pid_text, rundir = (pytester.path / "qemu.pid").read_text().split()
    assert _wait_dead(int(pid_text)), (
        "QEMU outlived the killed pytest (parent-death signal missing?)"
    )
    # The next run's reaper removes what the killed run left behind.
    from pytest_gondolin.vm.reaper import reap_orphans

    reap_orphans()
    assert not Path(rundir).exists()


def test_ctrl_c_closes_vms_cleanly(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(INTERRUPTED)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "gondolin", "-q"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pid_text, rundir = _wait_for(pytester.path / "qemu.pid").split()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out
    assert _wait_dead(int(pid_text), 5)
    assert not Path(rundir).exists(), "the interrupted run left its runtime folder"


def test_reaper_kills_only_orphans_of_dead_owners(tmp_path: Path) -> None:
    # A fake orphan: a folder owned by a dead pid with a process whose command line names it.
    dead = subprocess.Popen(["true"])
    dead.wait()
    rundir = paths.runtime_dir() / f"{dead.pid}-deadbeef"
    rundir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(rundir)])
    (rundir / "qemu.pid").write_text(f"{sleeper.pid}\n")
    # The reaper checks the command line; wait until the child has exec'd Python.
    deadline = time.monotonic() + 10
    while str(rundir) not in Path(f"/proc/{sleeper.pid}/cmdline").read_bytes().decode(
        errors="replace"
    ):
        assert time.monotonic() < deadline, "the fake orphan never started"
        time.sleep(0.02)
    mine = paths.runtime_dir() / f"{os.getpid()}-cafe0000"
    mine.mkdir()
    try:
        from pytest_gondolin.vm.reaper import reap_orphans

        removed = reap_orphans()
        assert rundir in removed and not rundir.exists()
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert mine.exists(), "a live owner's folder was reaped"
    finally:
        sleeper.kill()
        mine.rmdir()


def test_cli_image_list_and_exec() -> None:
    gondolin = [sys.executable, "-m", "pytest_gondolin.cli"]
    listing = subprocess.run(
        [*gondolin, "image", "list"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0
    assert "bookworm-" in listing.stdout and "kernel 6.1" in listing.stdout
    run = subprocess.run(
        [*gondolin, "exec", "--", "sh", "-c", "uname -n; exit 7"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 7, run.stderr
    assert run.stdout == "gondolin\n"
    bad = subprocess.run([*gondolin, "exec"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "give a command" in bad.stderr
