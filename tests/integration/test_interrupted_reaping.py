"""What a killed run leaves, reaped by the next one: real processes, no VM.

* a QEMU whose pytest was killed right after the fork (before it wrote
  ``qemu.pid``) is found by its folder in its command line, and killed;
* such a QEMU does not even start: a shell between ``setpriv --pdeathsig``
  and QEMU checks that the launching process is still its parent;
* the owner of a VM folder is alive only if its pid runs a process that
  started before the folder last changed (a reused pid is not the owner);
* cache files named after their writer (``.<pid>.tmp``, ``.taken-<pid>``)
  are removed once that writer is gone, and only those.

The whole runs, killed in each phase: ``test_interrupted_runs.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gondolin import paths
from pytest_gondolin.sandbox import worker_disk
from pytest_gondolin.vm import qemu_process, reaper


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _wait_cmdline(pid: int, needle: str) -> None:
    """Wait until process ``pid`` has exec'd into a command line holding ``needle``."""
    deadline = time.monotonic() + 30
    while needle not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
        assert time.monotonic() < deadline, f"process {pid} never ran {needle!r}"
        time.sleep(0.01)


@pytest.fixture
def sleeper_naming() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_qemu_whose_owner_died_before_writing_its_pid_is_reaped(
    sleeper_naming: list[subprocess.Popen[bytes]],
) -> None:
    # As after a SIGKILL right after the fork: the folder, QEMU running in it, no qemu.pid.
    rundir = paths.runtime_dir() / f"{_dead_pid()}-0dead000"
    rundir.mkdir(mode=0o700)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", f"{rundir}/disk.qcow2"]
    )
    sleeper_naming.append(orphan)
    _wait_cmdline(orphan.pid, str(rundir))
    assert not (rundir / "qemu.pid").exists()

    assert rundir in reaper.reap_orphans()
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert not rundir.exists()


def test_a_process_that_started_after_a_folder_changed_is_not_its_owner(
    sleeper_naming: list[subprocess.Popen[bytes]],
) -> None:
    # reap_orphans keeps a folder only if its pid runs a process started before the
    # folder's ctime (which cannot be set back: the rule is checked on its own).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    sleeper_naming.append(other)
    started = reaper.process_start_time(other.pid)
    assert started is not None
    assert reaper.started_before(other.pid, started)
    assert reaper.started_before(other.pid, time.time())
    assert not reaper.started_before(other.pid, started - 10), "a reused pid counted as owner"
    assert not reaper.started_before(_dead_pid(), time.time())


def test_a_started_process_is_older_than_what_it_made() -> None:
    started = reaper.process_start_time(os.getpid())
    assert started is not None
    assert started <= time.time()
    assert reaper.started_before(os.getpid(), time.time())
    assert reaper.process_start_time(_dead_pid()) is None


def test_a_launch_whose_parent_is_gone_does_not_start() -> None:
    ran = subprocess.run(
        [*qemu_process.parent_check(os.getpid()), "echo", "ran $1"], capture_output=True, text=True
    )
    assert (ran.returncode, ran.stdout) == (0, "ran $1\n")
    # Another parent than the one named: the launching process is gone.
    orphan = subprocess.run(
        [*qemu_process.parent_check(_dead_pid()), "echo", "ran"], capture_output=True, text=True
    )
    assert (orphan.returncode, orphan.stdout) == (qemu_process.ORPHANED_EXIT, "")


@pytest.mark.parametrize(
    ("name", "pid"),
    [
        (".k.qcow2.1234.tmp", 1234),
        (".scan-x.json.1234.140376227673040.tmp", 1234),  # pid, thread ident
        (".key.3.1234.tmp", 1234),  # part number, pid
        (".k.qcow2.taken-1234", 1234),
        (".initrd-abc.77.tmp", 77),
        ("k.qcow2.1234.tmp", None),  # not hidden
        (".kept.json.tmp", None),  # no pid
        (".x.tmp", None),
        (".k.qcow2.taken-", None),
        (".k.qcow2.taken-12x", None),
        (".k.0.tmp", None),
        (".k.99999999999.tmp", None),  # past any pid
        (".k.lock", None),
        (".cassette.yaml.abcdef.tmp", None),  # mkstemp's random part
    ],
)
def test_writer_pid(name: str, pid: int | None) -> None:
    assert reaper.writer_pid(name) == pid


def test_taken_suffix_agrees_with_worker_disk() -> None:
    assert reaper.TAKEN == worker_disk.TAKEN


def test_files_of_dead_writers_are_removed_and_only_those(
    tmp_path: Path, sleeper_naming: list[subprocess.Popen[bytes]]
) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    sleeper_naming.append(live)
    dead = _dead_pid()
    cache = tmp_path / "cache"
    files = {
        f"worker-snapshots/.k.qcow2.{dead}.tmp": False,
        f"worker-snapshots/.k.qcow2.taken-{dead}": False,
        f"snapshots/.s.qcow2.{dead}.tmp": False,
        f"host-environment/images/.e.img.{dead}.140376227673040.tmp": False,
        f"worker-snapshots/.k.qcow2.taken-{live.pid}": True,  # its writer runs
        f"worker-snapshots/.k.qcow2.{os.getpid()}.tmp": True,  # this process's own
        f"worker-snapshots/k.qcow2.{dead}.tmp": True,  # not a writer's name
        f"requirements/key/pkg/.p.{dead}.tmp": True,  # deeper than any writer writes
    }
    for name in files:
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(b"half")
    outside = tmp_path / f".o.{dead}.tmp"
    outside.write_bytes(b"not the cache's")
    (cache / "worker-snapshots" / f".l.{dead}.tmp").symlink_to(outside)

    removed = reaper.remove_stale_cache_files(cache)

    assert sorted(removed) == sorted(cache / name for name, kept in files.items() if not kept)
    for name, kept in files.items():
        assert (cache / name).exists() == kept, name
    assert outside.exists(), "a symlink was followed"
    assert reaper.remove_stale_cache_files(tmp_path / "missing") == []
    assert not (tmp_path / "missing").exists()
