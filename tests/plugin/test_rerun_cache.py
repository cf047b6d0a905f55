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
import shutil
from pathlib import Path

import pytest

from pytest_gondolin.sandbox import worker_cache
from tests.plugin.test_cache_folder import run_read_only
from tests.plugin.test_sandboxed import run_gondolin

pytest_plugins = ("pytester",)

RESTORED = "gondolin: sandbox1: restored the cached collected worker (* items) in * s"
COLLECTING = "gondolin: sandbox1: collecting in the started guest test worker"

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
        elif entry.name != worker_cache.collected_dir().name:
            (root / entry.name).symlink_to(entry)
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(root))
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


def _cached() -> set[Path]:
    return set(worker_cache.collected_dir().glob("*.qcow2"))


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
    edited.stdout.fnmatch_lines([COLLECTING, "*assert 1 == 2*"])
    # And back: the first tree's cached worker serves again, unchanged (the
    # inner runs' temporary folders are part of the tree: the failure's
    # artifacts are there).
    _edit_in_place(inner.path / "test_x.py", "value == 2", "value == 1")
    for folder in inner.path.glob("runpytest-*"):
        if folder.is_symlink():
            folder.unlink()
        else:
            shutil.rmtree(folder)
    back = run_gondolin(inner)
    back.assert_outcomes(passed=1)
    back.stdout.fnmatch_lines([RESTORED])


def test_an_edited_conftest_changes_the_outcome(inner: pytest.Pytester) -> None:
    _project(inner, expected=1, given=1)
    run_gondolin(inner).assert_outcomes(passed=1)
    _edit_in_place(inner.path / "conftest.py", "return 1", "return 3")
    edited = run_gondolin(inner)
    edited.assert_outcomes(failed=1)
    edited.stdout.fnmatch_lines([COLLECTING, "*assert 3 == 1*"])


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
