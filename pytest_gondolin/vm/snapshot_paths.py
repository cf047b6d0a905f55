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

Both kinds are qcow2 overlays whose backing file is the image's
``rootfs.qcow2``: :mod:`pytest_gondolin.image.info`, the report header and
``gondolin image prune`` find an image's snapshots through that.
"""

from __future__ import annotations

from pathlib import Path

import pytest_gondolin.paths as paths

__all__ = [
    "LAYER_SEPARATOR",
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
