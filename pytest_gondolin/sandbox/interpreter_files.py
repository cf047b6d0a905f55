"""What the host's interpreter is made of: where it lives and the files carried for it.

:class:`HostLayout` says where the running interpreter lives (binary,
prefixes, standard library, ``libpython``, extension ABI);
:func:`interpreter_files` lists every file and link it needs, by guest path
(the same as the host's), as :class:`CarriedFile` entries: the link chain
from ``sys.executable``, a venv's ``pyvenv.cfg`` and ``bin/python*``,
``libpython`` and the standard library with its own bytecode, less what
tests do not import (:data:`SKIPPED_DIRS`). Nothing here checks whether the
guest can run them: :mod:`.host_python` does, over these files.
"""

from __future__ import annotations

import os
import platform
import re
import stat
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_LINKS",
    "SKIPPED_DIRS",
    "CarriedFile",
    "HostLayout",
    "carried_file",
    "interpreter_files",
    "link_chain",
]

#: Folders of the standard library that tests do not import and that weigh
#: (tests alone are ~60% of it), and the GUI parts whose libraries (Tk, X)
#: a guest does not have.
SKIPPED_DIRS: Final = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "site-packages",
    }
)
#: Files left out wherever they are: the static library (``config-*``,
#: ~50 MB) and the Tk extension module (tkinter is left out).
_SKIPPED_FILE = re.compile(r"libpython.*\.a|_tkinter\..*so")
#: Links followed from ``sys.executable`` to the binary (the kernel's limit is 40).
MAX_LINKS: Final = 40


@dataclass(frozen=True)
class HostLayout:
    """Where the host's interpreter lives (:meth:`current` is the running one)."""

    executable: str
    prefix: str
    base_prefix: str
    #: ``platform.python_version()``.
    version: str
    implementation: str
    #: ``sys.implementation.cache_tag`` (``cpython-311``): the bytecode carried with the stdlib.
    cache_tag: str
    #: The extension ABI (``sysconfig``'s ``SOABI``: ``cpython-311-x86_64-linux-gnu``).
    soabi: str
    #: Folders of the standard library: ``stdlib`` and ``lib-dynload`` (when outside it).
    stdlib: tuple[str, ...]
    #: The shared ``libpython`` the binary needs (None: statically linked).
    libpython: str | None

    @classmethod
    def current(cls) -> HostLayout:
        stdlib = os.path.normpath(sysconfig.get_paths()["stdlib"])
        folders = [stdlib]
        for entry in sys.path:
            entry = os.path.normpath(entry) if entry else ""
            if os.path.basename(entry) == "lib-dynload" and not entry.startswith(stdlib + "/"):
                folders.append(entry)
        libpython = None
        if sysconfig.get_config_var("Py_ENABLE_SHARED"):
            name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
            libdir = sysconfig.get_config_var("LIBDIR")
            if name and libdir:
                libpython = os.path.join(str(libdir), str(name))
        return cls(
            # Normalized as the carried path is (link_chain): `../venv/bin/python`
            # started from the project names a folder the guest has only later.
            executable=os.path.abspath(sys.executable),
            prefix=sys.prefix,
            base_prefix=sys.base_prefix,
            version=platform.python_version(),
            implementation=sys.implementation.name,
            cache_tag=str(sys.implementation.cache_tag),
            soabi=str(sysconfig.get_config_var("SOABI") or ""),
            stdlib=tuple(folders),
            libpython=libpython,
        )

    @property
    def major_minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


@dataclass(frozen=True)
class CarriedFile:
    """One file or link the guest gets at ``path``."""

    path: str
    #: The host file read for it (differs from ``path`` for a library carried under its soname).
    source: str
    #: A symbolic link's target (None: a regular file).
    link: str | None
    size: int
    mtime_ns: int
    mode: int


def carried_file(path: str, source: str | None = None) -> CarriedFile | None:
    source = source or path
    try:
        st = os.lstat(source) if source == path else os.stat(source)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(source)
        except OSError:  # replaced since the lstat
            return None
        return CarriedFile(path, source, target, 0, st.st_mtime_ns, 0o777)
    if not stat.S_ISREG(st.st_mode):
        return None
    return CarriedFile(path, source, None, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))


def link_chain(executable: str) -> list[str]:
    """``executable`` and every link on the way to the binary (absolute paths, in order)."""
    chain: list[str] = []
    path = os.path.abspath(executable)
    for _ in range(MAX_LINKS):
        chain.append(path)
        if not os.path.islink(path):
            return chain
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    raise OSError(f"{executable}: more than {MAX_LINKS} symbolic links")


def _walk(folder: str, cache_tag: str) -> Iterator[str]:
    # The stdlib's bytecode comes along (``__pycache__/*.<cache_tag>.pyc``, ~15 MB):
    # without it the worker (PYTHONDONTWRITEBYTECODE) compiles every module it
    # imports, each start, under TCG: ``-c pass`` 2.3 s instead of 0.3 s,
    # importing json/unittest/argparse/inspect 14 s instead of 2.5 s (measured).
    bytecode = f".{cache_tag}.pyc"
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        in_cache = os.path.basename(dirpath) == "__pycache__"
        for name in sorted(filenames):
            if in_cache and not name.endswith(bytecode):
                continue
            if not _SKIPPED_FILE.fullmatch(name):
                yield os.path.join(dirpath, name)


def interpreter_files(layout: HostLayout) -> dict[str, CarriedFile]:
    """Every file the interpreter needs, by guest path (no checks yet)."""
    paths = link_chain(layout.executable)
    if layout.prefix != layout.base_prefix:
        venv = layout.prefix
        paths.append(os.path.join(venv, "pyvenv.cfg"))
        bindir = os.path.join(venv, "bin")
        try:
            paths += [
                os.path.join(bindir, n)
                for n in sorted(os.listdir(bindir))
                if n.startswith("python")
            ]
        except OSError:
            pass
    if layout.libpython is not None:
        paths.append(layout.libpython)
    for folder in layout.stdlib:
        paths += _walk(folder, layout.cache_tag)
    files: dict[str, CarriedFile] = {}
    for path in paths:
        carried = carried_file(path)
        if carried is not None and path not in files:
            files[path] = carried
    return files
