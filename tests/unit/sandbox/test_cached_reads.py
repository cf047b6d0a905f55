"""The per-run host reads reused across runs: Hypothesis's tables and the packages' distributions.

Real files and real ``importlib.metadata``/Hypothesis throughout. A cache hit
is made visible by changing the saved answer in its entry (its stamp left
as it is): a hit returns the changed answer, a read returns the real one.
"""

from __future__ import annotations

import base64
import gzip
import importlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import hypothesis  # noqa: F401 - hypothesis_tables packs only for sessions that import it
import pytest
from hypothesis.internal import charmap

from pytest_gondolin.sandbox import cached_reads
from pytest_gondolin.sandbox.cached_reads import (
    MAX_ENTRIES,
    hypothesis_tables,
    packages_distributions,
)


def _entries(cache: Path, kind: str) -> list[Path]:
    return sorted(cache.glob(f"{kind}-*.json"))


def _replace_answer(entry: Path, answer: object) -> None:
    """Change what ``entry`` answers, leaving the stat it was saved with (and so its validity)."""
    saved = json.loads(entry.read_text(encoding="utf-8"))
    saved["answer"] = answer
    entry.write_text(json.dumps(saved), encoding="utf-8")


# -- Hypothesis's Unicode tables ------------------------------------------------


#: One run's read of the tables, in a process of its own: Hypothesis keeps
#: its tables' home and some of them per process, and writes them as it reads.
_READ_TABLES = """
import base64, sys
from pathlib import Path
import hypothesis
from hypothesis.internal import charmap
from pytest_gondolin.sandbox.cached_reads import hypothesis_tables
folder = Path(charmap.charmap_file()).resolve().parent
print(folder)
print(base64.b64encode(hypothesis_tables(Path(sys.argv[1]))).decode())
"""


