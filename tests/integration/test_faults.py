"""Faults: a guest or host that breaks mid-run costs one test, never the session or the next run.

* a sandboxed session (one inner pytest run) whose tests panic the guest
  kernel, exhaust its memory, fill its disk, and get their QEMU killed
  from the host -- each fails naming the cause, the next test passes;
* the ``vm`` fixture's template killed or left paused: a clear, bounded
  error for that test, a working VM for the next;
* the host pytest SIGKILLed while it held the warm-snapshot lock and
  while a sandboxed test ran: the next run starts clean;
* a truncated warm snapshot in the cache: detected and rebuilt;
* QEMU itself confined (seccomp, no capabilities, only its own files).

Image-cache corruption is covered without building images in
``tests/unit/test_cache_faults.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest

from conftest import INNER_ADDOPTS
from pytest_gondolin import paths
from pytest_gondolin.errors import ExecTimeout, VMCrashed
from pytest_gondolin.fixtures import VMFactory
from pytest_gondolin.vm import reaper, warm
from pytest_gondolin.vm.identity import state_key
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.qemu import SANDBOX
from pytest_gondolin.vm.snapshot_paths import warm_snapshot_path

#: One inner session: a sandbox prepared three times (start, after the
#: panic, after the kill) under TCG on a busy 2-core host.
INNER_TIMEOUT = 600.0
PYTEST = (sys.executable, "-m", "pytest", "-p", "gondolin", "-p", "no:cacheprovider")


def _inner_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS",)}
    env.update(GONDOLIN_CACHE_DIR=str(cache), COLUMNS="120", PY_COLORS="0", PYTHONUNBUFFERED="1")
    env["PYTEST_ADDOPTS"] = INNER_ADDOPTS  # no shuffling: the tests' order is the scenario
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """The outer session's cache (resolved before pytester points HOME elsewhere)."""
    return paths.cache_dir()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pids: list[int], seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        living = [p for p in pids if _alive(p)]
        if not living:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _qemu_children(parent: int) -> list[int]:
    """QEMU processes whose parent is ``parent`` (setpriv execs QEMU in place).

    QEMU renames itself (``-name ...,process=gondolin-...``), so its argv[0]
    identifies it, not its ``comm``.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"qemu-system" in argv0:
            found.append(int(entry.name))
    return found


# --------------------------------------------------------------------------- sandboxed faults

FAULTS = """
import os
import signal
import threading
import time
from pathlib import Path

import pytest

sandboxed = pytest.mark.sandboxed


def _qemu_children():
    # QEMU renames itself (-name ...,process=gondolin-...): look at argv[0].
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                argv0 = (entry / "cmdline").read_bytes().split(b"\\0")[0]
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"qemu-system" in argv0:
                found.append(int(entry.name))
    return found


def _clean():
    assert os.uname().nodename == "gondolin"
    assert not Path("/fill").exists()
    st = os.statvfs("/")
    assert st.f_bavail * st.f_frsize > 512 << 20


@sandboxed
def test_01_first():
    _clean()


@sandboxed
def test_02_kernel_panic():
    with open("/proc/sysrq-trigger", "w") as trigger:
        trigger.write("c")
    time.sleep(120)


@sandboxed
def test_03_after_panic():
    _clean()


@sandboxed(timeout=240)
def test_04_out_of_memory():
    hog = []
    while True:
        hog.append(b"\\x01" * (8 << 20))  # written, so really resident


@sandboxed
def test_05_after_oom():
    _clean()


@sandboxed
def test_06_disk_full():
    st = os.statvfs("/")
    os.posix_fallocate(os.open("/fill", os.O_CREAT | os.O_WRONLY), 0, st.f_bfree * st.f_frsize - (8 << 20))
    with open("/more", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())


@sandboxed
def test_07_after_disk_full():
    _clean()
    Path("/written").write_bytes(b"y" * (32 << 20))


