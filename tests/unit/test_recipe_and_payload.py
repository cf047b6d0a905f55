"""Recipes, build ids, module resolution and the boot payload, without building anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_gondolin.errors import ConfigError, ImageError
from pytest_gondolin.image.build import resolve_modules
from pytest_gondolin.image.recipe import RECIPES_DIR, load_recipe
from pytest_gondolin.vm import payload


def test_builtin_recipe_loads() -> None:
    recipe = load_recipe("bookworm")
    assert recipe.suite == "bookworm"
    assert "python3" in recipe.packages and "busybox-static" in recipe.packages
    assert len(recipe.build_id) == 16
    assert recipe.image_key == f"bookworm-{recipe.build_id}"


def _copy_recipe(tmp_path: Path) -> Path:
    target = tmp_path / "recipe"
    shutil.copytree(RECIPES_DIR / "bookworm", target)
    return target


def test_build_id_follows_content(tmp_path: Path) -> None:
    folder = _copy_recipe(tmp_path)
    first = load_recipe(folder).build_id
    assert load_recipe(folder).build_id == first
    (folder / "init").write_text((folder / "init").read_text() + "\n# changed\n")
    assert load_recipe(folder).build_id != first


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"packages": "python3"}, "'packages' must be a list of strings"),
        ({"packages": ["ok", "Bad Name"]}, "invalid entry 'Bad Name'"),
        ({"name": "Has Space"}, "'name' 'Has Space' must match"),
        ({"disk_size_mib": 10}, "'disk_size_mib' must be an integer"),
        ({"suite": ""}, "'suite' must be a non-empty string"),
    ],
)
def test_bad_recipes_name_the_field(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    folder = _copy_recipe(tmp_path)
    data = json.loads((folder / "recipe.json").read_text())
    data.update(change)
    (folder / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        load_recipe(folder)


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="bookworm"):
        load_recipe("no-such-recipe")


def test_missing_init_is_named(tmp_path: Path) -> None:
    folder = _copy_recipe(tmp_path)
    (folder / "init").unlink()
    with pytest.raises(ConfigError, match="'init'"):
        load_recipe(folder)


def _module(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF\0junk\0depends=" + depends.encode() + b"\0vermagic=6.1\0")


def test_modules_resolve_dependencies_first(tmp_path: Path) -> None:
    k = tmp_path / "kernel"
    _module(k / "drivers/virtio/virtio.ko", "virtio_ring")
    _module(k / "drivers/virtio/virtio_ring.ko", "")
    _module(k / "drivers/block/virtio_blk.ko", "virtio,virtio_ring")
    _module(k / "drivers/net/virtio_net.ko", "net_failover,virtio")
    _module(k / "drivers/net/net_failover.ko", "failover")
    _module(k / "net/core/failover.ko", "")
    (tmp_path / "modules.builtin").write_text("kernel/drivers/char/virtio_console.ko\n")
    order = [
        p.name for p in resolve_modules(tmp_path, ("virtio_blk", "virtio_net", "virtio_console"))
    ]
    assert order == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_blk.ko",
        "failover.ko",
        "net_failover.ko",
        "virtio_net.ko",
    ]


def test_missing_module_is_an_error(tmp_path: Path) -> None:
    _module(tmp_path / "kernel/a.ko", "b")
    with pytest.raises(ImageError, match=r"'b' .*needed by a"):
        resolve_modules(tmp_path, ("a",))


def test_module_dependency_loop_is_an_error(tmp_path: Path) -> None:
    _module(tmp_path / "kernel/a.ko", "b")
    _module(tmp_path / "kernel/b.ko", "a")
    with pytest.raises(ImageError, match="loop"):
        resolve_modules(tmp_path, ("a",))


def test_payload_carries_guest_code_and_bytecode() -> None:
    blob = payload.build_payload({"ca.pem": b"PEM"})
    for needle in (
        b"gondolin/init.sh",
        b"gondolin/py/pytest_gondolin/guest/agent.py",
        b"gondolin/py/gondolin.py",
        b"gondolin/ca.pem",
    ):
        assert needle in blob
    # Host-only modules never go into the guest (the exact set: test_guest_boundary.py).
    for forbidden in (
        b"pytest_gondolin/vm/machine.py",
        b"netpolicy/driver.py",
        b"netpolicy/http/ca.py",
        b"netpolicy/http/recorder.py",
        b"pytest_gondolin/config.py",
        b"pytest_gondolin/errors.py",
    ):
        assert forbidden not in blob


def test_combined_initrd_is_cached_by_content(tmp_path: Path) -> None:
    base = tmp_path / "initrd.img"
    base.write_bytes(b"BASE")
    first = payload.combined_initrd(base, b"P1", tmp_path / "cache")
    assert first.read_bytes() == b"BASEP1"
    assert payload.combined_initrd(base, b"P1", tmp_path / "cache") == first
    assert payload.combined_initrd(base, b"P2", tmp_path / "cache") != first
