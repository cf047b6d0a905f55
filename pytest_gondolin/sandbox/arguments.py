"""The pytest arguments a test worker starts with, so its session matches the host's.

:func:`worker_args` repeats what changes how reports look, which items are
collected (and under which node ids) and which plugins and conftests load;
:func:`guest_args` drops the ``-p NAME`` plugin loads a guest cannot honour
(plugins whose module the guest cannot import), and
:func:`plugin_in_guest` says which those are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from pytest_gondolin.sandbox.guest_plugins import (
    PLUGIN_OPTION_PREFIXES,
    guest_plugin_loads,
    output_args,
    plugin_option_args,
)
from pytest_gondolin.sandbox.plugin_options import plugin_options
from pytest_gondolin.sandbox.project_files import EXCLUDED_DIRS

__all__ = ["GuestArgs", "GuestSources", "guest_args", "plugin_in_guest", "worker_args"]


def worker_args(config: pytest.Config) -> list[str]:
    """pytest arguments that make a worker's session match the host's.

    Names the host's rootdir, inifile (``-c /dev/null`` when there is none,
    so the worker does not find one of its own) and conftest boundary
    explicitly, and repeats the command-line options that change how
    reports look, what is collected and how, or which plugins and conftests
    load: ``-p`` (and ``-p NAME`` for each plugin the host autoloaded, but
    not the plugins the host applies around a run:
    :func:`~.guest_plugins.guest_plugin_loads`), ``-o`` (and ``-o markers=``
    with every marker the host registered: :func:`_marker_args`), ``-W``, ``--tb``, ``-l``, verbosity,
    ``--import-mode``, ``--assert``, ``--noconftest``, ``--strict-markers``,
    the doctest options (``--doctest-modules``, ``--doctest-glob``, ...),
    ``--ignore`` and ``--ignore-glob``, pytest-randomly's seed, ``--capture``
    and ``--setup-show`` (:mod:`.guest_plugins`), and the options of the
    plugins and conftests that load in the guest too, as the command line
    gave them (:func:`~.plugin_options.plugin_options`).  Paths (``--confcutdir``,
    ``--ignore``) are made absolute against the invocation directory, so
    they name the same files whatever the worker's working directory.
    Selection options (``-k``, ``-m``, ``--deselect``, ``--lf``, ``-x``) and
    reporting options (``--junitxml``) stay on the host: it sends the worker
    the node ids to run.  The caller appends what to collect (files or node
    ids).
    """
    option = config.option
    here = config.invocation_params.dir
    args = [f"--rootdir={config.rootpath}", "-c", str(config.inipath or os.devnull)]
    # pytest stops looking for conftest.py files at the inifile's directory,
    # or at the rootdir when there is none; with "-c /dev/null" it would
    # stop at /dev, i.e. nowhere, so name the host's boundary explicitly.
    confcutdir = getattr(option, "confcutdir", None)
    if confcutdir is None and config.inipath is None:
        confcutdir = config.rootpath
    if confcutdir is not None:
        args.append(f"--confcutdir={here / confcutdir}")
    # Autoload is off in the worker: -p for what the host loaded, autoloaded too.
    for plugin in guest_plugin_loads(config):
        args += ["-p", plugin]
    for override in getattr(option, "override_ini", None) or []:
        args += ["-o", override]
    args += _marker_args(config)
    for spec in getattr(option, "pythonwarnings", None) or []:
        args += ["-W", spec]
    tbstyle = getattr(option, "tbstyle", "auto")
    if tbstyle and tbstyle != "auto":
        args.append(f"--tb={tbstyle}")
    if getattr(option, "showlocals", False):
        args.append("-l")
    verbose = int(getattr(option, "verbose", 0) or 0)
    if verbose:
        args.append("-" + ("v" * verbose if verbose > 0 else "q" * -verbose))
    importmode = getattr(option, "importmode", None)
    if importmode:
        args.append(f"--import-mode={importmode}")
    if getattr(option, "assertmode", "rewrite") != "rewrite":
        args.append(f"--assert={option.assertmode}")
    if getattr(option, "noconftest", False):
        args.append("--noconftest")
    if getattr(option, "strict_markers", False):
        args.append("--strict-markers")
    args += _collection_args(config)
    args += plugin_option_args(config) + output_args(config)
    for tokens in plugin_options(config).values():
        args += tokens
    return args


def _marker_args(config: pytest.Config) -> list[str]:
    """``-o markers=...`` naming every marker the host has registered, the plugins' too.

    A plugin the worker does not load (pytest-cov, xdist and the others the
    host applies around a run, or one the guest cannot import) registers no
    marker there, so ``pytest.mark.no_cover`` would be an unknown mark in the
    guest: a warning the host never saw, an error under ``filterwarnings =
    error`` or ``--strict-markers`` (found marking python-dateutil's suite,
    whose conftest adds ``no_cover``).  The host's list already holds the
    ini file's and ``-o``'s markers, so the override keeps them.
    """
    lines = [str(line) for line in config.getini("markers")]
    return ["-o", "markers=" + "\n".join(lines)] if lines else []


def _collection_args(config: pytest.Config) -> list[str]:
    """The options that change which items a file yields: doctests and ignored paths.

    Missing attributes mean the plugin that adds the option is disabled
    (``-p no:doctest``); the worker then does not get the option either.
    """
    option = config.option
    here = config.invocation_params.dir
    args: list[str] = []
    # A module marked sandboxed (``pytestmark``) marks its doctests too: the
    # worker must collect them, under the same node ids, to run them.
    if getattr(option, "doctestmodules", False):
        args.append("--doctest-modules")
    for glob in getattr(option, "doctestglob", None) or []:
        args.append(f"--doctest-glob={glob}")
    if getattr(option, "doctest_ignore_import_errors", False):
        args.append("--doctest-ignore-import-errors")
    if getattr(option, "doctest_continue_on_failure", False):
        args.append("--doctest-continue-on-failure")
    report = getattr(option, "doctestreport", "udiff")
    if report and report != "udiff":
        args.append(f"--doctest-report={report}")
    # pytest resolves --ignore against the working directory: name it absolutely.
    for path in getattr(option, "ignore", None) or []:
        args.append(f"--ignore={here / path}")
    # A relative glob matches anywhere below ("*/" + glob, _pytest.pathlib.fnmatch_ex):
    # verbatim keeps its meaning.
    for glob in getattr(option, "ignore_glob", None) or []:
        args.append(f"--ignore-glob={glob}")
    return args


@dataclass(frozen=True)
class GuestSources:
    """Where the guest imports from: the project tree, other folders, distributions."""

    #: The project tree (the rootdir), copied in without its virtualenvs and
    #: caches (``project_files.EXCLUDED_DIRS``).
    project: Path
    #: Absolute folders the guest has whole at the same path (pytest,
    #: pytest-gondolin, editable sources carried in).
    folders: tuple[Path, ...]
    #: Canonical names of the distributions installed in the guest (pytest,
    #: the configured requirements, the host's environment when carried).
    distributions: frozenset[str]


#: Folders of installed distributions: a plugin found there is in the guest
#: only if its distribution is, even when a virtualenv sits in the project.
_INSTALL_DIRS = frozenset({"site-packages", "dist-packages"})


def plugin_in_guest(
    config: pytest.Config,
    name: str,
    sources: GuestSources,
    *,
    distributions_of: Callable[[str], Collection[str]],
) -> bool:
    """Whether ``-p name``, loaded on the host, can load in the guest too.

    Looks at the module the host loaded for ``name``: it loads in the guest
    when the distribution providing its top-level package
    (``distributions_of``) is installed there, or when its file lies in one
    of ``sources.folders`` or in the project tree outside an installation
    folder or an excluded one.  A name the host did not register is not
    known to load.
    """
    plugin = config.pluginmanager.get_plugin(name)
    filename = getattr(plugin, "__file__", None)
    if not isinstance(filename, str):
        return False
    top = str(getattr(plugin, "__name__", "")).partition(".")[0]
    if any(canonicalize_name(d) in sources.distributions for d in distributions_of(top)):
        return True
    path = Path(filename).resolve()
    if any(path.is_relative_to(folder) for folder in sources.folders):
        return True
    if not path.is_relative_to(sources.project):
        return False
    parts = path.relative_to(sources.project).parts[:-1]
    return not any(part in _INSTALL_DIRS or part in EXCLUDED_DIRS for part in parts)


@dataclass(frozen=True)
class GuestArgs:
    """The worker's arguments in the guest, and the plugins left out of them."""

    args: tuple[str, ...]
    #: ``-p NAME`` loads dropped because the guest cannot import ``NAME``.
    dropped_plugins: tuple[str, ...] = ()


