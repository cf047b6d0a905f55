"""The manifest of a cache archive: its format, and the checks that keep a hostile one out.

A cache archive (``gondolin cache export FILE``, :mod:`~pytest_gondolin.image.archive`)
is a tar file whose first member, :data:`MANIFEST_MEMBER`, is this JSON
document; every other member is one file it lists::

    {"format": 1, "producer": "pytest-gondolin 0.1.0", "created": "...Z",
     "cache_root": "/home/me/.cache/pytest-gondolin",
     "host": {"qemu": "QEMU emulator version 7.2.22 (...)", "machine": "pc-q35-7.2",
              "accel": "tcg"},
     "files": [
       {"path": "images/bookworm-93d05fc3da9826c2/rootfs.qcow2", "kind": "image",
        "size": 204079104, "sha256": "..."},
       {"path": "ca/gondolin-ca.pem", "kind": "ca", "size": 721, "sha256": "..."},
       {"path": "snapshots/2081ae9c5b41a2f0b515a84b.qcow2", "kind": "snapshot",
        "size": 79101952, "sha256": "...", "state_key": "2081ae9c5b41a2f0b515a84b",
        "backing": "images/bookworm-93d05fc3da9826c2/rootfs.qcow2",
        "host": {"qemu": "...", "machine": "pc-q35-7.2", "accel": "tcg"}}]}

A snapshot's ``host`` is what it can only be loaded with: the QEMU version,
the concrete machine type and the accelerator of the host that exported
it; ``state_key`` is its cache key (the file name), which digests those
same facts, so a snapshot that slipped through could still never be
loaded under another QEMU. ``backing`` is the archive path of the qcow2
it sits on (rebased to the importing cache's folder).

Everything here is pure (no files, no processes) and treats the manifest
as hostile: :func:`parse_manifest` accepts only the exact shape above,
bounded, with every path relative, without ``..``, hidden or empty parts,
under ``images/``, ``snapshots/`` or ``ca/``, and listed once. Any
deviation raises :class:`~pytest_gondolin.errors.ImageError` naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_gondolin.errors import ImageError

__all__ = [
    "ARCHIVE_FORMAT",
    "MANIFEST_MEMBER",
    "ArchiveEntry",
    "ArchiveManifest",
    "HostFacts",
    "check_path",
    "incompatibility",
    "parse_manifest",
]

ARCHIVE_FORMAT = 1
MANIFEST_MEMBER = "gondolin-cache.json"
#: A manifest lists a few dozen files in ~10 KiB; 4 MiB is far past any real one.
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_ENTRIES = 10_000
#: One file bigger than this is no image or snapshot of ours (images are ~200 MiB).
MAX_FILE_BYTES = 64 * 2**30
#: The CA files the cache holds (:mod:`pytest_gondolin.netpolicy.http.ca`).
CA_FILES = ("gondolin-ca.key", "gondolin-ca.pem")
KINDS = ("image", "snapshot", "ca", "environment")
#: A path part: starts with a letter, digit or underscore (never ``.``, ``..``
#: or a hidden name), then a bounded run of safe characters.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_TEXT = 500


@dataclass(frozen=True)
class HostFacts:
    """What a ready snapshot can only be loaded with."""

    qemu: str  # the first line of ``qemu-system-x86_64 --version``
    machine: str  # the concrete machine type ("pc-q35-7.2"), not the alias
    accel: str  # "tcg" | "kvm"

    def to_json(self) -> dict[str, str]:
        return {"qemu": self.qemu, "machine": self.machine, "accel": self.accel}


@dataclass(frozen=True)
class ArchiveEntry:
    """One file of the archive, as the manifest lists it."""

    path: str  # relative to the cache folder, "/"-separated
    kind: str  # one of KINDS
    size: int
    sha256: str
    state_key: str | None = None  # snapshots: the cache key (file name stem)
    backing: str | None = None  # snapshots: the archive path of their qcow2 backing file
    host: HostFacts | None = None  # snapshots: what they load with

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
        }
        if self.kind == "snapshot":
            out["state_key"] = self.state_key
            out["backing"] = self.backing
            out["host"] = self.host.to_json() if self.host else None
        return out

    @property
    def image_folder(self) -> str:
        """For an image file: its folder's name (``<name>-<build id>``)."""
        return self.path.split("/")[1]


@dataclass(frozen=True)
class ArchiveManifest:
    producer: str
    created: str
    cache_root: str  # the exporting cache folder (backing files named in it are rebased)
    host: HostFacts
    entries: tuple[ArchiveEntry, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "format": ARCHIVE_FORMAT,
            "producer": self.producer,
            "created": self.created,
            "cache_root": self.cache_root,
            "host": self.host.to_json(),
            "files": [e.to_json() for e in self.entries],
        }
        return (json.dumps(doc, indent=1) + "\n").encode()


