"""The pytest arguments a test worker starts with, so its session matches the host's.

:func:`worker_args` repeats what changes how reports look or which plugins
and conftests load; :func:`guest_args` drops what a guest cannot honour
(plugins installed only on the host).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

__all__ = ["guest_args", "worker_args"]


def worker_args(config: pytest.Config) -> list[str]:
    """pytest arguments that make a worker's session match the host's.

    Names the host's rootdir, inifile (``-c /dev/null`` when there is none,
    so the worker does not find one of its own) and conftest boundary
    explicitly, and repeats
    the command-line options that change how reports look or which plugins
    and conftests load: ``-p``, ``-o``, ``-W``, ``--tb``, ``-l``, verbosity,
    ``--import-mode``, ``--assert``, ``--noconftest``, ``--strict-markers``.
    Selection options (``-k``, ``-m``, ``--lf``, ``-x``) and reporting
    options (``--junitxml``) stay on the host.  The caller appends what to
    collect (files or node ids).
    """
    option = config.option
    args = [f"--rootdir={config.rootpath}", "-c", str(config.inipath or os.devnull)]
    # pytest stops looking for conftest.py files at the inifile's directory,
    # or at the rootdir when there is none; with "-c /dev/null" it would
    # stop at /dev, i.e. nowhere, so name the host's boundary explicitly.
    confcutdir = getattr(option, "confcutdir", None)
    if confcutdir is None and config.inipath is None:
        confcutdir = config.rootpath
    if confcutdir is not None:
        args.append(f"--confcutdir={confcutdir}")
    for plugin in getattr(option, "plugins", None) or []:
        args += ["-p", plugin]
    for override in getattr(option, "override_ini", None) or []:
        args += ["-o", override]
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
    return args


def guest_args(args: Sequence[str]) -> list[str]:
    """Drop ``-p NAME`` plugin loads: host plugins (xdist, cov, ...) are not installed in
    the guest. ``-p no:NAME`` (disabling) is kept; conftest plugins load there anyway."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "-p" and i + 1 < len(args) and not args[i + 1].startswith("no:"):
            skip = True
            continue
        out.append(arg)
    return out
