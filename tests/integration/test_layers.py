"""Layered ready snapshots (``vm/layers.py``) with real QEMU, in a private cache.

Each test gets a cache of its own that shares the real image and CA (the
same boot payload, so the same state key) and starts with a copy of the
real warm snapshot, so nothing boots cold.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from pytest_gondolin import paths
from pytest_gondolin.errors import ConfigError
from pytest_gondolin.fixtures import VMFactory
from pytest_gondolin.vm import layers as layers_mod
from pytest_gondolin.vm.identity import VMConfig, state_key
from pytest_gondolin.vm.layers import Layer, TarItem, launch_layered, stack_digest, tar_layer
from pytest_gondolin.vm.machine import VM
from pytest_gondolin.vm.snapshot_paths import (
    layered_snapshot_path,
    snapshots_dir,
    warm_snapshot_path,
)
from pytest_gondolin.vm.warm import launch_clean


@pytest.fixture(scope="session")
def real_cache() -> Path:
    return paths.cache_dir()


@pytest.fixture
def config(
    vm_factory: VMFactory, tmp_path: Path, real_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> VMConfig:
    """A VM config whose cache is private to this test, seeded with the real warm snapshot."""
    config = vm_factory.vm_config(vm_factory.guest_key())
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "images").symlink_to(real_cache / "images")
    shutil.copytree(real_cache / "ca", cache / "ca")
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(cache))
    key = state_key(config)
    source = real_cache / "snapshots" / f"{key}.qcow2"
    snapshots_dir().mkdir()
    if source.exists():
        shutil.copyfile(source, warm_snapshot_path(key))
    else:
        launch_clean(config, name="seed").close()
    return config


def _write_layer(name: str, path: str, text: str, calls: list[str] | None = None) -> Layer:
    def apply(vm: VM) -> None:
        if calls is not None:
            calls.append(name)
        vm.write_file(path, text)

    return Layer(name, uuid.uuid4().hex, apply)


def _read(vm: VM, path: str) -> str:
    return vm.read_file(path).decode()


def test_a_stack_is_built_once_then_restored_with_every_layer(config: VMConfig) -> None:
    calls: list[str] = []
    stack = [
        _write_layer("a", "/etc/layer-a", "A", calls),
        _write_layer("b", "/etc/layer-b", "B", calls),
    ]
    progress: list[str] = []
    vm = launch_layered(config, stack, name="first", progress=progress.append)
    try:
        assert (_read(vm, "/etc/layer-a"), _read(vm, "/etc/layer-b")) == ("A", "B")
        # The clean tag is the layered state: a test's change is undone by the restore.
        vm.exec("rm /etc/layer-a", check=True)
        vm.load_internal("gondolin-clean")
        assert _read(vm, "/etc/layer-a") == "A"
    finally:
        vm.close()
    assert calls == ["a", "b"]
    base = state_key(config)
    for count in (1, 2):
        assert layered_snapshot_path(base, stack_digest(base, stack[:count])).is_file()
    assert not list(snapshots_dir().glob("*.tmp"))

    calls.clear()
    progress.clear()
    again = launch_layered(config, stack, name="again", progress=progress.append)
    try:
        assert (_read(again, "/etc/layer-a"), _read(again, "/etc/layer-b")) == ("A", "B")
    finally:
        again.close()
    assert calls == [], "a cached stack applies no layer"
    assert any("with 2 layer(s)" in m for m in progress), progress


def test_a_new_top_layer_starts_from_the_cached_prefix(config: VMConfig) -> None:
    calls: list[str] = []
    bottom = _write_layer("bottom", "/etc/bottom", "1", calls)
    launch_layered(config, [bottom], name="prefix").close()
    calls.clear()
    top = _write_layer("top", "/etc/top", "2", calls)
    progress: list[str] = []
    vm = launch_layered(config, [bottom, top], name="stacked", progress=progress.append)
    try:
        assert (_read(vm, "/etc/bottom"), _read(vm, "/etc/top")) == ("1", "2")
    finally:
        vm.close()
    assert calls == ["top"]
    assert any("with 1 layer(s)" in m for m in progress), progress


def test_a_failing_layer_caches_nothing_and_closes_its_vm(config: VMConfig) -> None:
    seen: list[VM] = []

    def fail(vm: VM) -> None:
        seen.append(vm)
        vm.write_file("/etc/half", "half")
        raise ConfigError("system package 'nope' cannot be installed")

    layer = Layer("broken", uuid.uuid4().hex, fail)
    with pytest.raises(ConfigError, match="'nope'"):
        launch_layered(config, [layer], name="broken")
    assert seen and not seen[0].alive
    assert not list(snapshots_dir().glob("*+*.qcow2"))
    assert not list(snapshots_dir().glob(".*.tmp"))


def test_a_corrupt_layered_snapshot_is_deleted_and_rebuilt(config: VMConfig) -> None:
    calls: list[str] = []
    layer = _write_layer("c", "/etc/layer-c", "C", calls)
    base = state_key(config)
    cached = layered_snapshot_path(base, stack_digest(base, [layer]))
    cached.write_bytes(b"QFI\xfb" + b"\0" * 4096)  # a qcow2 magic and nothing after it
    vm = launch_layered(config, [layer], name="rebuilt")
    try:
        assert _read(vm, "/etc/layer-c") == "C"
    finally:
        vm.close()
    assert calls == ["c"]
    assert cached.stat().st_size > 1 << 20


def test_a_read_only_cache_uses_its_layers_and_saves_none(
    config: VMConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = _write_layer("kept", "/etc/kept", "K")
    launch_layered(config, [kept], name="writer").close()
    calls: list[str] = []
    extra = _write_layer("extra", "/etc/extra", "E", calls)
    folder = snapshots_dir()
    before = sorted(p.name for p in folder.iterdir())
    # These tests run as root, who can write a 0555 folder: the cache is
    # made read-only the way the plugin sees it, through paths.can_write.
    monkeypatch.setattr(paths, "can_write", lambda path: False)
    progress: list[str] = []
    vm = launch_layered(config, [kept, extra], name="reader", progress=progress.append)
    try:
        assert (_read(vm, "/etc/kept"), _read(vm, "/etc/extra")) == ("K", "E")
    finally:
        vm.close()
    assert calls == ["extra"]
    assert any("cannot be written" in m for m in progress), progress
    assert sorted(p.name for p in folder.iterdir()) == before


def test_tar_layer_unpacks_its_items_at_their_paths(config: VMConfig) -> None:
    import io
    import tarfile

    def tar(name: str, data: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as out:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    packed: list[str] = []

    def item(name: str, data: bytes) -> TarItem:
        def pack() -> bytes:
            packed.append(name)
            return tar(name, data)

        return TarItem(f"{name}:{uuid.uuid4().hex}", pack)

    items = [item("opt/one/a.txt", b"one"), item("opt/two/b.txt", b"two" * 1000)]
    vm = launch_layered(config, [tar_layer("files", items)], name="tars")
    try:
        assert _read(vm, "/opt/one/a.txt") == "one"
        assert _read(vm, "/opt/two/b.txt") == "two" * 1000
        assert vm.exec("ls /var/tmp").stdout == ""  # the pieces were removed
    finally:
        vm.close()
    packed.clear()
    launch_layered(config, [tar_layer("files", items)], name="tars-again").close()
    assert packed == [], "a cached tar layer packs nothing"


def test_least_recently_used_stacks_are_evicted(
    config: VMConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layers_mod, "MAX_STACKS_PER_BASE", 1)
    first = _write_layer("one", "/etc/one", "1")
    launch_layered(config, [first], name="one").close()
    second = _write_layer("two", "/etc/two", "2")
    launch_layered(config, [second], name="two").close()
    base = state_key(config)
    assert not layered_snapshot_path(base, stack_digest(base, [first])).exists()
    assert layered_snapshot_path(base, stack_digest(base, [second])).exists()


def test_concurrent_builders_of_a_shared_prefix_build_it_once(config: VMConfig) -> None:
    import threading

    calls: list[str] = []
    shared = _write_layer("shared", "/etc/shared", "S", calls)
    stacks = [[shared, _write_layer("left", "/etc/left", "L")], [shared]]
    found: list[str] = []
    errors: list[BaseException] = []

    def build(stack: list[Layer], name: str) -> None:
        try:
            vm = launch_layered(config, stack, name=name)
            try:
                found.append(_read(vm, "/etc/shared"))
            finally:
                vm.close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=build, args=(stack, f"builder{i}"))
        for i, stack in enumerate(stacks)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert found == ["S", "S"]
    assert calls == ["shared"], "the shared prefix is built once"
