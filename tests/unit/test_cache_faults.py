"""A damaged cache is detected and repaired, never used: images, build locks, the boot payload.

The image builder is replaced by a fake that writes a tiny but complete
image (what ``build_image`` guarantees), so the cache logic of
``image/store.py`` runs for real without mmdebstrap. The warm-snapshot
half (a truncated ``<cache>/snapshots/<key>.qcow2``) needs QEMU and is in
``tests/integration/test_faults.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_gondolin.errors import ImageError
from pytest_gondolin.image import info, store
from pytest_gondolin.image.manifest import (
    IMAGE_FILES,
    MANIFEST_FORMAT,
    read_manifest,
    write_manifest,
)
from pytest_gondolin.image.recipe import Recipe, load_recipe
from pytest_gondolin.vm import payload
from pytest_gondolin.vm.snapshot_paths import (
    MAX_BASES,
    evict_old_bases,
    snapshots_dir,
    warm_snapshot_lock,
    warm_snapshot_path,
)

FILES = {"vmlinuz": b"k" * 100, "initrd.img": b"i" * 50, "rootfs.qcow2": b"r" * 300}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def recipe() -> Recipe:
    return dataclasses.replace(load_recipe(), name="fakeimg", build_id="0123456789abcdef")


class FakeBuilder:
    """Writes a complete image like ``build_image`` does; counts calls; can be told to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None

    def __call__(self, recipe: Recipe, out: Path, *, progress: object) -> None:
        self.calls += 1
        (out / "vmlinuz").write_bytes(FILES["vmlinuz"])
        if self.fail is not None:
            raise self.fail  # half-written: one file, no manifest
        for name, data in FILES.items():
            (out / name).write_bytes(data)
        write_manifest(out, {"name": recipe.name, "build_id": recipe.build_id})


@pytest.fixture
def builder(monkeypatch: pytest.MonkeyPatch) -> FakeBuilder:
    fake = FakeBuilder()
    monkeypatch.setattr("pytest_gondolin.image.build.build_image", fake)
    return fake


# --------------------------------------------------------------------------- detection


def _good_image(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "name": "x",
                "build_id": "1",
                "files": {n: len(d) for n, d in FILES.items()},
            }
        )
    )
    return folder


def _truncate(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


DAMAGE = {
    "manifest missing": lambda d: (d / "manifest.json").unlink(),
    "manifest garbage": lambda d: (d / "manifest.json").write_text("{not json"),
    "manifest not an object": lambda d: (d / "manifest.json").write_text("[1, 2]"),
    "manifest empty": lambda d: (d / "manifest.json").write_text(""),
    "unknown format": lambda d: (d / "manifest.json").write_text(
        json.dumps({"format": 99, "files": {}})
    ),
    "no file list": lambda d: (d / "manifest.json").write_text(
        json.dumps({"format": MANIFEST_FORMAT})
    ),
    "rootfs truncated": lambda d: _truncate(d / "rootfs.qcow2"),
    "rootfs missing": lambda d: (d / "rootfs.qcow2").unlink(),
    "kernel grown": lambda d: (d / "vmlinuz").write_bytes(FILES["vmlinuz"] + b"x"),
    "initrd empty": lambda d: (d / "initrd.img").write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_open_image_rejects_a_damaged_folder(tmp_path: Path, damage: object) -> None:
    folder = _good_image(tmp_path / "img")
    assert store.open_image(folder).build_id == "1"  # negative control: intact, it opens
    damage(folder)  # type: ignore[operator]
    with pytest.raises(ImageError, match=str(folder)):
        store.open_image(folder)


def test_the_manifest_written_is_the_manifest_read(tmp_path: Path) -> None:
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    written = write_manifest(tmp_path, {"name": "x", "build_id": "7"})
    assert set(written["files"]) == set(IMAGE_FILES) == set(FILES)
    assert read_manifest(tmp_path) == written
    assert written["format"] == MANIFEST_FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, "manifest.json"])


