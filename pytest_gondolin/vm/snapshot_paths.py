"""Where warm (ready-state) snapshots are cached: the one place that spells these paths.

``<cache>/snapshots/<state key>.qcow2`` is the overlay of a VM that saved
its ready state as an internal snapshot (:mod:`pytest_gondolin.vm.warm`
writes it; :mod:`pytest_gondolin.image.info`, the report header and
``gondolin image prune`` read it). ``<state key>.lock`` serialises its
writers. The state key is :func:`pytest_gondolin.vm.identity.state_key`.
"""

from __future__ import annotations

from pathlib import Path

import pytest_gondolin.paths as paths

__all__ = ["snapshots_dir", "warm_snapshot_lock", "warm_snapshot_path"]


def snapshots_dir() -> Path:
    """The folder of cached warm snapshots (not created: readers must not create it)."""
    return paths.cache_root() / "snapshots"


def warm_snapshot_path(key: str) -> Path:
    """The cached warm snapshot for state key ``key`` (it may not exist)."""
    return snapshots_dir() / f"{key}.qcow2"


def warm_snapshot_lock(key: str) -> Path:
    """The lock file writers of :func:`warm_snapshot_path` hold (see :func:`~pytest_gondolin.paths.lock_path`)."""
    return snapshots_dir() / f"{key}.lock"
