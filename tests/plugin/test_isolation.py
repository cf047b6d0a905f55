"""``isolation="vm" | "process"``: the isolation table of docs/isolation.md, one test per row and mode.

One inner session per mode (real QEMU, the real guest worker) runs pairs of
sandboxed tests in file order: the first of each pair changes something (a
file in the project and in /etc, a daemon, /tmp, its environment, the
network recorder, a kernel parameter, the clock), the second checks that
none of it reached it. Each row's test below then asserts its pair passed,
so a leak names its row and its mode. The option's bad values are checked
without a VM (they fail at configuration or collection).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import inner_env_changes

pytest_plugins = ("pytester",)

#: Bound on one inner session (worker start-up ~30 s on a busy host, then ~16 tests).
INNER_TIMEOUT = 600.0
#: The host logs each fallback restore with this text (sandbox/isolation.py).
RESTORE_LOG = "restoring the VM after a process-isolated run: "

TABLE = """
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HERE = pathlib.Path(__file__).parent
DAEMON_PORT = 47123
DAEMON = (
    "import socket, time\\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\\n"
    f"s.bind(('127.0.0.1', {DAEMON_PORT})); s.listen()\\n"
    "time.sleep(1000)\\n"
)
sandboxed = pytest.mark.sandboxed


def _connects():
    try:
        socket.create_connection(("127.0.0.1", DAEMON_PORT), timeout=2).close()
    except OSError:
        return False
    return True


@sandboxed
def test_files_1_write():
    (HERE / "left-behind.txt").write_text("x")
    pathlib.Path("/etc/gondolin-left-behind").write_text("x")


@sandboxed
def test_files_2_check():
    assert not (HERE / "left-behind.txt").exists()
    assert not pathlib.Path("/etc/gondolin-left-behind").exists()


@sandboxed
def test_processes_1_daemon():
    subprocess.Popen([sys.executable, "-c", DAEMON], start_new_session=True)
    deadline = time.monotonic() + 60
    while not _connects():
        assert time.monotonic() < deadline, "the daemon never listened"
        time.sleep(0.1)


@sandboxed
def test_processes_2_check():
    assert not _connects(), "a daemon of an earlier test still listens"


@sandboxed
def test_tmp_1_write():
    pathlib.Path("/tmp/left-behind").write_text("x")
    pathlib.Path("/dev/shm/left-behind").write_text("x")


@sandboxed
def test_tmp_2_check():
    assert not pathlib.Path("/tmp/left-behind").exists()
    assert not pathlib.Path("/dev/shm/left-behind").exists()


@sandboxed
def test_env_1_change():
    os.environ["GONDOLIN_LEFT_BEHIND"] = "1"
    os.chdir("/")
    os.umask(0o077)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@sandboxed
def test_env_2_check():
    assert "GONDOLIN_LEFT_BEHIND" not in os.environ
    assert os.getcwd() == str(HERE)
    umask = os.umask(0o022)
    os.umask(umask)
    assert umask == 0o022
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


@sandboxed
def test_network_1_request(http_traffic):
    with pytest.raises(Exception):
        urllib.request.urlopen("http://example.org/left-behind", timeout=20)
    assert http_traffic.get_requests(host="example.org")


@sandboxed
def test_network_2_check(http_traffic):
    assert http_traffic.requests == []


@sandboxed
def test_sysctl_1_write():
    pathlib.Path("/proc/sys/vm/swappiness").write_text("13")
    assert pathlib.Path("/proc/sys/vm/swappiness").read_text().strip() == "13"


@sandboxed
def test_sysctl_2_check():
    assert pathlib.Path("/proc/sys/vm/swappiness").read_text().strip() != "13"


@sandboxed
def test_time_1_set():
    time.clock_settime(time.CLOCK_REALTIME, time.time() + 3 * 86400)


@sandboxed
def test_time_2_check():
    # The test file was written on the host minutes ago (tar keeps its mtime).
    assert abs(time.time() - os.stat(__file__).st_mtime) < 86400
