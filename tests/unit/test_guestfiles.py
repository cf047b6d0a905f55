"""What goes into the guest: project tree selection, the size cap, shipped distributions."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_gondolin import guestfiles
from pytest_gondolin.errors import ConfigError


def _tree(root: Path, *, fake_git: bool = True) -> None:
    rels = [
        "pkg/__init__.py",
        "tests/test_a.py",
        "conftest.py",
        ".venv/lib/x.py",
        "pkg/__pycache__/m.pyc",
        "node_modules/a/b.js",
        "data/ignored.bin",
        "build/lib/z.py",
        "x.egg-info/PKG-INFO",
    ]
    if fake_git:
        rels.append(".git/config")
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(rel)


def test_plain_folder_excludes_caches_and_envs(tmp_path: Path) -> None:
    _tree(tmp_path)
    files = {p.as_posix() for p in guestfiles.project_files(tmp_path)}
    assert files == {"pkg/__init__.py", "tests/test_a.py", "conftest.py", "data/ignored.bin"}


def test_git_checkout_honours_gitignore(tmp_path: Path) -> None:
    _tree(tmp_path, fake_git=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("data/\n")
    files = {p.as_posix() for p in guestfiles.project_files(tmp_path)}
    assert "data/ignored.bin" not in files
    assert {"pkg/__init__.py", "tests/test_a.py", "conftest.py", ".gitignore"} <= files


def test_pack_uses_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    with tarfile.open(fileobj=io.BytesIO(guestfiles.pack_project(tmp_path))) as tar:
        names = tar.getnames()
    assert names == [str(tmp_path / "a.py").lstrip("/")]


def test_size_cap_names_the_biggest_files(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"\0" * 2048)
    (tmp_path / "small.py").write_text("x")
    with pytest.raises(ConfigError, match=r"over the 0 MiB limit.*big\.bin"):
        guestfiles.pack_project(tmp_path, limit=1024)


def test_pytest_ships_with_its_dependencies() -> None:
    names = {d.metadata["Name"].lower() for d in guestfiles.dependency_closure(["pytest"])}
    assert {"pytest", "pluggy", "iniconfig", "packaging"} <= names
    with tarfile.open(fileobj=io.BytesIO(guestfiles.pack_distributions())) as tar:
        names_in_tar = tar.getnames()
    assert any(n.endswith("site/_pytest/main.py") for n in names_in_tar)
    assert not any(n.endswith(".pyc") for n in names_in_tar)


def test_missing_distribution_is_named() -> None:
    with pytest.raises(ConfigError, match="no-such-dist-xyz"):
        guestfiles.dependency_closure(["no-such-dist-xyz"])
