"""The runtime root is private or not used: no other local user can own or redirect it (CWE-377)."""

from __future__ import annotations

import logging
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_gondolin import paths
from pytest_gondolin.errors import VMError
from pytest_gondolin.vm import reaper

UID = os.getuid()
#: Stands in for another local user; only root can hand a folder to it.
OTHER_UID = 12345
needs_root = pytest.mark.skipif(UID != 0, reason="only root can chown a folder to another uid")


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake runtime base (like /tmp: anyone may create names in it)."""
    folder = tmp_path / "base"
    folder.mkdir()
    folder.chmod(0o1777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    return folder


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pytest_gondolin.paths" and r.levelno == logging.WARNING
    ]


def _assert_private(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == UID
    assert stat.S_IMODE(st.st_mode) == 0o700


def test_missing_root_is_created_private(base: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = os.umask(0)  # mode 0700 must not depend on the umask
    try:
        root = paths.runtime_dir()
    finally:
        os.umask(old)
    assert root == base / f"gondolin-{UID}"
    _assert_private(root)
    assert _warnings(caplog) == []


def test_existing_private_root_is_used(base: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Negative control: a 0700 folder of ours is the root, with no warning."""
    mine = base / f"gondolin-{UID}"
    mine.mkdir(mode=0o700)
    (mine / "123-abcd0000").mkdir(mode=0o700)  # a VM folder from an earlier run survives
    assert paths.runtime_dir() == mine
    assert paths.runtime_roots() == [mine]
    assert (mine / "123-abcd0000").is_dir()
    assert _warnings(caplog) == []


def _world_writable(path: Path, outside: Path) -> None:
    path.mkdir()
    path.chmod(0o777)


def _group_readable(path: Path, outside: Path) -> None:
    path.mkdir()
    path.chmod(0o750)


def _symlink(path: Path, outside: Path) -> None:
    path.symlink_to(outside, target_is_directory=True)


def _plain_file(path: Path, outside: Path) -> None:
    path.write_text("not a folder")


def _other_user(path: Path, outside: Path) -> None:
    path.mkdir(mode=0o700)
    os.chown(path, OTHER_UID, OTHER_UID)


@pytest.mark.parametrize(
    ("plant", "problem"),
    [
        (_world_writable, "has mode 777"),
        (_group_readable, "has mode 750"),
        (_symlink, "is a symbolic link"),
        (_plain_file, "is not a folder"),
        pytest.param(_other_user, f"is owned by uid {OTHER_UID}", marks=needs_root),
    ],
    ids=["mode-0777", "mode-0750", "symlink", "file", "other-uid"],
)
def test_root_planted_by_another_user_is_not_used(
    base: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    plant: Callable[[Path, Path], None],
    problem: str,
) -> None:
    planted = base / f"gondolin-{UID}"
    target = tmp_path / "attacker"
    target.mkdir(mode=0o777)
    plant(planted, target)
    before = os.lstat(planted)

    root = paths.runtime_dir()
    rundir = reaper.new_rundir()

    assert root != planted and root.parent == base
    assert root.name.startswith(f"gondolin-{UID}-")
    _assert_private(root)
    assert rundir.parent == root
    _assert_private(rundir)
    # The planted entry and whatever it points to are left exactly as they were.
    after = os.lstat(planted)
    assert (after.st_mode, after.st_uid, after.st_ino) == (
        before.st_mode,
        before.st_uid,
        before.st_ino,
    )
    assert list(target.iterdir()) == []
    if stat.S_ISDIR(after.st_mode):
        assert list(planted.iterdir()) == []
    # One warning naming the problem, however often the root is asked for.
    assert paths.runtime_dir() == root
    reaper.new_rundir()
    assert paths.runtime_roots() == [root]  # the planted one is never scanned
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert str(planted) in warnings[0] and problem in warnings[0] and str(root) in warnings[0]


def test_root_choice_is_cached(base: Path) -> None:
    (base / f"gondolin-{UID}").mkdir(mode=0o777)
    (base / f"gondolin-{UID}").chmod(0o777)
    first = paths.runtime_dir()
    assert all(paths.runtime_dir() == first for _ in range(100))
    # One fallback folder, not one per call.
    assert sorted(p.name for p in base.iterdir()) == sorted([f"gondolin-{UID}", first.name])


def test_removed_root_is_created_again(base: Path) -> None:
    root = paths.runtime_dir()
    root.rmdir()
    assert paths.runtime_dir() == root
    _assert_private(root)


def test_roots_include_private_fallbacks_only(base: Path) -> None:
    """Scanners see this user's fallbacks from other runs, never a look-alike they do not own."""
    root = paths.runtime_dir()
    fallback = base / f"gondolin-{UID}-a1b2c3d4"
    fallback.mkdir(mode=0o700)
    shared = base / f"gondolin-{UID}-evil0000"
    shared.mkdir()
    shared.chmod(0o777)
    (base / f"gondolin-{UID}-link0000").symlink_to(fallback, target_is_directory=True)
    (base / f"gondolin-{UID}1-00000000").mkdir(mode=0o700)  # another uid's prefix
    assert paths.runtime_roots() == [root, fallback]


def test_socket_paths_fit_in_a_sockaddr(base: Path) -> None:
    """A fallback adds 9 bytes to the root; in /tmp every VM socket path stays far below 107."""
    (base / f"gondolin-{UID}").mkdir()
    (base / f"gondolin-{UID}").chmod(0o777)
    fallback = paths.runtime_dir()
    assert len(fallback.name) == len(f"gondolin-{UID}") + 9
    worst = f"/tmp/gondolin-{2**32 - 2}-abcdefgh"
    assert len(worst) + paths.RUNDIR_SOCKET_SUFFIX < 70
    rundir = reaper.new_rundir()
    assert len(str(rundir / "agent.sock")) <= len(str(fallback)) + paths.RUNDIR_SOCKET_SUFFIX


def test_vm_folder_never_reuses_an_existing_entry(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = paths.runtime_dir()
    fixed = uuid.UUID("0123abcd" + "0" * 24)
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (root / f"{os.getpid()}-0123abcd").symlink_to(target, target_is_directory=True)
    with pytest.raises(VMError, match="cannot create the VM runtime folder"):
        reaper.new_rundir()
    assert list(target.iterdir()) == []
    (root / f"{os.getpid()}-0123abcd").unlink()
    # Negative control: with the name free, the folder is made, private.
    _assert_private(reaper.new_rundir())


def test_private_dir_problem_table(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    ok.mkdir(mode=0o700)
    assert paths.private_dir_problem(ok) is None
    assert paths.private_dir_problem(tmp_path / "absent") == "does not exist"
    ok.chmod(0o701)
    assert paths.private_dir_problem(ok) == "has mode 701 (group or other access)"
    assert paths.owned_dir_problem(ok) is None
