"""What :mod:`.host_environment` keeps across sessions: its scan's answer and its packs.

* **The scan** (:func:`load_scan`, :func:`save_scan`). Walking the host's
  environment costs 0.1-1 s (``importlib.metadata``, every RECORD parsed); its
  answer is saved as JSON with the list of every path the scan looked at (the
  ``sys.path`` folders, each distribution's metadata folder and the files its
  RECORD lists, the ``.pth`` files, editable source folders, the scanning code
  itself) and their ``stat`` results (mtime in ns, size, inode, mode). A later
  session re-``stat``\\ s those paths (~10 ms for 6,000 files) and reuses the
  answer only if every one is unchanged: an install, an upgrade or a removal
  changes its site folder's mtime, an edit in place changes the file's.
  Never stale by the coarse clock either: an answer is not saved while a path
  it depends on changed in the last :data:`RACY_SECONDS` (git's "racily
  clean" rule), since a change in the same clock tick could leave the mtime
  as it was.
* **The packs** (:func:`cached_pack`): one tar per carried distribution, at the
  files' absolute paths, written once under its content key. At most
  :data:`MAX_PACKS_BYTES` are kept; the least recently used go first (a
  changed venv leaves its old packs behind), once per layer (:func:`layer_packs`).

A read-only or broken cache costs a new scan or pack, never an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import threading
import time
from array import array
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = [
    "MAX_PACKS_BYTES",
    "RACY_SECONDS",
    "cached_pack",
    "evict_packs",
    "layer_packs",
    "load_scan",
    "save_scan",
    "tar_files",
]

log = logging.getLogger(__name__)

#: Linux stamps mtimes with a coarse clock (a few ms): a path changed this
#: recently could change again without its mtime moving, so no answer that
#: depends on it is saved (the next session scans again and saves then).
RACY_SECONDS: Final = 2.0
#: A saved answer holds the stat of every file the scan read; past this many
#: the JSON alone would cost more to check than the scan it saves.
_MAX_WITNESSES: Final = 500_000
#: The packs kept in a cache folder, in bytes; the least recently used go
#: first when a new one is written.
MAX_PACKS_BYTES: Final = 2 * 2**30


def _stamp(paths: Sequence[str]) -> str:
    """A digest of the ``stat`` of each of ``paths``, in order (the paths are stored beside it)."""
    # Two arrays filled in C, hashed as they are: a tuple per path and the
    # repr of them all cost 4-9 ms more for 6,400 paths. st_ino is unsigned
    # 64-bit; mtime (ns) and size fit a signed one.
    signed, unsigned = array("q"), array("Q")
    add_signed, add_unsigned = signed.extend, unsigned.extend
    stat = os.stat
    for path in paths:  # the hot loop of a cached scan: ~6,400 paths for a 54-distribution venv
        try:
            st = stat(path)  # symlinks followed: the scan reads what they name
        except OSError:
            add_signed((-1, -1))
            add_unsigned((0, 0))  # no file has inode 0
            continue
        add_signed((st.st_mtime_ns, st.st_size))
        add_unsigned((st.st_ino, st.st_mode))
    digest = hashlib.sha256(signed)
    digest.update(unsigned)
    return digest.hexdigest()


def load_scan(entry: Path, *, max_bytes: int | None = None) -> Any | None:
    """The answer saved in ``entry`` if every path it depends on is unchanged; else None.

    ``max_bytes``: a larger entry is not read (None: no bound).
    """
    try:
        with entry.open("rb") as file:
            raw = file.read() if max_bytes is None else file.read(max_bytes + 1)
        if max_bytes is not None and len(raw) > max_bytes:
            return None
        saved = json.loads(raw)
        witnesses = saved["witnesses"]
        if not isinstance(witnesses, list):
            return None
        "".join(witnesses)  # TypeError unless every witness is a string (fast, in C)
        if _stamp(witnesses) != saved["stamp"]:
            return None
        return saved["answer"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("no cached answer in %s: %s", entry, exc)
        return None


def save_scan(entry: Path, witnesses: Iterable[str], answer: Any, *, racy: bool = True) -> bool:
    """Save ``answer`` for :func:`load_scan`, keyed by the stat of ``witnesses``; True if saved.

    Not saved (False) when a witness changed in the last :data:`RACY_SECONDS`
    or the cache cannot be written. ``racy=False``: the caller knows a
    witness changed just now without changing what the answer holds (it
    rewrote the file itself), so recent changes do not hold it back.
    """
    paths = list(dict.fromkeys(witnesses))
    if len(paths) > _MAX_WITNESSES:
        return False
    recent = time.time_ns() - int(RACY_SECONDS * 1e9)
    for path in paths if racy else ():
        try:
            if os.stat(path).st_mtime_ns >= recent:
                log.debug("%s not cached: %s changed just now", entry.name, path)
                return False
        except OSError:
            continue
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        data = {"stamp": _stamp(paths), "witnesses": paths, "answer": answer}
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, entry)  # atomic: a reader sees a whole answer or none
        return True
    except OSError as exc:
        log.debug("%s not cached: %s", entry, exc)
        return False


def tar_files(paths: Iterable[str]) -> bytes:
    """A tar of ``paths`` (regular files, symlinks resolved) at their absolute paths."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in paths:
            try:
                fh = open(path, "rb")  # noqa: SIM115 - closed below, after addfile
            except OSError:
                continue  # gone since the scan: the key changes next session
            with fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    continue
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size = st.st_size
                info.mode = stat.S_IMODE(st.st_mode)
                info.mtime = int(st.st_mtime)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                tar.addfile(info, fh)
    return buf.getvalue()


