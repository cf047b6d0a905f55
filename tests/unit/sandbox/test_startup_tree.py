"""What the guest worker needs before its go (``sandbox/startup_tree.py``), on real files."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pluggy
import pytest

from pytest_gondolin.sandbox.startup_tree import join_tars, pack_startup_tree, startup_paths
from tests.tars import tar_of


def test_joined_tars_unpack_whole_with_plaintar_of(tmp_path: Path) -> None:
    joined = join_tars(tar_of({"a/one": b"1"}), b"", tar_of({"b/two": b"22"}))
    subprocess.run(["tar", "-xf", "-", "-C", str(tmp_path)], input=joined, check=True)
    assert (tmp_path / "a" / "one").read_bytes() == b"1"
    assert (tmp_path / "b" / "two").read_bytes() == b"22"
    # control: concatenated, plain tar stops at the first archive's end
    subprocess.run(
        ["tar", "-xf", "-", "-C", str(tmp_path / "a")],
        input=tar_of({"x": b""}) + tar_of({"y": b""}),
        check=True,
    )
    assert (tmp_path / "a" / "x").exists() and not (tmp_path / "a" / "y").exists()
    assert join_tars(b"", b"") == b""


def test_nothing_is_needed_early_when_pytest_comes_from_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "src" / "mypkg").mkdir(parents=True)
    assert startup_paths(tmp_path) == []
    assert pack_startup_tree(tmp_path) == b""


def test_pytests_own_dependency_under_the_root_is_packed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host imported pluggy from the project's ``src``: that package, at its absolute path."""
    where = tmp_path / "src" / "pluggy"
    shutil.copytree(
        Path(pluggy.__file__).parent, where, ignore=shutil.ignore_patterns("__pycache__")
    )
    (where / "__pycache__").mkdir()
    (where / "__pycache__" / "stale.pyc").write_bytes(b"")
    stand_in = types.ModuleType("pluggy")
    stand_in.__spec__ = importlib.util.spec_from_file_location(
        "pluggy", where / "__init__.py", submodule_search_locations=[str(where)]
    )
    monkeypatch.setitem(sys.modules, "pluggy", stand_in)  # find_spec answers from sys.modules
    assert startup_paths(tmp_path) == [where]
    with tarfile.open(fileobj=io.BytesIO(pack_startup_tree(tmp_path))) as tar:
        names = tar.getnames()
    assert f"{where.relative_to('/')}/__init__.py" in names
    assert not any("__pycache__" in n or "/src/" not in n for n in names), names
