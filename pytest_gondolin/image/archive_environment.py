"""Host environment images in a cache archive (``sandbox/environment_image.py``).

A layered snapshot with the host's environment was saved with that
environment's ext4 image in the VM's environment slot, and its key holds
the image's id: the snapshot is only usable with that very image. So an
archive carries, for every image a side file names as complete
(:func:`~pytest_gondolin.sandbox.slot_images.valid_id`), the image
itself, as kind ``environment`` at ``host-environment/images/<content>-<id>.img``:

* **exported at its file system's length.** The image file is sparse,
  truncated to the slot's 64 GiB; only the first :func:`data_bytes` (the
  ext4 superblock's block count times its block size) hold anything, and
  only those travel;
* **adopted on import.** The staged file must be an ext4 file system of
  exactly that length (:func:`check_staged`); it is renamed into the cache,
  truncated to the slot's size again, and recorded with a new side file
  under the image's lock (:func:`adopt`), unless this cache already has a
  complete image of the same content (kept: a snapshot of the archive's
  image is then rebuilt here once).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Final

from pytest_gondolin.errors import ImageError
from pytest_gondolin.vm import slot_images
from pytest_gondolin.vm.qemu import ENV_SLOT_BYTES

__all__ = ["FOLDER", "adopt", "check_staged", "data_bytes", "exportable"]

#: The images' folder, relative to the cache folder.
FOLDER: Final = "host-environment/images"
#: An image's file name: its content key and its random id.
IMAGE_NAME: Final = re.compile(
    r"([0-9a-f]{16,64})-([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\.img"
)

#: A build holds an image's lock while ``mkfs.ext4`` runs (minutes at worst).
LOCK_TIMEOUT: Final = 600.0
_SUPERBLOCK: Final = 1024
_EXT4_MAGIC: Final = 0xEF53
_INCOMPAT_64BIT: Final = 0x80


def data_bytes(path: Path) -> int | None:
    """The length of the ext4 file system at the start of ``path``; None if it holds none.

    Read from the superblock (hostile input on import: bounded by the file's
    size and the slot's).
    """
    try:
        with path.open("rb") as fh:
            fh.seek(_SUPERBLOCK)
            block = fh.read(1024)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    if len(block) < 0x154 or struct.unpack_from("<H", block, 0x38)[0] != _EXT4_MAGIC:
        return None
    log_size = int(struct.unpack_from("<I", block, 0x18)[0])
    if log_size > 6:  # blocks of 1 KiB to 64 KiB
        return None
    count = int(struct.unpack_from("<I", block, 0x04)[0])
    if struct.unpack_from("<I", block, 0x60)[0] & _INCOMPAT_64BIT:
        count |= int(struct.unpack_from("<I", block, 0x150)[0]) << 32
    length = count * (1024 << log_size)
    if not 0 < length <= min(size, ENV_SLOT_BYTES):
        return None
    return length


def exportable(cache_root: Path) -> list[tuple[Path, int]]:
    """(image file, bytes to archive) for every complete image in the cache at ``cache_root``."""
    folder = cache_root / FOLDER
    found: list[tuple[Path, int]] = []
    for side in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        image_id = slot_images.valid_id(folder, side.stem)
        if image_id is None:
            continue
        image = slot_images.image_path(folder, side.stem, image_id)
        length = data_bytes(image)
        if length is not None:
            found.append((image, length))
    return found


def check_staged(staged: Path, rel: str, size: int) -> None:
    """ImageError unless ``staged`` (archive path ``rel``) is an ext4 file system of ``size`` bytes."""
    if IMAGE_NAME.fullmatch(rel.rpartition("/")[2]) is None:
        raise ImageError(f"{rel} from the archive is not named as an environment image")
    if data_bytes(staged) != size:
        raise ImageError(f"{rel} from the archive is not an ext4 file system of {size} bytes")


def adopt(staged: Path, cache_root: Path, rel: str) -> bool:
    """Install ``staged`` at ``rel`` in the cache and record it; False if the cache has its content.

    ``rel`` passed :func:`check_staged`.
    """
    match = IMAGE_NAME.fullmatch(rel.rpartition("/")[2])
    assert match is not None, rel
    content, image_id = match.groups()
    folder = cache_root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    with slot_images.image_lock(folder, content).acquire(timeout=LOCK_TIMEOUT):
        if slot_images.valid_id(folder, content) is not None:
            return False
        target = slot_images.image_path(folder, content, image_id)
        os.rename(staged, target)
        os.truncate(target, ENV_SLOT_BYTES)  # sparse: the capacity the guest saw
        slot_images.record_image(folder, content, image_id)
    return True
