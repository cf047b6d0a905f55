"""Layer naming and keys, system-package options and apt errors, environment layer items (no VM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_gondolin.config import parse_system_packages
from pytest_gondolin.errors import ConfigError, ImageError
from pytest_gondolin.image.store import Image
from pytest_gondolin.image.system_packages import apt_error, archive_hosts, system_packages_layer
from pytest_gondolin.sandbox import host_environment as he
from pytest_gondolin.vm.layers import Layer, TarItem, stack_digest, tar_layer
from pytest_gondolin.vm.snapshot_paths import (
    layered_snapshot_path,
    layered_snapshots_of,
    snapshots_dir,
    warm_snapshot_path,
)


def _noop(vm: object) -> None:
    pass


def _layer(name: str, key: str) -> Layer:
    return Layer(name, key, _noop)


# -- option -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("", ()),
        ("less,git", ("git", "less")),
        ("less, git  git", ("git", "less")),
        ("less\ngit", ("git", "less")),
        (["less", "git,curl"], ("curl", "git", "less")),
        ("libstdc++6 python3.11-venv", ("libstdc++6", "python3.11-venv")),
    ],
)
def test_system_packages_forms(value: object, expected: tuple[str, ...]) -> None:
    assert parse_system_packages(value, "ini gondolin_system_packages") == expected


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        ("less,-oAPT::Get=1", "-oAPT::Get=1"),
        ("Less", "Less"),
        ("less;rm", "less;rm"),
        ("a", "a"),
        ("git $(reboot)", "$(reboot)"),
    ],
)
def test_bad_system_package_names_the_value_and_source(value: str, bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_system_packages(value, "--gondolin-system-packages")
    assert str(info.value) == f"--gondolin-system-packages: {bad!r} is not a Debian package name"


def test_system_packages_reject_other_types() -> None:
    with pytest.raises(ConfigError, match=r"\$GONDOLIN_SYSTEM_PACKAGES: .*got 3"):
        parse_system_packages(3, "$GONDOLIN_SYSTEM_PACKAGES")


def test_system_packages_precedence_ini_env_cli(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_gondolin.config import load_settings

    pytester.makeini("[pytest]\ngondolin_system_packages = less\n")
    monkeypatch.delenv("GONDOLIN_SYSTEM_PACKAGES", raising=False)
    assert load_settings(pytester.parseconfig()).system_packages == ("less",)
    monkeypatch.setenv("GONDOLIN_SYSTEM_PACKAGES", "git,curl")
    assert load_settings(pytester.parseconfig()).system_packages == ("curl", "git")
    config = pytester.parseconfig("--gondolin-system-packages=file")
    assert load_settings(config).system_packages == ("file",)


def test_host_environment_is_on_by_default_and_can_be_turned_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_gondolin.config import load_settings

    monkeypatch.delenv("GONDOLIN_HOST_ENVIRONMENT", raising=False)
    assert load_settings(pytester.parseconfig()).host_environment is True
    pytester.makeini("[pytest]\ngondolin_host_environment = off\n")
    assert load_settings(pytester.parseconfig()).host_environment is False
    monkeypatch.setenv("GONDOLIN_HOST_ENVIRONMENT", "on")
    assert load_settings(pytester.parseconfig()).host_environment is True
    config = pytester.parseconfig("--gondolin-host-environment=off")
    assert load_settings(config).host_environment is False


# -- apt ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sources", "hosts"),
    [
        ("deb http://deb.debian.org/debian bookworm main\n", ["deb.debian.org"]),
        (
            "# deb http://commented.example/debian bookworm main\n"
            "deb [signed-by=/k.gpg] https://mirror.example:8443/debian bookworm main\n"
            "deb-src http://deb.debian.org/debian bookworm main\n",
            ["mirror.example:8443", "deb.debian.org"],
        ),
        (
            "Types: deb\nURIs: http://a.example/debian http://b.example/d\n",
            ["a.example", "b.example"],
        ),
        ("deb file:///srv/mirror bookworm main\ndeb cdrom:[x]/ bookworm main\n", []),
        ("garbage \x00 line\n" * 3, []),
    ],
)
def test_archive_hosts(sources: str, hosts: list[str]) -> None:
    assert archive_hosts(sources) == hosts


def test_an_unknown_package_is_a_config_error_naming_it() -> None:
    output = (
        "Reading package lists...\nBuilding dependency tree...\n"
        "E: Unable to locate package no-such-thing\n"
    )
    error = apt_error(output, 100, ["less", "no-such-thing"], "apt-get install", "bookworm")
    assert isinstance(error, ConfigError)
    assert "'no-such-thing'" in str(error) and "E: Unable to locate package" in str(error)


def test_a_package_without_candidate_is_a_config_error() -> None:
    output = "E: Package 'python2' has no installation candidate\n"
    error = apt_error(output, 100, ["python2"], "apt-get install", "bookworm")
    assert isinstance(error, ConfigError) and "'python2'" in str(error)


def test_a_failing_post_install_script_is_one_image_error_with_the_tail() -> None:
    output = "x\n" * 1000 + (
        "Setting up broken (1.0) ...\n"
        "dpkg: error processing package broken (--configure):\n"
        " installed broken package post-installation script subprocess returned error exit status 1\n"
        "E: Sub-process /usr/bin/dpkg returned an error code (1)\n"
    )
    error = apt_error(output, 100, ["broken"], "apt-get install", "bookworm")
    assert isinstance(error, ImageError)
    message = str(error)
    assert "post-installation script" in message and "nothing was cached" in message
    assert message.count("\n") <= 26  # the tail, not all of apt's output


def test_system_packages_layer_key_is_the_image_and_the_sorted_set(tmp_path: Path) -> None:
    image = Image(tmp_path, {"build_id": "b1", "name": "bookworm"})
    other = Image(tmp_path, {"build_id": "b2", "name": "bookworm"})
    a = system_packages_layer(image, ["less", "git"])
    assert a.key == system_packages_layer(image, ["git", "less", "git"]).key
    assert a.key != system_packages_layer(image, ["less"]).key
    assert a.key != system_packages_layer(other, ["less", "git"]).key
    assert a.name == "system-packages"


# -- stacks and their files -------------------------------------------------------


def test_stack_digest_covers_order_names_keys_and_base() -> None:
    a, b = _layer("a", "1"), _layer("b", "2")
    digests = {
        stack_digest("base", [a, b]),
        stack_digest("base", [b, a]),
        stack_digest("base", [a]),
        stack_digest("other", [a, b]),
        stack_digest("base", [_layer("x", "1"), b]),
        stack_digest("base", [_layer("a", "9"), b]),
    }
    assert len(digests) == 6
    assert stack_digest("base", [a, b]) == stack_digest("base", [_layer("a", "1"), b])


def test_layered_snapshot_files_carry_both_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path))
    path = layered_snapshot_path("k" * 24, "d" * 24)
    assert path == snapshots_dir() / f"{'k' * 24}+{'d' * 24}.qcow2"
    assert layered_snapshots_of("k" * 24) == []
    snapshots_dir().mkdir()
    path.touch()
    warm_snapshot_path("k" * 24).touch()
    layered_snapshot_path("o" * 24, "d" * 24).touch()
    assert layered_snapshots_of("k" * 24) == [path]


def test_tar_layer_key_follows_its_items() -> None:

    def item(key: str) -> TarItem:
        return TarItem(key, lambda: b"")

    one = tar_layer("env", [item("a"), item("b")])
    assert one.key == tar_layer("env", [item("a"), item("b")]).key
    assert one.key != tar_layer("env", [item("a"), item("c")]).key
    assert one.key != tar_layer("env", [item("b"), item("a")]).key


# -- the environment's items ------------------------------------------------------


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages"
    (site / "demo").mkdir(parents=True)
    (site / "demo" / "__init__.py").write_text("X = 1\n")
    info = site / "demo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    (info / "RECORD").write_text("demo/__init__.py,,\ndemo-1.0.dist-info/METADATA,,\n")
    (site / "extra.pth").write_text(str(tmp_path / "elsewhere") + "\n")
    return site


def _items(tmp_path: Path, site: Path) -> list[TarItem]:
    env = he.scan(tmp_path / "project", sys_path=[str(site)], site_folders=frozenset({str(site)}))
    return he.layer_items(env, tmp_path / "packs")


def test_environment_items_change_only_with_their_content(tmp_path: Path) -> None:
    site = _site(tmp_path)
    first = [i.key for i in _items(tmp_path, site)]
    assert len(first) == 2 and first[0].startswith("pth:") and first[1].startswith("dist:")
    assert [i.key for i in _items(tmp_path, site)] == first
    module = site / "demo" / "__init__.py"
    module.write_text("X = 2\n")
    os.utime(module, ns=(1, 1))
    changed = [i.key for i in _items(tmp_path, site)]
    assert changed[0] == first[0] and changed[1] != first[1]


def test_environment_items_pack_their_files_at_host_paths(tmp_path: Path) -> None:
    import io
    import tarfile

    site = _site(tmp_path)
    data = b"".join(item.pack() for item in _items(tmp_path, site))
    names: list[str] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", ignore_zeros=True) as tar:
        names = tar.getnames()
    assert str(site / "demo" / "__init__.py").lstrip("/") in names
    assert str(site / "extra.pth").lstrip("/") in names


def _qcow2_with_backing(path: Path, backing: str) -> None:
    import struct

    name = backing.encode()
    header = struct.pack(">4sIQI", b"QFI\xfb", 3, 512, len(name))
    path.write_bytes(header + b"\0" * (512 - len(header)) + name)


def test_image_info_lists_layered_snapshots_with_the_warm_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_gondolin.image.info import warm_snapshots

    monkeypatch.setenv("GONDOLIN_CACHE_DIR", str(tmp_path))
    snapshots_dir().mkdir()
    rootfs = str(tmp_path / "images" / "bookworm-abc" / "rootfs.qcow2")
    _qcow2_with_backing(warm_snapshot_path("k" * 24), rootfs)
    _qcow2_with_backing(layered_snapshot_path("k" * 24, "d" * 24), rootfs)
    _qcow2_with_backing(layered_snapshot_path("o" * 24, "d" * 24), "/elsewhere/rootfs.qcow2")
    found = {p.name for p in warm_snapshots("bookworm-abc")}
    assert found == {f"{'k' * 24}.qcow2", f"{'k' * 24}+{'d' * 24}.qcow2"}
