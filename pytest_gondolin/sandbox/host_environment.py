"""The host's Python environment, carried into the guest at the same absolute paths.

What the host's interpreter can import for the project, the guest can too:

* **Folders.** Every folder of the host's ``sys.path`` that is neither the
  standard library nor inside the rootdir (the project copy brings those): the
  site folders (``site.getsitepackages()``, the user site) and plain folders
  holding distributions (``PYTHONPATH``, ``pip install --target``). The guest
  worker puts them on its ``sys.path`` in the host's order, running the
  ``.pth`` files of the site folders (:mod:`pytest_gondolin.guest.hostpath`).
* **Distributions.** Each distribution found in those folders is carried with
  its metadata folder (so ``importlib.metadata`` answers as on the host:
  versions, entry points, files) and the files its RECORD lists inside its
  folder (not scripts; bytecode only of the host's own cache tag, which the
  worker's interpreter loads as is). A binary distribution is carried when the
  host's extension ABI is the guest's (:data:`GUEST_SOABI`) and its wheel tags
  ask for no newer glibc than the guest's; otherwise the host's pip fetches a
  wheel of the same version for the guest, as for ``gondolin_requirements``,
  and if that fails too the session says once, at the start, which
  distributions are missing and why (:func:`fallback_requirements`).
* **Editable installs.** Their ``.pth`` files and import finders live in the
  site folder and are carried; the source folders they point to are the
  project copy when inside the rootdir, and are carried like the project tree
  (git-aware, capped) when outside it (:attr:`HostEnvironment.sources`).
* **Not carried:** pytest-gondolin itself (:data:`EXCLUDED_DISTRIBUTIONS`).

What of one distribution is carried, and whether the guest can load it, is
:mod:`.distribution_files`'.

Each distribution is packed once into a tar in the cache, keyed by the path,
size, mtime and mode of every file it carries. :func:`layer_items` turns
them into the pieces of the guest's ``host-environment`` layer
(``vm/layers.py``), cached as a ready snapshot under the keys of all pieces:
a later session with nothing changed reads only ``stat`` results and copies
nothing into the guest. The scan's own answer is cached the same way
(``scan(cache=...)``, :mod:`.environment_cache`): reused while the ``stat``
of every path it read is unchanged. The whole is capped
(:data:`DEFAULT_LIMIT`, ``gondolin_host_environment_limit``); past the cap the
error names the largest distributions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from packaging.utils import canonicalize_name

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.guest.hostpath import PLAIN, SITE
from pytest_gondolin.sandbox import distribution_files, environment_cache
from pytest_gondolin.sandbox.distribution_files import (
    GUEST_SOABI,
    carried_files,
    editable_source,
    inside,
    listdir,
    metadata_folder,
    norm,
    outermost,
    pack_key,
    pth_lines,
    regular_stat,
    why_not_loadable,
)
from pytest_gondolin.sandbox.environment_cache import layer_packs, tar_files
from pytest_gondolin.vm.layers import TarItem

__all__ = [
    "DEFAULT_LIMIT",
    "EXCLUDED_DISTRIBUTIONS",
    "GUEST_SOABI",
    "CarriedDistribution",
    "HostEnvironment",
    "MissingDistribution",
    "PathEntry",
    "layer_items",
    "scan",
]

log = logging.getLogger(__name__)

#: A usual project venv is 20-150 MiB; past this it is a data folder or a
#: whole system's site-packages, whose copy would cost seconds per session.
DEFAULT_LIMIT: Final = 512 * 1024 * 1024
#: The guest half of pytest-gondolin boots with the guest (``vm/payload.py``);
#: the host's copy (and, for an editable install, its source checkout) stays out.
EXCLUDED_DISTRIBUTIONS: Final = frozenset({"pytest-gondolin"})
#: Bumped when what :func:`scan` answers changes, so old cached answers are not reused.
_SCAN_FORMAT: Final = "1"


@dataclass(frozen=True)
class PathEntry:
    """One host ``sys.path`` folder the guest gets: a site folder or a plain one."""

    kind: str  # hostpath.SITE or hostpath.PLAIN
    path: str


@dataclass(frozen=True)
class CarriedDistribution:
    """A distribution whose files go to the guest at their host paths."""

    name: str
    version: str
    #: Absolute host paths of the files carried (metadata folder included).
    files: tuple[str, ...]
    size: int
    #: Content key of the pack: every carried file's path, size, mtime and mode.
    key: str


@dataclass(frozen=True)
class MissingDistribution:
    """A host distribution the guest cannot load as it is, and why."""

    name: str
    version: str
    reason: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class HostEnvironment:
    """What of the host's environment goes to the guest (see the module docstring)."""

    entries: tuple[PathEntry, ...]
    carried: tuple[CarriedDistribution, ...]
    missing: tuple[MissingDistribution, ...]
    #: ``.pth`` files no distribution owns (written by hand or by a tool).
    loose_files: tuple[str, ...]
    #: Source folders of editable installs outside the rootdir.
    sources: tuple[str, ...]
    #: Distributions carried without files, and why (no RECORD, ...).
    notes: tuple[str, ...] = field(default=())

    @property
    def size(self) -> int:
        return sum(d.size for d in self.carried)

    def carries(self, name: str) -> bool:
        key = canonicalize_name(name)
        return any(canonicalize_name(d.name) == key for d in self.carried)

    def host_path(self) -> str:
        """The value of ``hostpath.HOST_PATH_ENV`` for the guest worker."""
        return json.dumps([[e.kind, e.path] for e in self.entries])


