"""Parsers and helpers behind diagnostics: qcow2 backing names, kept-VM markers, artifact names."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_gondolin.diagnostics import MAX_DIR_NAME, artifact_dir_name
from pytest_gondolin.errors import ConfigError, ImageError
from pytest_gondolin.image.info import qcow2_backing_file, warm_snapshots
from pytest_gondolin.vm import kept, reaper

# -- qcow2 headers ---------------------------------------------------------------


def _header(version: int = 3, offset: int = 0, size: int = 0, name: bytes = b"") -> bytes:
    head = struct.pack(">4sIQI", b"QFI\xfb", version, offset, size)
    body = head.ljust(max(offset, len(head)), b"\0") + name
    return body


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_header(), None),
        (_header(offset=512, size=9, name=b"/a/b.qcow"), "/a/b.qcow"),
        (_header(version=2, offset=100, size=3, name=b"x/y"), "x/y"),
    ],
)
def test_backing_file_parsed(tmp_path: Path, data: bytes, expected: str | None) -> None:
    path = tmp_path / "f.qcow2"
    path.write_bytes(data)
    assert qcow2_backing_file(path) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"QFI",
        b"NOPE" + bytes(20),
        _header(version=1),
        _header(offset=512, size=2000, name=b"x" * 2000),  # name longer than the spec allows
        _header(offset=4, size=3, name=b"abc"),  # name inside the header
        _header(offset=512, size=10, name=b"short"),  # file ends early
        _header(offset=512, size=2, name=b"\xff\xfe"),  # not UTF-8
    ],
)
def test_bad_headers_raise_image_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.qcow2"
    path.write_bytes(data)
    with pytest.raises(ImageError):
        qcow2_backing_file(path)


def test_missing_file_is_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        qcow2_backing_file(tmp_path / "absent.qcow2")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_image_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.qcow2"
    path.write_bytes(_header(offset=24, size=len(data) % 1100, name=b"") + data)
    try:
        result = qcow2_backing_file(path)
    except ImageError:
        return
    assert result is None or isinstance(result, str)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_real_overlay_names_its_backing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot found by warm_snapshots() is exactly one whose backing file is in the image folder."""
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path / "cache"))
    image = tmp_path / "cache" / "images" / "demo-0123456789abcdef"
    image.mkdir(parents=True)
    snaps = tmp_path / "cache" / "snapshots"
    snaps.mkdir()
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None
    base = image / "rootfs.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    for name, backing in (("mine", base), ("other", tmp_path / "elsewhere.qcow2")):
        if not backing.exists():
            subprocess.run(
                [qemu_img, "create", "-q", "-f", "qcow2", str(backing), "16M"], check=True
            )
        subprocess.run(
            [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing),
             str(snaps / f"{name}.qcow2")],
            check=True,
        )  # fmt: skip
    (snaps / "junk.qcow2").write_bytes(b"not a qcow2")
    assert qcow2_backing_file(snaps / "mine.qcow2") == str(base)
    assert warm_snapshots("demo-0123456789abcdef") == [snaps / "mine.qcow2"]
    assert warm_snapshots("demo-ffffffffffffffff") == []


# -- kept-VM markers -----------------------------------------------------------------

GOOD_MARKER = {
    "nodeid": "tests/test_a.py::test_x[1]",
    "name": "vm3",
    "created": 1700000000.5,
    "image": "bookworm-93d05fc3da9826c2",
    "accel": "tcg",
    "memory_mib": 256,
}


def test_marker_round_trip() -> None:
    info = kept.KeptInfo.parse(json.dumps(GOOD_MARKER).encode())
    assert info.to_json() == GOOD_MARKER


