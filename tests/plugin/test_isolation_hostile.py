"""``isolation="process"`` against hostile tests: each ends as its own outcome, the next is clean.

One inner session (real QEMU) in process mode: each hostile test is followed
by a check that runs after it in the same guest worker (directly, or after
the fallback restore). The hostile tests fork a daemon, fill the per-test
tmpfs, remount ``/`` read-only and unmount a tree, unshare further, ptrace
their parent, kill every process they can see, kill the worker, write a
kernel parameter and set the clock. The restore rule ``every N`` gets its
own short session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.plugin.test_isolation import RESTORE_LOG, TableRun, run_table

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

HOSTILE = '''
import ctypes
import errno
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).parent
PORT = 47124
DAEMON = (
    "import socket, time\\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\\n"
    f"s.bind(('127.0.0.1', {PORT})); s.listen()\\n"
    "time.sleep(1000)\\n"
)
pytestmark = pytest.mark.sandboxed


def _listening():
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    except OSError:
        return False
    return True


def _clean():
    """What every check asserts: its own fresh namespaces, a writable tree, nothing left."""
    assert os.getpid() == 1
    assert not _listening()
    assert not (HERE / "left-behind").exists()
    assert not pathlib.Path("/etc/left-behind").exists()
    probe = HERE / "probe"
    probe.write_text("ok")
    assert probe.read_text() == "ok"
    assert pathlib.Path("/proc/sys/vm/swappiness").read_text().strip() != "13"
    assert abs(time.time() - os.stat(__file__).st_mtime) < 86400


def test_a1_forks_a_daemon():
    subprocess.Popen(["setsid", sys.executable, "-c", DAEMON])
    deadline = time.monotonic() + 60
    while not _listening():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a2_check():
    _clean()


def test_b1_fills_the_tmpfs():
    (HERE / "left-behind").write_text("x")
    with pytest.raises(OSError) as info:
        with open("/tmp/fill", "wb") as f:
            while True:
                f.write(b"x" * (1 << 20))
    assert info.value.errno == errno.ENOSPC


def test_b2_check():
    _clean()
    with open("/tmp/after-fill", "wb") as f:
        f.write(b"x" * (8 << 20))


def test_c1_remounts_root_read_only():
    subprocess.run(["umount", "-l", "/var/tmp"], check=True)
    subprocess.run(["mount", "-o", "remount,ro", "/"], check=True)
    with pytest.raises(OSError) as info:
        pathlib.Path("/etc/left-behind").write_text("x")
    assert info.value.errno == errno.EROFS


def test_c2_check():
    _clean()
    assert os.path.ismount("/var/tmp")


def test_d1_unshares_further():
    script = f"echo x > {HERE}/left-behind; exec sleep 1000"
    subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--uts", "sh", "-c", script])
    time.sleep(1)


def test_d2_check():
    _clean()


def test_e1_ptraces_its_parent():
    libc = ctypes.CDLL(None, use_errno=True)
    assert os.getppid() == 0  # the worker is outside the test's PID namespace
    assert libc.ptrace(16, os.getppid(), None, None) == -1  # PTRACE_ATTACH


def test_e2_check():
    _clean()


def test_f1_kills_all_it_can_see():
    subprocess.Popen([sys.executable, "-c", DAEMON])
    os.kill(-1, signal.SIGKILL)  # everything in its namespace but itself


def test_f2_check():
    _clean()


def test_g1_kills_the_worker():
    os.kill(os.getppid(), signal.SIGKILL)  # getppid() is 0: the worker's process group
    time.sleep(30)


def test_g2_check():
    _clean()


def test_h1_writes_a_kernel_parameter():
    pathlib.Path("/proc/sys/vm/swappiness").write_text("13")


def test_h2_check():
    _clean()


def test_i1_sets_the_clock():
    time.clock_settime(time.CLOCK_REALTIME, time.time() + 3 * 86400)


def test_i2_check():
    _clean()
'''

EVERY = """
import os
import pytest

@pytest.mark.sandboxed
@pytest.mark.parametrize("i", range(5))
def test_trivial(i):
    assert os.getpid() == 1
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path) -> TableRun:
    root = tmp_path_factory.mktemp("hostile")
    return run_table(root, gondolin_cache, HOSTILE, "process", one_lane=True)


@pytest.mark.parametrize("case", list("abcdefhi"))
def test_hostile_case_ends_as_its_own_outcome(hostile: TableRun, case: str) -> None:
    pair = sorted((n, s) for n, s in hostile.statuses.items() if n.startswith(f"test_{case}"))
    assert [s for _, s in pair] == ["PASSED", "PASSED"], (pair, hostile.text)
    assert hostile.same_vm(*(n for n, _ in pair)), (hostile.lanes, hostile.text)


def test_killing_the_worker_fails_that_test_only(hostile: TableRun) -> None:
    assert hostile.statuses.get("test_g1_kills_the_worker") == "FAILED", hostile.text
    assert hostile.statuses.get("test_g2_check") == "PASSED", hostile.text
    assert hostile.same_vm("test_g1_kills_the_worker", "test_g2_check"), hostile.text
    assert "test_g1_kills_the_worker - worker crashed" in hostile.text, hostile.text


def test_hostile_fallbacks_are_the_expected_ones(hostile: TableRun) -> None:
    """A restore after the killed worker, the sysctl write and the clock; none after the others."""
    reasons = [
        line.split(RESTORE_LOG, 1)[1] for line in hostile.text.splitlines() if RESTORE_LOG in line
    ]
    assert len(reasons) == 3, hostile.text
    assert reasons[0].startswith("the run failed"), reasons
    assert "kernel parameters" in reasons[1], reasons
    assert "the clock was set" in reasons[2], reasons


def test_restore_every_n_runs(tmp_path: Path, gondolin_cache: Path) -> None:
    run = run_table(
        tmp_path, gondolin_cache, EVERY, "process", "--gondolin-isolation-restore-every=2"
    )
    assert set(run.statuses.values()) == {"PASSED"} and len(run.statuses) == 5, run.text
    restores = [line for line in run.text.splitlines() if RESTORE_LOG in line]
    assert len(restores) == 2, run.text
    assert all("2 process-isolated runs since the last restore" in r for r in restores), restores
