"""The edit-run loop: a re-run restores the cached worker, and never serves a stale tree.

Real inner pytest runs with the real image (``sandbox/worker_cache.py``):
a second run of an unchanged project restores the cached collected worker
(the progress line says so); a test file or a conftest edited between runs
changes the outcome as edited, the edit made without changing the file's
size or modification time; a corrupt cached worker is replaced; a
read-only cache is used and not written. Each test has a worker cache of
its own (the rest of the cache is shared).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_gondolin.sandbox import collected_files, worker_disk
from pytest_gondolin.vm import reaper
from tests.plugin.test_cache_folder import run_read_only
from tests.plugin.test_sandboxed import run_gondolin

pytest_plugins = ("pytester",)

RESTORED = "gondolin: sandbox1: restored the cached collected worker (* items) in * s"
COLLECTING = "gondolin: sandbox1: collecting in the started guest test worker"
IN_PLACE = "gondolin: sandbox1: restored the * worker in place from a previous tree's snapshot*"
#: After an edit of nothing pytest's configuration read (sandbox/configured.py).
CONFIGURED = (
    "gondolin: sandbox1: restored the configured worker in place from a previous tree's snapshot*"
)
#: After an edit of what it read, or a file added: configured again.
STARTED = (
    "gondolin: sandbox1: restored the started worker in place from a previous tree's snapshot*"
)

TEST_FILE = """
    import pytest

    @pytest.mark.sandboxed
    def test_one(value):
        assert value == {value}
"""
CONFTEST = """
    import pytest

    @pytest.fixture
    def value():
        return {value}
"""


@pytest.fixture(autouse=True)
def worker_cache_of_our_own(
    inner: pytest.Pytester,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    gondolin_cache: Path,
) -> Path:
    """A cache whose collected workers are this test's alone (others' runs evict and add).

    Everything else is the shared cache's (linked; its CA copied, as the CA
    folder must be private): image, boot files, ready and layered snapshots.
    """
    root = tmp_path_factory.mktemp("cache")
    for entry in gondolin_cache.iterdir():
        if entry.name == "ca":
            shutil.copytree(entry, root / "ca")
        elif entry.name != collected_files.collected_dir().name:
            (root / entry.name).symlink_to(entry)
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(root))
    # pytest-randomly (installed here) draws a new seed each run; the worker
    # gets it with each run, not in its key (tested on its own below). Off
    # here: the tests read the inner runs' output line by line.
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:randomly")
    # pytester writes each inner run's output to ./stdout and ./stderr, in
    # the project tree, while that run packs the tree: the header it holds
    # then ("warm snapshot: no" on a cold first run) would make the next
    # run's tree another one. A git repository that ignores them keeps
    # them out of the copy (sandbox/project_files.py lists git's files).
    subprocess.run(["git", "init", "-q", str(inner.path)], check=True)
    (inner.path / ".gitignore").write_text("/stdout\n/stderr\n")
    return root


def _project(inner: pytest.Pytester, *, expected: int, given: int) -> None:
    inner.makepyfile(test_x=TEST_FILE.format(value=expected))
    inner.makeconftest(CONFTEST.format(value=given))


def _edit_in_place(path: Path, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` (same length) keeping the file's size and times."""
    assert len(old) == len(new)
    text = path.read_text()
    assert text.count(old) == 1, text
    stat = path.stat()
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _without_run_folders(inner: pytest.Pytester) -> None:
    """Remove the inner runs' temporary folders (a failure's artifacts): they are in the tree."""
    for folder in inner.path.glob("runpytest-*"):
        if folder.is_symlink():
            folder.unlink()
        else:
            shutil.rmtree(folder)


def _cached() -> set[Path]:
    return set(collected_files.collected_dir().glob("*.qcow2"))


