"""The host environment's file-system image (sandbox/environment_image.py), without a VM.

The images are built with the real ``mkfs.ext4`` and read back with the real
``debugfs``: what the guest would mount is checked file by file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_gondolin.errors import GondolinError
from pytest_gondolin.sandbox import environment_image, host_environment
from pytest_gondolin.sandbox.environment_image import (
    MAX_IMAGES,
    EnvironmentImage,
    image_layer,
    image_roots,
    mount_command,
    prepare,
)
from pytest_gondolin.vm.layers import Layer, layer_config, tar_layer
from pytest_gondolin.vm.qemu import ENV_SLOT_BYTES, ENV_SLOT_SERIAL, MachineSpec, command_line
from tests.fake_distributions import install_distribution

SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
needs_e2fsprogs = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path=SBIN) is None or shutil.which("debugfs", path=SBIN) is None,
    reason="e2fsprogs (mkfs.ext4, debugfs) not installed",
)


def _scan(tmp_path: Path, site: Path) -> host_environment.HostEnvironment:
    return host_environment.scan(
        tmp_path / "project", sys_path=[str(site)], site_folders=frozenset({str(site)})
    )


def _built(env: host_environment.HostEnvironment, cache: Path) -> EnvironmentImage:
    """The image of ``env``, built if it is new (as the layer's prepare thread does)."""
    image = prepare(env, cache)
    assert image is not None
    if image.build is not None:
        image.build()
    return image


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "venv" / "site-packages"
    site.mkdir(parents=True)
    install_distribution(
        site, "demo", {"demo/__init__.py": "VALUE = 'one'\n", "demo/data.txt": "x" * 5000}
    )
    install_distribution(site, "other", {"other.py": "Y = 2\n"})
    (site / "extra.pth").write_text("/nowhere\n")
    return site


def _debugfs(image: Path, request: str, *, check: bool = True) -> str:
    """What ``debugfs -R request`` prints (stdout, and stderr with ``check=False``)."""
    debugfs = shutil.which("debugfs", path=SBIN)
    assert debugfs is not None
    done = subprocess.run(
        [debugfs, "-R", request, str(image)], capture_output=True, text=True, check=check
    )
    return done.stdout if check else done.stdout + done.stderr


@needs_e2fsprogs
def test_the_image_holds_every_carried_file_at_its_host_path_with_its_mtime(
    tmp_path: Path, site: Path
) -> None:
    (site / "stray.txt").write_text("not listed\n")
    image = _built(_scan(tmp_path, site), tmp_path / "cache")
    assert image.roots == (str(site),)
    assert image.path.stat().st_size == ENV_SLOT_BYTES  # the slot's capacity, sparse
    assert image.path.stat().st_blocks * 512 < 64 * 2**20
    source = site / "demo" / "__init__.py"
    assert _debugfs(image.path, f"cat {source}") == "VALUE = 'one'\n"
    assert _debugfs(image.path, f"cat {site}/extra.pth") == "/nowhere\n"  # a loose .pth
    assert _debugfs(image.path, f"cat {site}/demo-1.0.dist-info/METADATA").startswith("Metadata")
    stat = _debugfs(image.path, f"stat {source}")
    assert f"mtime: 0x{int(source.stat().st_mtime):08x}" in stat, stat  # the host's .pyc stay valid
    # A file no RECORD lists is not carried.
    assert "File not found" in _debugfs(image.path, f"stat {site}/stray.txt", check=False)


@needs_e2fsprogs
def test_an_unchanged_environment_reuses_its_image(tmp_path: Path, site: Path) -> None:
    first = _built(_scan(tmp_path, site), tmp_path / "cache")
    second = prepare(_scan(tmp_path, site), tmp_path / "cache")
    assert second == first
    assert second.build is None  # nothing to build


@needs_e2fsprogs
def test_a_changed_distribution_makes_a_new_image_and_key(tmp_path: Path, site: Path) -> None:
    first = _built(_scan(tmp_path, site), tmp_path / "cache")
    (site / "demo" / "__init__.py").write_text("VALUE = 'two, longer'\n")
    second = _built(_scan(tmp_path, site), tmp_path / "cache")
    assert second.path != first.path and second.key != first.key
    assert _debugfs(second.path, f"cat {site}/demo/__init__.py") == "VALUE = 'two, longer'\n"
    # Their layers differ, so no snapshot of the first is loaded for the second.
    assert image_layer("e", first, []).key != image_layer("e", second, []).key


@needs_e2fsprogs
@pytest.mark.parametrize("damage", ["touched", "rewritten", "removed", "side file garbled"])
def test_an_image_changed_or_missing_is_rebuilt_under_a_new_id(
    tmp_path: Path, site: Path, damage: str
) -> None:
    env = _scan(tmp_path, site)
    first = _built(env, tmp_path / "cache")
    if damage == "touched":
        os.utime(first.path, ns=(1, 1))
    elif damage == "rewritten":
        with first.path.open("r+b") as f:
            f.write(b"\0" * 4096)
    elif damage == "removed":
        first.path.unlink()
    else:
        (first.path.parent / f"{first.key.split('-')[0]}.json").write_text("{not json")
    second = _built(env, tmp_path / "cache")
    # The same content under a new id: no snapshot of the old one matches.
    assert second.key.split("-")[0] == first.key.split("-")[0]
    assert second.key != first.key and second.path != first.path
    assert _debugfs(second.path, f"cat {site}/demo/__init__.py") == "VALUE = 'one'\n"


@needs_e2fsprogs
def test_nothing_half_written_is_left_and_old_images_are_evicted(
    tmp_path: Path, site: Path
) -> None:
    cache = tmp_path / "cache"
    folder = cache / "images"
    made = []
    for n in range(MAX_IMAGES + 2):
        (site / "other.py").write_text(f"Y = {n}\n")
        image = _built(_scan(tmp_path, site), cache)
        made.append(image)
        os.utime(folder / f"{image.key.split('-')[0]}.json", (n, n))  # a clear order of last use
    # A build that never finished (a crash): no side file names it; kept while recent.
    (site / "other.py").write_text("Y = 'crashed'\n")
    crashed = prepare(_scan(tmp_path, site), cache)
    assert crashed is not None and crashed.build is not None
    (site / "other.py").write_text("Y = 'last'\n")
    last = _built(_scan(tmp_path, site), cache)
    left = {p.name for p in folder.iterdir() if not p.name.endswith(".lock")}
    assert not [n for n in left if n.startswith(".")], left  # no stage folder, no temp file
    sides = {n for n in left if n.endswith(".json")}
    assert len(sides) == MAX_IMAGES, left
    assert f"{made[0].key.split('-')[0]}.json" not in sides and made[0].path.name not in left
    assert last.path.name in left and made[-1].path.name in left
    assert crashed.path.name in left  # recent: a running session may use it
    for side in sides:
        data = json.loads((folder / side).read_text())
        assert f"{side[:-5]}-{data['id']}.img" in left  # every side file names an image there
    # Old enough, the leftover goes.
    os.utime(crashed.path, (1, 1))
    (site / "other.py").write_text("Y = 'after'\n")
    _built(_scan(tmp_path, site), cache)
    assert not crashed.path.exists()


def test_a_failed_build_raises_once_and_again(tmp_path: Path, site: Path) -> None:
    """mkfs fails (here: the image's folder vanished): the error names the image, every call."""
    image = prepare(_scan(tmp_path, site), tmp_path / "cache")
    assert image is not None and image.build is not None
    shutil.rmtree(image.path.parent)
    with pytest.raises(GondolinError, match=str(image.path.parent)):
        image.build()
    with pytest.raises(GondolinError, match=str(image.path.parent)):
        image.build()


def test_without_mkfs_there_is_no_image(
    tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host without e2fsprogs: the caller unpacks the tar layer instead."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(environment_image, "_SBIN", str(tmp_path / "empty"))
    assert prepare(_scan(tmp_path, site), tmp_path / "cache") is None


@pytest.mark.parametrize(
    ("entries", "files", "expected"),
    [
        (["/v/lib/site"], ["/v/lib/site/a.py", "/v/lib/site/p/b.py"], ("/v/lib/site",)),
        (["/v/lib/site", "/v/lib/site/inner"], ["/v/lib/site/inner/a.py"], ("/v/lib/site",)),
        (["/v/site", "/w/site"], ["/v/site/a.py", "/w/site/b.py"], ("/v/site", "/w/site")),
        (["/v/site"], ["/v/site/a.py", "/elsewhere/x/c.py"], ("/elsewhere/x", "/v/site")),
        (["/v/site"], [], ()),
        (["/v/site"], ["/v/x/a.py", "/v/x/b/c.py", "/v/site/d.py"], ("/v/site", "/v/x")),
        (["/v/x/site"], ["/v/x/a.py", "/v/x/site/b.py", "/v/x/site/c.py"], ("/v/x",)),
        (["/v/s", "/v/site"], ["/v/site/a.py", "/v/s/b.py", "/v/site/c.py"], ("/v/s", "/v/site")),
        (["/v/si:te"], ["/v/si:te/a.py"], None),  # ':' separates overlay lower folders
        (["/v/si,te"], ["/v/si,te/a.py"], None),  # ',' separates mount options
        (["/site"], ["/site/a.py"], None),  # a top-level folder: not overlaid
        (["/etc/py"], ["/etc/py/a.py"], None),  # the guest's own system
        (["/var/lib/gondolin/x"], ["/var/lib/gondolin/x/a.py"], None),
    ],
)
def test_image_roots(
    entries: list[str], files: list[str], expected: tuple[str, ...] | None
) -> None:
    env = host_environment.HostEnvironment(
        tuple(host_environment.PathEntry("site", e) for e in entries),
        (host_environment.CarriedDistribution("d", "1", tuple(files), 1, "k"),),
        (),
        (),
        (),
    )
    assert image_roots(env) == expected


def test_the_mount_command_finds_the_slot_forgets_its_zeros_then_mounts() -> None:
    command = mount_command(["/work/venv/site", "/tmp/proj/venv/site"])
    assert f"= {ENV_SLOT_SERIAL} ]" in command
    lines = command.splitlines()
    assert lines[0] == "set -e"
    drop = lines.index("echo 3 > /proc/sys/vm/drop_caches")
    ext4 = next(i for i, line in enumerate(lines) if "mount -t ext4 -o ro,noload" in line)
    assert drop < ext4  # the zeros read at boot are gone before the superblock is read
    # A root under the guest's tmpfs: its top folder is bound to the disk first.
    bind = next(i for i, line in enumerate(lines) if "mount --bind" in line)
    assert "'/tmp/proj'" in lines[bind] or " /tmp/proj" in lines[bind]
    assert bind < ext4
    overlays = [line for line in lines if "mount -t overlay" in line]
    assert [line.rsplit(" ", 1)[1] for line in overlays] == [
        "/work/venv/site",
        "/tmp/proj/venv/site",
    ]


def test_layer_config_puts_the_drive_in_the_slot(tmp_path: Path) -> None:
    from pytest_gondolin.image.store import Image
    from pytest_gondolin.vm.identity import VMConfig

    config = VMConfig(image=Image(tmp_path, {"build_id": "b", "name": "i"}))
    plain = tar_layer("p", [])
    drive = tmp_path / "env.img"
    mounted = Layer("e", "k", lambda vm: None, drive=drive)
    assert layer_config(config, [plain]) is config
    assert layer_config(config, [plain, mounted]).environment_image == drive
    assert layer_config(layer_config(config, [mounted]), [plain]).environment_image is None
    with pytest.raises(ValueError, match="one slot"):
        layer_config(config, [mounted, Layer("f", "k2", lambda vm: None, drive=drive)])


def _spec(image: Path | None) -> MachineSpec:
    r = Path("/r")
    return MachineSpec("q", "tcg", r / "k", r / "i", r / "d", r, environment_image=image)


def test_every_vm_has_the_environment_slot_read_only() -> None:
    empty = command_line(_spec(None))
    index = empty.index("-blockdev")
    assert empty[index + 1].startswith("driver=null-co,node-name=envslot,")
    assert "read-only=on" in empty[index + 1] and f"size={ENV_SLOT_BYTES}" in empty[index + 1]
    full = command_line(_spec(Path("/c/env.img")))
    blockdev = full[full.index("-blockdev") + 1]
    assert "file.filename=/c/env.img" in blockdev and "read-only=on" in blockdev
    # The same device, at the same address, either way: a snapshot of one loads in the other.
    assert [a for a in empty if "envslot" in a and a.startswith("virtio")] == [
        a for a in full if "envslot" in a and a.startswith("virtio")
    ]
    with pytest.raises(ValueError, match="comma"):
        command_line(_spec(Path("/c/a,b.img")))
