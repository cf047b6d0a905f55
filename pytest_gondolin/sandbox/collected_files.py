"""Where collected workers' snapshots are kept: their names, one lock, eviction.

A collected worker (``sandbox/worker_cache.py``) is cached as
``<cache>/worker-snapshots/<key>.qcow2``. A write goes to a temporary name
and is renamed, under the folder's one lock (held long by another writer,
the write is skipped: it is only a cache); at most :data:`MAX_COLLECTED`
files are kept, least recently used first; a read-only cache is used and
never written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

import filelock

import pytest_gondolin.paths as paths
from pytest_gondolin.vm.overlay import copy_disk
from pytest_gondolin.vm.reaper import TAKEN as TAKEN

__all__ = [
    "MAX_COLLECTED",
    "RECORD_SUFFIX",
    "STORE_LOCK_TIMEOUT",
    "TAKEN",
    "collected_dir",
    "collected_path",
    "link_collected",
    "remove_collected",
    "store_collected",
]

log = logging.getLogger(__name__)

#: Collected snapshots kept (each is the environment's disk plus the guest's RAM, ~450 MiB).
MAX_COLLECTED: Final = 6
#: The suffix of a collected file's configured-snapshot record (``sandbox/configured.py``).
RECORD_SUFFIX: Final = ".configured.json"
#: A write copies one disk (~0.3 s); a writer holding the lock far longer is stuck.
STORE_LOCK_TIMEOUT: Final = 30.0


def collected_dir() -> Path:
    return paths.cache_root() / "worker-snapshots"


def collected_path(key: str) -> Path:
    return collected_dir() / f"{key}.qcow2"


def remove_collected(path: Path) -> None:
    if paths.can_write(path.parent):
        path.unlink(missing_ok=True)


def store_collected(disk: Path, key: str) -> Path | None:
    """Cache ``disk`` (a paused or stopped VM's overlay) as collected state ``key``.

    Returns the cached path, or None when the cache cannot be written or
    another writer held its lock past :data:`STORE_LOCK_TIMEOUT`. Never
    leaves a partial file.
    """
    lock = _folder_lock()
    if lock is None:
        return None
    target = collected_path(key)
    try:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            copy_disk(disk, tmp)
            tmp.rename(target)
        except OSError as exc:
            log.warning("could not cache the collected worker at %s: %s", target, exc)
            return None
        finally:
            tmp.unlink(missing_ok=True)
        _evict(keep=target)
    finally:
        lock.release()
    return target


def link_collected(disk: Path, key: str) -> bool:
    """Cache ``disk`` (a stopped VM's overlay, on the cache's file system) as ``key`` by a hard link.

    True when ``key`` is cached afterwards (by this link, or already);
    False when it could not be linked (another file system, a read-only
    cache, the folder's lock held past :data:`STORE_LOCK_TIMEOUT`).
    """
    lock = _folder_lock()
    if lock is None:
        return False
    target = collected_path(key)
    try:
        os.link(disk, target)
    except FileExistsError:
        return True  # another run cached the same tree meanwhile: that one stays
    except OSError as exc:
        log.debug("could not link %s to %s: %s", disk, target, exc)
        return False
    else:
        _evict(keep=target)
        return True
    finally:
        lock.release()


def _folder_lock() -> filelock.FileLock | None:
    """The collected folder's lock, held; None when the folder cannot be written or the lock is busy.

    One lock for the folder (writes and evictions), not one file per key left
    behind; held past :data:`STORE_LOCK_TIMEOUT` by another writer, the
    caller skips its write (it is only a cache).
    """
    folder = collected_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not paths.can_write(folder):
        return None
    lock = filelock.FileLock(str(paths.lock_path(folder / "worker-snapshots.lock")))
    try:
        lock.acquire(timeout=STORE_LOCK_TIMEOUT)
    except filelock.Timeout:
        return None
    return lock


def _evict(*, keep: Path) -> None:
    """Remove the least recently used collected snapshots past :data:`MAX_COLLECTED`."""
    found: list[tuple[float, Path]] = []
    for path in collected_dir().glob("*.qcow2"):
        try:
            found.append((path.stat().st_mtime, path))
        except OSError:
            continue
    found.sort(reverse=True)
    for _, path in found[MAX_COLLECTED:]:
        if path != keep:
            log.info("removing least recently used worker snapshot %s", path)
            path.unlink(missing_ok=True)
    # A record whose file is gone (evicted, or removed as unusable), and not taken.
    for record in collected_dir().glob(f"*{RECORD_SUFFIX}"):
        key = record.name.removesuffix(RECORD_SUFFIX)
        if not collected_path(key).exists() and not any(
            collected_dir().glob(f".{key}.qcow2{TAKEN}*")
        ):
            record.unlink(missing_ok=True)
