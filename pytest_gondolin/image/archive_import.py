"""Importing a cache archive: ``gondolin cache import FILE`` (the format: :mod:`~pytest_gondolin.image.archive_manifest`).

Import streams the archive (nothing is held in memory but one chunk and
the manifest) into a private staging folder inside the cache, then checks
everything before anything becomes visible: each member is listed in the
manifest once, is a regular file (never a link or device) of the listed
size and digest, nothing listed is missing; an image folder passes the
cache's own check, no qcow2 names a backing or data file outside the
cache (a snapshot's backing file is rebased onto the imported image);
the CA key matches its certificate. A snapshot made with another QEMU
version, machine type or accelerator is skipped with a message, never
written. Only then is each item renamed into place under the file lock
the cache's own writers hold (the image build lock, the warm-snapshot
lock, the CA lock), and only if it is not there yet: two imports at once
each install an item at most once, and a run reading the cache sees an
item whole or not at all. A damaged archive leaves the cache as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import lzma
import os
import secrets
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import filelock

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import CacheDirError, GondolinError, ImageError
from pytest_gondolin.hosttools import require as require_tool
from pytest_gondolin.image import archive_environment
from pytest_gondolin.image.archive import LOCK_TIMEOUT, TOOL_TIMEOUT, Progress, chunks
from pytest_gondolin.image.archive_manifest import (
    CA_FILES,
    MANIFEST_MEMBER,
    MAX_MANIFEST_BYTES,
    ArchiveEntry,
    ArchiveManifest,
    HostFacts,
    incompatibility,
    parse_manifest,
)
from pytest_gondolin.image.manifest import read_manifest
from pytest_gondolin.image.store import images_root, open_image
from pytest_gondolin.vm.reaper import pid_alive

__all__ = ["ImportSummary", "import_cache"]


@dataclass(frozen=True)
class ImportSummary:
    installed: tuple[str, ...]  # cache paths now in place
    present: tuple[str, ...]  # cache paths that were there already (kept as they were)
    skipped: tuple[str, ...]  # one line per item not imported, with the reason


@dataclass
class _Plan:
    """What one import writes, and what it leaves out (filled in as the manifest is read)."""

    manifest: ArchiveManifest
    write: dict[str, ArchiveEntry] = field(default_factory=dict)
    present: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _plan(manifest: ArchiveManifest, root: Path, here: HostFacts | None) -> _Plan:
    plan = _Plan(manifest)
    folders = {e.image_folder for e in manifest.entries if e.kind == "image"}
    have_images = {f for f in folders if _complete(images_root() / f)}
    ca_here = {name: _file_sha256(root / "ca" / name) for name in CA_FILES}
    ca_archive = {e.path.split("/")[1]: e.sha256 for e in manifest.entries if e.kind == "ca"}
    other_ca = ca_here["gondolin-ca.pem"] is not None and bool(ca_archive) and ca_archive != ca_here
    for entry in manifest.entries:
        why: str | None = None
        if entry.kind == "image" and entry.image_folder in have_images:
            if entry.path.endswith("/manifest.json"):
                plan.present.append(f"images/{entry.image_folder}")
            continue
        if entry.kind == "ca" and ca_here["gondolin-ca.pem"] is not None:
            if not other_ca:
                plan.present.append(entry.path)
                continue
            why = "this cache has a CA of its own, which is kept"
        if entry.kind == "snapshot":
            if other_ca:
                why = "made for the archive's CA, and this cache keeps its own"
            else:
                why = incompatibility(entry.host, here)
            if why is None and (root / entry.path).exists():
                plan.present.append(entry.path)
                continue
        if entry.kind == "environment" and (root / entry.path).exists():
            plan.present.append(entry.path)
            continue
        if why is not None:
            never = " (it would never be loaded here)" if entry.kind == "snapshot" else ""
            plan.skipped.append(f"{entry.path}: skipped, {why}{never}")
            continue
        plan.write[entry.path] = entry
    return plan


def _complete(folder: Path) -> bool:
    try:
        open_image(folder)
    except ImageError:
        return False
    return True


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _remove_stale_staging(root: Path) -> None:
    for folder in root.glob(".import-*"):
        try:
            pid = int(folder.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if not pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def import_cache(source: Path, *, progress: Progress, here: HostFacts | None) -> ImportSummary:
    """Import the archive ``source`` into the cache (see the module docstring for the guarantees).

    ``here`` is this host's :func:`host_facts` (None: no usable QEMU, so no
    snapshot is imported). Raises ImageError for an archive that is
    unreadable, damaged, truncated or not ours (the cache is then as it
    was), CacheDirError if the cache cannot be written.
    """
    root = paths.cache_root()
    need = f"the archive {source} must be imported there"
    problem = paths.cache_write_problem(root)
    if problem is not None:
        raise CacheDirError(root, problem, need=need)
    try:
        # A refused write becomes the one CacheDirError; any other OSError (a full
        # disk) is named below. Either way the staging folder goes, the cache stays.
        with paths.writing_cache(need):
            root = paths.cache_dir().absolute()  # backing files are named by absolute path
            _remove_stale_staging(root)
            staging = root / f".import-{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o700)
            try:
                plan = _unpack(source, staging, root, here, progress)
                _verify(plan, staging, root)
                installed = _commit(plan, staging, root, progress)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ImageError(f"importing {source} into {root} failed: {exc}") from exc
    return ImportSummary(tuple(installed), tuple(plan.present), tuple(plan.skipped))


def _unpack(
    source: Path, staging: Path, root: Path, here: HostFacts | None, say: Progress
) -> _Plan:
    """Stream ``source`` into ``staging``: the manifest's files this import writes, each checked."""
    try:
        fh = source.open("rb")
    except OSError as exc:
        raise ImageError(f"cannot read the archive {source}: {exc.strerror}") from exc
    damaged = f"the archive {source} is damaged or truncated"
    plan: _Plan | None = None
    try:
        with fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST_MEMBER or not first.isreg():
                raise ImageError(f"{source} is not a pytest-gondolin cache archive (no manifest)")
            raw = _member_bytes(tar, first, source)
            manifest = parse_manifest(raw)
            plan = _plan(manifest, root, here)
            _check_space(staging, sum(e.size for e in plan.write.values()))
            listed = {e.path: e for e in manifest.entries}
            seen: set[str] = set()
            while (member := tar.next()) is not None:  # iterating would yield the manifest again
                entry = listed.get(member.name)
                if entry is None or member.name in seen:
                    raise ImageError(
                        f"{damaged}: member {member.name!r:.200} is not in its manifest"
                    )
                if not member.isreg() or member.size != entry.size:
                    raise ImageError(
                        f"{damaged}: {member.name} is not a regular file of {entry.size} bytes"
                    )
                seen.add(member.name)
                if member.name in plan.write:
                    _stage(tar, member, entry, staging, say, damaged)
            missing = sorted(set(listed) - seen)
            if missing:
                raise ImageError(
                    f"{damaged}: {len(missing)} listed file(s) missing, first {missing[0]}"
                )
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as exc:
        if plan is None:
            raise ImageError(f"{source} is not a pytest-gondolin cache archive ({exc})") from exc
        raise ImageError(f"{damaged} ({exc})") from exc
    return plan


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, source: Path) -> bytes:
    if member.size > MAX_MANIFEST_BYTES:
        raise ImageError(f"{source}: manifest of {member.size} bytes is too big")
    stream = tar.extractfile(member)
    assert stream is not None  # a regular file
    data = stream.read(member.size)
    if len(data) != member.size:
        raise ImageError(f"the archive {source} is truncated in its manifest")
    return data


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ImageError(
            f"the archive needs {needed / 2**20:.0f} MiB in {folder.parent}, "
            f"only {free / 2**20:.0f} MiB are free"
        )


