"""Where pytest-gondolin keeps its files.

* cache (images, warm snapshots, the MITM CA): ``$GONDOLIN_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/pytest-gondolin``, else ``~/.cache/pytest-gondolin``.
* runtime (per-VM sockets, overlays, console logs): ``gondolin-<uid>`` under
  ``$XDG_RUNTIME_DIR`` or the system temp dir, one subdirectory per VM,
  reaped when its owner process is gone.

The runtime root is trusted only if it is private: a real folder (not a
symlink), owned by this user, with no group or other access, checked with
lstat as ssh-agent and tmux check theirs. In a shared ``/tmp`` another user
can create ``gondolin-<uid>`` first and, if it were used, rename or replace
the per-VM folders in it and reach their sockets, overlays and console logs
(CWE-377). If it is not private, this process uses a fresh folder from
:func:`tempfile.mkdtemp` (``gondolin-<uid>-XXXXXXXX``, created 0700 and
exclusively) and logs one warning; scanners find this user's private
fallbacks too (:func:`runtime_roots`).

Paths stay short because Unix socket paths are limited (107 bytes on
Linux, 103 on macOS): a per-VM socket is ``<root>/<pid>-<8 hex>/agent.sock``,
at most :data:`RUNDIR_SOCKET_SUFFIX` bytes past the root; under ``/tmp`` the
whole path stays under 70 bytes.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path

from pytest_gondolin.errors import ConfigError

log = logging.getLogger(__name__)

#: Longest part of a socket path past the runtime root:
#: ``/<pid, 7 digits>-<8 hex>/agent.sock``.
RUNDIR_SOCKET_SUFFIX = len("/4194304-0123abcd/agent.sock")


def cache_dir() -> Path:
    """Return the cache root, creating it if needed."""
    env = os.environ.get("GONDOLIN_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "pytest-gondolin"
    root.mkdir(parents=True, exist_ok=True)
    return root


def owned_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a real folder owned by this user, or None if it is one.

    Checked with lstat: a symlink is never a folder here, whatever it points to.
    """
    return _dir_problem(path, private=False)


def private_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a private folder of this user, or None if it is one.

    Private: a real folder owned by this user (:func:`owned_dir_problem`)
    with no group or other permission bits, so nobody else can add, rename
    or replace anything in it. One lstat.
    """
    return _dir_problem(path, private=True)


def _dir_problem(path: Path, *, private: bool) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not {os.getuid()}"
    if private and st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):o} (group or other access)"
    return None


def _runtime_base() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


_lock = threading.Lock()
#: The root chosen per (base folder, uid): the environment may change under
#: tests, the choice (and its warning) must not repeat for the same base.
_chosen: dict[tuple[Path, int], Path] = {}
_warned: set[tuple[Path, int]] = set()


def runtime_dir() -> Path:
    """Return this process's runtime root: a private (0700, owned by us, not a symlink) folder.

    ``<base>/gondolin-<uid>`` if it is private or could be created;
    otherwise a fresh ``<base>/gondolin-<uid>-XXXXXXXX`` and, once per
    process, a logged warning naming the problem. The choice is cached per
    base; later calls cost one lstat (a root removed meanwhile is chosen
    again). Raises ConfigError if no private folder can be created in the base.
    """
    base = _runtime_base()
    key = (base, os.getuid())
    with _lock:
        root = _chosen.get(key)
        if root is not None and private_dir_problem(root) is None:
            return root
        root, problem = _choose_root(base)
        if problem is not None and key not in _warned:
            _warned.add(key)
            primary = base / f"gondolin-{os.getuid()}"
            log.warning(
                "runtime folder %s %s, so another user may control it; using %s instead "
                "(remove %s, or set XDG_RUNTIME_DIR to a private folder)",
                primary,
                problem,
                root,
                primary,
            )
        _chosen[key] = root
        return root


def _choose_root(base: Path) -> tuple[Path, str | None]:
    """The root to use in ``base``, and what is wrong with ``gondolin-<uid>`` if it is not that."""
    uid = os.getuid()
    root = base / f"gondolin-{uid}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir never follows a symlink at ``root``: it fails if any entry exists.
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o700)
    except OSError as exc:
        problem: str | None = f"cannot be created ({exc.strerror})"
    else:
        problem = private_dir_problem(root)
        if problem is None:
            return root, None
    try:
        # Created 0700 under a random name that must not exist yet (O_EXCL semantics).
        fallback = Path(tempfile.mkdtemp(prefix=f"gondolin-{uid}-", dir=base))
    except OSError as exc:
        raise ConfigError(
            f"no private runtime folder in {base}: {root} {problem}, and a new one cannot be "
            f"created ({exc}); set XDG_RUNTIME_DIR to a folder only you can write"
        ) from exc
    atexit.register(_remove_if_empty, fallback)
    return fallback, problem


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def runtime_roots() -> list[Path]:
    """Every private runtime root of this user in the base: this process's first.

    Includes the fallback folders of other runs (``gondolin-<uid>-*``), so
    the reaper and ``gondolin ps`` see VMs started while ``gondolin-<uid>``
    was unusable. Only folders that pass :func:`private_dir_problem` are
    listed; the rest may belong to someone else and are never looked into.
    """
    current = runtime_dir()
    uid = os.getuid()
    roots = [current]
    try:
        names = sorted(os.listdir(current.parent))
    except OSError:
        return roots
    for name in names:
        if name == f"gondolin-{uid}" or name.startswith(f"gondolin-{uid}-"):
            path = current.parent / name
            if path != current and private_dir_problem(path) is None:
                roots.append(path)
    return roots
