"""A waiting worker's start-up: what it imports before the go, what it refreshes after.

The guest test worker (:mod:`pytest_gondolin.guest.worker`) can start,
import pytest and wait for the host's ``go`` before it reads anything of the
project; the host snapshots it there and reuses that state across runs
(``sandbox/worker_cache.py``). This module says what is imported before the
go (:func:`preload`) and what the import system must learn after it, when
the project tree has been copied in (:func:`refresh_path`), and how the
worker's pytest reads the installed distributions once while it parses its
command line (:func:`distributions_read_once`). Standard library and pytest
only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

__all__ = [
    "PRELOAD_ENV",
    "distributions_read_once",
    "plugins_to_preload",
    "preload",
    "refresh_path",
    "rewrite_warning_filters",
]

#: Environment variable: the modules a waiting worker imports ahead (comma-separated).
PRELOAD_ENV = "GONDOLIN_WORKER_PRELOAD"


def plugins_to_preload(args: Sequence[str]) -> list[str]:
    """The modules that ``-p NAME`` options in ``args`` load (not ``no:`` ones), in order."""
    names = [args[i + 1] for i in range(len(args) - 1) if args[i] == "-p"]
    return [n for n in names if n and not n.startswith("no:") and "," not in n]


def preload(modules: Sequence[str] = ()) -> None:
    """Import what every session imports first: pytest's built-in plugins, and ``modules``.

    ``modules`` are those the host's ``-p`` plugins load (the modules of
    their entry points: hypothesis, coverage, ... come with them). A module
    that fails to import is left to pytest, which reports it as it would
    anyway. Nothing is unloaded again: a module imported twice is not the
    same module (C extensions keep the first one's objects).
    """
    from _pytest.config import default_plugins

    for name in default_plugins:
        with contextlib.suppress(Exception):
            importlib.import_module(f"_pytest.{name}")
    for name in modules:
        if name:
            with contextlib.suppress(Exception):
                importlib.import_module(name)


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


class _Remembered(importlib.metadata.Distribution):
    """An installed distribution whose entry points are read once (the rest is read as before)."""

    def __init__(self, dist: importlib.metadata.Distribution) -> None:
        self._dist = dist
        self._entry_points = dist.entry_points

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
def distributions_read_once() -> Iterator[None]:
    """While active, ``importlib.metadata.distributions()`` lists and reads the distributions once.

    pytest looks up every ``-p NAME`` among the ``pytest11`` entry points of
    every installed distribution (pluggy's ``load_setuptools_entrypoints``),
    reading each one's ``entry_points.txt`` again for each name: under TCG,
    with the host's distributions carried (dozens) and one ``-p`` per host
    plugin, that was most of the worker's collection time. Meant for the
    parsing of the command line only (``WorkerPlugin.pytest_cmdline_parse``),
    when nothing installs distributions: the first call reads them and later
    calls get the same ones. Calls with arguments (a name, a path) are
    passed through.
    """
    original = importlib.metadata.distributions
    read: list[importlib.metadata.Distribution] | None = None

    def distributions(**kwargs: Any) -> Iterable[importlib.metadata.Distribution]:
        nonlocal read
        if kwargs:
            return original(**kwargs)
        if read is None:
            read = [_Remembered(dist) for dist in original()]
        return iter(read)

    importlib.metadata.distributions = distributions
    try:
        yield
    finally:
        if importlib.metadata.distributions is distributions:
            importlib.metadata.distributions = original
