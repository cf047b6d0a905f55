"""Which folders a carried tar fills under the guest's tmpfs (vm/disk_backed.py), on real tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from pytest_gondolin.errors import VMError
from pytest_gondolin.vm.disk_backed import MAX_FOLDERS, TMPFS_FOLDERS, folders_to_back


def _tar(*names: str, dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def test_the_guests_tmpfs_folders_are_the_ones_sysinit_mounts() -> None:
    assert set(TMPFS_FOLDERS) == {"/tmp", "/root", "/var/tmp", "/var/cache", "/var/log"}


def test_trees_under_tmpfs_are_named_by_their_top_folder() -> None:
    tars = [
        _tar(
            "root/.pyenv/versions/3.13.0/bin/python3.13",
            "tmp/work/proj/test_a.py",
            "tmp/work/venv/pyvenv.cfg",
            "var/cache/pkg/x.py",
            "home/me/proj/test_b.py",  # on the guest's disk already
            "usr/lib/python3/dist-packages/y.py",
        ),
        _tar("tmp/other/z.py", dirs=("tmp/emptydir",)),
    ]
    assert folders_to_back(tars) == [
        "/root/.pyenv",
        "/tmp/emptydir",
        "/tmp/other",
        "/tmp/work",
        "/var/cache/pkg",
    ]


def test_a_file_in_a_mounts_root_and_lookalike_paths_need_no_folder() -> None:
    tars = [_tar("tmp/loose.py", "tmpx/a/b.py", "var/tmpfoo/a/b.py", "./usr/x", "rootfs/a/b")]
    assert folders_to_back(tars) == []


def test_joined_tars_are_all_read() -> None:
    joined = _tar("tmp/a/1.py") + _tar("root/b/2.py")
    assert folders_to_back([joined]) == ["/root/b", "/tmp/a"]


def test_too_many_top_folders_is_refused() -> None:
    names = [f"tmp/d{i}/f" for i in range(MAX_FOLDERS + 1)]
    with pytest.raises(VMError, match="top-level folders"):
        folders_to_back([_tar(*names)])
