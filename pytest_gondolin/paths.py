"""Where pytest-gondolin keeps its files.

* cache (images, warm snapshots, the MITM CA): ``$GONDOLIN_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/pytest-gondolin``, else ``~/.cache/pytest-gondolin``.
  Only VMs need it: :func:`cache_root` names it without touching the disk
  (the report header, readers), :func:`cache_dir` creates it for a VM and
  raises :class:`~pytest_gondolin.errors.CacheDirError` (naming the folder
  and ``GONDOLIN_CACHE_DIR``) if it cannot. A cache that exists but cannot
  be written still serves what is in it: writers ask :func:`can_write`,
  map a refused write with :func:`writing_cache`, and hold their locks
  where :func:`lock_path` says (in the runtime folder when the cache's is
  read-only). The cache holds the images guests boot and the CA key their
  TLS trusts, so a cache folder another user owns or may write in is
  reported once (:func:`cache_trust_problem`); it is still used.
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
import errno
import grp
import hashlib
import logging
import os
import pwd
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from pytest_gondolin.errors import CacheDirError, ConfigError

log = logging.getLogger(__name__)

#: Longest part of a socket path past the runtime root:
#: ``/<pid, 7 digits>-<8 hex>/agent.sock``.
RUNDIR_SOCKET_SUFFIX = len("/4194304-0123abcd/agent.sock")


#: errno values that mean "this may not be written here" (not "this is broken").
_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


#: Cache roots already checked by :func:`cache_dir` (the warning is given once).
_trust_checked: set[Path] = set()


def cache_root() -> Path:
    """The cache root the environment names; nothing is created or checked.

    Raises CacheDirError only if it names none (no ``GONDOLIN_CACHE_DIR``,
    ``XDG_CACHE_HOME`` or home folder).
    """
    env = os.environ.get("GONDOLIN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "pytest-gondolin"
    try:
        home = Path.home()
    except RuntimeError as exc:  # no HOME and no passwd entry
        raise CacheDirError("~/.cache/pytest-gondolin", f"has no home folder ({exc})") from exc
    return home / ".cache" / "pytest-gondolin"


def cache_dir() -> Path:
    """Return the cache root, creating it if needed.

    Raises CacheDirError if it cannot be created or is not a folder; a
    folder that exists but is read-only is returned (what is in it can
    still be used). The first time a root is returned, a warning is logged
    if :func:`cache_trust_problem` finds one.
    """
    root = cache_root()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)  # it will hold the CA key
    except FileExistsError:
        raise CacheDirError(root, "is not a folder") from None
    except OSError as exc:
        raise CacheDirError(root, f"cannot be created ({exc.strerror})") from exc
    if root not in _trust_checked:
        _trust_checked.add(root)
        problem = cache_trust_problem(root)
        if problem is not None:
            log.warning(
                "the cache folder %s %s: whoever can write there can replace the images "
                "guests boot and the CA key their TLS trusts; set GONDOLIN_CACHE_DIR to a "
                "folder only you can write",
                root,
                problem,
            )
    return root


def cache_trust_problem(root: Path) -> str | None:
    """Why another user may control the cache folder ``root``, or None.

    Another user owns it (root excepted: root can change anything anyway),
    or others, or a group with other members, may write in it (and so add
    or rename entries, even with the sticky bit: an image or CA folder
    planted before ours). A group named after this user with no other
    member (a "user private group", Debian's default with umask 002) is
    this user alone. A missing folder has no problem yet: it will be
    created as ours.
    """
    try:
        st = os.stat(root)
    except OSError:
        return None
    if st.st_uid not in (os.getuid(), 0):
        return f"is owned by uid {st.st_uid}, not {os.getuid()}"
    writers = st.st_mode & (stat.S_IWOTH | (0 if _own_group(st.st_gid) else stat.S_IWGRP))
    if writers:
        who = "others" if writers & stat.S_IWOTH else f"group {st.st_gid}"
        return f"has mode {stat.S_IMODE(st.st_mode):o} ({who} may write in it)"
    return None


def _own_group(gid: int) -> bool:
    """Whether group ``gid`` is this user's private group (its name, no other member)."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}


def cache_write_problem(root: Path) -> str | None:
    """Why files cannot be added under the cache root ``root``, or None if they can.

    Creates nothing: for a missing root, the nearest folder that exists
    must let this user create the rest.
    """
    probe = root
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return (
            "is not a folder" if probe == root else f"cannot be created ({probe} is not a folder)"
        )
    if can_write(probe):
        return None
    return "is read-only" if probe == root else f"cannot be created ({probe} is read-only)"


def can_write(folder: Path) -> bool:
    """Whether this process may add and replace files in ``folder`` (False if it does not exist)."""
    return os.access(folder, os.W_OK | os.X_OK)


@contextlib.contextmanager
def writing_cache(need: str) -> Iterator[None]:
    """Turn a write the cache refuses (EACCES, EPERM, EROFS) into one CacheDirError.

    ``need`` says what had to be written ("image X must be built there"). Any
    other OSError passes unchanged: it is not about where the cache is.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _REFUSED:
            raise
        detail = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
        raise CacheDirError(cache_root(), f"cannot be written ({detail})", need=need) from exc


def lock_path(path: Path) -> Path:
    """Where to hold the lock file ``path`` (a file in the cache).

    ``path`` itself when it can be opened for writing (its folder can be
    written, or the file exists and can be); otherwise a file in this
    user's private runtime folder keyed by ``path``, so the processes of
    this user reading a read-only cache still take turns.  A missing folder
    is created first when it can be: were it not, a process coming before
    the folder exists would lock in the runtime folder and one coming after
    in the cache -- two locks for one resource.
    """
    if os.path.exists(path):
        if os.access(path, os.W_OK):
            return path
    else:
        if not os.path.isdir(path.parent):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only cache, a file in the way: the runtime folder
                log.debug("no folder for the lock %s: %s", path, exc)
        if can_write(path.parent):
            return path
    digest = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:24]
    folder = runtime_dir() / "cache-locks"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{digest}.lock"


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