def _stdlib_folders() -> frozenset[str]:
    paths = sysconfig.get_paths()
    return frozenset(norm(paths[k]) for k in ("stdlib", "platstdlib") if k in paths)


def _is_stdlib(entry: str, stdlib: frozenset[str]) -> bool:
    return entry in stdlib or entry.endswith(".zip") or os.path.basename(entry) == "lib-dynload"


def host_site_folders() -> frozenset[str]:
    """The host interpreter's site folders (venv-aware), and the user site when enabled."""
    folders = set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        folders.add(site.getusersitepackages())
    return frozenset(norm(f) for f in folders)


def scan(
    rootdir: Path,
    *,
    sys_path: Sequence[str] | None = None,
    site_folders: frozenset[str] | None = None,
    host_soabi: str | None = None,
    guest_soabi: str = GUEST_SOABI,
    limit: int = DEFAULT_LIMIT,
    cache: Path | None = None,
) -> HostEnvironment:
    """What of the host's environment goes to the guest for a project at ``rootdir``.

    ``sys_path``, ``site_folders`` and ``host_soabi`` default to the running
    interpreter's; ``guest_soabi`` is the extension ABI of the Python that
    runs the worker in the guest (the image's, or the host's own when
    carried). With ``cache``, the answer is kept there and reused while
    nothing it depends on changed (:mod:`.environment_cache`: ~0.02 s instead
    of a walk). Raises ConfigError, naming the largest distributions, if the
    carried files come to more than ``limit`` bytes.
    """
    root = norm(str(rootdir))
    sys_path = list(sys.path if sys_path is None else sys_path)
    site_folders = host_site_folders() if site_folders is None else site_folders
    host_soabi = host_soabi or str(sysconfig.get_config_var("SOABI") or "")
    inputs = (_SCAN_FORMAT, root, sys_path, sorted(site_folders), host_soabi, guest_soabi)
    interpreter = (sys.executable, sys.version, sys.prefix, sys.base_prefix)
    entry = None
    if cache is not None:
        digest = hashlib.sha256(repr((inputs, interpreter)).encode()).hexdigest()[:32]
        entry = cache / f"scan-{digest}.json"
    env = _from_json(environment_cache.load_scan(entry)) if entry is not None else None
    if env is None:
        # The scanning code itself.
        witnesses = [__file__, distribution_files.__file__, environment_cache.__file__]
        stdlib = _stdlib_folders()
        env = _scan(root, sys_path, site_folders, host_soabi, guest_soabi, stdlib, witnesses)
        if entry is not None:
            environment_cache.save_scan(entry, witnesses, dataclasses.asdict(env))
    _check_limit(env, limit)
    return env


def _check_limit(env: HostEnvironment, limit: int) -> None:
    if env.size > limit:
        biggest = sorted(env.carried, key=lambda d: d.size, reverse=True)[:5]
        listing = ", ".join(f"{d.name} ({d.size / 2**20:.1f} MiB)" for d in biggest)
        raise ConfigError(
            f"the host's Python environment is {env.size / 2**20:.0f} MiB, over the "
            f"{limit // 2**20} MiB limit for carrying it into the guest; largest distributions: "
            f"{listing}. Raise gondolin_host_environment_limit (e.g. '2G') or set "
            "gondolin_host_environment = off."
        )


def _from_json(data: object) -> HostEnvironment | None:
    """A :class:`HostEnvironment` from its ``dataclasses.asdict`` form (None: not that)."""
    if not isinstance(data, dict):
        return None
    try:
        return HostEnvironment(
            tuple(PathEntry(**e) for e in data["entries"]),
            tuple(
                CarriedDistribution(**{**d, "files": tuple(d["files"])}) for d in data["carried"]
            ),
            tuple(MissingDistribution(**m) for m in data["missing"]),
            tuple(data["loose_files"]),
            tuple(data["sources"]),
            tuple(data["notes"]),
        )
    except (KeyError, TypeError):
        return None