def check_path(path: str, kind: str) -> None:
    """Raise ImageError unless ``path`` is a safe cache path for a file of ``kind``.

    Safe: relative, "/"-separated parts that each match :data:`_PART` (so no
    ``..``, ``.``, empty or hidden part, no backslash or NUL), under the
    folder of its kind: ``images/<folder>/<file>``, ``ca/<CA file>``,
    ``snapshots/`` and one to three more parts, or
    ``host-environment/images/<file>``. Lock and temporary files
    are never archived.
    """
    parts = path.split("/")
    if not all(_PART.fullmatch(p) for p in parts):
        raise ImageError(f"archive path {path!r} is not a safe relative path")
    if parts[-1].endswith((".lock", ".tmp")):
        raise ImageError(f"archive path {path!r} is a lock or temporary file")
    if kind == "image":
        ok = len(parts) == 3 and parts[0] == "images"
    elif kind == "ca":
        ok = len(parts) == 2 and parts[0] == "ca" and parts[1] in CA_FILES
    elif kind == "snapshot":
        ok = 2 <= len(parts) <= 4 and parts[0] == "snapshots"
    elif kind == "environment":  # a host environment's image (image/archive_environment.py)
        ok = len(parts) == 3 and parts[:2] == ["host-environment", "images"]
    else:
        raise ImageError(f"archive file {path!r} has an unknown kind {kind!r}")
    if not ok:
        raise ImageError(f"archive path {path!r} is not where a file of kind {kind!r} belongs")


def incompatibility(made: HostFacts | None, here: HostFacts | None) -> str | None:
    """Why a snapshot made under ``made`` cannot be loaded ``here``, or None if it can."""
    if here is None:
        return "this host has no usable QEMU"
    if made is None:
        return "the archive does not say which QEMU made it"
    for field, name in (("qemu", "QEMU"), ("machine", "machine type"), ("accel", "accelerator")):
        theirs, ours = getattr(made, field), getattr(here, field)
        if theirs != ours:
            return f"made with {name} {theirs!r}, this host has {ours!r}"
    return None


def _text(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise ImageError(f"archive manifest: {where}{key} is not a short string: {value!r:.80}")
    return value


def _facts(value: object, where: str) -> HostFacts:
    if not isinstance(value, dict):
        raise ImageError(f"archive manifest: {where} is not an object")
    return HostFacts(
        qemu=_text(value, "qemu", f"{where}."),
        machine=_text(value, "machine", f"{where}."),
        accel=_text(value, "accel", f"{where}."),
    )


def _entry(raw: object, index: int) -> ArchiveEntry:
    where = f"files[{index}]"
    if not isinstance(raw, dict):
        raise ImageError(f"archive manifest: {where} is not an object")
    path = _text(raw, "path", f"{where}.")
    kind = _text(raw, "kind", f"{where}.")
    check_path(path, kind)
    size = raw.get("size")
    if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
        raise ImageError(f"archive manifest: {path}: size {size!r:.40} is not a valid size")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ImageError(
            f"archive manifest: {path}: sha256 {digest!r:.80} is not a SHA-256 hex digest"
        )
    if kind != "snapshot":
        return ArchiveEntry(path, kind, size, digest)
    state_key = _text(raw, "state_key", f"{where}.")
    backing = raw.get("backing")
    if backing is not None:
        if not isinstance(backing, str):
            raise ImageError(f"archive manifest: {path}: backing {backing!r:.80} is not a path")
        check_path(backing, "image" if backing.startswith("images/") else "snapshot")
    host = raw.get("host")
    return ArchiveEntry(
        path,
        kind,
        size,
        digest,
        state_key=state_key,
        backing=backing,
        host=None if host is None else _facts(host, f"{where}.host"),
    )


def parse_manifest(raw: bytes) -> ArchiveManifest:
    """The manifest in ``raw``; ImageError naming the first thing that is wrong with it.

    Besides each entry's shape (:func:`check_path`, sizes, digests): every
    path is listed once, no file of an entry sits inside another's path,
    and a snapshot's backing file is itself in the archive.
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ImageError(f"archive manifest is {len(raw)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # nesting deep past the parser's stack
        raise ImageError(f"archive manifest is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ImageError("archive manifest is not a JSON object")
    if doc.get("format") != ARCHIVE_FORMAT:
        raise ImageError(
            f"archive format {doc.get('format')!r:.40} is not {ARCHIVE_FORMAT} "
            "(export it again with this version of pytest-gondolin)"
        )
    files = doc.get("files")
    if not isinstance(files, list) or len(files) > MAX_ENTRIES:
        raise ImageError(f"archive manifest: files is not a list of at most {MAX_ENTRIES} entries")
    entries = tuple(_entry(raw_entry, i) for i, raw_entry in enumerate(files))
    paths = {e.path for e in entries}
    if len(paths) != len(entries):
        raise ImageError("archive manifest lists a path twice")
    for e in entries:
        parent = e.path.rsplit("/", 1)[0]
        while "/" in parent:
            if parent in paths:
                raise ImageError(f"archive manifest: {e.path} lies inside the file {parent}")
            parent = parent.rsplit("/", 1)[0]
        if e.backing is not None and e.backing not in paths:
            raise ImageError(f"archive manifest: {e.path} sits on {e.backing}, which is not in it")
    return ArchiveManifest(
        producer=_text(doc, "producer", ""),
        created=_text(doc, "created", ""),
        cache_root=_text(doc, "cache_root", ""),
        host=_facts(doc.get("host"), "host"),
        entries=entries,
    )
