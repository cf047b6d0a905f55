"""The agent unpacks a small tree the host wrote (``guest/unpack.py``), as ``tar`` would as root."""

from __future__ import annotations

import io
import tarfile

import pytest

from pytest_gondolin.errors import AgentRequestError
from pytest_gondolin.vm.machine import VM

TAR = "/var/tmp/tree.tar"


def _tree() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(
            name: str, kind: bytes, *, data: bytes = b"", mode: int = 0o644, link: str = ""
        ) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, 1_600_000_000, link
            info.uid, info.gid, info.uname, info.gname = 0, 0, "root", "root"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("tmp/tree/pkg", tarfile.DIRTYPE, mode=0o755)
        add("tmp/tree/pkg/run.sh", tarfile.REGTYPE, data=b"#!/bin/sh\necho ran\n", mode=0o755)
        add("tmp/tree/pkg/data.txt", tarfile.REGTYPE, data=b"bytes\n", mode=0o600)
        add("tmp/tree/pkg/link", tarfile.SYMTYPE, link="data.txt")
    second = io.BytesIO()  # a second tar joined after the first: both unpacked
    with tarfile.open(fileobj=second, mode="w") as tar:
        info = tarfile.TarInfo("tmp/tree/other.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"two"))
    return buf.getvalue() + second.getvalue()


def test_a_small_tree_is_unpacked_with_modes_times_and_links_and_its_folder_made(vm: VM) -> None:
    vm.write_file(TAR, _tree(), mode=0o600)
    vm.unpack_tar(TAR, folder="/tmp/tree/start/here", timeout=60)
    listing = vm.exec(
        "cd /tmp/tree && stat -c '%n %a %Y %U' pkg/run.sh pkg/data.txt && readlink pkg/link"
        " && cat pkg/link other.txt && pkg/run.sh && test -d start/here && test ! -e " + TAR,
        check=True,
    ).stdout.splitlines()
    assert listing == [
        "pkg/run.sh 755 1600000000 root",
        "pkg/data.txt 600 1600000000 root",
        "data.txt",
        "bytes",
        "tworan",  # other.txt has no newline; run.sh's output follows
    ]


def test_a_file_that_is_not_a_tar_is_refused_and_removed(vm: VM) -> None:
    vm.write_file(TAR, b"not a tar at all" * 100)
    with pytest.raises(AgentRequestError, match="not a tar"):
        vm.unpack_tar(TAR, folder="/tmp/x", timeout=60)
    assert vm.exec(f"test -e {TAR}").returncode == 1
