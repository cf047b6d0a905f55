"""Two reads of the host every sandboxed run makes, reused across runs while their files are unchanged.

* :func:`hypothesis_tables` -- Hypothesis's Unicode tables, recompressed and
  packed for the guest (why the guest needs them: its docstring), on every
  run whose tests import Hypothesis: asking Hypothesis for them (it rewrites
  the UTF-8 table each time) and recompressing cost 40-150 ms a run here
  (fresh processes, load average ~10 on 2 cores); a hit costs 0.5 ms.
* :func:`packages_distributions` -- :func:`importlib.metadata.packages_distributions`
  (which distribution provides each top-level package: whether a ``-p``
  plugin loads in the guest), once a run. It parses the RECORD of every
  distribution without ``top_level.txt``: 24 ms in a run of this checkout's
  55 distributions, 55-150 ms under that load; a hit (~200 ``stat`` calls
  and the JSON) 1-7 ms.

Each answer is saved under the user cache dir with the ``stat`` of every
path it was read from (the environment scan's mechanism:
``environment_cache.load_scan`` / ``save_scan``): for the tables, their
folder and each table file; for the distributions, every ``sys.path``
entry (a distribution installed or removed changes its folder's mtime),
each distribution's metadata folder and the files the function reads in it.
A later run re-``stat``\\ s those paths and reuses the answer only if every
one is unchanged; the entry's name holds what else the answer depends on
(the interpreter and ``sys.path``; Hypothesis's version and the tables'
folder). Entries are written atomically (a reader sees a whole entry or
none), at most :data:`MAX_ENTRIES` per kind are kept (the least recently
used go), and a missing, unreadable or read-only cache costs the read, never
an error.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from pytest_gondolin.sandbox.environment_cache import RACY_SECONDS, load_scan, save_scan

__all__ = [
    "HYPOTHESIS_TABLES_MAX",
    "MAX_ENTRIES",
    "RACY_SECONDS",
    "hypothesis_tables",
    "packages_distributions",
]

log = logging.getLogger(__name__)

#: Hypothesis's Unicode tables are tens of KiB; larger files are not theirs.
HYPOTHESIS_TABLES_MAX: Final = 4 << 20
#: Entries kept per kind: one per virtualenv (or Hypothesis folder) in use.
MAX_ENTRIES: Final = 16
#: An entry larger than this is not read (the tables' cap, base64, plus slack).
_MAX_ENTRY_BYTES: Final = HYPOTHESIS_TABLES_MAX * 2
#: Bumped when what an entry holds, or how it is made, changes.
_FORMAT: Final = 2
#: The files ``packages_distributions`` reads in a metadata folder (Python 3.11+).
_METADATA_FILES: Final = (
    "top_level.txt",
    "RECORD",
    "SOURCES.txt",
    "installed-files.txt",
    "METADATA",
    "PKG-INFO",
)


def _entry(cache: Path, kind: str, *key: str) -> Path:
    digest = hashlib.sha256(json.dumps([_FORMAT, kind, *key]).encode()).hexdigest()[:32]
    return cache / f"{kind}-{digest}.json"


def _load(entry: Path) -> object | None:
    """The answer saved in ``entry`` while every path it depends on is unchanged; else None."""
    answer: object = load_scan(entry, max_bytes=_MAX_ENTRY_BYTES)
    if answer is not None:
        with contextlib.suppress(OSError):
            os.utime(entry)  # recently used: evicted last
    return answer


def _save(entry: Path, witnesses: Sequence[str], answer: object, *, racy: bool) -> None:
    """Save ``answer`` for :func:`_load` (``environment_cache.save_scan``), then evict."""
    if save_scan(entry, witnesses, answer, racy=racy):
        _evict(entry)


def _evict(entry: Path) -> None:
    """Keep at most :data:`MAX_ENTRIES` entries of ``entry``'s kind, the most recently used."""
    kind = entry.name.rpartition("-")[0]
    found: list[tuple[float, Path]] = []
    for path in entry.parent.glob(f"{kind}-*.json"):
        with contextlib.suppress(OSError):
            found.append((path.stat().st_mtime, path))
    found.sort(reverse=True)
    for _, path in found[MAX_ENTRIES:]:
        if path != entry:
            with contextlib.suppress(OSError):
                path.unlink()


