"""The configured worker: a snapshot of the guest between pytest's configuration and collection.

After an edit, a one-test run (the edit-run loop) restores the started
worker in place from the previous tree's file (``sandbox/worker_disk.py``)
and the worker then configures pytest again before it collects: ~1 s of
the ~1.2 s it spends under TCG for one test file (registering every plugin,
the fixture manager reading every plugin module). What configuring reads
of the project is little: the initial ``conftest.py`` files, the ini file,
``-p`` plugins from the tree and what they import.

So such a run's worker pauses once configured (``guest/configured.py``):
it names the files it read, and the host saves the internal snapshot
:data:`CONFIGURED_TAG` in the VM's disk, next to the started and collected
ones, and keeps a :class:`Record` beside the cached file
(``<key>.configured.json``): the digest of the tree's file names, and of
each project file among those read. A later run of the same lineage whose
tree matches the record restores that snapshot instead of the started
worker's, copies its tree over the one the guest holds (the same file
names, so nothing to delete) and tells the worker to collect.

When is the record not enough? Whatever configuration read outside the tree
(the environment, the interpreter, the ``go``'s arguments and environment)
is part of the lineage already. A project file added, removed or renamed
changes the names (a new ``conftest.py``, a module shadowing an import): the
run starts from the started worker again, as does an edit of a file read.
The list comes from the guest, from the project's own configuration code
(its conftest), before any test ran: it is bounded and checked, and at worst
makes that project's own later runs configure from a stale conftest, which
its author could do anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest_gondolin.paths as paths
from pytest_gondolin.sandbox.collected_files import RECORD_SUFFIX, collected_dir
from pytest_gondolin.sandbox.messages import MAX_CONFIGURED_READS
from pytest_gondolin.sandbox.worker_cache import TreeMembers, tree_members

__all__ = [
    "CONFIGURED_TAG",
    "Record",
    "forget",
    "load",
    "move",
    "record_path",
    "store",
    "tree_files",
]

log = logging.getLogger(__name__)

#: The internal snapshot of the configured worker, in the collected worker's file.
CONFIGURED_TAG: Final = "gondolin-configured"
#: Part of every record: a change in what they mean makes old ones unusable.
RECORD_FORMAT: Final = "configured 2"
#: A record file is a few KiB; one this big is not ours.
MAX_RECORD_BYTES: Final = 4 * 1024 * 1024


def tree_files(tars: Sequence[bytes] | TreeMembers) -> dict[str, str]:
    """What the project ``tars`` unpack to in the guest: absolute path -> ``<type>:<digest>``.

    The type is tar's code (``0`` a file, ``5`` a folder, ``2`` a link): a
    name that changed type changes the tree's names (:class:`Record`).
    ``tars`` may be given as their ``worker_cache.members_of`` already.
    """
    files: dict[str, str] = {}
    for data in tars:
        for name, kind, digest in tree_members(data) if isinstance(data, bytes) else data:
            files["/" + name.strip("/")] = f"{kind}:{digest.hex()}"
    return files


def _names_digest(files: Mapping[str, str]) -> str:
    names = (f"{value.partition(':')[0]}{path}" for path, value in sorted(files.items()))
    return hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Record:
    """What a configured snapshot depends on in the project tree."""

    #: A digest of the tree's sorted file names.
    names: str
    #: The project files configuration read: path -> digest of the member.
    read: Mapping[str, str]

    @classmethod
    def made(cls, files: Mapping[str, str], read: Sequence[str]) -> Record:
        """The record of a worker configured with the tree ``files``, having read ``read``."""
        return cls(_names_digest(files), {path: files[path] for path in read if path in files})

    def holds_for(self, files: Mapping[str, str]) -> bool:
        """Whether a worker configured as recorded would have configured the same with ``files``."""
        return self.names == _names_digest(files) and all(
            files.get(path) == digest for path, digest in self.read.items()
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {"format": RECORD_FORMAT, "names": self.names, "read": dict(self.read)}, sort_keys=True
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Record | None:
        """The record in ``raw``, or None when it is not one (another format, damaged)."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            return None
        names, read = data.get("names"), data.get("read")
        if not isinstance(names, str) or not isinstance(read, dict):
            return None
        if len(read) > MAX_CONFIGURED_READS or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in read.items()
        ):
            return None
        return cls(names, read)


def record_path(key: str) -> Path:
    """Where the record of the collected worker ``key``'s configured snapshot is kept."""
    return collected_dir() / f"{key}{RECORD_SUFFIX}"


def load(key: str) -> Record | None:
    """The record kept for ``key``; None when there is none (or it is not usable)."""
    try:
        with record_path(key).open("rb") as file:
            raw = file.read(MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_RECORD_BYTES:
        return None
    return Record.from_json(raw)


def store(key: str, record: Record) -> None:
    """Keep ``record`` for ``key`` (a temporary file renamed: never half-written)."""
    target = record_path(key)
    if not paths.can_write(target.parent):
        return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(record.to_json())
        tmp.rename(target)
    except OSError as exc:
        log.debug("could not keep %s: %s", target, exc)
    finally:
        tmp.unlink(missing_ok=True)


def move(old: str, new: str) -> None:
    """The record of ``old`` becomes ``new``'s (its file was given back under ``new``)."""
    if old == new:
        return
    record = load(old)
    forget(old)
    if record is not None:
        store(new, record)


def forget(key: str) -> None:
    if paths.can_write(collected_dir()):
        record_path(key).unlink(missing_ok=True)
