"""The cache folder: named without writing, one clear error when it cannot be used.

Only VMs need the cache. A folder that cannot be created, or a write it
refuses, is one :class:`CacheDirError` naming the folder and
``GONDOLIN_CACHE_DIR``; a read-only folder still serves what is in it (its
locks move to the runtime folder); a folder another user controls is
reported once. Root writes through any mode bits, so "cannot be written"
is made here with a file where a folder should be; a real read-only cache
(a read-only mount, an unprivileged user) is in ``tests/plugin/test_cache_folder.py``.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from pytest_gondolin import paths
from pytest_gondolin.errors import CacheDirError, ConfigError, NetworkPolicyError
from pytest_gondolin.netpolicy.http.ca import CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority
from pytest_gondolin.vm import guest_ca

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="only root can chown a folder")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cache variables set; a private runtime base; returns a scratch folder."""
    for name in ("GONDOLIN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr(paths, "_trust_checked", set())
    return tmp_path


@pytest.mark.parametrize(
    ("problem", "need", "expected"),
    [
        (
            "cannot be created (Permission denied)",
            "",
            "the pytest-gondolin cache folder /nonexistent/.cache/pytest-gondolin cannot be "
            "created (Permission denied); set GONDOLIN_CACHE_DIR to a folder this user can write",
        ),
        (
            "cannot be written (Read-only file system: /nonexistent/.cache/pytest-gondolin/images)",
            "image bookworm-0123 must be built there",
            "the pytest-gondolin cache folder /nonexistent/.cache/pytest-gondolin cannot be "
            "written (Read-only file system: /nonexistent/.cache/pytest-gondolin/images), and "
            "image bookworm-0123 must be built there; set GONDOLIN_CACHE_DIR to a folder this "
            "user can write",
        ),
    ],
)
def test_the_message_names_the_folder_and_the_variable(
    problem: str, need: str, expected: str
) -> None:
    error = CacheDirError(Path("/nonexistent/.cache/pytest-gondolin"), problem, need=need)
    assert str(error) == expected
    assert (error.path, error.problem, error.need) == (
        "/nonexistent/.cache/pytest-gondolin",
        problem,
        need,
    )
    assert isinstance(error, ConfigError)


def test_cache_root_follows_the_environment_and_creates_nothing(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(env / "home"))
    assert paths.cache_root() == env / "home" / ".cache" / "pytest-gondolin"
    monkeypatch.setenv("XDG_CACHE_HOME", str(env / "xdg"))
    assert paths.cache_root() == env / "xdg" / "pytest-gondolin"
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(env / "explicit"))
    assert paths.cache_root() == env / "explicit"
    assert not any((env / name).exists() for name in ("home", "xdg", "explicit"))


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        ("file-in-place", "is not a folder"),
        ("file-on-the-way", "cannot be created (Not a directory)"),
    ],
)
def test_a_cache_that_cannot_be_created_is_one_error(
    env: Path, monkeypatch: pytest.MonkeyPatch, layout: str, problem: str
) -> None:
    blocker = env / "blocker"
    blocker.write_text("a file, not a folder")
    root = blocker if layout == "file-in-place" else blocker / "home" / ".cache"
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(root))
    with pytest.raises(CacheDirError) as info:
        paths.cache_dir()
    assert (info.value.path, info.value.problem) == (str(root), problem)
    assert "GONDOLIN_CACHE_DIR" in str(info.value)
    # Negative control: a folder that can be made is made.
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(env / "fine" / "cache"))
    assert paths.cache_dir().is_dir()


def test_write_problem_table(env: Path) -> None:
    (env / "file").write_text("x")
    (env / "dir").mkdir()
    assert paths.cache_write_problem(env / "dir") is None
    assert paths.cache_write_problem(env / "missing" / "deeper") is None  # can be created
    assert paths.cache_write_problem(env / "file") == "is not a folder"
    assert paths.cache_write_problem(env / "file" / "cache") == (
        f"cannot be created ({env / 'file'} is not a folder)"
    )
    assert not (env / "missing").exists()  # it only looked


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_refused_write_becomes_cache_dir_error(
    env: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(env / "cache"))
    with pytest.raises(CacheDirError) as info, paths.writing_cache("image x must be built there"):
        raise OSError(err, os.strerror(err), str(env / "cache" / "images"))
    assert info.value.path == str(env / "cache")
    assert str(env / "cache" / "images") in info.value.problem
    assert info.value.need == "image x must be built there"