def guest_args(
    args: Sequence[str],
    loads_in_guest: Callable[[str], bool],
    plugin_options: Mapping[str, Sequence[str]] | None = None,
) -> GuestArgs:
    """Drop the ``-p NAME`` plugin loads for which ``loads_in_guest(NAME)`` is false.

    Host plugins not installed in the guest (xdist, cov, ...) would stop the
    worker at start-up.  ``-p no:NAME`` (disabling) is always kept; conftest
    plugins load in the guest anyway. The options of a dropped plugin go
    with it: ``guest_plugins.PLUGIN_OPTION_PREFIXES``, and its tokens in
    ``plugin_options`` (:func:`~.plugin_options.plugin_options`, which
    :func:`worker_args` appended one plugin after the other).
    """
    out: list[str] = []
    dropped: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "-p" and i + 1 < len(args):
            name = args[i + 1]
            if not name.startswith("no:") and not loads_in_guest(name):
                dropped.append(name)
                skip = True
                continue
        out.append(arg)
    # A dropped plugin's options would be unknown to the worker.
    prefixes = tuple(p for name in dropped for p in PLUGIN_OPTION_PREFIXES.get(name, ()))
    if prefixes:
        out = [arg for arg in out if not arg.startswith(prefixes)]
    for name in dropped:
        out = _without_run(out, list((plugin_options or {}).get(name, ())))
    return GuestArgs(tuple(out), tuple(dropped))


def _without_run(args: list[str], run: list[str]) -> list[str]:
    """``args`` without the last contiguous occurrence of ``run`` (unchanged when absent)."""
    if not run:
        return args
    for start in range(len(args) - len(run), -1, -1):
        if args[start : start + len(run)] == run:
            return args[:start] + args[start + len(run) :]
    return args