def test_warm_snapshot_paths_live_in_the_cache(cache: Path) -> None:
    assert warm_snapshot_path("k1") == cache / "snapshots" / "k1.qcow2"
    assert warm_snapshot_lock("k1") == cache / "snapshots" / "k1.lock"
    assert snapshots_dir() == warm_snapshot_path("k1").parent
    assert not snapshots_dir().exists()  # readers (image inspect, the header) never create it
    assert info.warm_snapshots("bookworm-0") == []


def test_only_the_most_recently_used_state_keys_keep_snapshots(cache: Path) -> None:
    snaps = cache / "snapshots"
    snaps.mkdir()
    keys = [f"{i:024x}" for i in range(MAX_BASES + 3)]
    for age, key in enumerate(keys):  # keys[0] is the newest, the last the oldest
        for name in (f"{key}.qcow2", f"{key}+{'a' * 24}.qcow2", f"{key}.lock"):
            (snaps / name).write_bytes(b"q")
            os.utime(snaps / name, (1e9 - age * 100, 1e9 - age * 100))
    # The oldest key's layer was used recently: the key counts as used then.
    os.utime(snaps / f"{keys[-1]}+{'a' * 24}.qcow2", (1e9 + 50, 1e9 + 50))
    just_saved = keys[-2]  # the key just saved stays, however old its files look

    removed = evict_old_bases(keep=just_saved)

    left = {p.name.split("+")[0].split(".")[0] for p in snaps.glob("*.qcow2")}
    assert left == {just_saved, keys[-1], *keys[: MAX_BASES - 2]}
    assert len(left) == MAX_BASES
    assert {p.name for p in removed} == {
        n for k in keys[MAX_BASES - 2 : -2] for n in (f"{k}.qcow2", f"{k}+{'a' * 24}.qcow2")
    }
    assert len(list(snaps.glob("*.lock"))) == len(keys)  # locks stay: a peer may hold one
    assert evict_old_bases(keep=just_saved) == []  # within the bound: nothing more goes


def test_evicting_without_a_snapshots_folder_is_a_no_op(cache: Path) -> None:
    assert evict_old_bases(keep="k") == []
    assert not snapshots_dir().exists()


# --------------------------------------------------------------------------- repair


def test_built_once_then_served_from_the_cache(
    cache: Path, recipe: Recipe, builder: FakeBuilder
) -> None:
    first = store.ensure_image(recipe)
    again = store.ensure_image(recipe)
    assert builder.calls == 1 and first.path == again.path
    assert first.path == cache / "images" / recipe.image_key


@pytest.mark.parametrize("damage", ["rootfs truncated", "manifest missing", "manifest garbage"])
def test_a_damaged_cached_image_is_rebuilt(
    cache: Path, recipe: Recipe, builder: FakeBuilder, damage: str
) -> None:
    image = store.ensure_image(recipe)
    DAMAGE[damage](image.path)
    rebuilt = store.ensure_image(recipe)
    assert builder.calls == 2
    assert store.open_image(rebuilt.path).build_id == recipe.build_id
    assert (rebuilt.path / "rootfs.qcow2").read_bytes() == FILES["rootfs.qcow2"]
    assert sorted(p.name for p in (cache / "images").iterdir()) == [".locks", recipe.image_key]


def test_a_failed_build_leaves_nothing_half_written(
    cache: Path, recipe: Recipe, builder: FakeBuilder
) -> None:
    builder.fail = RuntimeError("mirror unreachable")
    with pytest.raises(RuntimeError, match="mirror unreachable"):
        store.ensure_image(recipe)
    root = cache / "images"
    assert sorted(p.name for p in root.iterdir()) == [".locks"]  # no target, no .tmp-*
    builder.fail = None
    assert store.ensure_image(recipe).build_id == recipe.build_id  # the lock was released
    assert builder.calls == 2


