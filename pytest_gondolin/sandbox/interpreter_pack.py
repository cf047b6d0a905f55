"""The host's interpreter (:mod:`.host_python`) as tars at its guest paths, cached by content.

:func:`pack_chunks` packs the base interpreter once into the cache, in pieces
of about :data:`CHUNK_BYTES`, keyed by :attr:`HostInterpreter.key`; a later
session reads them back and packs nothing. :func:`layer_items` offers them
to a cached guest layer (``vm/layers.py``), one item per piece;
:func:`pack_venv` packs the venv's few files, copied each session.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from pytest_gondolin.errors import ConfigError
from pytest_gondolin.sandbox.host_python import CarriedFile, HostInterpreter
from pytest_gondolin.vm.layers import TarItem

__all__ = ["CHUNK_BYTES", "MAX_CACHED_INTERPRETERS", "layer_items", "pack_chunks", "pack_venv"]

log = logging.getLogger(__name__)

#: Packs are written to the guest in pieces of about this size (one is held
#: in the agent's memory at a time), as the environment's are.
CHUNK_BYTES: Final = 32 * 1024 * 1024
#: Interpreters whose packs stay cached (a host with a few Pythons, tox-style).
MAX_CACHED_INTERPRETERS: Final = 4


def _tar(files: list[CarriedFile]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path.lstrip("/"))
            info.mtime = f.mtime_ns // 1_000_000_000
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if f.link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = f.link
                tar.addfile(info)
                continue
            try:
                fh = open(f.source, "rb")  # noqa: SIM115 - closed right after addfile
            except OSError as exc:
                raise OSError(f"{f.source}: cannot be packed for the guest ({exc})") from exc
            with fh:
                info.size = os.fstat(fh.fileno()).st_size
                info.mode = f.mode
                tar.addfile(info, fh)
    return buf.getvalue()


def _groups(files: tuple[CarriedFile, ...], chunk: int) -> Iterator[list[CarriedFile]]:
    group: list[CarriedFile] = []
    size = 0
    for f in files:
        if group and size + f.size > chunk:
            yield group
            group, size = [], 0
        group.append(f)
        size += f.size + 512
    if group:
        yield group


def _cached_count(cache: Path, key: str) -> int | None:
    """How many packs ``key`` has in ``cache`` (None: not cached); marks it recently used."""
    index = cache / f"{key}.json"
    try:
        count = json.loads(index.read_text())["chunks"]
        os.utime(index)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return count if isinstance(count, int) and 0 < count < 10_000 else None


def pack_chunks(
    interpreter: HostInterpreter, cache: Path, *, chunk: int = CHUNK_BYTES
) -> list[bytes]:
    """Tars of every carried file at its guest path, about ``chunk`` bytes each, cached by key.

    A later session with the same :attr:`HostInterpreter.key` reads the
    cached tars and packs nothing; the packs of at most
    :data:`MAX_CACHED_INTERPRETERS` keys are kept. Raises OSError if a
    carried file cannot be read any more.
    """
    key = interpreter.key
    count = _cached_count(cache, key)
    if count is not None:
        try:
            return [(cache / f"{key}.{i}.tar").read_bytes() for i in range(count)]
        except OSError:
            pass
    chunks = [_tar(group) for group in _groups(interpreter.files, chunk)]
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(chunks):
            tmp = cache / f".{key}.{i}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, cache / f"{key}.{i}.tar")
        tmp = cache / f".{key}.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"chunks": len(chunks)}))
        os.replace(tmp, cache / f"{key}.json")  # last: a reader sees every pack or packs again
        _evict(cache)
    except OSError as exc:
        log.debug("host interpreter packs not cached: %s", exc)
    return chunks


def _evict(cache: Path) -> None:
    """Keep the packs of the :data:`MAX_CACHED_INTERPRETERS` most recently used keys."""
    indexes = sorted(cache.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for index in indexes[MAX_CACHED_INTERPRETERS:]:
        index.unlink(missing_ok=True)  # first: the packs are then no longer "cached"
        for tar in cache.glob(f"{index.stem}.*.tar"):
            tar.unlink(missing_ok=True)


def layer_items(interpreter: HostInterpreter, cache: Path) -> list[TarItem]:
    """The carried interpreter as tar items for a layer (``vm/layers.py``), keyed by its content."""
    key = interpreter.key
    count = sum(1 for _ in _groups(interpreter.files, CHUNK_BYTES))
    return [
        TarItem(f"host-python:{key}:{i}", functools.partial(_chunk, interpreter, cache, i))
        for i in range(count)
    ]


def _chunk(interpreter: HostInterpreter, cache: Path, index: int) -> bytes:
    key = interpreter.key
    if _cached_count(cache, key) is not None:
        try:
            return (cache / f"{key}.{index}.tar").read_bytes()
        except OSError:
            pass
    try:
        return pack_chunks(interpreter, cache)[index]
    except OSError as exc:  # a carried file vanished since the check
        raise ConfigError(f"the host's Python cannot be carried into the guest: {exc}") from exc


def pack_venv(interpreter: HostInterpreter) -> bytes:
    """A tar of the venv's own files (:attr:`HostInterpreter.venv`), packed each session (tiny)."""
    try:
        return _tar(list(interpreter.venv))
    except OSError as exc:
        raise ConfigError(f"the host's venv cannot be carried into the guest: {exc}") from exc