def _run_tables(home: Path, cache: Path) -> tuple[Path, bytes]:
    """(the tables' folder, what :func:`hypothesis_tables` packed) in a new process over ``home``."""
    env = {**os.environ, "HYPOTHESIS_STORAGE_DIRECTORY": str(home)}
    done = subprocess.run(
        [sys.executable, "-c", _READ_TABLES, str(cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # the first run computes the tables: seconds under load
        check=True,
    )
    folder, packed = done.stdout.split()
    return Path(folder), base64.b64decode(packed)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A Hypothesis home of this test's own, holding this process's tables if it has them (saves computing)."""
    home = tmp_path / "hypothesis"
    ours = Path(charmap.charmap_file()).resolve().parent
    if ours.is_dir():
        shutil.copytree(ours, home / ours.relative_to(ours.parents[1]))
    return home


def test_tables_are_reused_until_a_table_file_changes_and_pack_the_same_bytes(
    home: Path, tmp_path: Path
) -> None:
    folder, packed = _run_tables(home, tmp_path / "a")
    # What the guest gets: every table Hypothesis keeps, at its own path, decompressing to its content.
    with tarfile.open(fileobj=io.BytesIO(packed)) as tar:
        members = {"/" + m.name: tar.extractfile(m).read() for m in tar}
    files = sorted(folder.glob("*.json.gz"))
    assert folder.is_relative_to(home) and len(files) >= 2
    assert sorted(members) == [str(f) for f in files]
    for f in files:
        assert gzip.decompress(members[str(f)]) == gzip.decompress(f.read_bytes())

    (entry,) = _entries(tmp_path / "a", "hypothesis-tables")
    _replace_answer(entry, base64.b64encode(b"from the cache").decode())
    assert _run_tables(home, tmp_path / "a")[1] == b"from the cache"  # a hit: nothing re-read

    table = files[0]
    st = table.stat()
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _run_tables(home, tmp_path / "a")[1] == packed  # changed: read and packed again
    assert len(_entries(tmp_path / "a", "hypothesis-tables")) == 1
    # Packed byte for byte the same without the cache (the collected worker's key holds them).
    assert _run_tables(home, tmp_path / "fresh")[1] == packed


def test_no_tables_when_the_tests_do_not_import_hypothesis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "hypothesis")
    assert hypothesis_tables(tmp_path) == b""
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_an_unreadable_entry_costs_a_read_never_an_error(home: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    packed = _run_tables(home, cache)[1]
    (entry,) = _entries(cache, "hypothesis-tables")
    garbage = [b"", b"{not json", json.dumps({"witnesses": [1], "stamp": []}).encode()]
    garbage.append(b" " * (cached_reads.HYPOTHESIS_TABLES_MAX * 2 + 1))  # past the bound: not read
    for data in garbage:
        entry.write_bytes(data)
        assert _run_tables(home, cache)[1] == packed


# -- which distribution provides a package -------------------------------------------

#: Old enough to be past RACY_SECONDS; each step of a test backdates to a
#: different time, so importlib's own listing cache (keyed by mtime) sees the change.
_HOUR = 3600 * 10**9


def _backdate(root: Path, hours_ago: int) -> None:
    ns = time.time_ns() - hours_ago * _HOUR
    for path in [root, *root.rglob("*")]:
        os.utime(path, ns=(ns, ns))


def _install(site: Path, name: str, top_level: str) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text(f"{top_level}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site folder that is the whole ``sys.path``, holding one distribution."""
    site = tmp_path / "site"
    _install(site, "fakedist", "fakepkg")
    _backdate(site, 10)
    monkeypatch.setattr(sys, "path", [str(site)])
    importlib.invalidate_caches()
    return site


def test_distributions_are_reused_until_a_file_they_came_from_changes(
    site: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    assert packages_distributions(cache) == {"fakepkg": ["fakedist"]}
    (entry,) = _entries(cache, "distributions")
    _replace_answer(entry, {"fakepkg": ["from-the-cache"]})
    assert packages_distributions(cache) == {"fakepkg": ["from-the-cache"]}

    (site / "fakedist-1.0.dist-info" / "top_level.txt").write_text("otherpkg\n")
    _backdate(site, 9)
    importlib.invalidate_caches()
    expected = {"otherpkg": ["fakedist"]}
    assert importlib.metadata.packages_distributions() == expected
    assert packages_distributions(cache) == expected  # changed in place: read again
    assert packages_distributions(cache) == expected


def test_a_distribution_installed_or_removed_is_seen(site: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert packages_distributions(cache) == {"fakepkg": ["fakedist"]}
    _install(site, "newdist", "newpkg")
    _backdate(site, 8)
    importlib.invalidate_caches()
    assert packages_distributions(cache) == {"fakepkg": ["fakedist"], "newpkg": ["newdist"]}
    for path in sorted((site / "fakedist-1.0.dist-info").iterdir()):
        path.unlink()
    (site / "fakedist-1.0.dist-info").rmdir()
    _backdate(site, 7)
    importlib.invalidate_caches()
    assert packages_distributions(cache) == {"newpkg": ["newdist"]}


def test_distributions_changed_just_now_are_not_saved(site: Path, tmp_path: Path) -> None:
    _install(site, "newdist", "newpkg")  # written now: could change again within the mtime tick
    importlib.invalidate_caches()
    cache = tmp_path / "cache"
    assert packages_distributions(cache) == {"fakepkg": ["fakedist"], "newpkg": ["newdist"]}
    assert _entries(cache, "distributions") == []


def test_each_sys_path_has_its_entry_and_the_entries_are_bounded(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    for i in range(MAX_ENTRIES + 3):
        monkeypatch.setattr(sys, "path", [str(site), str(tmp_path / f"absent{i}")])
        assert packages_distributions(cache) == {"fakepkg": ["fakedist"]}
        assert len(_entries(cache, "distributions")) == min(i + 1, MAX_ENTRIES)
    # The latest is among those kept, and still answers.
    for entry in _entries(cache, "distributions"):
        _replace_answer(entry, {"x": ["y"]})
    assert packages_distributions(cache) == {"x": ["y"]}