def test_08_arm_qemu_killer():
    pids = _qemu_children()
    assert pids, "no QEMU child found"
    threading.Timer(10, lambda: [os.kill(p, signal.SIGKILL) for p in pids]).start()


@sandboxed
def test_09_qemu_killed_mid_test():
    time.sleep(180)


@sandboxed
def test_10_after_kill():
    _clean()
"""

EXPECTED_FAULT_STATUSES = {
    "test_faults_inner.py::test_01_first": "PASSED",
    "test_faults_inner.py::test_02_kernel_panic": "FAILED",
    "test_faults_inner.py::test_03_after_panic": "PASSED",
    "test_faults_inner.py::test_04_out_of_memory": "FAILED",
    "test_faults_inner.py::test_05_after_oom": "PASSED",
    "test_faults_inner.py::test_06_disk_full": "FAILED",
    "test_faults_inner.py::test_07_after_disk_full": "PASSED",
    "test_faults_inner.py::test_08_arm_qemu_killer": "PASSED",
    "test_faults_inner.py::test_09_qemu_killed_mid_test": "FAILED",
    "test_faults_inner.py::test_10_after_kill": "PASSED",
}


def _section(output: str, test: str) -> str:
    """The failure section of ``test`` in pytest's output."""
    start = output.index(f"_ {test} _")
    end = output.find("\n____", start + 1)
    following = [i for i in (end, output.find("\n====", start + 1)) if i > 0]
    return output[start : min(following) if following else len(output)]


def test_guest_faults_fail_only_their_own_sandboxed_test(
    pytester: pytest.Pytester, real_cache: Path
) -> None:
    """Panic, OOM, ENOSPC and a SIGKILLed QEMU: each fails its test with the cause; the next passes."""
    pytester.makepyfile(test_faults_inner=FAULTS)
    result = subprocess.run(
        [*PYTEST, "-v", "-rA"],
        cwd=pytester.path,
        env=_inner_env(real_cache),
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
    )
    output = result.stdout + result.stderr
    # The short summary (-rA): "PASSED test_faults_inner.py::test_01_first", one per item.
    statuses = {
        line.split(" ")[1]: line.split(" ")[0]
        for line in result.stdout.splitlines()
        if line.startswith(("PASSED ", "FAILED ", "ERROR ")) and "test_faults_inner.py::" in line
    }
    assert statuses == EXPECTED_FAULT_STATUSES, output
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, output
    panic = _section(output, "test_02_kernel_panic")
    assert "the VM died" in panic, panic
    assert "Kernel panic" in panic and "sysrq" in panic.lower(), panic  # the console tail
    oom = _section(output, "test_04_out_of_memory")
    assert "SIGKILL" in oom or "MemoryError" in oom or "the VM died" in oom, oom
    full = _section(output, "test_06_disk_full")
    assert "No space left on device" in full, full
    killed = _section(output, "test_09_qemu_killed_mid_test")
    assert "the VM died" in killed or "VMCrashed" in killed, killed


# --------------------------------------------------------------------------- the vm fixture


def test_dead_template_is_replaced(vm: VM, vm_factory: VMFactory) -> None:
    """QEMU of the ``vm`` template killed mid-test: a clear error now, a new template next time."""
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    with pytest.raises(VMCrashed, match="QEMU exit"):
        vm.exec("true")
    # What the next test's ``vm`` fixture does:
    fresh = vm_factory.clean_vm(vm_factory.guest_key())
    assert fresh is not vm and fresh.alive
    assert fresh.exec("echo fresh").stdout == "fresh\n"
    assert vm.rundir is not None and not vm.rundir.exists()  # the dead one was cleaned up