_pack_lock = threading.Lock()


def cached_pack(key: str, files: Iterable[str], cache: Path, *, evict: bool = True) -> bytes:
    """The tar of ``files``, from ``cache`` under ``key`` or packed now and cached.

    With ``evict``, a pack written makes room (:func:`evict_packs`); a layer
    that asks for many packs passes False and evicts once, after its last
    (:func:`layer_packs`): listing the folder costs ~5 ms per 2,400 packs.
    """
    target = cache / f"{key}.tar"
    with _pack_lock:
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            pass
        else:
            with contextlib.suppress(OSError):
                os.utime(target)  # recently used: evicted last
            return data
        data = tar_files(files)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{key}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)  # atomic: a reader sees a whole pack or none
        except OSError as exc:
            log.debug("pack %s not cached in %s: %s", key, cache, exc)
        else:
            if evict:
                evict_packs(cache, keep=[target])
        return data


def layer_packs(
    packs: Sequence[tuple[str, Sequence[str]]], cache: Path
) -> list[Callable[[], bytes]]:
    """For each ``(key, files)`` of ``packs``, a function giving its :func:`cached_pack`.

    Called in order (as a tar layer does), the last one also evicts, once for
    all of them and keeping them all: the cache may hold one layer's packs
    past :data:`MAX_PACKS_BYTES` while it is built, never more.
    """
    keep = [cache / f"{key}.tar" for key, _ in packs]

    def pack(key: str, files: Sequence[str], last: bool) -> bytes:
        data = cached_pack(key, files, cache, evict=False)
        if last and cache.is_dir():
            evict_packs(cache, keep=keep)
        return data

    return [
        functools.partial(pack, key, files, index == len(packs) - 1)
        for index, (key, files) in enumerate(packs)
    ]


def evict_packs(cache: Path, *, keep: Collection[Path], limit: int | None = None) -> None:
    """Remove the least recently used packs in ``cache`` until they fit in ``limit`` bytes.

    ``limit`` defaults to :data:`MAX_PACKS_BYTES`; the packs in ``keep`` (those
    just written or read) stay. A pack another session is about
    to read and finds gone is packed again there: eviction never fails a run.
    """
    limit = MAX_PACKS_BYTES if limit is None else limit
    kept = set(keep)
    packs: list[tuple[float, int, Path]] = []
    for path in cache.glob("*.tar"):
        try:
            st = path.stat()
        except OSError:
            continue
        packs.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in packs)
    for _, size, path in sorted(packs):
        if total <= limit:
            break
        if path in kept:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
