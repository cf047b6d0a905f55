"""A waiting worker's start-up: what it imports before the go, what it refreshes after.

The guest test worker (:mod:`pytest_gondolin.guest.worker`) can start,
import pytest and wait for the host's ``go`` before it reads anything of the
project; the host snapshots it there and reuses that state across runs
(``sandbox/worker_cache.py``). This module says what is done before the
go (:func:`preload`: imports, and the installed distributions' entry points
read into memory) and what the import system must learn after it, when the
project tree has been copied in (:func:`refresh_path`), how the worker's
pytest reads the installed distributions once while it parses its command
line (:func:`distributions_read_once`), and how the collected worker leaves
no page cache in the snapshot the host takes next (:func:`drop_page_cache`).
Nothing done before the go reads the project: its tree is not there yet.
Standard library and pytest only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "LATE_MODULES",
    "PRELOAD_ENV",
    "EntryPointsRead",
    "distributions_read_once",
    "drop_page_cache",
    "forget_shadowed",
    "plugins_to_preload",
    "preload",
    "refresh_path",
    "rewrite_warning_filters",
]

#: Environment variable: the modules a waiting worker imports ahead (comma-separated).
PRELOAD_ENV = "GONDOLIN_WORKER_PRELOAD"
#: Modules every session imports only once it runs, none of them the
#: project's: ``readline`` (pytest's capture plugin imports it at start-up;
#: a C extension and its library, read from disk: ~0.05 s under TCG), the
#: command line completion helper pytest's parser imports, and the options
#: of the guest's ``gondolin`` plugin.
LATE_MODULES = ("readline", "_pytest._argcomplete", "pytest_gondolin.guest.options")
#: Where a guest's page cache is dropped (Linux; root only).
DROP_CACHES = "/proc/sys/vm/drop_caches"


def plugins_to_preload(args: Sequence[str]) -> list[str]:
    """The modules that ``-p NAME`` options in ``args`` load (not ``no:`` ones), in order."""
    names = [args[i + 1] for i in range(len(args) - 1) if args[i] == "-p"]
    return [n for n in names if n and not n.startswith("no:") and "," not in n]


def preload(modules: Sequence[str] = ()) -> EntryPointsRead:
    """Do ahead what every session does first; returns the distributions' entry points, read now.

    Imports pytest's built-in plugins, :data:`LATE_MODULES` and ``modules``
    (those the host's ``-p`` plugins load: the modules of their entry
    points; hypothesis, coverage, ... come with them). A module that fails
    to import is left to pytest, which reports it as it would anyway.
    Nothing is unloaded again: a module imported twice is not the same
    module (C extensions keep the first one's objects). Nothing here
    depends on the go: not its arguments, working folder or environment.
    """
    from _pytest.config import default_plugins

    for name in default_plugins:
        with contextlib.suppress(Exception):
            importlib.import_module(f"_pytest.{name}")
    for name in (*LATE_MODULES, *modules):
        if name:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
    return EntryPointsRead.now()


def forget_shadowed() -> list[str]:
    """After the go: forget each top-level module of :data:`LATE_MODULES` the project now shadows.

    A project's own ``readline.py`` in the working folder (first on
    ``sys.path``) is the module its session imports; before the go it was
    not there and the standard library's was imported. Only the folders
    before the standard library's are searched (the rest cannot shadow it).
    Returns the names forgotten.
    """
    stdlib = os.path.dirname(os.__file__)
    before = sys.path[: sys.path.index(stdlib)] if stdlib in sys.path else list(sys.path)
    forgotten: list[str] = []
    for name in LATE_MODULES:
        module = sys.modules.get(name)
        if "." in name or module is None:
            continue
        try:
            found = importlib.machinery.PathFinder.find_spec(name, before)
        except (ImportError, ValueError):
            continue
        if found is not None and found.origin != getattr(module.__spec__, "origin", None):
            del sys.modules[name]
            forgotten.append(name)
    return forgotten


def rewrite_warning_filters(args: Sequence[str]) -> list[str]:
    """``-W`` options that silence pytest's "already imported" warning for ``-p`` names loaded now.

    pytest marks each ``-p NAME`` for assertion rewriting and warns about
    one already imported (fatal under ``-W error``): after :func:`preload`
    that is expected, and the plugin's own assertions lose rewriting, as
    when another plugin had imported it first. Meant to go last on the
    command line, so they win over the user's ``-W`` options.
    """
    filters: list[str] = []
    for name in plugins_to_preload(args):
        if name in sys.modules:
            message = f"Module already imported so cannot be rewritten; {re.escape(name)}$"
            filters += ["-W", f"ignore:{message}:pytest.PytestAssertRewriteWarning"]
    return filters


def refresh_path() -> None:
    """After the go: what the import system must learn about folders that appeared since start-up.

    The host's site folders' ``.pth`` files name folders (editable installs)
    that the host copies in only with the project, after start-up; ``site``
    skipped them then. They go right after their site folder, as ``site``
    would have put them. Import lines are not run again (their hooks are
    installed). Then every cached folder listing is dropped, and the
    "nothing here" verdicts on folders that did not exist yet.
    """
    from pytest_gondolin.guest.hostpath import HOST_PATH_ENV, SITE, parse_entries

    text = os.environ.get(HOST_PATH_ENV)
    entries = parse_entries(text) if text else []
    for kind, folder in entries:
        if kind != SITE or folder not in sys.path:
            continue
        at = sys.path.index(folder) + 1
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".pth"))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as pth:
                    lines = pth.read().splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            for line in lines:
                line = line.rstrip()
                if not line or line.startswith(("#", "import ", "import\t")):
                    continue
                path = os.path.abspath(os.path.join(folder, line))
                if path not in sys.path and os.path.isdir(path):
                    sys.path.insert(at, path)
                    at += 1
    for key in [k for k, v in sys.path_importer_cache.items() if v is None]:
        del sys.path_importer_cache[key]
    importlib.invalidate_caches()


def _folder_stat(dist: importlib.metadata.Distribution) -> tuple[int, int, int] | None:
    """The device and times of ``dist``'s metadata folder (None: not a folder on disk).

    Not its inode number: the guest's environment is an overlay, whose
    folders get a new number each time the kernel reads them again (after
    the started snapshot dropped its caches). A folder made anew (installed,
    replaced) has a new change time.
    """
    path = getattr(dist, "_path", None)  # a PathDistribution's metadata folder
    if not isinstance(path, pathlib.Path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_mtime_ns, st.st_ctime_ns)


class EntryPointsRead:
    """The installed distributions' entry points as read before the go, each with its folder's stat.

    Reading each distribution's ``entry_points.txt`` after the go costs a
    disk read apiece (the started snapshot holds no page cache): ~0.3 s
    under TCG with the dev environment's 54 distributions. Read before the
    go, they live in the started worker's memory. :meth:`of` gives a
    distribution's remembered entry points only when its metadata folder is
    the same one, unchanged since (device, modification and change times):
    a distribution installed, replaced or removed since is read anew, and
    one that was not there (the project's own metadata, copied with its
    tree after the go) is read as before. The only writer between
    the started snapshot and the go is the copy of the project's tree, which
    never writes into the environment's metadata folders read here.
    """

    def __init__(
        self,
        known: Mapping[str, tuple[tuple[int, int, int], importlib.metadata.EntryPoints]],
    ) -> None:
        self._known = dict(known)

    @classmethod
    def now(cls) -> EntryPointsRead:
        """Every distribution ``importlib.metadata`` finds now, read (unreadable ones left out)."""
        known: dict[str, tuple[tuple[int, int, int], importlib.metadata.EntryPoints]] = {}
        try:
            found = list(importlib.metadata.distributions())
        except Exception:  # a broken sys.path entry: pytest meets it after the go, as before
            return cls(known)
        for dist in found:
            stat = _folder_stat(dist)
            if stat is None:
                continue
            try:
                known.setdefault(str(getattr(dist, "_path")), (stat, dist.entry_points))  # noqa: B009
            except Exception:  # unreadable metadata: read (and fail) after the go, as before
                continue
        return cls(known)

    def of(self, dist: importlib.metadata.Distribution) -> importlib.metadata.EntryPoints:
        """``dist.entry_points``: as read before the go if its folder is unchanged, else read now."""
        path = getattr(dist, "_path", None)
        remembered = self._known.get(str(path)) if isinstance(path, pathlib.Path) else None
        if remembered is not None and _folder_stat(dist) == remembered[0]:
            return remembered[1]
        return dist.entry_points


class _Remembered(importlib.metadata.Distribution):
    """An installed distribution whose entry points are read once (the rest is read as before)."""

    def __init__(
        self, dist: importlib.metadata.Distribution, ahead: EntryPointsRead | None = None
    ) -> None:
        self._dist = dist
        self._entry_points = dist.entry_points if ahead is None else ahead.of(dist)

    def read_text(self, filename: str) -> str | None:
        return self._dist.read_text(filename)

    def locate_file(self, path: Any) -> Any:
        return self._dist.locate_file(path)

    @property
    def entry_points(self) -> importlib.metadata.EntryPoints:
        return self._entry_points

    def __getattr__(self, name: str) -> Any:
        # What the base class does not define (a PathDistribution's ``_path``,
        # which some plugins read): the distribution's own.
        return getattr(self._dist, name)


@contextlib.contextmanager
def distributions_read_once(ahead: EntryPointsRead | None = None) -> Iterator[None]:
    """While active, ``importlib.metadata.distributions()`` lists and reads the distributions once.

    pytest looks up every ``-p NAME`` among the ``pytest11`` entry points of
    every installed distribution (pluggy's ``load_setuptools_entrypoints``),
    reading each one's ``entry_points.txt`` again for each name: under TCG,
    with the host's distributions carried (dozens) and one ``-p`` per host
    plugin, that was most of the worker's collection time. Meant for the
    parsing of the command line only (``WorkerPlugin.pytest_cmdline_parse``),
    when nothing installs distributions: the first call reads them and later
    calls get the same ones. Calls with arguments (a name, a path) are
    passed through. With ``ahead`` (:func:`preload`'s), the entry points of
    a distribution unchanged since then are not read again.
    """
    original = importlib.metadata.distributions
    read: list[importlib.metadata.Distribution] | None = None

    def distributions(**kwargs: Any) -> Iterable[importlib.metadata.Distribution]:
        nonlocal read
        if kwargs:
            return original(**kwargs)
        if read is None:
            read = [_Remembered(dist, ahead) for dist in original()]
        return iter(read)

    importlib.metadata.distributions = distributions
    try:
        yield
    finally:
        if importlib.metadata.distributions is distributions:
            importlib.metadata.distributions = original


def drop_page_cache() -> None:
    """Write back what is dirty and drop the clean page cache: the host snapshots this guest next.

    What collection read (sources, ``__pycache__``) is in the worker's memory
    by now; left in the page cache it would be part of every restore of the
    snapshot (measured: 173 -> 136 ms a test). Errors are ignored (no
    ``/proc``, not root): the snapshot is then only bigger.
    """
    with contextlib.suppress(OSError):
        os.sync()
    with contextlib.suppress(OSError), open(DROP_CACHES, "w", encoding="ascii") as control:
        control.write("1")