def test_unresponsive_agent_is_a_bounded_clear_error(
    vm: VM, vm_factory: VMFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused guest (its agent cannot answer): exec gives up at its deadline, with a clear error.

    The VM is left paused, as a test that fails before resuming would leave
    it; the next ``vm`` user still gets a running guest.
    """
    channel = vm._channel
    assert channel is not None
    monkeypatch.setattr(channel, "_exec_grace", 2.0)  # the default 10 s grace, shortened
    vm.pause()
    started = time.monotonic()
    with pytest.raises(ExecTimeout, match="host-side deadline"):
        vm.exec("true", timeout=1)
    waited = time.monotonic() - started
    assert 2.5 < waited < 10, waited
    fresh = vm_factory.clean_vm(vm_factory.guest_key())
    assert fresh.exec("echo running", timeout=30).stdout == "running\n"


# --------------------------------------------------------------------------- killed host runs


@pytest.fixture
def private_cache(tmp_path: Path, real_cache: Path) -> Path:
    """A cache of our own that shares the real images (no rebuild) and CA (same boot payload)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "images").symlink_to(real_cache / "images")
    shutil.copytree(real_cache / "ca", cache / "ca")
    return cache


KILLED = """
import os
import time
from pathlib import Path

import pytest


@pytest.mark.sandboxed
def test_1_ready():
    assert os.uname().nodename == "gondolin"


def test_2_mark():
    Path(os.environ["MARK_FILE"]).write_text("running")


@pytest.mark.sandboxed
def test_3_sleeps():
    time.sleep(300)
"""


def _held(lock_path: Path) -> bool:
    try:
        filelock.FileLock(str(lock_path)).acquire(timeout=0).lock.release()
    except filelock.Timeout:
        return True
    return False