@pytest.mark.parametrize(
    "change",
    [
        {"nodeid": 3},
        {"created": "yesterday"},
        {"created": True},
        {"memory_mib": -1},
        {"memory_mib": 1.5},
        {"image": None},
        {"name": "x" * 5000},
    ],
)
def test_bad_marker_fields_raise_config_error(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        kept.KeptInfo.parse(json.dumps({**GOOD_MARKER, **change}).encode())


@pytest.mark.parametrize("raw", [b"", b"[]", b"{", b"\xff", b" " * (kept.MAX_MARKER_BYTES + 1)])
def test_non_markers_raise_config_error(raw: bytes) -> None:
    with pytest.raises(ConfigError):
        kept.KeptInfo.parse(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from([*GOOD_MARKER, "extra"]),
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_marker_parses_or_raises_config_error(raw: bytes) -> None:
    try:
        info = kept.KeptInfo.parse(raw)
    except ConfigError:
        return
    assert isinstance(info.nodeid, str) and isinstance(info.memory_mib, int)


def _fake_folder(runtime: Path, owner: int, ident: str, marker: dict[str, object] | None) -> Path:
    rundir = runtime / f"{owner}-{ident}"
    rundir.mkdir(parents=True)
    (rundir / "qemu.pid").write_text("999999999\n")  # no such process
    if marker is not None:
        (rundir / reaper.KEPT_MARKER).write_text(json.dumps(marker))
    return rundir


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    from pytest_gondolin import paths

    return paths.runtime_dir()


DEAD_OWNER = 2**22 + 12345  # above the default pid_max: never a live process


def test_find_by_prefix_and_errors(runtime: Path) -> None:
    _fake_folder(runtime, DEAD_OWNER, "abcd1234", GOOD_MARKER)
    _fake_folder(runtime, DEAD_OWNER, "abce5678", GOOD_MARKER)
    _fake_folder(runtime, DEAD_OWNER, "ffff0000", None)  # not kept: not findable
    assert kept.find("abcd").id == "abcd1234"
    with pytest.raises(ConfigError, match="ambiguous"):
        kept.find("abc")
    with pytest.raises(ConfigError, match="no kept VM"):
        kept.find("ffff")
    with pytest.raises(ConfigError, match="not a VM id"):
        kept.find("../etc")
    assert [f.id for f in kept.list_folders()] == ["abcd1234", "abce5678"]
    assert len(kept.list_folders(kept_only=False)) == 3


def test_kill_removes_folder_of_dead_vm(runtime: Path) -> None:
    rundir = _fake_folder(runtime, DEAD_OWNER, "abcd1234", GOOD_MARKER)
    folder = kept.find("abcd1234")
    assert not folder.running
    assert kept.kill(folder) is False
    assert not rundir.exists()


def test_reaper_spares_kept_only_when_asked(runtime: Path) -> None:
    kept_dir = _fake_folder(runtime, DEAD_OWNER, "abcd1234", GOOD_MARKER)
    orphan = _fake_folder(runtime, DEAD_OWNER, "ffff0000", None)
    assert reaper.reap_orphans(spare_kept=True) == [orphan]
    assert kept_dir.exists()
    assert reaper.reap_orphans() == [kept_dir]


def test_unreadable_marker_still_counts_as_kept(runtime: Path) -> None:
    rundir = _fake_folder(runtime, DEAD_OWNER, "abcd1234", None)
    (rundir / reaper.KEPT_MARKER).write_bytes(b"\x00garbage")
    folder = kept.find("abcd")
    assert folder.kept is not None and folder.kept.nodeid == "?"


def test_scanners_never_follow_a_symlink_in_the_runtime_root(runtime: Path, tmp_path: Path) -> None:
    """A symlink named like a dead owner's VM folder is neither listed, read nor removed."""
    elsewhere = tmp_path / "elsewhere"
    decoy = _fake_folder(elsewhere, DEAD_OWNER, "abcd1234", GOOD_MARKER)
    (runtime / decoy.name).symlink_to(decoy, target_is_directory=True)
    real = _fake_folder(runtime, DEAD_OWNER, "ffff0000", GOOD_MARKER)
    # Negative control: the real folder with the same content is seen and reaped.
    assert [f.id for f in kept.list_folders()] == ["ffff0000"]
    assert kept.read_folder(runtime / decoy.name) is None
    with pytest.raises(ConfigError, match="no kept VM"):
        kept.find("abcd")
    assert reaper.reap_orphans() == [real]
    assert not real.exists()
    assert (runtime / decoy.name).is_symlink()
    assert sorted(p.name for p in decoy.iterdir()) == [reaper.KEPT_MARKER, "qemu.pid"]


@pytest.mark.skipif(os.getuid() != 0, reason="only root can chown a folder to another uid")
def test_scanners_skip_folders_of_another_user(runtime: Path) -> None:
    theirs = _fake_folder(runtime, DEAD_OWNER, "abcd1234", GOOD_MARKER)
    os.chown(theirs, 12345, 12345)
    mine = _fake_folder(runtime, DEAD_OWNER, "ffff0000", GOOD_MARKER)
    assert [f.id for f in kept.list_folders()] == ["ffff0000"]  # negative control: ours is seen
    assert reaper.reap_orphans() == [mine]
    assert (theirs / reaper.KEPT_MARKER).exists()


def test_scanners_see_private_fallback_roots(runtime: Path, tmp_path: Path) -> None:
    """VMs kept while gondolin-<uid> was unusable are still found; a look-alike root is not."""
    fallback = tmp_path / f"gondolin-{os.getuid()}-a1b2c3d4"
    fallback.mkdir(mode=0o700)
    _fake_folder(fallback, DEAD_OWNER, "abcd1234", GOOD_MARKER)
    shared = tmp_path / f"gondolin-{os.getuid()}-evil0000"
    shared.mkdir()
    shared.chmod(0o777)
    planted = _fake_folder(shared, DEAD_OWNER, "ffff0000", GOOD_MARKER)
    assert [f.id for f in kept.list_folders()] == ["abcd1234"]
    assert reaper.reap_orphans(spare_kept=True) == []
    assert [p.name for p in reaper.reap_orphans()] == [f"{DEAD_OWNER}-abcd1234"]
    assert planted.exists()


# -- artifact folder names ---------------------------------------------------------------


@pytest.mark.parametrize(
    "nodeid",
    [
        "tests/test_a.py::test_x",
        "test_a.py::test_p[a b/c]",
        "test_a.py::TestK::test_m[\u00e9\u00e8-..-/]",
        "../../etc/passwd",
        "x" * 1000,
        "",
    ],
)
def test_artifact_dir_name_is_one_safe_component(nodeid: str) -> None:
    name = artifact_dir_name(nodeid)
    assert 0 < len(name) <= MAX_DIR_NAME
    assert "/" not in name and not name.startswith(".")
    assert name == artifact_dir_name(nodeid)  # stable within and across runs


def test_artifact_dir_names_differ_when_sanitizing_collides() -> None:
    assert artifact_dir_name("t.py::test[a b]") != artifact_dir_name("t.py::test[a_b]")
