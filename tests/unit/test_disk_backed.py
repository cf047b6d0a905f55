"""Which folders a carried tar fills under the guest's tmpfs (vm/disk_backed.py), on real tars;
the agent's bind request (guest/binds.py) on real folders, with mount(2) recorded."""

from __future__ import annotations

import errno
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

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


# -- the agent's side (guest/binds.py), with mount(2) recorded, not made -----------


def _binds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, points: list[str]
) -> tuple[Callable[[list[tuple[str, str]]], None], list[tuple[str, str]]]:
    from pytest_gondolin.guest import binds

    table = tmp_path / "mountinfo"
    table.write_text(
        "".join(
            f"{i} 1 0:{i} / {point} rw,relatime shared:1 - tmpfs tmpfs rw\n"
            for i, point in enumerate(points, start=20)
        )
    )
    made: list[tuple[str, str]] = []
    monkeypatch.setattr(
        binds, "mount", lambda source, target, fstype, flags: made.append((source, target))
    )
    return lambda pairs: binds.bind_folders(pairs, mountinfo=str(table)), made


def test_the_agent_binds_missing_and_empty_folders_and_skips_bound_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = tmp_path / "has space"
    escaped = str(bound).replace(" ", "\\040")
    bind, made = _binds(tmp_path, monkeypatch, [escaped])
    (tmp_path / "empty").mkdir()
    pairs = [
        (str(tmp_path / "disk1"), str(tmp_path / "new" / "deep")),
        (str(tmp_path / "disk2"), str(tmp_path / "empty")),
        (str(tmp_path / "disk3"), str(bound)),  # a mount point already (escaped in the table)
        (str(tmp_path / "disk1"), str(tmp_path / "new" / "deep")),  # named twice
    ]
    bind(pairs)
    assert made == [pairs[0], pairs[1]]
    assert (tmp_path / "disk1").is_dir() and (tmp_path / "new" / "deep").is_dir()


def test_the_agent_binds_nothing_when_one_folder_holds_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bind, made = _binds(tmp_path, monkeypatch, [])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("kept")
    (tmp_path / "file").write_text("not a folder")
    for blocked in ("full", "file"):
        with pytest.raises(OSError, match=blocked) as info:
            bind(
                [
                    (str(tmp_path / "d1"), str(tmp_path / "a")),
                    (str(tmp_path / "d2"), str(tmp_path / blocked)),
                ]
            )
        assert info.value.errno == errno.ENOTEMPTY
    assert made == [] and not (tmp_path / "d1").exists()
