"""What a sandboxed session copies into the guest: the project tree and pytest itself.

* The project tree under pytest's rootdir goes to the same absolute path in
  the guest, so node ids, tracebacks and ``__file__`` match the host. Left
  out: VCS folders, virtualenvs, caches, build output, and (in a git
  checkout) whatever ``.gitignore`` ignores. Capped at
  :data:`PROJECT_SIZE_LIMIT`; past it, the error names the largest files.
* pytest, pluggy and their pure-Python dependencies are copied from the
  host's own installation, so the guest runs exactly the host's versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

from pytest_gondolin.errors import ConfigError

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
#: Where shipped libraries live in the guest (on the guest's root disk).
GUEST_SITE = "/opt/gondolin/site"
#: Distributions the guest worker needs, copied (with their dependencies)
#: from the host's environment.
SHIPPED_DISTRIBUTIONS = ("pytest",)


def _excluded(rel: Path) -> bool:
    return (
        any(part in EXCLUDED_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1])
        or rel.name in EXCLUDED_DIRS
    )


def _git_files(root: Path) -> list[Path] | None:
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
    return [Path(p) for p in res.stdout.decode(errors="surrogateescape").split("\0") if p]


def project_files(root: Path) -> list[Path]:
    """Relative paths of the files under ``root`` that go to the guest."""
    listed = _git_files(root)
    if listed is None:
        listed = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [
                d for d in dirnames if d not in EXCLUDED_DIRS and not d.endswith(".egg-info")
            ]
            base = Path(dirpath).relative_to(root)
            listed += [base / f for f in filenames]
    return sorted(
        p
        for p in listed
        if not _excluded(p) and (root / p).is_file() and not (root / p).is_symlink()
    )


def pack_project(root: Path, *, limit: int = PROJECT_SIZE_LIMIT) -> bytes:
    """A tar of the project tree with members at their absolute paths (leading '/' dropped)."""
    files = project_files(root)
    sizes = [(root / p).stat().st_size for p in files]
    total = sum(sizes)
    if total > limit:
        biggest = sorted(zip(sizes, files, strict=True), reverse=True)[:5]
        listing = ", ".join(f"{p} ({s / 2**20:.1f} MiB)" for s, p in biggest)
        raise ConfigError(
            f"the project tree under {root} is {total / 2**20:.0f} MiB, over the {limit // 2**20} MiB "
            f"limit for copying into the guest; largest files: {listing}. Exclude them with .gitignore."
        )
    return _tar((root / p, str((root / p).relative_to("/"))) for p in files)


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


def dependency_closure(names: Iterable[str]) -> list[importlib.metadata.Distribution]:
    """``names`` and everything they require (no extras), as installed on the host.

    Environment markers are evaluated for the guest: Linux, CPython 3.11.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    guest_env = {
        "python_version": "3.11",
        "python_full_version": "3.11.2",
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


def pack_distributions(names: Iterable[str] = SHIPPED_DISTRIBUTIONS) -> bytes:
    """A tar of the host's installed files of ``names`` and their dependencies under GUEST_SITE."""
    members: list[tuple[Path, str]] = []
    for dist in dependency_closure(names):
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
#: Platform tags of the guest (Debian bookworm x86_64, CPython 3.11, glibc 2.36).
GUEST_PLATFORMS = (
    "manylinux_2_36_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "linux_x86_64",
)
#: pip resolving and downloading wheels: minutes on a slow index, never an hour.
PIP_TIMEOUT = 1800


def requirements_dir(
    requirements: Iterable[str], progress: Callable[[str], None] | None = None
) -> Path:
    """Install ``requirements`` for the guest's Python into a cached folder and return it.

    The host's pip resolves wheels for the guest's platform (``--only-binary``:
    the guest has no compiler and no network), once per requirement set; later
    sessions reuse the folder. Raises ConfigError with pip's output on failure.
    """
    import filelock

    from pytest_gondolin import paths

    reqs = sorted(set(requirements))
    key = hashlib.sha256("\n".join([*GUEST_PLATFORMS, "cp311", *reqs]).encode()).hexdigest()[:16]
    root = paths.cache_dir() / "requirements"
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    with filelock.FileLock(str(root / f"{key}.lock"), timeout=PIP_TIMEOUT):
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
            "3.11",
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
                f"pip could not install the guest requirements {reqs} (wheels for CPython 3.11 on "
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