def _output(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


def test_a_rerun_restores_the_collected_worker(inner: pytest.Pytester) -> None:
    _project(inner, expected=1, given=1)
    first = run_gondolin(inner)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines([COLLECTING])
    assert "restored the cached collected worker" not in _output(first)
    again = run_gondolin(inner)
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([RESTORED])
    assert "collecting in the started guest test worker" not in _output(again)


def test_an_edited_test_file_changes_the_outcome(inner: pytest.Pytester) -> None:
    _project(inner, expected=1, given=1)
    run_gondolin(inner).assert_outcomes(passed=1)
    _edit_in_place(inner.path / "test_x.py", "value == 1", "value == 2")
    edited = run_gondolin(inner)
    edited.assert_outcomes(failed=1)
    # Only the test file changed: the first run's configured worker collects it.
    edited.stdout.fnmatch_lines([CONFIGURED, COLLECTING, "*assert 1 == 2*"])
    # And back: the first tree's file was reused by the edit's run (one test:
    # sandbox/worker_disk.py), so it collects again, and passes (the inner
    # runs' temporary folders are part of the tree: the failure's artifacts
    # are there).
    _edit_in_place(inner.path / "test_x.py", "value == 2", "value == 1")
    _without_run_folders(inner)
    back = run_gondolin(inner)
    back.assert_outcomes(passed=1)
    back.stdout.fnmatch_lines([IN_PLACE, COLLECTING])
    again = run_gondolin(inner)
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([RESTORED])


def test_an_edited_conftest_changes_the_outcome(inner: pytest.Pytester) -> None:
    _project(inner, expected=1, given=1)
    run_gondolin(inner).assert_outcomes(passed=1)
    _edit_in_place(inner.path / "conftest.py", "return 1", "return 3")
    edited = run_gondolin(inner)
    edited.assert_outcomes(failed=1)
    # pytest's configuration read the conftest: configured again, from the started worker.
    edited.stdout.fnmatch_lines([STARTED, COLLECTING, "*assert 3 == 1*"])
    _without_run_folders(inner)
    again = run_gondolin(inner)
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines([RESTORED])


def test_a_corrupt_cached_worker_is_replaced(inner: pytest.Pytester) -> None:
    _project(inner, expected=4, given=4)
    before = _cached()
    run_gondolin(inner).assert_outcomes(passed=1)
    new = _cached() - before
    assert len(new) == 1, new
    (snapshot,) = new
    snapshot.write_bytes(b"not a qcow2 file\n" * 64)
    result = run_gondolin(inner)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([COLLECTING])
    assert snapshot.read_bytes()[:4] == b"QFI\xfb"  # written again, whole
    again = run_gondolin(inner)
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([RESTORED])


def test_a_read_only_cache_is_used_not_written(
    inner: pytest.Pytester, worker_cache_of_our_own: Path
) -> None:
    _project(inner, expected=5, given=5)
    run_gondolin(inner).assert_outcomes(passed=1)  # the started worker's layer is cached
    _edit_in_place(inner.path / "test_x.py", "value == 5", "value == 6")
    before = _cached()
    result = run_read_only(inner, worker_cache_of_our_own, "-rA")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "gondolin: sandbox1 restored from the cached ready snapshot with * layer(s)*",
            COLLECTING,
            "*assert 5 == 6*",
        ]
    )
    assert "building layer" not in _output(result)
    assert _cached() == before


# -- one test: the cached file used in place (sandbox/worker_disk.py) ------------

STATEFUL = """
    import os
    import pytest

    MARK = os.path.join(os.path.dirname(__file__), "written-by-the-test")

    @pytest.mark.sandboxed
    def test_one():
        # What a run writes to the disk it restored must not reach the next run.
        assert not os.path.exists(MARK)
        with open(MARK, "w") as fh:
            fh.write("x")
"""


def _taken() -> list[Path]:
    return list(collected_files.collected_dir().glob(f"*{worker_disk.TAKEN}*"))


def test_a_one_test_rerun_uses_the_cached_file_in_place(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_x=STATEFUL)
    before = _cached()
    run_gondolin(inner).assert_outcomes(passed=1)
    new = _cached() - before
    assert len(new) == 1, new  # kept when the VM closed: the VM's own disk
    (snapshot,) = new
    inode = snapshot.stat().st_ino
    for _ in range(2):
        again = run_gondolin(inner)
        again.assert_outcomes(passed=1)  # the first run's write was not kept
        again.stdout.fnmatch_lines([RESTORED])
        # Given back whole: the same file (no copy was made), nothing left taken.
        assert snapshot.stat().st_ino == inode
        assert _taken() == []
    assert not (inner.path / "written-by-the-test").exists()  # only ever in the guest