def _stage(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    entry: ArchiveEntry,
    staging: Path,
    say: Progress,
    damaged: str,
) -> None:
    stream = tar.extractfile(member)
    assert stream is not None  # checked: a regular file
    target = staging / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    say(f"importing {entry.path} ({entry.size / 2**20:.1f} MiB)")
    try:
        with open(target, "xb") as out:
            for chunk in chunks(stream, entry.size, f"importing {entry.path}", say):
                digest.update(chunk)
                out.write(chunk)
    except ImageError as exc:
        raise ImageError(f"{damaged}: {exc}") from exc
    if digest.hexdigest() != entry.sha256:
        raise ImageError(f"{damaged}: {entry.path} does not match its SHA-256 in the manifest")
    if entry.path.endswith(".key"):
        target.chmod(0o600)


def _qemu_img_info(path: Path) -> dict[str, object]:
    qemu_img = require_tool("qemu-img")
    res = subprocess.run(
        [qemu_img, "info", "-f", "qcow2", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TOOL_TIMEOUT,
    )
    if res.returncode != 0:
        raise ImageError(
            f"{path.name} from the archive is not a usable qcow2: {res.stderr.strip()}"
        )
    info = json.loads(res.stdout)
    assert isinstance(info, dict)
    return info


def _check_qcow2(path: Path, rel: str, backing: Path | None) -> None:
    """ImageError unless qcow2 ``path`` has exactly ``backing`` as backing file and no data file."""
    info = _qemu_img_info(path)
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and "data-file" in data:
        raise ImageError(f"{rel} from the archive names an external data file; refused")
    found = info.get("full-backing-filename") or info.get("backing-filename")
    if (found or None) != (str(backing) if backing else None):
        raise ImageError(f"{rel} from the archive sits on {found!r}, expected {backing}; refused")


def _verify(plan: _Plan, staging: Path, root: Path) -> None:
    """Check what was staged as a whole; rebase snapshots onto this cache's files."""
    for folder in sorted({e.image_folder for e in plan.write.values() if e.kind == "image"}):
        manifest = read_manifest(staging / "images" / folder)  # sizes, format, missing files
        if folder != f"{manifest.get('name')}-{manifest.get('build_id')}":
            raise ImageError(f"images/{folder} in the archive holds another image's manifest")
        _check_qcow2(staging / "images" / folder / "rootfs.qcow2", f"images/{folder}", None)
    if any(e.kind == "ca" for e in plan.write.values()):
        from pytest_gondolin.netpolicy.http.ca import CertificateAuthority

        try:
            CertificateAuthority._load(staging / "ca" / CA_FILES[0], staging / "ca" / CA_FILES[1])
        except GondolinError as exc:
            raise ImageError(f"the CA in the archive is unusable: {exc}") from exc
    for entry in plan.write.values():
        staged = staging / entry.path
        if entry.kind == "environment":
            archive_environment.check_staged(staged, entry.path, entry.size)
        if entry.kind != "snapshot":
            continue
        if not _is_qcow2(staged):
            if entry.path.endswith(".qcow2"):
                raise ImageError(f"{entry.path} from the archive is not a qcow2 file")
            continue  # a plain data file: its digest was all there was to check
        backing = None if entry.backing is None else root / entry.backing
        if backing is not None:
            _rebase(staged, entry.path, backing)
        _check_qcow2(staged, entry.path, backing)


def _is_qcow2(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == b"QFI\xfb"


def _rebase(staged: Path, rel: str, backing: Path) -> None:
    """Point qcow2 ``staged`` at ``backing`` (header only: ``qemu-img rebase -u``)."""
    qemu_img = require_tool("qemu-img")
    res = subprocess.run(
        [qemu_img, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(staged)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=TOOL_TIMEOUT,
    )
    if res.returncode != 0:
        raise ImageError(f"cannot rebase {rel} onto {backing}: {res.stderr.strip()}")


def _chain_depth(entry: ArchiveEntry, manifest: ArchiveManifest) -> int:
    """How many snapshots of the archive lie under ``entry`` (bases are installed first)."""
    by_path = {e.path: e for e in manifest.entries}
    depth, seen = 0, {entry.path}
    while entry.backing is not None and entry.backing in by_path and entry.backing not in seen:
        entry = by_path[entry.backing]
        seen.add(entry.path)
        depth += 1
    return depth


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(paths.lock_path(lock)), timeout=LOCK_TIMEOUT):
            yield
    except filelock.Timeout as exc:
        raise ImageError(f"timed out after {LOCK_TIMEOUT:.0f} s waiting for {lock}") from exc


def _commit(plan: _Plan, staging: Path, root: Path, say: Progress) -> list[str]:
    """Rename each staged item into place under its lock, unless a peer put it there first."""
    installed: list[str] = []
    for folder in sorted({e.image_folder for e in plan.write.values() if e.kind == "image"}):
        target = images_root() / folder
        with _locked(images_root() / ".locks" / f"{folder}.lock"):
            if _complete(target):
                plan.present.append(f"images/{folder}")
                continue
            if target.exists():  # damaged: the archive's whole copy replaces it
                trash = images_root() / f".tmp-old-{folder}-{os.getpid()}"
                target.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            (staging / "images" / folder).rename(target)
        installed.append(f"images/{folder}")
    if any(e.kind == "ca" for e in plan.write.values()):
        ca = root / "ca"
        ca.mkdir(mode=0o700, exist_ok=True)
        with _locked(ca / "gondolin-ca.lock"):
            if (ca / "gondolin-ca.pem").exists():  # a peer's: keep it (snapshots for it follow it)
                plan.present.append("ca")
            else:
                os.replace(staging / "ca" / "gondolin-ca.key", ca / "gondolin-ca.key")
                os.replace(staging / "ca" / "gondolin-ca.pem", ca / "gondolin-ca.pem")  # last
                installed.append("ca")
    for entry in (e for e in plan.write.values() if e.kind == "environment"):
        if archive_environment.adopt(staging / entry.path, root, entry.path):
            installed.append(entry.path)
        else:  # this cache built an image of the same content: kept
            plan.present.append(entry.path)
    for entry in sorted(
        (e for e in plan.write.values() if e.kind == "snapshot"),
        key=lambda e: _chain_depth(e, plan.manifest),
    ):
        target = root / entry.path
        lock = target.with_name(f"{target.name.split('.')[0]}.lock")  # the warm snapshot's lock
        with _locked(lock):
            if target.exists():
                plan.present.append(entry.path)
                continue
            try:
                os.rename(staging / entry.path, target)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                raise ImageError(f"{entry.path} vanished from the staging folder") from exc
        installed.append(entry.path)
    say(f"imported {len(installed)} item(s) into {root}")
    return installed
