"""The initramfs writer against the format the kernel reads (checked with the cpio tool's parser logic)."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_gondolin.image import cpio


def parse(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A small independent newc reader: (name, mode, data, rdev) per member, trailer excluded."""
    out = []
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        assert archive[name_start + namesize - 1] == 0
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start : data_start + size]
        pos = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert len(archive) % 4 == 0
            return out
        out.append((name, mode, data, (rmaj, rmin)))


def test_members_round_trip() -> None:
    entries = [
        cpio.Entry.directory("/bin"),
        cpio.Entry.file("/bin/tool", b"\x7fELF...", 0o755),
        cpio.Entry.symlink("/bin/sh", "tool"),
        cpio.Entry.chardev("/dev/console", 5, 1),
        cpio.Entry.file("/empty", b""),
    ]
    members = parse(cpio.archive(entries))
    assert [m[0] for m in members] == ["bin", "bin/tool", "bin/sh", "dev/console", "empty"]
    assert stat.S_ISDIR(members[0][1]) and stat.S_IMODE(members[0][1]) == 0o755
    assert members[1][2] == b"\x7fELF..." and stat.S_IMODE(members[1][1]) == 0o755
    assert stat.S_ISLNK(members[2][1]) and members[2][2] == b"tool"
    assert stat.S_ISCHR(members[3][1]) and members[3][3] == (5, 1)
    assert members[4][2] == b""


def test_output_depends_only_on_entries() -> None:
    entries = [cpio.Entry.file("/a", b"x")]
    assert cpio.archive(entries) == cpio.archive(list(entries))


@given(
    st.lists(
        st.tuples(st.text("abcdefgh_", min_size=1, max_size=40), st.binary(max_size=300)),
        max_size=12,
    )
)
def test_any_files_round_trip(files: list[tuple[str, bytes]]) -> None:
    entries = [cpio.Entry.file(f"/d/{name}", data) for name, data in files]
    parsed = parse(cpio.archive(entries))
    assert [(n, d) for n, _, d, _ in parsed] == [(f"d/{name}", data) for name, data in files]


def test_concatenated_archives_parse_one_after_another() -> None:
    first = cpio.archive([cpio.Entry.file("/one", b"1")])
    second = cpio.archive([cpio.Entry.file("/two", b"22")])
    assert parse(first) == [("one", stat.S_IFREG | 0o644, b"1", (0, 0))]
    assert parse((first + second)[len(first) :])[0][0] == "two"


@pytest.mark.parametrize("path", ["/x", "x", "//x"])
def test_leading_slashes_are_dropped(path: str) -> None:
    assert parse(cpio.archive([cpio.Entry.file(path, b"")]))[0][0] == "x"