"""

ROWS = ("files", "processes", "tmp", "env", "network", "sysctl", "time")
#: The rows whose change only a restore undoes in process mode.
KERNEL_ROWS = {"sysctl": "test_sysctl_1_write", "time": "test_time_1_set"}
_VERBOSE = re.compile(r"^(?P<nodeid>\S+::\S+) (?P<status>PASSED|FAILED|ERROR)\b")
#: ``-rA``'s summary lines (with ``-s`` a verbose line may be split by the test's output).
_SUMMARY = re.compile(r"^(?P<status>PASSED|FAILED|ERROR) (?P<nodeid>\S+::\S+)")


#: The inner session's conftest, on the host: prints each sandboxed item's VM
#: (its lane), and with ``ISOLATION_TEST_ONE_LANE=1`` keeps the guest worker to one
#: VM, so the test after a change runs in the VM of that change (with two VMs
#: taking turns it would run in the other one and could not see a leak).
LANE_CONFTEST = """
import os
import sys

if os.environ.get("GONDOLIN_GUEST") != "1":

    def pytest_configure(config):
        import pytest_gondolin.sandbox.guest_worker as guest_worker

        if os.environ.get("ISOLATION_TEST_ONE_LANE") == "1":
            guest_worker.PREFETCH_LANES = 1
        run = guest_worker.GuestWorker.run

        def run_and_say(self, nodeid, options):
            outcome = run(self, nodeid, options)
            name = nodeid.split("::")[-1]
            print(f"GONDOLIN-LANE {name} {self.vm.name if self.vm else None}", file=sys.stderr)
            return outcome

        guest_worker.GuestWorker.run = run_and_say
