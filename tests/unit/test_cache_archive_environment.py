"""Host environment images in a cache archive (``image/archive_environment.py``).

Real ``mkfs.ext4`` images in real caches, through the real export and import.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from pytest_gondolin.errors import ImageError
from pytest_gondolin.image import archive_environment
from pytest_gondolin.image.archive_environment import FOLDER, check_staged, data_bytes
from pytest_gondolin.vm.qemu import ENV_SLOT_BYTES
from pytest_gondolin.vm.slot_images import record_image, valid_id
from tests.unit.test_cache_archive import _export, _import_into, make_cache

SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
MKFS = shutil.which("mkfs.ext4", path=SBIN)
pytestmark = pytest.mark.skipif(MKFS is None, reason="e2fsprogs (mkfs.ext4) not installed")

CONTENT = "ab" * 12
FS_BYTES = 8 * 2**20


def _image(folder: Path, content: str = CONTENT, text: str = "hello") -> tuple[Path, str]:
    """An ext4 image of FS_BYTES holding ``text``, sparse-truncated to the slot, recorded."""
    assert MKFS is not None
    folder.mkdir(parents=True, exist_ok=True)
    image_id = str(uuid.uuid4())
    image = folder / f"{content}-{image_id}.img"
    stage = folder.parent / f"stage-{image_id}"
    (stage / "site").mkdir(parents=True)
    (stage / "site" / "mod.py").write_text(text)
    subprocess.run(
        [MKFS, "-q", "-F", "-t", "ext4", "-d", str(stage), str(image), f"{FS_BYTES // 1024}k"],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(stage)
    os.truncate(image, ENV_SLOT_BYTES)
    record_image(folder, content, image_id)
    return image, image_id


def test_an_image_travels_at_its_file_systems_length_and_is_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_cache(tmp_path / "a")
    image, image_id = _image(a / FOLDER)
    assert data_bytes(image) == FS_BYTES
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(a))
    archive = tmp_path / "cache.tar"
    _export(archive)
    member = f"{FOLDER}/{image.name}"
    with tarfile.open(archive) as tar:
        assert tar.getmember(member).size == FS_BYTES  # not the slot's 64 GiB
    assert archive.stat().st_size < 4 * FS_BYTES

    b = tmp_path / "b"
    done = _import_into(b, archive, monkeypatch)
    assert member in done.installed
    imported = b / member
    assert imported.stat().st_size == ENV_SLOT_BYTES  # the capacity the guest saw
    assert valid_id(b / FOLDER, CONTENT) == image_id  # the layered snapshot's key holds this id
    with image.open("rb") as old, imported.open("rb") as new:
        assert old.read(FS_BYTES) == new.read(FS_BYTES)
    # Imported again: present, the recorded image untouched.
    again = _import_into(b, archive, monkeypatch)
    assert member in again.present and member not in again.installed
    assert valid_id(b / FOLDER, CONTENT) == image_id


def test_a_cache_with_its_own_image_of_that_content_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_cache(tmp_path / "a")
    _image(a / FOLDER)
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(a))
    archive = tmp_path / "cache.tar"
    _export(archive)
    b = tmp_path / "b"
    _, own_id = _image(b / FOLDER)
    done = _import_into(b, archive, monkeypatch)
    assert not any(path.startswith(FOLDER) for path in done.installed)
    assert valid_id(b / FOLDER, CONTENT) == own_id
    assert not list((b / FOLDER).glob(".*tmp"))


def test_an_image_no_side_file_names_stays_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_cache(tmp_path / "a")
    image, _ = _image(a / FOLDER)
    image.touch()  # changed since it was recorded: never used, never exported
    assert archive_environment.exportable(a) == []
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(a))
    archive = tmp_path / "cache.tar"
    _export(archive)
    with tarfile.open(archive) as tar:
        assert not any(name.startswith(FOLDER) for name in tar.getnames())


def _superblock(tmp_path: Path, **fields: int) -> Path:
    """A file with an ext4-looking superblock: (offset -> u32/u16 value) patched in."""
    path = tmp_path / "fake.img"
    block = bytearray(4096)
    struct.pack_into("<H", block, 1024 + 0x38, fields.get("magic", 0xEF53))
    struct.pack_into("<I", block, 1024 + 0x04, fields.get("blocks", 1))
    struct.pack_into("<I", block, 1024 + 0x18, fields.get("log", 2))  # 4 KiB blocks
    struct.pack_into("<I", block, 1024 + 0x60, fields.get("incompat", 0))
    struct.pack_into("<I", block, 1024 + 0x150, fields.get("blocks_hi", 0))
    path.write_bytes(bytes(block))
    return path


@pytest.mark.parametrize(
    "fields",
    [
        {"magic": 0x1234},  # not ext4
        {"blocks": 0},  # empty
        {"blocks": 2},  # longer than the file (8 KiB of 4 KiB)
        {"log": 40},  # an absurd block size
        {"incompat": 0x80, "blocks_hi": 1},  # 64-bit count past the slot
    ],
    ids=["magic", "empty", "past-the-file", "block-size", "past-the-slot"],
)
def test_a_hostile_superblock_is_no_file_system(tmp_path: Path, fields: dict[str, int]) -> None:
    fake = _superblock(tmp_path, **fields)
    assert data_bytes(fake) is None
    with pytest.raises(ImageError, match="not an ext4 file system"):
        check_staged(fake, f"{FOLDER}/{CONTENT}-{uuid.uuid4()}.img", 4096)


def test_a_consistent_superblock_gives_its_length(tmp_path: Path) -> None:
    fake = _superblock(tmp_path, blocks=1)
    assert data_bytes(fake) == 4096
    check_staged(fake, f"{FOLDER}/{CONTENT}-{uuid.uuid4()}.img", 4096)
    with pytest.raises(ImageError, match="not named as an environment image"):
        check_staged(fake, f"{FOLDER}/other.img", 4096)
