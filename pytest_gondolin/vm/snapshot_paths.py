"""Where ready-state snapshots are cached: the one place that spells these paths.

Every file lives in ``<cache>/snapshots/`` and carries its key in its name:

* ``<state key>.qcow2`` — the *warm snapshot*: the overlay of a VM that
  saved its ready state as internal snapshot ``gondolin-clean``
  (:mod:`pytest_gondolin.vm.warm` writes it). The state key is
  :func:`pytest_gondolin.vm.identity.state_key` (24 hex digits).
* ``<state key>+<stack digest>.qcow2`` — a *layered snapshot*: the same
  ready state with layers applied on top (Debian packages, the host's
  Python environment), saved under the same tag
  (:mod:`pytest_gondolin.vm.layers` writes it). The stack digest
  (24 hex digits, :func:`pytest_gondolin.vm.layers.stack_digest`) covers
  the state key and every layer's name and content key, in order; each
  prefix of a stack has a file of its own.
* ``<name>.lock`` beside each — the file lock its writers hold (moved to
  the runtime folder when the cache is read-only, see
  :func:`~pytest_gondolin.paths.lock_path`); ``.<name>.<pid>.tmp`` — a
  file being written, renamed into place when complete.

At most :data:`MAX_BASES` state keys keep files here: saving a new warm
snapshot removes the least recently used other keys' files, warm and
layered (:func:`evict_old_bases`). A state key changes with every upgrade
of pytest-gondolin (the agent code is part of it), so without the bound
each upgrade would leave its snapshots behind for ``gondolin image prune``.

Both kinds are qcow2 overlays whose backing file is the image's
``rootfs.qcow2``: :mod:`pytest_gondolin.image.info`, the report header and
``gondolin image prune`` find an image's snapshots through that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import pytest_gondolin.paths as paths

log = logging.getLogger(__name__)

#: State keys whose snapshots are kept; the least recently used others go.
MAX_BASES: Final = 4

__all__ = [
    "LAYER_SEPARATOR",
    "MAX_BASES",
    "evict_old_bases",
    "layered_snapshot_lock",
    "layered_snapshot_path",
    "layered_snapshots_of",
    "snapshots_dir",
    "warm_snapshot_lock",
    "warm_snapshot_path",
]

#: Between the state key and the stack digest in a layered snapshot's name.
LAYER_SEPARATOR = "+"


def snapshots_dir() -> Path:
    """The folder of cached warm snapshots (not created: readers must not create it)."""
    return paths.cache_root() / "snapshots"


def warm_snapshot_path(key: str) -> Path:
    """The cached warm snapshot for state key ``key`` (it may not exist)."""
    return snapshots_dir() / f"{key}.qcow2"


def warm_snapshot_lock(key: str) -> Path:
    """The lock file writers of :func:`warm_snapshot_path` hold (see :func:`~pytest_gondolin.paths.lock_path`)."""
    return snapshots_dir() / f"{key}.lock"


def layered_snapshot_path(key: str, digest: str) -> Path:
    """The cached layered snapshot of stack ``digest`` over state key ``key`` (it may not exist)."""
    return snapshots_dir() / f"{key}{LAYER_SEPARATOR}{digest}.qcow2"


def layered_snapshot_lock(key: str, digest: str) -> Path:
    """The lock file writers of :func:`layered_snapshot_path` hold."""
    return snapshots_dir() / f"{key}{LAYER_SEPARATOR}{digest}.lock"


def layered_snapshots_of(key: str) -> list[Path]:
    """The cached layered snapshots over state key ``key``, in no particular order."""
    folder = snapshots_dir()
    if not folder.is_dir():
        return []
    return list(folder.glob(f"{key}{LAYER_SEPARATOR}*.qcow2"))


def evict_old_bases(keep: str) -> list[Path]:
    """Remove the snapshots of all but the :data:`MAX_BASES` most recently used state keys.

    A key's last use is the newest modification time among its warm and
    layered files (a restore touches the file it loads). ``keep`` (the key
    just saved) always stays. Lock files stay too (empty, and a peer may
    hold one); a file that vanishes or cannot be removed is skipped.
    Returns the removed files.
    """
    folder = snapshots_dir()
    if not folder.is_dir():
        return []
    used: dict[str, float] = {}
    files: dict[str, list[Path]] = {}
    for path in folder.glob("*.qcow2"):
        key = path.stem.split(LAYER_SEPARATOR, 1)[0]
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        used[key] = max(used.get(key, 0.0), mtime)
        files.setdefault(key, []).append(path)
    others = sorted((k for k in used if k != keep), key=lambda k: used[k], reverse=True)
    removed: list[Path] = []
    for key in others[MAX_BASES - 1 :]:
        for path in files[key]:
            try:
                path.unlink()
            except OSError:
                continue
            log.info("removed snapshot %s of a state key unused since others were saved", path)
            removed.append(path)
    return removed