def test_an_edit_starts_from_the_previous_trees_file_in_place(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_x=STATEFUL)
    before = _cached()
    run_gondolin(inner).assert_outcomes(passed=1)
    (snapshot,) = _cached() - before
    inode = snapshot.stat().st_ino
    _append(inner.path / "test_x.py", "\n# edited\n")
    edited = run_gondolin(inner)
    # Collected anew (the edited tree), from the started worker's state: the
    # first run's test wrote its mark after that state, so it is not there.
    edited.assert_outcomes(passed=1)
    edited.stdout.fnmatch_lines([IN_PLACE, COLLECTING])
    (reused,) = _cached() - before
    assert reused != snapshot and not snapshot.exists()  # the previous tree's key is gone
    assert reused.stat().st_ino == inode  # the same file, no copy made
    assert _taken() == []
    again = run_gondolin(inner)
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([RESTORED])
    assert "# edited" in (inner.path / "test_x.py").read_text()


def test_an_unloadable_previous_tree_is_removed_and_the_worker_started(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(test_x=STATEFUL.replace("written-by-the-test", "third-mark"))
    before = _cached()
    run_gondolin(inner).assert_outcomes(passed=1)
    (snapshot,) = _cached() - before
    snapshot.write_bytes(b"not a qcow2 file\n" * 64)
    _append(inner.path / "test_x.py", "\n# edited\n")
    edited = run_gondolin(inner)
    edited.assert_outcomes(passed=1)
    edited.stdout.fnmatch_lines(
        ["gondolin: sandbox1 restored from the cached ready snapshot*", COLLECTING]
    )
    assert "in place from a previous tree" not in _output(edited)
    assert not snapshot.exists()
    (new,) = _cached() - before
    assert new.read_bytes()[:4] == b"QFI\xfb"
    assert _taken() == []


KILLING_CONFTEST = """
    import os
    import signal

    def pytest_runtest_logreport(report):
        # On the host, after the test: its QEMU dies before the session closes it.
        if report.when != "call" or os.environ.get("KILL_QEMU") != "1":
            return
        killed = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    program = fh.read().split(b"\\0")[0]
            except (OSError, IndexError):
                continue
            if int(fields[1]) == os.getpid() and b"qemu-system" in program:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
        assert killed, "no QEMU to kill"
"""


def test_a_worker_whose_vm_died_is_not_given_back(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner.makepyfile(test_x=STATEFUL.replace("written-by-the-test", "another-mark"))
    inner.makeconftest(KILLING_CONFTEST)
    before = _cached()
    run_gondolin(inner).assert_outcomes(passed=1)
    (snapshot,) = _cached() - before
    monkeypatch.setenv("KILL_QEMU", "1")
    killed = run_gondolin(inner)
    killed.assert_outcomes(passed=1)
    killed.stdout.fnmatch_lines([RESTORED])
    monkeypatch.delenv("KILL_QEMU")
    assert not snapshot.exists()  # removed, not given back
    assert _taken() == []
    after = run_gondolin(inner)
    after.assert_outcomes(passed=1)
    after.stdout.fnmatch_lines([COLLECTING])


def test_two_tests_restore_a_copy_and_leave_the_cached_file_alone(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        test_x="""
        import pytest

        @pytest.mark.sandboxed
        def test_one():
            pass

        @pytest.mark.sandboxed
        def test_two():
            pass
        """
    )
    before = _cached()
    run_gondolin(inner).assert_outcomes(passed=2)
    (snapshot,) = _cached() - before
    stat = snapshot.stat()
    again = run_gondolin(inner)
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines([RESTORED])
    assert snapshot.stat().st_ino == stat.st_ino
    assert snapshot.stat().st_size == stat.st_size  # only read: the VMs ran on copies
    assert _taken() == []


def test_a_taken_file_of_a_dead_process_is_removed(worker_cache_of_our_own: Path) -> None:
    folder = collected_files.collected_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = "0" * 32
    cached = collected_files.collected_path(key)
    cached.write_bytes(b"cached")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = folder / f".{key}.qcow2{worker_disk.TAKEN}{dead.pid}"
    orphan.write_bytes(b"left by a killed run")
    other = folder / f".{'1' * 32}.qcow2{worker_disk.TAKEN}{dead.pid}"
    other.write_bytes(b"left by a killed run, of another tree")
    live = folder / f".{key}.qcow2{worker_disk.TAKEN}{os.getppid()}"
    live.write_bytes(b"held by a running process")
    # A live process that started after the file was taken (its pid reused)
    # does not hold it either: the file's ctime cannot be set back here, so that
    # rule (vm/reaper.started_before) is tested on its own in
    # tests/integration/test_interrupted_reaping.py.
    reaper.remove_stale_cache_files()  # what every session does at its start
    taken = worker_disk.take_collected(key)
    assert taken is not None and taken.read_bytes() == b"cached"
    assert not cached.exists()  # no other run sees it while taken
    assert not orphan.exists()
    assert not other.exists()
    assert live.exists()
    assert worker_disk.take_collected(key) is None  # taken already


DIRTY = """
    import pytest

    @pytest.mark.sandboxed
    def test_the_tree_is_on_the_disk():
        with open("/proc/meminfo") as meminfo:
            dirty = next(int(line.split()[1]) for line in meminfo if line.startswith("Dirty:"))
        assert dirty < 1024, f"{dirty} kB dirty"
"""


def test_the_copied_tree_is_written_back_before_the_snapshot(inner: pytest.Pytester) -> None:
    """The snapshot after collection holds no dirty tree (each restore would write it back).

    The copy syncs before the go (``worker_setup.copy_project``); without it
    the 4 MiB file below stays dirty for the kernel's 30 s writeback delay.
    """
    inner.makepyfile(test_x=DIRTY)
    (inner.path / "data.bin").write_bytes(os.urandom(4 << 20))
    result = run_gondolin(inner)
    result.stdout.fnmatch_lines([COLLECTING])
    result.assert_outcomes(passed=1)


# -- what the started worker did before its go (guest/startup.py) ----------------

HELPER_TEST = """
    import pytest

    import helper

    @pytest.mark.sandboxed
    def test_one():
        assert helper.VALUE == 1
"""


def test_an_edited_project_module_is_imported_anew(inner: pytest.Pytester) -> None:
    """The started worker imported modules before its go: never one of the project's."""
    inner.makepyfile(test_x=HELPER_TEST, helper="VALUE = 1\n")
    run_gondolin(inner).assert_outcomes(passed=1)
    _edit_in_place(inner.path / "helper.py", "VALUE = 1", "VALUE = 7")
    edited = run_gondolin(inner)
    edited.assert_outcomes(failed=1)
    # Imported by the test, not by pytest's configuration.
    edited.stdout.fnmatch_lines([CONFIGURED, COLLECTING, "*assert 7 == 1*"])


# -- the configured worker (sandbox/configured.py) ---------------------------------

READING_CONFTEST = """
    import pathlib

    import pytest

    import helper

    LIMIT = int(pathlib.Path(__file__).with_name("limit.txt").read_text())

    @pytest.fixture
    def value():
        return helper.VALUE + LIMIT
"""


@pytest.mark.parametrize(
    ("edited", "old", "new"),
    [
        ("helper.py", "VALUE = 1", "VALUE = 5"),  # imported by the conftest
        ("limit.txt", "10", "50"),  # read by the conftest with open()
    ],
)
def test_an_edit_of_what_configuration_read_configures_again(
    inner: pytest.Pytester, edited: str, old: str, new: str
) -> None:
    inner.makepyfile(test_x=TEST_FILE.format(value=11), helper="VALUE = 1\n")
    inner.makeconftest(READING_CONFTEST)
    (inner.path / "limit.txt").write_text("10")
    run_gondolin(inner).assert_outcomes(passed=1)
    _edit_in_place(inner.path / "test_x.py", "value == 11", "value == 12")
    # The test file is not read while pytest configures.
    run_gondolin(inner).stdout.fnmatch_lines([CONFIGURED, "*assert 11 == 12*"])
    _without_run_folders(inner)
    _edit_in_place(inner.path / edited, old, new)
    result = run_gondolin(inner)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([STARTED, "*assert * == 12*"])
    assert ("assert 15 == 12" if edited == "helper.py" else "assert 51 == 12") in _output(result)


def test_a_file_added_to_the_tree_configures_again(inner: pytest.Pytester) -> None:
    """A new file may be a conftest or shadow a module: the names are part of the record."""
    _project(inner, expected=1, given=1)
    run_gondolin(inner).assert_outcomes(passed=1)
    _edit_in_place(inner.path / "test_x.py", "value == 1", "value == 2")
    run_gondolin(inner).stdout.fnmatch_lines([CONFIGURED, "*assert 1 == 2*"])
    _without_run_folders(inner)
    _edit_in_place(inner.path / "test_x.py", "value == 2", "value == 3")
    run_gondolin(inner).stdout.fnmatch_lines([CONFIGURED, "*assert 1 == 3*"])
    _without_run_folders(inner)
    sub = inner.path / "sub"
    sub.mkdir()
    (sub / "notes.txt").write_text("new\n")
    result = run_gondolin(inner)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([STARTED, "*assert 1 == 3*"])


RESIDENT = """
    import ctypes
    import os
    import pytest

    DATA = os.path.join(os.path.dirname(__file__), "data.bin")

    def resident_pages(path):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        size = os.path.getsize(path)
        pages = (size + 4095) // 4096
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
            try:
                vector = ctypes.create_string_buffer(pages)
                assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
                return sum(byte & 1 for byte in vector.raw), pages
            finally:
                libc.munmap(address, size)
        finally:
            os.close(fd)

    @pytest.mark.sandboxed
    def test_what_collection_read_is_not_in_the_page_cache():
        resident, pages = resident_pages(DATA)
        assert resident < pages // 4, f"{resident} of {pages} pages of data.bin resident"
        with open(DATA, "rb") as fh:
            fh.read()
        assert resident_pages(DATA)[0] > pages // 2  # and the measure sees a read
"""


def test_the_collected_snapshot_holds_no_page_cache(inner: pytest.Pytester) -> None:
    """What collection read is in the worker's memory; the page cache is dropped before the snapshot.

    The conftest reads a 4 MiB file at collection; the test, restored from
    the snapshot taken after collection, finds none of it resident.
    """
    inner.makeconftest(
        """
        import os

        with open(os.path.join(os.path.dirname(__file__), "data.bin"), "rb") as fh:
            DATA = fh.read()
        """
    )
    inner.makepyfile(test_x=RESIDENT)
    (inner.path / "data.bin").write_bytes(os.urandom(4 << 20))
    result = run_gondolin(inner)
    result.stdout.fnmatch_lines([COLLECTING])
    result.assert_outcomes(passed=1)


# -- pytest-randomly: a new seed each run still restores the cached worker -------

DRAWING_TEST = """
    import random

    import pytest

    @pytest.mark.sandboxed
    def test_one():
        assert random.random() < 0
"""


def _drawn(result: pytest.RunResult) -> str:
    (value,) = re.findall(r"assert (0\.\d+) < 0", _output(result))[:1]
    return value


def test_each_runs_randomly_seed_reaches_the_cached_worker(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_ADDOPTS", "")
    inner.makepyfile(test_x=DRAWING_TEST)
    drawn: dict[int, list[str]] = {}
    for seed in (1, 2, 1):
        result = run_gondolin(inner, "-p", "randomly", f"--randomly-seed={seed}")
        result.assert_outcomes(failed=1)
        if drawn:  # the seed is not part of the cached worker's key
            result.stdout.fnmatch_lines([RESTORED])
        drawn.setdefault(seed, []).append(_drawn(result))
        _without_run_folders(inner)
    assert drawn[1][0] == drawn[1][1]  # the run's seed, not the cached worker's
    assert drawn[1][0] != drawn[2][0]


DRAWN_PARAMETER = """
    import random

    import pytest

    @pytest.mark.sandboxed
    @pytest.mark.parametrize("n", [random.randrange(10**9)])
    def test_drawn(n):
        assert n >= 0
"""


def test_a_collection_that_drew_from_another_seed_is_collected_again(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_ADDOPTS", "")
    inner.makepyfile(test_x=DRAWN_PARAMETER)
    run_gondolin(inner, "-p", "randomly", "--randomly-seed=1").assert_outcomes(passed=1)
    other = run_gondolin(inner, "-p", "randomly", "--randomly-seed=2")
    other.assert_outcomes(passed=1)
    other.stdout.fnmatch_lines(
        [
            "gondolin: sandbox1: the cached collected worker lacks test_x.py::test_drawn*: collecting again"
        ]
    )
    again = run_gondolin(inner, "-p", "randomly", "--randomly-seed=2")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines([RESTORED])
