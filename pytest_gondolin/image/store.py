"""The image cache: finding, validating, building-once and pruning images.

Layout under ``<cache>/images/``::

    <name>-<build_id>/        a complete image (manifest.json written last)
        vmlinuz  initrd.img  rootfs.qcow2  manifest.json
    .locks/<name>-<build_id>.lock
    .tmp-<name>-<build_id>-<pid>/   a build in progress (or left by a dead builder)

Concurrent builders serialize on a :mod:`filelock` per image; a build
happens in a temp folder renamed into place when complete, so a reader never
sees a half-written image. A folder whose manifest or files don't match is
treated as corrupt and rebuilt. Finding a complete image writes nothing, so
a read-only cache serves the images in it; one that must be built there
raises :class:`~pytest_gondolin.errors.CacheDirError`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import ImageError
from pytest_gondolin.image import build
from pytest_gondolin.image.build import Progress
from pytest_gondolin.image.manifest import read_manifest
from pytest_gondolin.image.recipe import Recipe, load_recipe
from pytest_gondolin.vm.reaper import pid_alive

log = logging.getLogger(__name__)

#: How long a second builder waits for the first to finish an image. A cold
#: build takes ~1-2 min here; 30 min covers a slow mirror.
BUILD_LOCK_TIMEOUT = 30 * 60


@dataclass(frozen=True)
class Image:
    """A complete, validated image in the cache."""

    path: Path
    manifest: dict[str, Any]

    @property
    def build_id(self) -> str:
        return str(self.manifest["build_id"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.qcow2"

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


def images_root() -> Path:
    """The folder of cached images (not created: finding an image must not write)."""
    return paths.cache_root() / "images"


def open_image(path: Path) -> Image:
    """Open and validate the image folder ``path``; raise ImageError if it is incomplete."""
    return Image(path, read_manifest(path))


def _remove_stale_builds(root: Path) -> None:
    for tmp in root.glob(".tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            pid = -1
        if pid <= 0 or not pid_alive(pid):
            log.info("removing abandoned image build %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_image(
    recipe: Recipe | str | None = None, *, progress: Progress | None = None, rebuild: bool = False
) -> Image:
    """Return the cached image for ``recipe``, building it first if needed.

    ``recipe`` may be a Recipe, a built-in recipe name, a recipe folder, or a
    folder holding a prebuilt image (one with manifest.json).
    """
    if isinstance(recipe, str) and (Path(recipe) / "manifest.json").is_file():
        return open_image(Path(recipe))
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe) if recipe else load_recipe()
    paths.cache_dir()  # CacheDirError, naming the folder, if there can be no cache at all
    root = images_root()
    target = root / recipe.image_key
    if not rebuild:
        try:
            return open_image(target)
        except ImageError:
            pass
    locks = root / ".locks"
    lock = filelock.FileLock(str(locks / f"{recipe.image_key}.lock"))
    if progress:
        progress(f"waiting for the image lock {lock.lock_file}")
    try:
        # The lock is the first write of a build: a read-only cache stops it here.
        with paths.writing_cache(f"image {recipe.image_key} must be built there"):
            locks.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=BUILD_LOCK_TIMEOUT)
    except filelock.Timeout as exc:
        raise ImageError(
            f"timed out after {BUILD_LOCK_TIMEOUT} s waiting for another build of {recipe.image_key}"
        ) from exc
    try:
        if not rebuild:
            try:
                return open_image(target)  # another process built it while we waited
            except ImageError as exc:
                if target.exists():
                    log.warning("discarding corrupt image: %s", exc)
        _remove_stale_builds(root)
        tmp = root / f".tmp-{recipe.image_key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build.build_image(recipe, tmp, progress=progress or (lambda msg: None))
            if target.exists():
                trash = root / f".tmp-old-{recipe.image_key}-{os.getpid()}"
                target.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return open_image(target)
    finally:
        lock.release()


def list_images() -> list[Image | Path]:
    """Every folder in the image cache: an :class:`Image`, or a Path if it is incomplete."""
    out: list[Image | Path] = []
    root = images_root()
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            out.append(open_image(path))
        except ImageError:
            out.append(path)
    return out


def prune_images(keep: set[str]) -> list[Path]:
    """Remove cached images whose folder name is not in ``keep``, and abandoned builds.

    Returns the removed folders. Images being built by a live process are kept.
    """
    root = images_root()
    removed: list[Path] = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or not path.is_dir() or path.name in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    before = set(root.glob(".tmp-*"))
    _remove_stale_builds(root)
    removed += sorted(before - set(root.glob(".tmp-*")))
    return removed
