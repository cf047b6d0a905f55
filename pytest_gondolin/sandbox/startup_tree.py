"""The part of the project tree the guest worker imports before its go.

The guest test worker starts, imports pytest and waits for its go before the
project tree is copied in (``sandbox/worker_cache.py``). That holds as long
as nothing pytest imports at start-up lives in the project tree. It does not
when the project under test is one of pytest's own dependencies, installed
editable as its maintainers do (``pip install -e .`` of pluggy, iniconfig,
packaging or pytest itself): the host's ``.pth`` file names the project's
``src`` folder, which does not exist in the guest yet, and ``import pytest``
fails there with ``No module named 'pluggy'``.

:func:`pack_startup_tree` packs those packages (found where the host imports
them from) at their absolute paths, for the guest to unpack before the
worker starts. Their content is part of the started worker's cache key, so
an edit to them starts a fresh worker; the project copy after the go
delivers the same files again.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import logging
import tarfile
from collections.abc import Iterable
from pathlib import Path

from pytest_gondolin.sandbox.project_files import (
    IMAGE_PYTHON,
    SHIPPED_DISTRIBUTIONS,
    dependency_closure,
    pack_project,
)

__all__ = ["join_tars", "pack_startup_tree", "startup_paths"]

log = logging.getLogger(__name__)


def _top_level_names(dist: importlib.metadata.Distribution) -> list[str]:
    """The import names ``dist`` provides: its ``top_level.txt``, else its files, else its name."""
    text = dist.read_text("top_level.txt")
    if text:
        return [n.strip() for n in text.splitlines() if n.strip().isidentifier()]
    names = {
        f.parts[0].removesuffix(".py")
        for f in dist.files or ()
        if len(f.parts) > 1 or f.suffix == ".py"
    }
    found = sorted(n for n in names if n.isidentifier())
    return found or [dist.metadata["Name"].replace("-", "_").lower()]


def _location(name: str) -> Path | None:
    """Where the host imports the top-level module ``name`` from (a package folder or a file)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        folders = list(spec.submodule_search_locations)
        return Path(folders[0]).resolve() if len(folders) == 1 else None
    if spec.origin and spec.has_location:
        return Path(spec.origin).resolve()
    return None


def startup_paths(
    root: Path,
    distributions: Iterable[str] = SHIPPED_DISTRIBUTIONS,
    python_version: str = IMAGE_PYTHON,
) -> list[Path]:
    """The packages (folders) and modules (files) under ``root`` that ``distributions`` and their dependencies import from."""
    top = root.resolve()
    found: set[Path] = set()
    for dist in dependency_closure(distributions, python_version):
        for name in _top_level_names(dist):
            where = _location(name)
            if where is not None and where != top and where.is_relative_to(top):
                found.add(where)
    return sorted(found)


def pack_startup_tree(
    root: Path,
    distributions: Iterable[str] = SHIPPED_DISTRIBUTIONS,
    python_version: str = IMAGE_PYTHON,
) -> bytes:
    """A tar of :func:`startup_paths` at their absolute paths, copied as the project is (``b""``: none)."""
    tars: list[bytes] = []
    for path in startup_paths(root, distributions, python_version):
        log.info("%s is imported by pytest at start-up: copied in before the worker starts", path)
        tars.append(pack_project(path) if path.is_dir() else _pack_file(path))
    return join_tars(*tars)


def _pack_file(path: Path) -> bytes:
    """A tar of the one module file ``path`` at its absolute path."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tar.gettarinfo(str(path), arcname=str(path).lstrip("/"))
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        with path.open("rb") as fh:
            tar.addfile(info, fh)
    return buf.getvalue()


def join_tars(*tars: bytes) -> bytes:
    """One tar holding the members of ``tars`` in order (``b""`` when all are empty).

    Plain ``tar -xf`` stops at the first archive's end, so tars are merged,
    not concatenated.
    """
    parts = [t for t in tars if t]
    if len(parts) <= 1:
        return parts[0] if parts else b""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for data in parts:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    return buf.getvalue()
