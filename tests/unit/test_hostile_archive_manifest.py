"""A cache archive whose manifests nest deeper than the JSON parser's stack, or are huge.

``gondolin cache import`` reads the manifest (at most 4 MiB) with
``json.loads``; 200 KB of ``[`` is far inside that bound but deeper than
the parser's recursion limit, which raises ``RecursionError`` -- not a
``ValueError``. Before the fix that escaped ``parse_manifest`` and the
command died with a traceback instead of its one-line refusal (red team
round 3). The same held for an image folder's own ``manifest.json`` in the
archive, which was also read whole, whatever its size (the archive may list
it at gigabytes with the right digest). Other tampered archives (paths, links, sizes, digests) are
``tests/unit/test_cache_archive.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from pytest_gondolin.errors import ImageError
from pytest_gondolin.image.archive_manifest import (
    MANIFEST_MEMBER,
    MAX_MANIFEST_BYTES,
    parse_manifest,
)
from pytest_gondolin.image.manifest import MAX_MANIFEST_BYTES as MAX_IMAGE_MANIFEST_BYTES
from pytest_gondolin.image.manifest import read_manifest
from tests.unit.test_cache_archive import FACTS, _cli, _import_into

#: Deep nesting, well under the manifest's size bound.
NESTED = b"[" * 200_000


@pytest.mark.parametrize(
    "raw",
    [
        NESTED,
        b'{"format": 1, "files": [], "x": ' + NESTED + b"]" * 200_000 + b"}",
        b'{"format": 1, "files": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    ],
    ids=["array", "inside-an-object", "objects"],
)
def test_a_manifest_nested_past_the_parser_s_stack_is_named(raw: bytes) -> None:
    assert len(raw) <= MAX_MANIFEST_BYTES
    with pytest.raises(ImageError, match="archive manifest is not valid JSON"):
        parse_manifest(raw)


def test_negative_control_a_shallow_bad_manifest_is_named_the_same_way() -> None:
    with pytest.raises(ImageError, match="archive manifest is not valid JSON"):
        parse_manifest(b"[[[")


def _archive(path: Path, manifest: bytes) -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(MANIFEST_MEMBER)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return path


def test_importing_it_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _archive(tmp_path / "deep.tar", NESTED)
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match="not valid JSON"):
        _import_into(cache, archive, monkeypatch)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_the_command_refuses_it_in_one_line(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "deep.tar", NESTED)
    cache = tmp_path / "cache"
    res = _cli("cache", "import", str(archive), cache=cache)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("gondolin: error:")]
    assert len(errors) == 1 and "archive manifest is not valid JSON" in errors[0], res.stderr


def _image_archive(path: Path, manifest_json: bytes) -> Path:
    """An archive of one image folder holding only ``manifest.json`` (its digest is right)."""
    entry = {
        "path": "images/evil-1/manifest.json",
        "kind": "image",
        "size": len(manifest_json),
        "sha256": hashlib.sha256(manifest_json).hexdigest(),
    }
    doc = {
        "format": 1,
        "producer": "x",
        "created": "x",
        "cache_root": "/somewhere",
        "host": FACTS.to_json(),
        "files": [entry],
    }
    blob = json.dumps(doc).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in ((MANIFEST_MEMBER, blob), (str(entry["path"]), manifest_json)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "manifest_json",
    [NESTED, b'{"format": 1}' + b" " * (MAX_IMAGE_MANIFEST_BYTES + 1)],
    ids=["nested", "oversized"],
)
def test_an_image_manifest_from_an_archive_is_read_within_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest_json: bytes
) -> None:
    """The image folder's own ``manifest.json`` is hostile too: bounded, never a raw error."""
    archive = _image_archive(tmp_path / "image.tar", manifest_json)
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match=r"evil-1: no readable manifest\.json"):
        _import_into(cache, archive, monkeypatch)
    assert not (cache / "images" / "evil-1").exists()


def test_negative_control_a_small_image_manifest_is_read(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": 1, "files": {}}')
    with pytest.raises(ImageError, match="vmlinuz"):  # read, then found to list no vmlinuz
        read_manifest(tmp_path)
