"""What goes into the guest: project tree selection, the size cap, shipped distributions."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

import pytest_gondolin.sandbox.project_files as project_files
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
    files = {p.as_posix() for p in project_files.project_files(tmp_path)}
    assert files == {"pkg/__init__.py", "tests/test_a.py", "conftest.py", "data/ignored.bin"}


def test_git_checkout_honours_gitignore(tmp_path: Path) -> None:
    _tree(tmp_path, fake_git=False)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("data/\n")
    files = {p.as_posix() for p in project_files.project_files(tmp_path)}
    assert "data/ignored.bin" not in files
    assert {"pkg/__init__.py", "tests/test_a.py", "conftest.py", ".gitignore"} <= files


def test_pack_uses_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    with tarfile.open(fileobj=io.BytesIO(project_files.pack_project(tmp_path))) as tar:
        names = tar.getnames()
    assert names == [str(tmp_path / "a.py").lstrip("/")]


def test_size_cap_names_the_biggest_files(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(b"\0" * 2048)
    (tmp_path / "small.py").write_text("x")
    with pytest.raises(ConfigError, match=r"over the 0 MiB limit.*big\.bin"):
        project_files.pack_project(tmp_path, limit=1024)


def test_pytest_ships_with_its_dependencies() -> None:
    names = {d.metadata["Name"].lower() for d in project_files.dependency_closure(["pytest"])}
    assert {"pytest", "pluggy", "iniconfig", "packaging"} <= names
    with tarfile.open(fileobj=io.BytesIO(project_files.pack_distributions())) as tar:
        names_in_tar = tar.getnames()
    assert any(n.endswith("site/_pytest/main.py") for n in names_in_tar)
    assert not any(n.endswith(".pyc") for n in names_in_tar)


def test_missing_distribution_is_named() -> None:
    with pytest.raises(ConfigError, match="no-such-dist-xyz"):
        project_files.dependency_closure(["no-such-dist-xyz"])


# -- the project copy never leaves the rootdir ---------------------------------------------------

SECRET = b"HOST-SECRET-d41d8cd9"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the project, holding files that must never reach the guest."""
    folder = tmp_path / "outside"
    folder.mkdir()
    for name in ("mod.py", "secret.py"):
        (folder / name).write_bytes(SECRET)
    return folder


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "ok" / "nested").mkdir(parents=True)
    (root / "ok" / "nested" / "deep.py").write_text("ok = 1\n")
    (root / "top.py").write_text("top = 1\n")
    return root


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def _packed(root: Path) -> dict[str, bytes]:
    """The project tar as {path relative to root: content}; asserts no member leaves root."""
    out: dict[str, bytes] = {}
    prefix = str(root).strip("/") + "/"
    with tarfile.open(fileobj=io.BytesIO(project_files.pack_project(root))) as tar:
        for member in tar.getmembers():
            assert member.isreg() and member.name.startswith(prefix), member.name
            fh = tar.extractfile(member)
            assert fh is not None
            out[member.name.removeprefix(prefix)] = fh.read()
    return out


def _skipped_warning(caplog: pytest.LogCaptureFixture) -> str:
    messages = [
        r.getMessage() for r in caplog.records if r.name == "pytest_gondolin.sandbox.project_files"
    ]
    assert len(messages) == 1, messages
    return messages[0]


@pytest.mark.parametrize("git", [False, True], ids=["plain", "git"])
@pytest.mark.parametrize("folder", ["pkg", "a/b/c"], ids=["depth1", "depth3"])
def test_symlinked_folder_pointing_outside_is_not_followed(
    project: Path, outside: Path, caplog: pytest.LogCaptureFixture, git: bool, folder: str
) -> None:
    (project / folder).mkdir(parents=True)
    (project / folder / "mod.py").write_text("mod = 1\n")
    if git:
        _git(project, "init", "-q")
        _git(project, "add", "-A")  # the index lists <folder>/mod.py ...
    shutil.rmtree(project / folder)
    (project / folder).symlink_to(outside, target_is_directory=True)  # ... now outside
    packed = _packed(project)
    assert SECRET not in b"".join(packed.values())
    assert not any(p.startswith(folder) for p in packed)
    # Negative control: an ordinary nested file is copied.
    assert packed["ok/nested/deep.py"] == b"ok = 1\n"
    assert f"{folder}/ (symlink)" in _skipped_warning(caplog)


