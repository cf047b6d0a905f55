"""The images a VM's environment slot holds, as the cache keeps them.

Each image is ``<content>-<id>.img`` in :func:`images_folder`: its content
key, and a random id given when it was built (or imported). A side file
``<content>.json``, written last by :func:`record_image` under
:func:`image_lock`, names the id and the image file's ``stat``; only an
image its side file names, unchanged since (:func:`valid_id`), is used.
Built by ``sandbox/environment_image.py``, carried by cache archives
(``image/archive_environment.py``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import filelock

import pytest_gondolin.paths as paths

__all__ = ["image_lock", "image_path", "images_folder", "record_image", "valid_id"]

log = logging.getLogger(__name__)


def images_folder(cache: Path) -> Path:
    """Where the images of host environment cache ``cache`` (``<cache>/host-environment``) are."""
    return cache / "images"


def image_path(folder: Path, content: str, image_id: str) -> Path:
    """The file of image ``image_id`` of ``content`` in ``folder``: ``<content>-<id>.img``."""
    return folder / f"{content}-{image_id}.img"


def image_lock(folder: Path, content: str) -> filelock.FileLock:
    """The lock held while the side file of ``content``'s image is read to build, or written."""
    return filelock.FileLock(str(paths.lock_path(folder / f"{content}.lock")))


def record_image(folder: Path, content: str, image_id: str) -> Path:
    """Write the side file naming image ``<content>-<image_id>.img`` as it is now; return it.

    Call with :func:`image_lock` held. Last of a build (or of an import:
    ``image/archive_environment.py``): an image no side file names is never used.
    """
    st = image_path(folder, content, image_id).stat()
    side = folder / f"{content}.json"
    tmp = side.with_name(f".{side.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps({"id": image_id, "stat": [st.st_size, st.st_mtime_ns, st.st_ino]}))
    os.replace(tmp, side)
    return side


def valid_id(folder: Path, content: str) -> str | None:
    """The id of the image of ``content`` when its side file says it is the file built."""
    side = folder / f"{content}.json"
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    image = image_path(folder, content, data["id"])
    try:
        st = image.stat()
    except OSError:
        return None
    if data.get("stat") != [st.st_size, st.st_mtime_ns, st.st_ino]:
        log.info("environment image %s changed since it was built; building another", image)
        return None
    return str(data["id"])
