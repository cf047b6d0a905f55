"""Disk-only checkpoints (Gondolin's semantics) and their portable metadata.

A checkpoint is a qcow2 file whose backing file is the image's root disk,
holding everything the guest wrote to its disk (not RAM, not tmpfs). Its
metadata travels inside the same file as a trailer after the qcow2 data::

    <qcow2 bytes> <JSON metadata> <u32 big-endian JSON length> b"GONDOLIN-CKPT1\\n"

QEMU only ever opens a checkpoint read-only, as the backing file of a fresh
per-resume overlay, so bytes past the qcow2's last cluster are never read
or overwritten. Any number of resumes share one checkpoint and never see
each other's writes. A moved checkpoint still resumes: the overlay names
its current path; if its own backing image moved, it is rebased onto the
cached image with the recorded build id.
"""

from __future__ import annotations

import json
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_gondolin.errors import SnapshotError
from pytest_gondolin.hosttools import require as require_tool

TRAILER_MAGIC = b"GONDOLIN-CKPT1\n"
FORMAT_VERSION = 1
#: Metadata is a few hundred bytes; anything over this is not ours.
MAX_METADATA = 64 * 1024


def write_trailer(path: Path, metadata: dict[str, Any]) -> None:
    blob = json.dumps(metadata, sort_keys=True).encode()
    with path.open("ab") as fh:
        fh.write(blob + struct.pack(">I", len(blob)) + TRAILER_MAGIC)


def read_trailer(path: Path) -> dict[str, Any]:
    """Return the metadata of checkpoint ``path``; SnapshotError if it has none."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            tail_len = len(TRAILER_MAGIC) + 4
            if size < tail_len:
                raise SnapshotError(f"{path} is not a gondolin checkpoint (too small)")
            fh.seek(size - tail_len)
            tail = fh.read(tail_len)
            if tail[4:] != TRAILER_MAGIC:
                raise SnapshotError(f"{path} is not a gondolin checkpoint (no metadata trailer)")
            (length,) = struct.unpack(">I", tail[:4])
            if length > MAX_METADATA or length > size - tail_len:
                raise SnapshotError(f"{path}: checkpoint metadata length {length} is invalid")
            fh.seek(size - tail_len - length)
            data = json.loads(fh.read(length))
    except OSError as exc:
        raise SnapshotError(f"cannot read checkpoint {path}: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # nested past the parser's stack
        raise SnapshotError(f"{path}: checkpoint metadata is not valid JSON") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise SnapshotError(
            f"{path}: unsupported checkpoint format {data.get('format') if isinstance(data, dict) else data!r}"
        )
    return data


def export_disk(disk: Path, base: Path, target: Path, metadata: dict[str, Any]) -> None:
    """Write the guest-visible contents of ``disk`` (minus ``base``) to ``target`` atomically."""
    qemu_img = require_tool("qemu-img")
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    res = subprocess.run(
        [qemu_img, "convert", "-O", "qcow2", "-F", "qcow2", "-B", str(base), str(disk), str(tmp)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(
            f"qemu-img convert failed writing checkpoint {target}: {res.stderr.strip()}"
        )
    write_trailer(tmp, {"format": FORMAT_VERSION, "created": time.time(), **metadata})
    tmp.rename(target)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    metadata: dict[str, Any]

    @property
    def build_id(self) -> str:
        return str(self.metadata.get("image_build_id"))


def backing_of(path: Path) -> str | None:
    """The backing file name recorded in qcow2 ``path`` (None if it has none)."""
    qemu_img = require_tool("qemu-img")
    res = subprocess.run(
        [qemu_img, "info", "--output=json", "-U", str(path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if res.returncode != 0:
        raise SnapshotError(f"{path} is not a readable qcow2 image: {res.stderr.strip()}")
    try:
        backing = json.loads(res.stdout).get("backing-filename")
    except ValueError as exc:
        raise SnapshotError(f"qemu-img info gave unreadable output for {path}") from exc
    return str(backing) if backing else None


def ensure_backing(path: Path, base: Path) -> None:
    """Point checkpoint ``path`` at ``base`` if its recorded backing file is gone (the cache moved)."""
    recorded = backing_of(path)
    if recorded is not None and Path(recorded).exists():
        return
    qemu_img = require_tool("qemu-img")
    res = subprocess.run(
        [qemu_img, "rebase", "-u", "-F", "qcow2", "-b", str(base), str(path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if res.returncode != 0:
        raise SnapshotError(f"cannot rebase checkpoint {path} onto {base}: {res.stderr.strip()}")
