"""The images a VM's environment slot holds, as the cache keeps them.

Each image is ``<content>-<id>.img`` in :func:`images_folder`: its content
key, and a random id given when it was built (or imported). A side file
``<content>.json``, written last by :func:`record_image` under
:func:`image_lock`, names the id and the image file's ``stat``; only an
image its side file names, unchanged since (:func:`valid_id`), is used.
A build under way is named by a claim ``<content>.claim`` (:func:`claim`,
:func:`claimed_id`), so that every process needing that content builds or
waits for the same id; whoever writes the image holds :func:`build_lock`.
At most :data:`MAX_IMAGES` are kept (:func:`evict_images`). Built by ``sandbox/environment_image.py``, carried by cache archives
(``image/archive_environment.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Final

import filelock

import pytest_gondolin.paths as paths

__all__ = [
    "LEFTOVER_AGE",
    "MAX_IMAGES",
    "build_lock",
    "claim",
    "claimed_id",
    "drop_claim",
    "evict_images",
    "image_lock",
    "image_path",
    "images_folder",
    "record_image",
    "recorded_id",
    "valid_id",
]

log = logging.getLogger(__name__)

#: Images kept (each the size of its venv; a changed venv makes a new one).
MAX_IMAGES: Final = 8
#: An image no side file names (a crashed or lost build) is removed after this:
#: a session still running may start VMs on it until then.
LEFTOVER_AGE: Final = 2 * 24 * 3600.0


def images_folder(cache: Path) -> Path:
    """Where the images of host environment cache ``cache`` (``<cache>/host-environment``) are."""
    return cache / "images"


def image_path(folder: Path, content: str, image_id: str) -> Path:
    """The file of image ``image_id`` of ``content`` in ``folder``: ``<content>-<id>.img``."""
    return folder / f"{content}-{image_id}.img"


def image_lock(folder: Path, content: str) -> filelock.FileLock:
    """The lock held while the side file of ``content``'s image is read to build, or written."""
    return filelock.FileLock(str(paths.lock_path(folder / f"{content}.lock")))


def build_lock(folder: Path, content: str) -> filelock.FileLock:
    """The lock a process holds while it writes an image of ``content`` (its whole build).

    Held only by a running build: the kernel drops it when its holder dies
    (``flock``), so a process that finds it free and no side file naming its
    id knows nobody is building that id.
    """
    return filelock.FileLock(str(paths.lock_path(folder / f"{content}.build.lock")))


def claim(folder: Path, content: str, image_id: str) -> None:
    """Name ``image_id`` as the image of ``content`` being built (call with :func:`image_lock` held)."""
    target = folder / f"{content}.claim"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps({"id": image_id, "pid": os.getpid(), "started": time.time()}))
    os.replace(tmp, target)


def claimed_id(folder: Path, content: str) -> tuple[str, int, float] | None:
    """The id, pid and start time (epoch s) of the claim on ``content`` whose image file exists."""
    try:
        data = json.loads((folder / f"{content}.claim").read_text())
        image_id, pid, started = data["id"], data["pid"], data["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (
        isinstance(image_id, str)
        and image_id.replace("-", "").isalnum()
        and isinstance(pid, int)
        and isinstance(started, (int, float))
    ):
        return None
    if not image_path(folder, content, image_id).is_file():
        return None
    return image_id, pid, float(started)


def drop_claim(folder: Path, content: str, image_id: str) -> None:
    """Remove the claim on ``content`` if it names ``image_id`` (call with :func:`image_lock` held)."""
    found = claimed_id(folder, content)
    if found is not None and found[0] == image_id:
        (folder / f"{content}.claim").unlink(missing_ok=True)


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


def recorded_id(folder: Path, content: str) -> tuple[str, object] | None:
    """The id the side file of ``content`` names and the ``stat`` it recorded, unchecked."""
    try:
        data = json.loads((folder / f"{content}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    return data["id"], data.get("stat")


def valid_id(folder: Path, content: str) -> str | None:
    """The id of the image of ``content`` when its side file says it is the file built."""
    recorded = recorded_id(folder, content)
    if recorded is None:
        return None
    image_id, recorded_stat = recorded
    image = image_path(folder, content, image_id)
    try:
        st = image.stat()
    except OSError:
        return None
    if recorded_stat != [st.st_size, st.st_mtime_ns, st.st_ino]:
        log.info("environment image %s changed since it was built; building another", image)
        return None
    return image_id


def evict_images(folder: Path, *, keep: Path) -> None:
    """Remove the least recently used images past :data:`MAX_IMAGES`, and stale leftovers.

    Leftovers (an image no side file names: a crashed or lost build, a
    stage folder, a claim) go once older than :data:`LEFTOVER_AGE`: a running session
    may still start VMs on them.
    """
    found: list[tuple[float, Path]] = []
    for side in folder.glob("*.json"):
        try:
            found.append((side.stat().st_mtime, side))
        except OSError:
            continue
    found.sort(reverse=True)
    named: set[str] = set()
    for rank, (_, side) in enumerate(found):
        try:
            image_id = json.loads(side.read_text())["id"]
        except (OSError, ValueError, KeyError, TypeError):
            image_id = None
        if rank < MAX_IMAGES or side == keep:
            if isinstance(image_id, str):
                named.add(image_path(folder, side.stem, image_id).name)
            continue
        log.info("removing least recently used environment image %s", side)
        side.unlink(missing_ok=True)
        if isinstance(image_id, str):
            image_path(folder, side.stem, image_id).unlink(missing_ok=True)
    old = time.time() - LEFTOVER_AGE
    for path in [*folder.glob("*.img"), *folder.glob(".stage-*"), *folder.glob("*.claim")]:
        try:
            if path.name in named or path.stat().st_mtime > old:
                continue
        except OSError:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