# -- Hypothesis's Unicode tables -------------------------------------------------


def hypothesis_tables(cache: Path) -> bytes:
    """Hypothesis's cached Unicode tables, packed at the same paths for the guest.

    Hypothesis computes them on first use (its charmap, and the code points
    a codec encodes: ``st.text()`` asks for UTF-8's) and caches them under
    ``.hypothesis`` in the working folder, which the project copy leaves
    out. Each sandboxed test starts from the worker's snapshot, so every
    test that drew text computed them again: a loop over every code point
    keeping a tuple for each, ~20 MB/s of growth under TCG until a 256 MiB
    guest ran out of memory (attrs' suite). Here the host, whose tests
    imported Hypothesis at collection, reads its cached tables (or makes
    them: ~1 s, once) and the guest, whose working folder is the host's,
    finds them where it looks. Empty when the tests do not use Hypothesis
    or anything fails.

    The bytes depend only on the tables' contents and paths (recompressed,
    fixed tar headers): the collected worker's key holds them. They are
    reused from ``cache`` while the tables' folder and files are unchanged;
    Hypothesis is not asked then, since asking rewrites the codec's file.
    """
    if "hypothesis" not in sys.modules:
        return b""
    try:
        import hypothesis
        from hypothesis.internal import charmap

        folder = Path(charmap.charmap_file()).resolve().parent
        entry = _entry(cache, "hypothesis-tables", hypothesis.__version__, str(folder))
        saved = _load(entry)
        if isinstance(saved, str):
            return base64.b64decode(saved, validate=True)
        charmap.charmap()
        by_codec = getattr(charmap, "intervals_from_codec", None)
        if by_codec is not None:
            by_codec("utf-8")
        witnesses = [str(folder), *map(str, sorted(folder.glob("*.json.gz")))]
        # Recompressed: Hypothesis rewrites a codec's file on every call, its
        # gzip header naming a temporary file, so the bytes (and the collected
        # worker's key, which holds them) changed with every run.
        tables = {
            path: gzip.compress(gzip.decompress(Path(path).read_bytes()), mtime=0)
            for path in witnesses[1:]
        }
    except Exception as exc:  # Hypothesis's internals, any version: never fail a run for them
        log.debug("no Hypothesis Unicode tables for the guest: %s", exc)
        return b""
    if sum(map(len, tables.values())) > HYPOTHESIS_TABLES_MAX:
        return b""
    packed = _pack_tables(tables)
    # Not held back by RACY_SECONDS: the codec's file was rewritten just
    # now, by the call above, on every miss. Its content is fixed by
    # Hypothesis's version and the Unicode version (in the entry's name and
    # folder); the stat tells that no table was added or replaced since.
    _save(entry, witnesses, base64.b64encode(packed).decode("ascii"), racy=False)
    return packed


def _pack_tables(tables: Mapping[str, bytes]) -> bytes:
    """A tar of ``tables`` at their absolute paths, its headers fixed (mode, mtime)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, data in tables.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), 0o644, 1
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- which distribution provides a package ----------------------------------------


def packages_distributions(cache: Path) -> Mapping[str, list[str]]:
    """``importlib.metadata.packages_distributions()``, from ``cache`` while nothing it read changed.

    A distribution that is
    not a folder on ``sys.path`` (a custom finder's) leaves the answer
    uncached: what it reads is unknown.
    """
    entry = _entry(cache, "distributions", sys.version, os.getcwd(), json.dumps(sys.path))
    saved = _load(entry)
    if isinstance(saved, dict) and all(
        isinstance(names, list) and all(isinstance(n, str) for n in names)
        for names in saved.values()
    ):
        return saved
    folders = [os.path.abspath(p) for p in sys.path]
    files: list[str] = []
    for dist in importlib.metadata.distributions():
        folder = getattr(dist, "_path", None)  # PathDistribution's metadata folder; no public name
        if folder is None:
            return importlib.metadata.packages_distributions()
        folders.append(str(folder))
        files += [os.path.join(folder, name) for name in _METADATA_FILES]
    # A file missing now is no witness: one created later changes its folder's
    # mtime. A change during the read is within RACY_SECONDS: not saved.
    answer = importlib.metadata.packages_distributions()
    _save(entry, folders + [path for path in files if os.path.exists(path)], answer, racy=True)
    return answer
