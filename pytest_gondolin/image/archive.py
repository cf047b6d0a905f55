"""The cache as one archive: ``gondolin cache export FILE`` and ``gondolin cache import FILE``.

An archive holds the complete images (``<cache>/images/``), the CA the
guests trust (``<cache>/ca/``: a warm snapshot's key digests the boot
payload, which carries that CA), every file under ``<cache>/snapshots/`` and
the host environment images layered snapshots were saved with
(:mod:`~pytest_gondolin.image.archive_environment`),
behind a manifest (:mod:`~pytest_gondolin.image.archive_manifest`) with
each file's size and SHA-256 and what each snapshot needs to be loaded.

Export reads every file twice (once to hash it for the manifest, which
comes first, once into the tar, hashing again: a file that changed in
between stops the export) and writes ``FILE`` by renaming a temporary
file, so ``FILE`` is either complete or untouched.

Importing is :mod:`~pytest_gondolin.image.archive_import`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest_gondolin.paths as paths
from pytest_gondolin import __version__
from pytest_gondolin.errors import ImageError
from pytest_gondolin.hosttools import require as require_tool
from pytest_gondolin.image import archive_environment
from pytest_gondolin.image.archive_manifest import (
    CA_FILES,
    MANIFEST_MEMBER,
    ArchiveEntry,
    ArchiveManifest,
    HostFacts,
)
from pytest_gondolin.image.info import qcow2_backing_file
from pytest_gondolin.image.store import BUILD_LOCK_TIMEOUT, images_root, open_image
from pytest_gondolin.vm.accel import choose_accel, qemu_version
from pytest_gondolin.vm.qemu import MACHINE
from pytest_gondolin.vm.snapshot_paths import snapshots_dir

__all__ = [
    "LOCK_TIMEOUT",
    "TOOL_TIMEOUT",
    "ExportSummary",
    "Progress",
    "chunks",
    "export_cache",
    "host_facts",
]

Progress = Callable[[str], None]

CHUNK = 1 << 20
#: Files this big get progress lines while they are copied, at most one per interval.
PROGRESS_BYTES = 32 * 2**20
PROGRESS_INTERVAL = 2.0
#: The warm-snapshot and CA writers hold their locks for seconds; an import waits as long
#: as an image build may take (it may be waiting for one).
LOCK_TIMEOUT = BUILD_LOCK_TIMEOUT
#: ``qemu-img`` and ``qemu -machine help`` answer at once; this only guards against a wedged host.
TOOL_TIMEOUT = 60.0
_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    files: int
    bytes: int
    skipped: tuple[str, ...]  # one line per cache file left out, with the reason


@functools.cache
def _machine_type(qemu: str) -> str:
    """The concrete machine type our ``-machine`` alias (``q35``) resolves to in ``qemu``."""
    alias = MACHINE.split(",")[0]
    try:
        res = subprocess.run(
            [qemu, "-machine", "help"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=TOOL_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"cannot run {qemu} -machine help: {exc}") from exc
    for line in res.stdout.splitlines():
        name, _, rest = line.partition(" ")
        if name == alias:
            _, sep, target = rest.rpartition("(alias of ")
            return target.rstrip(")").strip() if sep else alias
    return alias


def host_facts(accel: str = "auto") -> HostFacts:
    """This host's QEMU version, machine type and the accelerator ``accel`` resolves to."""
    qemu = require_tool("qemu-system-x86_64")
    return HostFacts(qemu_version(qemu), _machine_type(qemu), choose_accel(accel).name)


# -- export ------------------------------------------------------------------------------