"""
_LANE = re.compile(r"^GONDOLIN-LANE (?P<name>\S+) (?P<vm>\S+)$", re.M)


@dataclass(frozen=True)
class TableRun:
    mode: str
    statuses: dict[str, str]
    text: str

    @property
    def lanes(self) -> dict[str, str]:
        """Each test's VM (by name), as the inner session's conftest printed it."""
        return {m["name"]: m["vm"] for m in _LANE.finditer(self.text)}

    def same_vm(self, *names: str) -> bool:
        """Whether the tests ``names`` all ran in one VM."""
        lanes = self.lanes
        return all(name in lanes for name in names) and len({lanes[n] for n in names}) == 1


def _run(
    root: Path, cache: Path, *args: str, one_lane: bool = False
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["ISOLATION_TEST_ONE_LANE"] = "1" if one_lane else ""
    for name, value in inner_env_changes(cache).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    argv = [sys.executable, "-mpytest", f"--basetemp={root / 'basetemp'}", "-p", "gondolin"]
    return subprocess.run(
        [*argv, "-p", "no:randomly", *args],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=INNER_TIMEOUT,
        check=False,
    )


def statuses_of(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if match := _VERBOSE.match(line) or _SUMMARY.match(line):
            out.setdefault(match["nodeid"].split("::")[-1], match["status"])
    return out


def run_table(
    root: Path, cache: Path, source: str, mode: str, *args: str, one_lane: bool = False
) -> TableRun:
    """Run ``source`` in an inner session in ``mode``; ``one_lane``: in one VM, test after test."""
    (root / "test_table.py").write_text(textwrap.dedent(source).lstrip())
    (root / "conftest.py").write_text(LANE_CONFTEST)
    started = time.monotonic()
    proc = _run(
        root,
        cache,
        "-v",
        "-rA",
        f"--gondolin-isolation={mode}",
        "-o",
        "log_cli=true",
        "--log-cli-level=INFO",
        *args,
        one_lane=one_lane,
    )
    text = proc.stdout + proc.stderr + f"\n[inner run {time.monotonic() - started:.0f} s]"
    return TableRun(mode, statuses_of(proc.stdout), text)


@pytest.fixture(scope="module", params=["vm", "process"])
def table(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path
) -> TableRun:
    mode = str(request.param)
    root = tmp_path_factory.mktemp(f"table-{mode}")
    return run_table(root, gondolin_cache, TABLE, mode, one_lane=True)


pytestmark = pytest.mark.integration


@pytest.mark.parametrize("row", ROWS)
def test_isolation_row(table: TableRun, row: str) -> None:
    """Each row of the table, in each mode: the change passed, the check after it passed."""
    pair = {
        name: status for name, status in table.statuses.items() if name.startswith(f"test_{row}_")
    }
    assert len(pair) == 2, table.text
    assert set(pair.values()) == {"PASSED"}, (pair, table.text)
    assert table.same_vm(*pair), (table.lanes, table.text)  # the check could see a leak


def test_process_mode_restores_only_after_kernel_changes(table: TableRun) -> None:
    """Clean process-isolated tests reuse the VM; sysctl and clock changes bring a restore."""
    restores = [line for line in table.text.splitlines() if RESTORE_LOG in line]
    if table.mode == "vm":
        assert restores == [], table.text
        return
    assert len(restores) == len(KERNEL_ROWS), table.text
    assert "kernel parameters" in restores[0] and "swappiness" in restores[0], restores
    assert "the clock was set" in restores[1], restores


# -- bad values: no VM needed -------------------------------------------------------------


def test_bad_marker_value_fails_at_collection(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.sandboxed(isolation="thread")
        def test_x():
            pass
        """
    )
    result = inner.runpytest_subprocess("-p", "gondolin", timeout=INNER_TIMEOUT)
    text = result.stdout.str() + result.stderr.str()
    assert "isolation must be one of vm, process, got 'thread'" in text, text
    assert "test_bad.py::test_x" in text, text
    assert result.ret != pytest.ExitCode.OK


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("env", "$GONDOLIN_ISOLATION: isolation must be one of vm, process, got 'threads'"),
        ("ini", "ini gondolin_isolation: isolation must be one of vm, process, got 'threads'"),
        ("cli", "invalid choice: 'threads'"),
        ("every", "isolation restore every must be between 1 and"),
    ],
)
def test_bad_option_values_are_usage_errors(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str, expected: str
) -> None:
    inner.makepyfile(test_ok="def test_ok():\n    pass\n")
    args = ["-p", "gondolin"]
    if how == "env":
        monkeypatch.setenv("GONDOLIN_ISOLATION", "threads")
    elif how == "ini":
        inner.makeini("[pytest]\ngondolin_isolation = threads\n")
    elif how == "cli":
        args.append("--gondolin-isolation=threads")
    else:
        args.append("--gondolin-isolation-restore-every=0")
    result = inner.runpytest_subprocess(*args, timeout=INNER_TIMEOUT)
    assert expected in result.stderr.str(), result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_marker_wins_over_the_session_option(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``isolation=`` on the marker beats ``GONDOLIN_ISOLATION`` (the usual precedence)."""
    inner.makepyfile(
        test_mixed="""
        import os
        import pytest

        @pytest.mark.sandboxed(isolation="vm")
        def test_vm():
            assert os.getpid() != 1

        @pytest.mark.sandboxed
        def test_process():
            assert os.getpid() == 1  # PID 1 of the test's own PID namespace
        """
    )
    monkeypatch.setenv("GONDOLIN_ISOLATION", "process")
    result = inner.runpytest_subprocess("-p", "gondolin", "-v", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=2)


# -- the pure parts: the plan of the new root, the fallback rules (no VM) -----------------

#: The guest's mounts as its worker sees them (captured from the real image).
GUEST_MOUNTINFO = """\
22 25 0:20 / /proc rw,relatime - proc proc rw
23 25 0:21 / /sys rw,relatime - sysfs sysfs rw
24 25 0:5 / /dev rw,relatime - devtmpfs devtmpfs rw,size=105352k,mode=755
25 1 254:0 / / rw,noatime - ext4 /dev/vda rw
26 25 0:22 / /run rw,nosuid,nodev,relatime - tmpfs tmpfs rw,mode=755
27 24 0:23 / /dev/pts rw,nosuid,relatime - devpts devpts rw,gid=5,mode=620
28 24 0:24 / /dev/shm rw,nosuid,nodev,relatime - tmpfs tmpfs rw
29 25 0:25 / /tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw
30 25 0:26 / /root rw,relatime - tmpfs tmpfs rw,mode=700
34 25 0:22 /gondolin/ca-bundle.crt /etc/ssl/certs/ca-certificates.crt rw - tmpfs tmpfs rw
35 29 254:0 /var/lib/x /tmp/my\\040project rw,noatime - ext4 /dev/vda rw
36 25 0:30 / /opt/ro ro,relatime - ext4 /dev/vdb ro
37 26 0:31 / /run/gondolin-isolation rw - tmpfs tmpfs rw
"""


def test_plan_puts_parents_first_and_treats_each_kind_of_mount() -> None:
    from pytest_gondolin.guest.newroot import Step, parse_mountinfo, plan_root

    files = {"/etc/ssl/certs/ca-certificates.crt"}
    steps = plan_root(parse_mountinfo(GUEST_MOUNTINFO), is_dir=lambda p: p not in files)
    assert steps[0] == Step("overlay", "/")  # before /sys and /dev, which it would hide
    assert set(steps) == {
        Step("overlay", "/"),
        Step("bind-ro", "/sys"),
        Step("overlay", "/dev"),
        Step("overlay", "/run"),
        Step("bind", "/dev/pts"),
        Step("tmpfs", "/dev/shm"),
        Step("tmpfs", "/tmp"),
        Step("overlay", "/root"),
        Step("bind-ro", "/etc/ssl/certs/ca-certificates.crt"),
        Step("overlay", "/tmp/my project"),  # a project under /tmp stays, as an overlay
        Step("bind", "/opt/ro"),
    }
    depth = [s.point.count("/") if s.point != "/" else 0 for s in steps]
    assert depth == sorted(depth)


def test_mountinfo_lines_that_do_not_parse_are_skipped() -> None:
    from pytest_gondolin.guest.newroot import parse_mountinfo

    assert parse_mountinfo("garbage\n1 2 3\n\n22 25 0:20 / relative rw - proc proc rw\n") == []


def test_dirty_reasons_name_each_change() -> None:
    from pytest_gondolin.guest.isolation import KernelState, dirty_reasons

    before = KernelState("m", "n", "o", 100.0)
    assert dirty_reasons(before, KernelState("m", "n", "o", 100.3)) == []
    changed = dirty_reasons(before, KernelState("M", "N", "O", 3700.0))
    assert changed == [
        "kernel modules were loaded or unloaded",
        "the worker's mounts changed",
        "network links, addresses or routes changed",
        "the clock was set (+3600.0 s)",
    ]


def test_ledger_rules() -> None:
    from pytest_gondolin.guest.isolation import RESTORE_QUERY
    from pytest_gondolin.sandbox.isolation import LaneLedger, run_env

    ledger, lane = LaneLedger(restore_every=3), object()
    assert ledger.after_run(lane, "vm", failed=False) == "vm isolation"
    assert ledger.after_run(lane, "process", failed=False) is None
    assert ledger.since_restore(lane) == 1
    assert "failed" in str(ledger.after_run(lane, "process", failed=True))
    ledger.restored(lane)
    handler = ledger.answering(lane, lambda kind, args: ("inner", kind))
    assert handler("http", {}) == ("inner", "http")
    assert handler(RESTORE_QUERY, {"reason": "x" * 1000}) is None
    reason = str(ledger.after_run(lane, "process", failed=False))
    assert reason.startswith("the test changed kernel state: xxx") and len(reason) < 400
    ledger.restored(lane)
    assert [ledger.after_run(lane, "process", failed=False) for _ in range(3)][:2] == [None, None]
    assert ledger.since_restore(lane) == 3
    assert ledger.fallbacks == {"failed": 1, "kernel state": 1, "every": 1}
    assert run_env("process", {"A": "1"}) == {"A": "1", "PYTEST_GONDOLIN_ISOLATION": "process"}
    assert run_env("vm", {"A": "1"}) == {"A": "1"}
    with pytest.raises(ValueError, match="restore_every must be at least 1, got 0"):
        LaneLedger(0)


def test_pool_takes_a_clean_member_back_without_a_restore() -> None:
    from pytest_gondolin.vm.pool import RestorePool

    class Member:
        name, alive = "m", True

        def close(self) -> None:
            self.alive = False

    restored: list[Member] = []
    pool = RestorePool[Member](None, restored.append, size=1)
    member = Member()
    pool.add(member)
    assert pool.take() is member
    pool.give_back(member, clean=True)
    assert pool.take() is member and restored == []
    pool.give_back(member)
    assert pool.take() is member and restored == [member]
    pool.close()


# -- report parity in process mode ---------------------------------------------------------

PARITY = """
import os
import time

import pytest

pytestmark = pytest.mark.sandboxed(isolation="process")


def test_ok():
    print("LIVE-OUTPUT-FROM-THE-TEST")


def test_fails():
    assert 1 + 1 == 3


@pytest.mark.sandboxed(timeout=3)
def test_sleeps_too_long():
    time.sleep(60)


def test_crashes():
    os._exit(3)


def test_after():
    assert os.getpid() == 1
"""


def test_process_mode_reports_like_vm_mode(tmp_path: Path, gondolin_cache: Path) -> None:
    """-s live output, junitxml, a timeout with the test's stack, a crash naming the test."""
    junit = tmp_path / "junit.xml"
    run = run_table(tmp_path, gondolin_cache, PARITY, "process", "-s", f"--junitxml={junit}")
    assert run.statuses == {
        "test_ok": "PASSED",
        "test_fails": "FAILED",
        "test_sleeps_too_long": "FAILED",
        "test_crashes": "FAILED",
        "test_after": "PASSED",
    }, run.text
    assert "LIVE-OUTPUT-FROM-THE-TEST" in run.text, run.text
    assert "Timeout > 3s" in run.text, run.text
    sleep_line = PARITY.splitlines().index("    time.sleep(60)")
    assert f'test_table.py", line {sleep_line} in test_sleeps_too_long' in run.text, run.text
    assert "test_table.py::test_crashes: the test process exited with status 3" in run.text
    xml = junit.read_text()
    assert xml.count("<testcase ") == 5 and xml.count("<failure ") == 3, xml


def test_process_mode_exitfirst_and_last_failed(tmp_path: Path, gondolin_cache: Path) -> None:
    source = """
        import pytest

        pytestmark = pytest.mark.sandboxed(isolation="process")

        def test_a():
            pass

        def test_b():
            assert False

        def test_c():
            pass
        """
    first = run_table(tmp_path, gondolin_cache, source, "process", "-x")
    assert first.statuses == {"test_a": "PASSED", "test_b": "FAILED"}, first.text
    again = run_table(tmp_path, gondolin_cache, source, "process", "--lf")
    assert again.statuses == {"test_b": "FAILED"}, again.text


def test_process_mode_under_xdist(tmp_path: Path, gondolin_cache: Path) -> None:
    """``-n 2``: each xdist worker runs its process-isolated tests in its own guest."""
    source = """
        import os
        import pytest

        @pytest.mark.sandboxed(isolation="process")
        @pytest.mark.parametrize("i", range(4))
        def test_apart(i, tmp_path):
            assert os.getpid() == 1
            assert not (tmp_path.parent / "left-behind").exists()
            (tmp_path.parent / "left-behind").write_text("x")
        """
    run = run_table(tmp_path, gondolin_cache, source, "process", "-n", "2")
    assert list(run.statuses.values()) == ["PASSED"] * 4, run.text
    assert re.search(r"\[gw0\].*PASSED", run.text) and re.search(r"\[gw1\].*PASSED", run.text)


def test_overlay_options_escape_separators() -> None:
    from pytest_gondolin.guest.newroot import escape

    assert escape("/work/a,b:c\\d") == "/work/a\\,b\\:c\\\\d"
