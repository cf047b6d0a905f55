"""What is in the cache for an image: build state, files, sizes, warm snapshots.

Read-only and cheap (no QEMU, no build): the ``gondolin image inspect``
command and the pytest report header use it. A warm snapshot
(``<cache>/snapshots/<state key>.qcow2``, see ``vm/snapshot_paths.py``)
belongs to the image whose ``rootfs.qcow2`` is its qcow2 backing file, so
the snapshots of an image are found by reading each snapshot's qcow2
header — not by recomputing state keys, which would build a boot payload.
Layered snapshots (``<state key>+<stack digest>.qcow2``, ``vm/layers.py``)
have the same backing file, so they are found, listed and pruned with them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_gondolin.errors import ConfigError, ImageError
from pytest_gondolin.image.recipe import Recipe, load_recipe
from pytest_gondolin.image.store import Image, images_root, open_image
from pytest_gondolin.vm.snapshot_paths import LAYER_SEPARATOR, snapshots_dir

#: qcow2 header (QEMU docs/interop/qcow2.txt): magic, version, backing file offset and size.
_QCOW2_HEADER = struct.Struct(">4sIQI")
_QCOW2_MAGIC = b"QFI\xfb"
#: The qcow2 spec caps backing file names at 1023 bytes.
_MAX_BACKING_NAME = 1023
#: The name lies in the first cluster (at most 2 MiB by the spec).
_MAX_BACKING_OFFSET = 2 * 1024 * 1024


def qcow2_backing_file(path: Path) -> str | None:
    """The backing file named in the qcow2 header of ``path``, or None if it has none.

    Raises ImageError if ``path`` cannot be read or is not a well-formed qcow2 header.
    """
    try:
        with path.open("rb") as fh:
            header = fh.read(_QCOW2_HEADER.size)
            if len(header) < _QCOW2_HEADER.size:
                raise ImageError(f"{path}: too short for a qcow2 header")
            magic, version, offset, size = _QCOW2_HEADER.unpack(header)
            if magic != _QCOW2_MAGIC or version not in (2, 3):
                raise ImageError(f"{path}: not a qcow2 v2/v3 file")
            if offset == 0 or size == 0:
                return None
            if size > _MAX_BACKING_NAME or not _QCOW2_HEADER.size <= offset <= _MAX_BACKING_OFFSET:
                raise ImageError(f"{path}: implausible backing file field ({offset}, {size})")
            fh.seek(offset)
            raw = fh.read(size)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc}") from exc
    if len(raw) != size:
        raise ImageError(f"{path}: backing file name is cut short")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ImageError(f"{path}: backing file name is not UTF-8") from exc


def warm_snapshots(image_key: str) -> list[Path]:
    """Cached ready-state snapshots of the image folder ``image_key``, newest first."""
    folder = snapshots_dir()
    if not folder.is_dir():
        return []
    found: list[tuple[float, Path]] = []
    for snap in folder.glob("*.qcow2"):
        try:
            backing = qcow2_backing_file(snap)
            mtime = snap.stat().st_mtime
        except (ImageError, OSError):
            continue  # a half-copied or foreign file is not a usable snapshot
        if backing is not None and Path(backing).parent.name == image_key:
            found.append((mtime, snap))
    return [p for _, p in sorted(found, reverse=True)]


@dataclass(frozen=True)
class ImageStatus:
    """An image as the cache knows it: built (``image`` set) or not yet."""

    key: str  # "<name>-<build id>": the folder name in the cache
    name: str
    build_id: str
    path: Path
    image: Image | None
    recipe: Recipe | None

    @property
    def built(self) -> bool:
        return self.image is not None

    def files(self) -> dict[str, int]:
        """File name -> size in bytes, for a built image."""
        if self.image is None:
            return {}
        out: dict[str, int] = {}
        for p in sorted(self.path.iterdir()):
            if p.is_file():
                out[p.name] = p.stat().st_size
        return out

    def to_json(self) -> dict[str, Any]:
        snaps = warm_snapshots(self.key)
        return {
            "key": self.key,
            "name": self.name,
            "build_id": self.build_id,
            "path": str(self.path),
            "built": self.built,
            "recipe": str(self.recipe.directory) if self.recipe else None,
            "manifest": self.image.manifest if self.image else None,
            "files": self.files(),
            "size_bytes": sum(self.files().values()),
            "warm_snapshots": [
                {
                    "path": str(p),
                    "size_bytes": p.stat().st_size,
                    # with system packages or the host environment on top
                    "layered": LAYER_SEPARATOR in p.name,
                }
                for p in snaps
            ],
        }


def image_status(name: str) -> ImageStatus:
    """Find ``name`` (recipe name or folder, image folder, or cached ``<name>-<build id>``).

    Never builds. Raises ConfigError if ``name`` is none of those.
    """
    candidate = Path(name)
    if (candidate / "manifest.json").is_file():
        folder = open_image(candidate)
        return ImageStatus(candidate.name, folder.name, folder.build_id, candidate, folder, None)
    cached = images_root() / name
    if "/" not in name and not name.startswith(".") and (cached / "manifest.json").is_file():
        folder = open_image(cached)
        return ImageStatus(name, folder.name, folder.build_id, cached, folder, None)
    try:
        recipe = load_recipe(name)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; nor is it a cached image (`gondolin image list` shows those)"
        ) from None
    target = images_root() / recipe.image_key
    built: Image | None
    try:
        built = open_image(target)
    except ImageError:
        built = None
    return ImageStatus(recipe.image_key, recipe.name, recipe.build_id, target, built, recipe)