def test_other_os_errors_pass_unchanged(env: Path) -> None:
    """Negative control: a full disk is not a wrong cache folder."""
    with pytest.raises(OSError) as info, paths.writing_cache("anything"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert type(info.value) is OSError and info.value.errno == errno.ENOSPC


def test_locks_move_to_the_runtime_folder_when_the_cache_cannot_hold_them(env: Path) -> None:
    writable = env / "cache" / "snapshots"
    writable.mkdir(parents=True)
    assert paths.lock_path(writable / "k.lock") == writable / "k.lock"
    (writable / "old.lock").write_text("")
    assert paths.lock_path(writable / "old.lock") == writable / "old.lock"
    # A folder that cannot be written (here: a file stands where it should be).
    (env / "ro").write_text("")
    moved = paths.lock_path(env / "ro" / "k.lock")
    assert moved.parent == paths.runtime_dir() / "cache-locks"
    assert paths.private_dir_problem(paths.runtime_dir()) is None
    # Keyed by the lock's path: the same lock in every process, another lock elsewhere.
    assert paths.lock_path(env / "ro" / "k.lock") == moved
    assert paths.lock_path(env / "ro" / "other.lock") != moved


def test_a_lock_in_a_cache_folder_not_made_yet_makes_the_folder(env: Path) -> None:
    """Every process locks the same file for a resource, before and after its folder exists."""
    lock = env / "cache" / "images" / ".locks" / "k.lock"
    assert not lock.parent.exists()
    first = paths.lock_path(lock)  # as the first process, before anything made the folder
    assert first == lock and lock.parent.is_dir()
    assert paths.lock_path(lock) == first  # as every later one
    # Negative control: where the folder cannot be made, the runtime folder, every time.
    (env / "blocked").write_text("")
    moved = paths.lock_path(env / "blocked" / "sub" / "k.lock")
    assert moved.parent == paths.runtime_dir() / "cache-locks"
    assert paths.lock_path(env / "blocked" / "sub" / "k.lock") == moved


def test_a_cache_others_may_write_in_is_reported_once(
    env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shared = env / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(shared))
    caplog.set_level(logging.WARNING, logger="pytest_gondolin.paths")
    assert paths.cache_dir() == shared  # used all the same
    paths.cache_dir()
    warnings = [r.getMessage() for r in caplog.records if r.name == "pytest_gondolin.paths"]
    assert len(warnings) == 1, warnings
    assert str(shared) in warnings[0] and "CA key" in warnings[0]
    assert "777" in warnings[0] and "GONDOLIN_CACHE_DIR" in warnings[0]
    # Negative control: a folder only we can write is not reported.
    private = env / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(private))
    caplog.clear()
    paths.cache_dir()
    assert not [r for r in caplog.records if r.name == "pytest_gondolin.paths"]
    assert paths.cache_trust_problem(private) is None


@needs_root
def test_a_cache_another_user_owns_or_whose_group_may_write_is_reported(env: Path) -> None:
    theirs = env / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 12345, 12345)
    assert paths.cache_trust_problem(theirs) == f"is owned by uid 12345, not {os.getuid()}"
    shared = env / "shared-group"
    shared.mkdir()
    shared.chmod(0o770)
    os.chown(shared, os.getuid(), 12345)  # a group that is not this user's own
    assert paths.cache_trust_problem(shared) == "has mode 770 (group 12345 may write in it)"
    # Negative control: this user's private group (root's own "root" group) is this user alone.
    os.chown(shared, os.getuid(), 0)
    assert paths.cache_trust_problem(shared) is None


def test_a_new_cache_folder_is_private(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(env / "new" / "cache"))
    old = os.umask(0)
    try:
        root = paths.cache_dir()
    finally:
        os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o700
    assert paths.cache_trust_problem(root) is None


# -- the CA of a read-only cache ------------------------------------------------------


def test_a_read_only_cache_ca_is_read_without_its_lock(env: Path) -> None:
    folder = env / "ca"
    made = CertificateAuthority.load_or_create(folder)
    (folder / "gondolin-ca.lock").unlink()  # the lock plays no part in reading
    assert guest_ca._read(folder).ca_pem == made.ca_pem


def test_a_read_only_cache_without_a_ca_names_the_folder(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(env))
    with pytest.raises(CacheDirError) as info:
        guest_ca._read(env / "ca")
    assert info.value.path == str(env) and "CA" in info.value.need


def test_a_read_only_cache_ca_that_does_not_match_is_refused(env: Path) -> None:
    """Negative control: a key from one CA and a certificate from another are never used."""
    one = CertificateAuthority.load_or_create(env / "one")
    CertificateAuthority.load_or_create(env / "two")
    (env / "two" / CA_CERT_FILE).write_bytes(one.ca_pem)
    with pytest.raises(NetworkPolicyError, match="do not belong together"):
        guest_ca._read(env / "two")
    (env / "two" / CA_KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(NetworkPolicyError, match="corrupt"):
        guest_ca._read(env / "two")