def test_abandoned_builds_of_dead_processes_are_removed(
    cache: Path, recipe: Recipe, builder: FakeBuilder
) -> None:
    root = store.images_root()
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = root / f".tmp-{recipe.image_key}-{dead.pid}"
    abandoned.mkdir(parents=True)
    (abandoned / "rootfs.qcow2").write_bytes(b"half")
    live = root / f".tmp-other-{os.getpid()}"  # a build under way in a live process
    live.mkdir()
    store.ensure_image(recipe)
    assert not abandoned.exists()
    assert live.exists()


def _hold_lock_and_die(lock_path: Path, *, die: bool) -> subprocess.Popen[bytes]:
    """A process that takes ``lock_path`` and then (if ``die``) SIGKILLs itself."""
    code = (
        "import filelock, os, signal, sys, time\n"
        f"lock = filelock.FileLock({str(lock_path)!r}); lock.acquire()\n"
        "print('held', flush=True)\n"
        f"os.kill(os.getpid(), signal.SIGKILL) if {die!r} else time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


def test_a_build_lock_of_a_killed_process_is_not_stale(
    cache: Path, recipe: Recipe, builder: FakeBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "BUILD_LOCK_TIMEOUT", 5)
    lock_path = store.images_root() / ".locks" / f"{recipe.image_key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    killed = _hold_lock_and_die(lock_path, die=True)
    assert killed.wait(10) == -signal.SIGKILL
    started = time.monotonic()
    store.ensure_image(recipe)
    assert time.monotonic() - started < 2 and builder.calls == 1

    # Negative control: a live holder does block, and the wait is bounded with a clear error.
    store.ensure_image(recipe, rebuild=False)
    monkeypatch.setattr(store, "BUILD_LOCK_TIMEOUT", 0.5)
    holder = _hold_lock_and_die(lock_path, die=False)
    try:
        with pytest.raises(ImageError, match="timed out"):
            store.ensure_image(recipe, rebuild=True)
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- boot payload


def test_warm_snapshot_key_is_stable(tmp_path: Path) -> None:
    """The boot payload's digest names the initrd, which is part of the warm-snapshot key.

    Bytecode marshalled with back-references depends on refcounts at dump
    time, so the same sources gave another initrd name -- and another key,
    a cold boot and one more cached snapshot -- from one call to the next
    (the first ``state_key`` of a process differed from the later ones).
    Checked in a fresh interpreter, where that first call happens.
    """
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("state_key asks qemu-system-x86_64 for its version")
    image = tmp_path / "image"
    image.mkdir()
    (image / "initrd.img").write_bytes(b"base initrd")
    code = (
        "from pathlib import Path\n"
        "from pytest_gondolin.image.store import Image\n"
        "from pytest_gondolin.vm.identity import VMConfig, state_key\n"
        f"image = Image(Path({str(image)!r}), {{'build_id': '1', 'name': 'fake'}})\n"
        "config = VMConfig(image=image, network=False)\n"
        "print(*(state_key(config) for _ in range(3)))\n"
    )
    env = {**os.environ, "GONDOLIN_CACHE_DIR": str(tmp_path / "cache")}
    keys = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        ).stdout.split()
        for _ in range(2)
    ]
    assert len(keys[0]) == 3 and keys[0] == keys[1], keys
    assert len(set(keys[0])) == 1, keys
    # Negative control: the key does follow the payload.
    files = {"mtu": b"1500"}
    assert payload.build_payload(files) == payload.build_payload(files)
    assert payload.build_payload(files) != payload.build_payload({"mtu": b"9000"})


def test_payload_bytecode_loads() -> None:
    """The precompiled modules in the payload are valid bytecode for this interpreter."""
    import importlib.util
    import marshal

    source = b"VALUE = [n * 2 for n in range(3)]\n"
    data = payload._pyc(source, "/run/gondolin/py/x.py")
    assert data[:4] == importlib.util.MAGIC_NUMBER
    namespace: dict[str, object] = {}
    exec(marshal.loads(data[16:]), namespace)
    assert namespace["VALUE"] == [0, 2, 4]