def _start(pytester: pytest.Pytester, cache: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*PYTEST, "-q", *args],
        cwd=pytester.path,
        env={**_inner_env(cache), "MARK_FILE": str(pytester.path / "mark")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigkilled_sandboxed_runs_leave_nothing_that_blocks_the_next(
    pytester: pytest.Pytester, private_cache: Path
) -> None:
    """SIGKILL while holding the warm-snapshot lock, then mid sandboxed test; the third run is clean."""
    pytester.makepyfile(test_killed=KILLED)
    snapshots = private_cache / "snapshots"

    # 1. Killed during the cold boot, while it holds the warm-snapshot lock.
    first = _start(pytester, private_cache)
    deadline = time.monotonic() + 120
    locks: list[Path] = []
    while time.monotonic() < deadline and not (locks and _held(locks[0])):
        locks = sorted(snapshots.glob("*.lock")) if snapshots.is_dir() else []
        time.sleep(0.05)
    assert locks and _held(locks[0]), "the first run never took the warm-snapshot lock"
    qemus = _qemu_children(first.pid)
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert _wait_dead(qemus) == []
    assert not _held(locks[0]), "the lock of a killed run is still held"

    # 2. Killed while a sandboxed test runs in the guest.
    second = _start(pytester, private_cache)
    mark = pytester.path / "mark"
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert second.poll() is None, "the second run ended early"
        assert time.monotonic() < deadline, "the second run never reached its host test"
        time.sleep(0.1)
    time.sleep(2)  # test_3_sleeps is now running in the guest
    qemus = _qemu_children(second.pid)
    assert qemus
    second.send_signal(signal.SIGKILL)
    assert second.wait(30) == -signal.SIGKILL
    assert _wait_dead(qemus) == [], "QEMU outlived the killed pytest"

    # 3. The next run: no stale lock or folder in its way, a warm start.
    started = time.monotonic()
    third = subprocess.run(
        [*PYTEST, "-v", "-k", "not sleeps"],
        cwd=pytester.path,
        env={**_inner_env(private_cache), "MARK_FILE": str(mark)},
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
    )
    assert third.returncode == 0, third.stdout + third.stderr
    assert "2 passed" in third.stdout
    assert "restored from the cached ready snapshot" in third.stdout + third.stderr
    assert time.monotonic() - started < warm.WARM_LOCK_TIMEOUT / 4
    owners = {int(d.name.split("-", 1)[0]) for d in reaper.vm_folders()}
    assert first.pid not in owners and second.pid not in owners, "a killed run's folder survived"


# --------------------------------------------------------------------------- the warm cache


def test_truncated_warm_snapshot_is_detected_and_rebuilt(
    vm_factory: VMFactory,
    private_cache: Path,
    real_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A half-written ready snapshot fails to load, is deleted, and a cold boot replaces it."""
    config = vm_factory.vm_config(vm_factory.guest_key())
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(private_cache))
    key = state_key(config)
    cached = warm_snapshot_path(key)
    cached.parent.mkdir(parents=True, exist_ok=True)
    assert cached.parent.parent == private_cache
    source = real_cache / "snapshots" / f"{key}.qcow2"
    progress: list[str] = []
    if source.exists():
        shutil.copyfile(source, cached)
    else:
        warm.launch_clean(config, name="seed", progress=progress.append).close()
    size = cached.stat().st_size
    with cached.open("r+b") as fh:
        fh.truncate(size // 2)

    caplog.set_level(logging.WARNING, logger="pytest_gondolin.vm.warm")
    rebuilt = warm.launch_clean(config, name="rebuilt", progress=progress.append)
    try:
        assert rebuilt.exec("echo ok").stdout == "ok\n"
    finally:
        rebuilt.close()
    assert "did not load" in caplog.text
    assert any("booting rebuilt cold" in m for m in progress), progress
    assert cached.stat().st_size > size // 2

    # The rebuilt file is good: the next launch restores from it without booting.
    progress.clear()
    again = warm.launch_clean(config, name="again", progress=progress.append)
    try:
        assert again.exec("echo again").stdout == "again\n"
    finally:
        again.close()
    assert any("restored from the cached ready snapshot" in m for m in progress), progress


# --------------------------------------------------------------------------- QEMU confined


def test_qemu_runs_confined(vm: VM) -> None:
    """The VM under test runs with the seccomp sandbox, no capabilities and only its own files.

    Snapshot and restore (``savevm``/``loadvm``) work under the sandbox.
    Negative control for the file check: this pytest process itself has
    files open outside the VM's folder, which the same scan reports.
    """
    assert vm.pid is not None and vm.rundir is not None
    assert vm.command[vm.command.index("-sandbox") + 1] == SANDBOX
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{vm.pid}/status").read_text().splitlines()
    )
    assert status["Seccomp"].strip() == "2"  # SECCOMP_MODE_FILTER
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"

    image_dir = vm.config.image.path.resolve()

    def strays(pid: int, allowed: tuple[Path, ...]) -> list[str]:
        out = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if not target.startswith("/") or target == "/dev/null":
                continue
            if not any(Path(target).is_relative_to(a) for a in allowed):
                out.append(target)
        return out

    allowed = (vm.rundir.resolve(), image_dir)
    assert strays(vm.pid, allowed) == []
    assert strays(os.getpid(), allowed) != []  # the scan does see foreign files
    # The image's root disk is open read-only (it is the backing file of the overlay).
    for fd in Path(f"/proc/{vm.pid}/fd").iterdir():
        with_target = os.readlink(fd) if fd.exists() else ""
        if with_target == str(vm.config.image.rootfs.resolve()):
            flags = int(
                (Path(f"/proc/{vm.pid}/fdinfo") / fd.name)
                .read_text()
                .split("flags:")[1]
                .split()[0],
                8,
            )
            assert flags & os.O_ACCMODE == os.O_RDONLY

    snap = vm.snapshot()
    vm.exec("echo changed > /etc/gondolin-confined")
    vm.restore(snap)
    assert vm.exec("cat /etc/gondolin-confined").returncode != 0


def test_qemu_events_do_not_pile_up(vm: VM) -> None:
    """QEMU's QMP events (STOP/RESUME on every restore) are not kept: a long session stays flat.

    qemu.qmp's default listener would queue and keep each of them forever
    (~1 KiB per restored test, seen in the soak's memory trend).
    """
    for _ in range(3):
        vm.restore(vm.snapshot())
    qmp = vm._qemu._qmp if vm._qemu is not None else None
    assert qmp is not None and qmp._client is not None
    events = qmp._client.events
    assert events.empty() and len(events.history) == 0