@pytest.mark.parametrize("git", [False, True], ids=["plain", "git"])
def test_symlinked_file_pointing_outside_is_not_followed(
    project: Path, outside: Path, caplog: pytest.LogCaptureFixture, git: bool
) -> None:
    (project / "ok" / "conf.py").symlink_to(outside / "secret.py")
    if git:
        _git(project, "init", "-q")
        _git(project, "add", "-A")
    packed = _packed(project)
    assert SECRET not in b"".join(packed.values())
    assert set(packed) == {"top.py", "ok/nested/deep.py"}
    assert "ok/conf.py (symlink)" in _skipped_warning(caplog)


@pytest.mark.parametrize("git", [False, True], ids=["plain", "git"])
def test_symlink_pointing_inside_the_tree_is_skipped_not_followed(
    project: Path, caplog: pytest.LogCaptureFixture, git: bool
) -> None:
    """Documented behaviour: a symlink is never followed, even to a file the copy holds anyway."""
    (project / "alias.py").symlink_to("top.py")
    (project / "ok" / "again").symlink_to("nested", target_is_directory=True)
    if git:
        _git(project, "init", "-q")
        _git(project, "add", "-A")
    assert set(_packed(project)) == {"top.py", "ok/nested/deep.py"}
    message = _skipped_warning(caplog)
    assert "alias.py (symlink)" in message
    assert "ok/again" in message


def _write_index(root: Path, names: list[str]) -> None:
    """A hand-made git index (version 2) listing ``names`` -- git itself refuses such paths."""
    hashed = subprocess.run(
        ["git", "-C", str(root), "hash-object", "-w", "--stdin"],
        input=b"x",
        capture_output=True,
        check=True,
    )
    blob = hashed.stdout.decode().strip()
    body = b""
    for name in sorted(n.encode() for n in names):
        entry = struct.pack(">10I", 0, 0, 0, 0, 0, 0, 0o100644, 0, 0, 1)
        entry += bytes.fromhex(blob) + struct.pack(">H", len(name)) + name
        body += entry + b"\0" * (8 - len(entry) % 8)
    data = b"DIRC" + struct.pack(">II", 2, len(names)) + body
    (root / ".git" / "index").write_bytes(data + hashlib.sha1(data).digest())


