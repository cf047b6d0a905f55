"""What of one host distribution goes to the guest, and whether the guest can load it.

The file-level half of :mod:`.host_environment`'s scan: a distribution's
carried files (its metadata folder and what its RECORD lists inside its
folder, bytecode only of the host's cache tag), whether its binaries load
under the guest's Python (extension ABI, manylinux glibc), the source folder
of an editable install (PEP 610), the folders ``.pth`` files name, and the
content key of a pack (path, size, mtime and mode of every file).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

__all__ = [
    "BYTECODE",
    "GUEST_GLIBC",
    "GUEST_SOABI",
    "PACK_FORMAT",
    "carried_files",
    "editable_source",
    "inside",
    "listdir",
    "metadata_folder",
    "norm",
    "outermost",
    "pack_key",
    "pth_lines",
    "regular_stat",
    "why_not_loadable",
]

#: The guest image's Python (Debian bookworm: CPython 3.11 on x86_64); a
#: binary distribution built for another ABI cannot load there.
GUEST_SOABI: Final = "cpython-311-x86_64-linux-gnu"
#: glibc of the guest image (Debian bookworm); a manylinux wheel asking for
#: a newer one cannot load there.
GUEST_GLIBC: Final = (2, 36)
#: Bumped when the pack layout changes, so old cached packs are not reused.
PACK_FORMAT: Final = "1"


def norm(path: str) -> str:
    """``path`` absolute and normalised (symlinks kept: the guest gets the host's paths)."""
    return os.path.normpath(os.path.abspath(path))


def inside(path: str, folder: str) -> bool:
    """Whether normalised ``path`` is ``folder`` or under it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def pth_lines(folder: str) -> Iterator[tuple[str, str]]:
    """``(pth file, folder it names)`` for every path line of the ``.pth`` files in ``folder``."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".pth"))
    except OSError:
        return
    for name in names:
        try:
            text = Path(folder, name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "import ", "import\t")):
                continue
            target = norm(os.path.join(folder, line))
            # As site.addpackage: a line naming no folder adds nothing (isdir is
            # False for a NUL byte too).
            if os.path.isdir(target):
                yield os.path.join(folder, name), target


def glibc_needed(dist: importlib.metadata.Distribution) -> tuple[int, int] | None:
    """The oldest glibc among the wheel's manylinux tags (None: no such tag)."""
    wheel = dist.read_text("WHEEL") or ""
    versions: list[tuple[int, int]] = []
    for line in wheel.splitlines():
        if not line.startswith("Tag:"):
            continue
        platform = line.rsplit("-", 1)[-1].strip()
        if platform.startswith("manylinux_"):
            parts = platform.split("_")
            if len(parts) >= 3 and parts[1].isdigit() and parts[2].isdigit():
                versions.append((int(parts[1]), int(parts[2])))
        elif platform.startswith("manylinux2014"):
            versions.append((2, 17))
        elif platform.startswith("manylinux2010"):
            versions.append((2, 12))
        elif platform.startswith("manylinux1"):
            versions.append((2, 5))
    return min(versions) if versions else None


def why_not_loadable(
    dist: importlib.metadata.Distribution,
    files: Sequence[str],
    host_soabi: str,
    guest_soabi: str = GUEST_SOABI,
) -> str | None:
    """Why the guest's Python cannot load this distribution's binaries (None: it can)."""
    binaries = [f for f in files if f.endswith(".so") or ".so." in os.path.basename(f)]
    if not binaries:
        return None
    if host_soabi != guest_soabi:
        return f"binary for {host_soabi}, the guest's Python is {guest_soabi}"
    glibc = glibc_needed(dist)
    if glibc is not None and glibc > GUEST_GLIBC:
        return f"needs glibc {glibc[0]}.{glibc[1]}, the guest has {GUEST_GLIBC[0]}.{GUEST_GLIBC[1]}"
    return None


def metadata_folder(dist: importlib.metadata.Distribution) -> str | None:
    # PathDistribution keeps its .dist-info/.egg-info folder here; there is no
    # public accessor, and every installed distribution on sys.path is one.
    path = getattr(dist, "_path", None)
    return norm(str(path)) if path is not None else None


def walk_files(folder: str, dirs: list[str] | None = None) -> Iterator[str]:
    """Files under ``folder`` in a stable order, ``__pycache__`` left out; folders seen go to ``dirs``."""
    for dirpath, dirnames, filenames in os.walk(folder):
        if dirs is not None:
            dirs.append(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def regular_stat(path: str) -> os.stat_result | None:
    """``stat`` of ``path`` if it is (or names) a regular file; None otherwise."""
    try:
        st = os.stat(path)  # a symlinked file is carried as the file it names
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


#: Bytecode the worker's interpreter loads as is (the host's own, or the
#: image's of the same minor version: one magic number): carried, so the
#: guest does not compile the environment again in every session (seconds
#: under TCG). Other tags and optimisation levels are left out.
BYTECODE: Final = f".{sys.implementation.cache_tag}.pyc"


def carried_files(
    dist: importlib.metadata.Distribution, folder: str, meta: str, witnesses: list[str]
) -> tuple[list[str], bool]:
    """Absolute paths of the files carried for ``dist``, and whether it has a RECORD.

    Adds to ``witnesses`` every path the answer depends on (the scan's cache,
    :mod:`.environment_cache`).
    """
    witnesses.append(meta)
    found = dict.fromkeys(walk_files(meta, witnesses))
    listed = dist.files
    for f in listed or ():
        if ".." in f.parts:
            continue  # a script outside the folder
        if (f.suffix == ".pyc" or "__pycache__" in f.parts) and not f.name.endswith(BYTECODE):
            continue  # bytecode of another interpreter or optimisation level
        path = norm(os.path.join(folder, str(f)))
        if inside(path, folder):
            found[path] = None
    witnesses += found
    return list(found), listed is not None


def pack_key(files: Iterable[tuple[str, os.stat_result]]) -> str:
    """The content key of a pack of ``files``: each one's path, size, mtime and mode."""
    h = hashlib.sha256(PACK_FORMAT.encode())
    for path, st in files:
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n".encode())
    return h.hexdigest()[:32]


def listdir(folder: str) -> list[str]:
    """The sorted names in ``folder`` ([] when it cannot be read)."""
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def editable_source(dist: importlib.metadata.Distribution) -> str | None:
    """The project folder an editable install names (PEP 610 ``direct_url.json``), if any."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    dir_info = data.get("dir_info")
    url = data.get("url")
    if not isinstance(dir_info, dict) or not dir_info.get("editable") or not isinstance(url, str):
        return None
    if not url.startswith("file://"):
        return None
    from urllib.parse import unquote, urlsplit

    return norm(unquote(urlsplit(url).path))


def outermost(folders: Iterable[str]) -> tuple[str, ...]:
    """``folders`` without duplicates and without those inside another one."""
    out: list[str] = []
    for folder in sorted(set(folders), key=len):
        if not any(inside(folder, kept) for kept in out):
            out.append(folder)
    return tuple(sorted(out))
