"""What a sandboxed session copies into the guest: the project tree and pytest itself.

* The project tree under pytest's rootdir goes to the same absolute path in
  the guest, so node ids, tracebacks and ``__file__`` match the host. Left
  out: VCS folders, virtualenvs, caches, build output, and (in a git
  checkout) whatever ``.gitignore`` ignores. Capped at
  :data:`PROJECT_SIZE_LIMIT`; past it, the error names the largest files.
* The copy never leaves the rootdir: the tree is walked from the rootdir's
  real path through folder descriptors and no symlink below it is followed
  (file or folder, at any depth; a swap between listing and opening is
  caught by checking the opened file); git-listed paths that are absolute or
  contain ``..`` are refused. What was left out that way (symlinks, paths
  outside the tree, files that are not regular files) is named in one
  warning per session (:func:`pack_project`); the exclusions above are silent.
* pytest, pluggy and their pure-Python dependencies are copied from the
  host's own installation, so the guest runs exactly the host's versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pytest_gondolin.errors import ConfigError

log = logging.getLogger(__name__)

#: Project trees bigger than this are almost always a virtualenv or data
#: folder that slipped past the exclusions; copying them would cost seconds per session.
PROJECT_SIZE_LIMIT = 64 * 1024 * 1024
#: Folder names never copied, wherever they appear.
EXCLUDED_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".hypothesis",
        "node_modules",
        ".eggs",
        "build",
        "dist",
    }
)
#: The warning about project paths left out names this many; a tree full of
#: symlinks would otherwise print a page.
MAX_SKIPPED_NAMED = 10
#: Where shipped libraries live in the guest (on the guest's root disk).
GUEST_SITE = "/opt/gondolin/site"
#: Distributions the guest worker needs, copied (with their dependencies)
#: from the host's environment.
SHIPPED_DISTRIBUTIONS = ("pytest",)

# Opening a project file, relative to its folder's fd (which os.fwalk checked
# is no symlink): never through a symlink in its name (O_NOFOLLOW), never
# blocking on a FIFO (O_NONBLOCK), never acquiring a controlling tty (O_NOCTTY).
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


@dataclass(frozen=True, order=True)
class SkippedPath:
    """A project path that was not copied into the guest, and why."""

    #: Relative to the rootdir as listed (a folder ends with ``/``); a
    #: refused git entry exactly as git printed it.
    path: str
    #: "symlink", "outside the project", "not a regular file" or "changed while copying".
    reason: str


def _excluded_name(name: str, *, folder: bool) -> bool:
    return name in EXCLUDED_DIRS or (folder and name.endswith(".egg-info"))


def _leaves_tree(rel: str) -> bool:
    """True for a listed path that is not a plain path down the tree: absolute, ``..``, ``.`` or empty parts."""
    return rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/"))


def _git_files(root: Path) -> set[str] | None:
    try:
        res = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return {p for p in res.stdout.decode(errors="surrogateescape").split("\0") if p}


def _lstat_mode(name: str, dir_fd: int) -> int | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return None


def _scan(root: Path, skipped: list[SkippedPath]) -> Generator[tuple[str, int, str], None, None]:
    """Yield ``(relative path, folder fd, name)`` for each project file that lstat calls regular.

    The folder fd stays open until the next item is requested. Folders are
    walked with :func:`os.fwalk` from the rootdir's real path, which opens
    each folder relative to its parent's fd and descends only if the opened
    folder is the one lstat saw; symlinked folders are never entered. In a
    git checkout only git-listed paths are yielded, and only folders that
    hold some are walked. Left-out symlinks, special files and refused git
    entries are appended to ``skipped``.
    """
    listed = _git_files(root)
    folders: set[str] | None = None  # with git: the folders that hold a listed file
    named: set[str] | None = None  # with git: those folders and every listed path
    if listed is not None:
        refused = {rel for rel in listed if _leaves_tree(rel)}
        skipped += [SkippedPath(rel, "outside the project") for rel in sorted(refused)]
        listed -= refused
        folders = {rel.rsplit("/", i)[0] for rel in listed for i in range(1, rel.count("/") + 1)}
        named = folders | listed
    top = os.path.realpath(root)
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(top, follow_symlinks=False):
        base = os.path.relpath(dirpath, top)
        prefix = "" if base == "." else f"{base}/"
        descend: list[str] = []
        for name in sorted(dirnames):
            rel = prefix + name
            if _excluded_name(name, folder=True) or (named is not None and rel not in named):
                continue
            mode = _lstat_mode(name, dir_fd)
            if mode is not None and stat.S_ISLNK(mode):
                skipped.append(SkippedPath(f"{rel}/", "symlink"))
            elif mode is not None and stat.S_ISDIR(mode) and (folders is None or rel in folders):
                descend.append(name)
        dirnames[:] = descend
        for name in sorted(filenames):
            rel = prefix + name
            if _excluded_name(name, folder=False) or (listed is not None and rel not in listed):
                continue
            mode = _lstat_mode(name, dir_fd)
            if mode is None:
                continue  # gone since it was listed
            if stat.S_ISLNK(mode):
                skipped.append(SkippedPath(rel, "symlink"))
            elif not stat.S_ISREG(mode):
                skipped.append(SkippedPath(rel, "not a regular file"))
            else:
                yield rel, dir_fd, name


def _open_regular(dir_fd: int, name: str) -> BinaryIO | None:
    """Open ``name`` in the folder ``dir_fd`` if it is a regular file now; None otherwise.

    The type is checked on the opened file (fstat), so a file swapped for a
    symlink, FIFO or device after it was listed is never read through.
    """
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:  # ELOOP: a symlink now; ENOENT: gone
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def project_files(root: Path) -> list[Path]:
    """Relative paths of the files under ``root`` that go to the guest (see the module docstring)."""
    return sorted(Path(rel) for rel, _, _ in _scan(root, []))


def pack_project(root: Path, *, limit: int = PROJECT_SIZE_LIMIT) -> bytes:
    """A tar of the project tree with members at their absolute paths (leading '/' dropped).

    Every member is a regular file read through a descriptor opened below
    ``root`` without following symlinks. Paths left out for safety are
    logged in one warning (once per process for the same root and paths).
    Raises ConfigError, naming the largest files, if the tree is over ``limit`` bytes.
    """
    skipped: list[SkippedPath] = []
    contents: dict[str, tuple[os.stat_result, bytes]] = {}
    sizes: list[tuple[int, str]] = []
    total = 0
    for rel, dir_fd, name in _scan(root, skipped):
        fh = _open_regular(dir_fd, name)
        if fh is None:
            skipped.append(SkippedPath(rel, "changed while copying"))
            continue
        with fh:
            st = os.fstat(fh.fileno())
            sizes.append((st.st_size, rel))
            total += st.st_size
            if total <= limit:  # past the limit only the sizes matter, for the error
                contents[rel] = (st, fh.read(st.st_size))
    if total > limit:
        biggest = sorted(sizes, reverse=True)[:5]
        listing = ", ".join(f"{p} ({s / 2**20:.1f} MiB)" for s, p in biggest)
        raise ConfigError(
            f"the project tree under {root} is {total / 2**20:.0f} MiB, over the {limit // 2**20} MiB "
            f"limit for copying into the guest; largest files: {listing}. Exclude them with .gitignore."
        )
    _report_skipped(root, skipped)
    prefix = str(root).strip("/")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in sorted(contents, key=lambda r: r.split("/")):
            st, data = contents[rel]
            info = tarfile.TarInfo(f"{prefix}/{rel}")
            info.size = len(data)  # a file that shrank since fstat is copied as read
            info.mode = stat.S_IMODE(st.st_mode)
            info.mtime = int(st.st_mtime)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_reported_lock = threading.Lock()
#: (root, skipped paths) already warned about: one warning per session, not one per sandbox.
_reported: set[tuple[str, tuple[SkippedPath, ...]]] = set()


def _report_skipped(root: Path, skipped: list[SkippedPath]) -> None:
    if not skipped:
        return
    key = (str(root), tuple(sorted(skipped)))
    with _reported_lock:
        if key in _reported:
            return
        _reported.add(key)
    named = ", ".join(f"{s.path} ({s.reason})" for s in key[1][:MAX_SKIPPED_NAMED])
    more = len(skipped) - MAX_SKIPPED_NAMED
    log.warning(
        "%d path(s) of %s not copied into the guest (symlinks are never followed, paths "
        "outside the project are refused): %s%s",
        len(skipped),
        root,
        named,
        f" and {more} more" if more > 0 else "",
    )


def _tar(members: Iterable[tuple[Path, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for src, name in members:
            info = tar.gettarinfo(str(src), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with src.open("rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


#: The image's own Python (Debian bookworm), which runs the worker unless the
#: host's interpreter is carried (:mod:`.host_python`).
IMAGE_PYTHON = "3.11.2"


def _minor(version: str) -> str:
    """``3.11`` of ``3.11.2``."""
    return ".".join(version.split(".")[:2])


def dependency_closure(
    names: Iterable[str], python_version: str = IMAGE_PYTHON
) -> list[importlib.metadata.Distribution]:
    """``names`` and everything they require (no extras), as installed on the host.

    Environment markers are evaluated for the guest: Linux, the CPython
    ``python_version`` (``3.11.2``) that runs the worker there.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    guest_env = {
        "python_version": _minor(python_version),
        "python_full_version": python_version,
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = canonicalize_name(name)
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise ConfigError(
                f"distribution {name!r} (needed in the guest) is not installed on the host"
            ) from exc
        seen[key] = dist
        for spec in dist.requires or ():
            try:
                req = Requirement(spec)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate(guest_env):
                todo.append(req.name)
    return [seen[k] for k in sorted(seen)]


def pack_distributions(
    names: Iterable[str] = SHIPPED_DISTRIBUTIONS, python_version: str = IMAGE_PYTHON
) -> bytes:
    """A tar of the host's installed files of ``names`` and their dependencies under GUEST_SITE."""
    members: list[tuple[Path, str]] = []
    for dist in dependency_closure(names, python_version):
        for f in dist.files or ():
            if f.suffix == ".pyc" or ".." in f.parts or f.parts[0].endswith(".data"):
                continue
            src = Path(str(f.locate()))
            if src.is_file():
                members.append((src, f"{GUEST_SITE.lstrip('/')}/{f.as_posix()}"))
    return _tar(members)


#: Where requirements installed for the guest live (after GUEST_SITE on sys.path,
#: so the worker's pytest stays the host's).
GUEST_REQUIREMENTS = "/opt/gondolin/requirements"
#: Platform tags of the guest (Debian bookworm x86_64, glibc 2.36).
GUEST_PLATFORMS = (
    "manylinux_2_36_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "linux_x86_64",
)
#: pip resolving and downloading wheels: minutes on a slow index, never an hour.
PIP_TIMEOUT = 1800


def requirements_dir(
    requirements: Iterable[str],
    progress: Callable[[str], None] | None = None,
    python_version: str = IMAGE_PYTHON,
) -> Path:
    """Install ``requirements`` for the guest's Python into a cached folder and return it.

    ``python_version`` is the CPython that runs the worker in the guest (the
    host's own when carried): wheels are chosen for its major.minor.

    The host's pip resolves wheels for the guest's platform (``--only-binary``:
    the guest has no compiler and no network), once per requirement set; later
    sessions reuse the folder. Raises ConfigError with pip's output on failure.
    """
    import filelock

    import pytest_gondolin.paths as paths

    reqs = sorted(set(requirements))
    minor = _minor(python_version)
    tag = "cp" + minor.replace(".", "")
    key = hashlib.sha256("\n".join([*GUEST_PLATFORMS, tag, *reqs]).encode()).hexdigest()[:16]
    root = paths.cache_root() / "requirements"
    target = root / key
    if (target / ".complete").exists():
        return target  # a read-only cache that already holds them serves them too
    need = f"the guest requirements {' '.join(reqs)} must be installed there"
    with paths.writing_cache(need):
        paths.cache_dir().joinpath("requirements").mkdir(exist_ok=True)
    lock = paths.lock_path(root / f"{key}.lock")
    with filelock.FileLock(str(lock), timeout=PIP_TIMEOUT), paths.writing_cache(need):
        if (target / ".complete").exists():
            return target
        if progress:
            progress(f"installing guest requirements with pip: {' '.join(reqs)}")
        tmp = root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(tmp),
            "--only-binary=:all:",
            "--python-version",
            minor,
            "--implementation",
            "cp",
            *(f"--platform={p}" for p in GUEST_PLATFORMS),
            *reqs,
        ]
        try:
            res = subprocess.run(
                cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=PIP_TIMEOUT
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(
                f"pip did not finish installing guest requirements within {PIP_TIMEOUT} s"
            ) from exc
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(
                f"pip could not install the guest requirements {reqs} (wheels for CPython {minor} on "
                f"manylinux x86_64 are needed):\n{(res.stdout + res.stderr)[-3000:]}"
            )
        (tmp / ".complete").write_text("\n".join(reqs) + "\n")
        tmp.rename(target)
    return target


def pack_folder(folder: Path, guest_path: str) -> bytes:
    """A tar of everything under ``folder``, placed at ``guest_path`` in the guest."""
    members = [
        (p, f"{guest_path.strip('/')}/{p.relative_to(folder).as_posix()}")
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.suffix != ".pyc"
    ]
    return _tar(members)