def test_git_entries_outside_the_tree_are_refused(
    project: Path, outside: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _git(project, "init", "-q")
    hostile = [
        str(outside / "secret.py"),  # absolute
        "../outside/secret.py",
        "ok/../../outside/mod.py",
        "./top.py",
    ]
    _write_index(project, ["top.py", "ok/nested/deep.py", *hostile])
    # The crafted entries do reach project_files: git lists them as they are.
    assert set(hostile) <= (project_files._git_files(project) or set())
    packed = _packed(project)
    assert SECRET not in b"".join(packed.values())
    assert set(packed) == {"top.py", "ok/nested/deep.py"}  # negative control: these are copied
    message = _skipped_warning(caplog)
    for path in hostile:
        assert f"{path} (outside the project)" in message


@pytest.mark.parametrize(
    ("rel", "leaves"),
    [
        ("a.py", False),
        ("pkg/sub/m.py", False),
        ("..a/b..", False),
        ("/etc/passwd", True),
        ("../x", True),
        ("a/../../x", True),
        ("a/..", True),
        ("./a", True),
        ("a//b", True),
        ("a/", True),
    ],
)
def test_listed_path_forms(rel: str, leaves: bool) -> None:
    assert project_files._leaves_tree(rel) is leaves


@pytest.mark.parametrize("git", [False, True], ids=["plain", "git"])
def test_file_swapped_for_symlink_after_listing_is_not_followed(
    project: Path, outside: Path, git: bool
) -> None:
    if git:
        _git(project, "init", "-q")
        _git(project, "add", "-A")
    entries = project_files._scan(project, [])
    rel, dir_fd, name = next(entries)
    assert rel == "top.py"  # a regular file when listed
    # Negative control: opened now, it is read.
    fh = project_files._open_regular(dir_fd, name)
    assert fh is not None
    with fh:
        assert fh.read() == b"top = 1\n"
    swap = project / "swap.tmp"
    swap.symlink_to(outside / "secret.py")
    os.replace(swap, project / "top.py")  # atomic: the name is a symlink from now on
    assert project_files._open_regular(dir_fd, name) is None
    os.unlink(project / "top.py")
    os.mkfifo(project / "top.py")  # a FIFO would block a plain open
    assert project_files._open_regular(dir_fd, name) is None
    entries.close()


def test_folder_swapped_for_symlink_during_the_walk_is_not_entered(
    project: Path, outside: Path
) -> None:
    entries = project_files._scan(project, [])
    assert next(entries)[0] == "top.py"  # "ok" was seen as a real folder by now
    shutil.rmtree(project / "ok")
    (outside / "nested").mkdir()
    (outside / "nested" / "deep.py").write_bytes(SECRET)
    (project / "ok").symlink_to(outside, target_is_directory=True)
    assert [rel for rel, _, _ in entries] == []
    # Negative control: a fresh walk lists the real folder's file again once it is back.
    (project / "ok").unlink()
    (project / "ok" / "nested").mkdir(parents=True)
    (project / "ok" / "nested" / "deep.py").write_text("ok = 1\n")
    assert [rel for rel, _, _ in project_files._scan(project, [])] == [
        "top.py",
        "ok/nested/deep.py",
    ]


def test_special_files_are_skipped_without_blocking(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(project / "pipe")
    assert set(_packed(project)) == {"top.py", "ok/nested/deep.py"}
    assert "pipe (not a regular file)" in _skipped_warning(caplog)


def test_skipped_paths_are_warned_once_and_capped(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(project_files.MAX_SKIPPED_NAMED + 5):
        (project / f"link{i:02}.py").symlink_to("top.py")
    _packed(project)
    _packed(project)  # a second sandbox in the same session: no second warning
    message = _skipped_warning(caplog)
    assert message.startswith(f"{project_files.MAX_SKIPPED_NAMED + 5} path(s) of {project}")
    assert message.endswith(" and 5 more")


def test_pack_keeps_file_modes(project: Path) -> None:
    (project / "run.sh").write_text("#!/bin/sh\n")
    (project / "run.sh").chmod(0o755)
    (project / "top.py").chmod(0o640)
    with tarfile.open(fileobj=io.BytesIO(project_files.pack_project(project))) as tar:
        modes = {Path(m.name).name: m.mode for m in tar.getmembers()}
    assert modes["run.sh"] == 0o755 and modes["top.py"] == 0o640


def test_cached_requirements_are_served_without_writing_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only cache that already holds a requirement set serves it: no lock, no pip."""
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(project_files.subprocess, "run", _no_pip)
    # A first call finds nothing and must install (pip refused here): control.
    with pytest.raises(AssertionError, match="pip must not run"):
        project_files.requirements_dir(["six"])
    folder = next(p for p in (tmp_path / "requirements").iterdir() if p.suffix == ".lock")
    target = folder.with_suffix("")
    (target / "six.py").parent.mkdir()
    (target / ".complete").write_text("six\n")
    folder.unlink()
    (tmp_path / "requirements").chmod(0o555)
    try:
        assert project_files.requirements_dir(["six"]) == target
        assert not any(p.suffix == ".lock" for p in (tmp_path / "requirements").iterdir())
    finally:
        (tmp_path / "requirements").chmod(0o755)


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run")
