"""The manifest of a built image: its format, writing it, reading and checking it.

``manifest.json`` is written last by the builder (:mod:`~pytest_gondolin.image.build`)
and read by the cache (:mod:`~pytest_gondolin.image.store`): its presence
marks an image folder complete, and the sizes it records tell an intact
folder from a damaged one. Both sides import this module and neither
imports the other back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytest_gondolin.errors import ImageError

__all__ = ["IMAGE_FILES", "MANIFEST_FORMAT", "MANIFEST_NAME", "read_manifest", "write_manifest"]

#: Bump when the manifest's meaning changes; older image folders are then rebuilt.
MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
#: The files every image holds, with their sizes recorded in the manifest.
IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.qcow2")
#: A manifest is ~1 KiB; read no more than this of one (a cache archive's may be hostile).
MAX_MANIFEST_BYTES = 1 << 20


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder``'s manifest from ``fields`` plus the format and the file sizes; return it.

    Call it last: the manifest is renamed into place, so a folder either
    has a complete one or none.
    """
    manifest = {
        "format": MANIFEST_FORMAT,
        **fields,
        "files": {name: (folder / name).stat().st_size for name in IMAGE_FILES},
    }
    tmp = folder / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(folder / MANIFEST_NAME)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """Return the manifest of image folder ``folder`` once it and the files it lists check out.

    Raises ImageError naming what is wrong: no readable manifest, an unknown
    format, or a file missing or of another size than recorded.
    """
    try:
        with (folder / MANIFEST_NAME).open("rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)  # an imported archive's is hostile
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"more than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(raw)
    except (OSError, ValueError, RecursionError) as exc:
        raise ImageError(f"{folder}: no readable {MANIFEST_NAME} ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ImageError(f"{folder}: {MANIFEST_NAME} has an unknown format")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ImageError(f"{folder}: {MANIFEST_NAME} lists no files")
    for name in IMAGE_FILES:
        expected = files.get(name)
        try:
            actual = (folder / name).stat().st_size
        except OSError as exc:
            raise ImageError(f"{folder}: {name} is missing") from exc
        if actual != expected:
            raise ImageError(f"{folder}: {name} is {actual} bytes, manifest says {expected}")
    return manifest