def _sha256(path: Path, say: Progress, size: int) -> str:
    """The SHA-256 of the first ``size`` bytes of ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in chunks(fh, size, f"hashing {path.name}", say):
            digest.update(chunk)
    return digest.hexdigest()


def chunks(fh: IO[bytes], size: int, what: str, say: Progress) -> Iterator[bytes]:
    """``size`` bytes of ``fh`` in chunks, with progress lines for big files; ImageError if short."""
    done, last = 0, time.monotonic()
    while done < size:
        chunk = fh.read(min(CHUNK, size - done))
        if not chunk:
            raise ImageError(f"{what}: ended after {done} of {size} bytes")
        done += len(chunk)
        yield chunk
        if size >= PROGRESS_BYTES and time.monotonic() - last >= PROGRESS_INTERVAL:
            last = time.monotonic()
            say(f"{what}: {done / 2**20:.0f} of {size / 2**20:.0f} MiB")


def _regular_files(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (no links followed), skipping hidden, lock and temp files."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or name.endswith((".lock", ".tmp")):
                continue
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return found


def _collect(root: Path, facts: HostFacts, say: Progress) -> tuple[list[ArchiveEntry], list[str]]:
    """The entries of the archive of cache ``root`` (hashed), and the files left out and why."""
    skipped: list[str] = []
    planned: list[tuple[Path, str]] = []
    images = images_root().absolute()  # below ``root``, which is absolute too
    for folder in sorted(images.iterdir()) if images.is_dir() else []:
        if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            open_image(folder)
        except ImageError as exc:
            skipped.append(f"{folder}: incomplete image ({exc})")
            continue
        planned += [(f, "image") for f in _regular_files(folder) if f.parent == folder]
    ca = root / "ca"
    if all((ca / name).is_file() for name in CA_FILES):
        planned += [(ca / name, "ca") for name in CA_FILES]
    planned += [(f, "snapshot") for f in _regular_files(snapshots_dir().absolute())]
    # Host environment images travel at their file system's length, not the slot's.
    lengths = dict(archive_environment.exportable(root))
    planned += [(f, "environment") for f in lengths]
    names = {p.relative_to(root).as_posix() for p, _ in planned}
    entries: list[ArchiveEntry] = []
    for path, kind in planned:
        rel = path.relative_to(root).as_posix()
        state_key = backing = None
        try:
            if kind == "snapshot":
                backing, why = _backing_in_cache(path, root, names)
                if why is not None:
                    skipped.append(f"{path}: {why}")
                    continue
                state_key = path.name.split(".")[0]
            size = lengths.get(path) or path.stat().st_size
            digest = _sha256(path, say, size)
        except FileNotFoundError:  # pruned or evicted meanwhile: it was never complete here
            skipped.append(f"{path}: removed while it was exported")
            continue
        host = facts if kind == "snapshot" else None
        entries.append(ArchiveEntry(rel, kind, size, digest, state_key, backing, host))
    return entries, skipped


def _backing_in_cache(path: Path, root: Path, names: set[str]) -> tuple[str | None, str | None]:
    """(archive path of ``path``'s qcow2 backing file, None) or (None, why it cannot go along)."""
    with path.open("rb") as fh:
        if fh.read(4) != _QCOW2_MAGIC:
            return None, None  # not a disk: a plain data file travels as it is
    try:
        backing = qcow2_backing_file(path)
    except ImageError as exc:
        return None, str(exc)
    if backing is None:
        return None, None
    target = Path(os.path.normpath(path.parent / backing))
    try:
        rel = target.relative_to(root).as_posix()
    except ValueError:
        return None, f"sits on {target}, outside the cache"
    if rel not in names:
        return None, f"sits on {target}, which is not in the cache any more"
    return rel, None


def _tar_mode(target: Path) -> tuple[str, dict[str, int]]:
    name = target.name
    if name.endswith((".tar.gz", ".tgz")):
        return "w:gz", {"compresslevel": 1}  # images are compressed qcow2: level 1 is as good
    if name.endswith(".tar.xz"):
        return "w:xz", {"preset": 1}
    return "w", {}


def export_cache(target: Path, *, progress: Progress, facts: HostFacts) -> ExportSummary:
    """Write the cache's images, CA and snapshots to the archive ``target``; return what it holds.

    ``facts`` are recorded as what the snapshots load with (:func:`host_facts`).
    ``.tar.gz`` / ``.tgz`` and ``.tar.xz`` names are compressed, anything
    else is a plain tar. ImageError if the cache holds no complete image or
    a file changes while it is exported; ``target`` is then left as it was.
    """
    root = paths.cache_root().absolute()
    try:
        entries, skipped = _collect(root, facts, progress)
    except OSError as exc:
        raise ImageError(f"cannot read the cache {root}: {exc}") from exc
    if not any(e.kind == "image" for e in entries):
        raise ImageError(
            f"no complete image in {images_root()}: nothing to export (gondolin image build)"
        )
    manifest = ArchiveManifest(
        producer=f"pytest-gondolin {__version__}",
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        cache_root=str(root),
        host=facts,
        entries=tuple(entries),
    )
    target = target.absolute()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    mode, options = _tar_mode(target)
    try:
        with tarfile.open(  # type: ignore[call-overload]
            tmp, mode, format=tarfile.PAX_FORMAT, copybufsize=CHUNK, **options
        ) as tar:
            blob = manifest.to_bytes()
            tar.addfile(_info(MANIFEST_MEMBER, len(blob), 0o644, time.time()), _BytesReader(blob))
            for entry in entries:
                _add(tar, root / entry.path, entry, progress)
        os.replace(tmp, target)
    except OSError as exc:
        raise ImageError(f"cannot write the archive {target}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return ExportSummary(target, len(entries), sum(e.size for e in entries), tuple(skipped))


def _info(name: str, size: int, mode: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode, int(mtime), tarfile.REGTYPE
    return info


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk, self._pos = self._data[self._pos : end], min(end, len(self._data))
        return chunk


class _Feed:
    """The bytes of one cache file for ``tarfile.addfile`` (which wants exactly ``n`` per read)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buf, self._pos = chunks, b"", 0

    def read(self, n: int = -1, /) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._pos >= len(self._buf):
                self._buf, self._pos = next(self._chunks, b""), 0
                if not self._buf:
                    break
            left = len(self._buf) - self._pos
            take = left if n < 0 else min(n - len(out), left)
            out += self._buf[self._pos : self._pos + take]
            self._pos += take
        return bytes(out)


def _add(tar: tarfile.TarFile, path: Path, entry: ArchiveEntry, say: Progress) -> None:
    digest = hashlib.sha256()

    def hashed(fh: IO[bytes]) -> Iterator[bytes]:
        for chunk in chunks(fh, entry.size, f"archiving {entry.path}", say):
            digest.update(chunk)
            yield chunk

    say(f"archiving {entry.path} ({entry.size / 2**20:.1f} MiB)")
    mode = 0o600 if entry.path.endswith(".key") else 0o644
    changed = ImageError(f"{path} changed while it was exported; export again")
    try:
        with path.open("rb") as fh:
            info = _info(entry.path, entry.size, mode, path.stat().st_mtime)
            tar.addfile(info, _Feed(hashed(fh)))
        grown = entry.kind != "environment" and path.stat().st_size != entry.size
        if digest.hexdigest() != entry.sha256 or grown:
            raise changed
    except FileNotFoundError as exc:
        raise changed from exc