def _scan(
    root: str,
    sys_path: Sequence[str],
    site_folders: frozenset[str],
    host_soabi: str,
    guest_soabi: str,
    stdlib: frozenset[str],
    witnesses: list[str],
) -> HostEnvironment:
    """:func:`scan` without its cache; adds to ``witnesses`` every path the answer depends on."""
    candidates: list[str] = []
    for entry in sys_path:
        if not entry:
            continue
        path = norm(entry)
        if path in candidates or _is_stdlib(path, stdlib) or inside(path, root):
            continue
        witnesses.append(path)
        if os.path.isdir(path):
            candidates.append(path)
    pth_targets: dict[str, str] = {}  # folder named by a .pth line -> the .pth file
    for path in candidates:
        if path in site_folders:
            witnesses += (os.path.join(path, n) for n in listdir(path) if n.endswith(".pth"))
            for pth, target in pth_lines(path):
                pth_targets.setdefault(target, pth)

    entries: list[PathEntry] = []
    carried: list[CarriedDistribution] = []
    missing: list[MissingDistribution] = []
    notes: list[str] = []
    owned: set[str] = set()
    excluded: set[str] = set()  # files of excluded distributions (their .pth included)
    editable: list[str] = []
    holders: set[str] = set()  # folders named by .pth files that hold distributions
    for path in candidates:
        dists = list(importlib.metadata.distributions(path=[path]))
        if path in site_folders:
            entries.append(PathEntry(SITE, path))
        elif not dists:
            continue  # no distributions: a source folder (below) or not an environment
        elif path in pth_targets:
            holders.add(path)  # the guest's addsitedir puts it back, in the same place
        else:
            entries.append(PathEntry(PLAIN, path))
        for dist in dists:
            meta = metadata_folder(dist)
            name = dist.metadata["Name"] or (os.path.basename(meta or "") or "?")
            version = dist.version or "0"
            if meta is None:
                continue
            files, has_record = carried_files(dist, path, meta, witnesses)
            if canonicalize_name(name) in EXCLUDED_DISTRIBUTIONS:
                excluded.update(files)
                continue
            owned.update(files)
            if not has_record:
                notes.append(f"{name} {version} has no RECORD: only its metadata is carried")
            reason = why_not_loadable(dist, files, host_soabi, guest_soabi)
            if reason is not None:
                missing.append(MissingDistribution(name, version, reason))
                continue
            stats = [(f, st) for f in files if (st := regular_stat(f)) is not None]
            carried.append(
                CarriedDistribution(
                    name,
                    version,
                    tuple(f for f, _ in stats),
                    sum(st.st_size for _, st in stats),
                    pack_key(stats),
                )
            )
            source = editable_source(dist)
            if source is not None:
                # A source inside the rootdir is the project's tree (copied on its own,
                # never one of the answer's sources): every new file there would
                # otherwise make the answer racy and unsaved.
                if not inside(source, root):
                    witnesses.append(source)
                if os.path.isdir(source):
                    editable.append(source)
    loose = [
        pth
        for entry in entries
        if entry.kind == SITE
        for pth in (os.path.join(entry.path, n) for n in listdir(entry.path))
        if pth.endswith(".pth") and pth not in owned and pth not in excluded
    ]
    # Editable sources outside the rootdir: the project folders the
    # installers recorded, and any folder a carried .pth file names.
    for target, pth in pth_targets.items():
        if pth not in excluded and target not in site_folders and target not in holders:
            editable.append(target)
    sources = outermost(s for s in editable if not inside(s, root) and not _is_stdlib(s, stdlib))
    return HostEnvironment(
        tuple(entries), tuple(carried), tuple(missing), tuple(loose), sources, tuple(notes)
    )


def layer_items(env: HostEnvironment, cache: Path) -> list[TarItem]:
    """What ``env`` carries as tar items for a layer (``vm/layers.py``), each with its content key.

    The ``.pth`` files no distribution owns first (keyed by their path, size,
    mtime and mode), then one item per distribution (:attr:`CarriedDistribution.key`,
    packed once into ``cache``; the cache evicted once, after the last): a
    changed distribution changes one key.
    """
    items: list[TarItem] = []
    loose = list(env.loose_files)
    if loose:
        stats = [(f, st) for f in loose if (st := regular_stat(f)) is not None]
        items.append(TarItem(f"pth:{pack_key(stats)}", lambda: tar_files(loose)))
    packs = layer_packs([(dist.key, dist.files) for dist in env.carried], cache)
    for dist, pack in zip(env.carried, packs, strict=True):
        items.append(TarItem(f"dist:{dist.key}", pack))
    return items


_reported_lock = threading.Lock()
_reported: set[tuple[str, ...]] = set()


def report_once(lines: Sequence[str]) -> bool:
    """Log ``lines`` as one warning, once per process for the same lines; True if logged."""
    key = tuple(lines)
    if not key:
        return False
    with _reported_lock:
        if key in _reported:
            return False
        _reported.add(key)
    log.warning("%s", "\n".join(key))
    return True
