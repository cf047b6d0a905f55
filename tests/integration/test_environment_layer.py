"""The host's environment reaches the guest as a cached layer (issue 12, item 2), on by default.

The inner sessions run under a venv made here (``python -m venv
--without-pip``) whose site-packages is a symlink to another folder, with
the outer environment reached through a ``.pth`` line (pytest and the
plugin's dependencies), an installed distribution ``demo``, a distribution
whose dist-info has no RECORD, and a ``.pth`` whose import line fails —
bad input from the issue, each of which must leave the run going.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

import pytest_gondolin
from pytest_gondolin import paths
from pytest_gondolin.errors import GondolinError
from pytest_gondolin.sandbox import environment_image, host_environment
from pytest_gondolin.vm.identity import VMConfig
from pytest_gondolin.vm.layers import Layer, TarItem, launch_layered, tar_layer
from pytest_gondolin.vm.machine import VM
from tests.fake_distributions import install_distribution
from tests.integration.test_layers import config, real_cache
from tests.plugin.test_sandboxed import INNER_TIMEOUT, _inner_env_changes

__all__ = ["config", "real_cache"]  # fixtures: a private cache seeded with the warm snapshot

BUILDING = "building layer host-environment"

_TESTS = """
import importlib.metadata as md
from pathlib import Path

import pytest


@pytest.mark.sandboxed
def test_the_environment_is_the_hosts():
    import demo

    assert demo.VALUE == Path("expected.txt").read_text().strip()
    assert md.version("demo") == "1.0"
    assert md.version("norecord") == "0.1"  # its metadata, though it has no RECORD
    # Mounted from the host-built image (sandbox/environment_image.py), not unpacked.
    with open("/proc/mounts") as mounts:
        overlays = [f[1] for f in map(str.split, mounts) if f[0] == "gondolin-env"]
    assert any(demo.__file__.startswith(root + "/") for root in overlays), overlays
"""


@pytest.fixture
def project(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pytest.Pytester, Path, Path]:
    """The inner project, its venv's python and the venv's (real) site folder."""
    for name, value in _inner_env_changes(paths.cache_dir()).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("PYTHONPATH", str(Path(pytest_gondolin.__file__).parent.parent))
    base = tmp_path_factory.mktemp("envlayer")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    link = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site = base / "real-site-packages"
    link.rename(site)
    link.symlink_to(site, target_is_directory=True)
    (site / "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "broken.pth").write_text("import no_such_module_gondolin_test\n")
    install_distribution(site, "demo", {"demo/__init__.py": "VALUE = 'one'\n"}, version="1.0")
    install_distribution(site, "norecord", {"norecord.py": "X = 1\n"}, version="0.1", record=False)
    pytester.makepyfile(test_env=textwrap.dedent(_TESTS))
    (pytester.path / "expected.txt").write_text("one\n")
    return pytester, venv / "bin" / "python", site


def _run(pytester: pytest.Pytester, python: Path) -> pytest.RunResult:
    return pytester.run(
        str(python), "-m", "pytest", "-p", "no:cacheprovider", "-v", timeout=INNER_TIMEOUT
    )


def test_the_layer_is_reused_and_rebuilt_when_a_distribution_changes(
    project: tuple[pytest.Pytester, Path, Path],
) -> None:
    pytester, python, site = project
    first = _run(pytester, python)  # no option: the environment is carried by default
    first.assert_outcomes(passed=1)
    assert BUILDING in first.stdout.str()

    second = _run(pytester, python)
    second.assert_outcomes(passed=1)
    out = second.stdout.str()
    assert BUILDING not in out, out
    # Nothing changed: the whole collected worker is reused (sandbox/worker_cache.py).
    assert re.search(r"restored the cached collected worker \(1 items\)", out), out

    (site / "demo" / "__init__.py").write_text("VALUE = 'two'\n")
    (pytester.path / "expected.txt").write_text("two\n")
    third = _run(pytester, python)
    third.assert_outcomes(passed=1)
    assert BUILDING in third.stdout.str()


def test_turned_off_the_guest_lacks_the_environment(
    project: tuple[pytest.Pytester, Path, Path],
) -> None:
    """Negative control: the same test fails without the carry-over."""
    pytester, python, _ = project
    result = pytester.run(
        str(python),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--gondolin-host-environment=off",
        timeout=INNER_TIMEOUT,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*No module named 'demo'*"])


def test_a_tar_layer_is_packed_while_its_vm_starts_and_kept_on_disk(
    config: VMConfig,
) -> None:
    """The items are packed on the prepare thread (not after the VM is up), sent in order,
    and a tree under the guest's tmpfs lands on its disk: it is in the cached layer."""
    packed: list[str] = []

    def item(path: str, text: str) -> TarItem:
        def pack() -> bytes:
            packed.append(threading.current_thread().name)
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as out:
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size = len(text)
                out.addfile(info, io.BytesIO(text.encode()))
            return buf.getvalue()

        return TarItem(f"{path}:{uuid.uuid4().hex}", pack)

    items = [item("/opt/envlayer/a.txt", "a"), item("/var/tmp/envtree/b.txt", "b")]
    launch_layered(config, [tar_layer("host-environment", items)], name="prefetched").close()
    assert packed == ["layer-prepare", "layer-prepare"]
    packed.clear()
    vm = launch_layered(config, [tar_layer("host-environment", items)], name="from-cache")
    try:
        assert packed == [], "a cached layer packs nothing, not even ahead"
        assert vm.read_file("/opt/envlayer/a.txt") == b"a"
        assert vm.read_file("/var/tmp/envtree/b.txt") == b"b"
        mounts = vm.exec(["awk", "{print $5}", "/proc/self/mountinfo"], check=True).stdout
        assert "/var/tmp/envtree" in mounts.split(), mounts
        assert vm.exec("ls /var/tmp").stdout.split() == ["envtree"], "the pieces were removed"
    finally:
        vm.close()


def test_an_image_layer_mounts_the_environment_writable_at_host_paths_and_is_never_stale(
    config: VMConfig, tmp_path: Path
) -> None:
    """The host-built image (sandbox/environment_image.py), mounted by a cached layer:
    the host's paths, mtimes and metadata; writable; reused while nothing changed;
    a changed distribution, or the image changed in place, builds the layer again."""
    # Under /tmp: in the guest a tmpfs folder, bound to its disk before the overlay.
    site = tmp_path / "venv" / "site-packages"
    site.mkdir(parents=True)
    install_distribution(site, "demo", {"demo/__init__.py": "VALUE = 'one'\n"}, version="1.0")
    source = site / "demo" / "__init__.py"

    def layer() -> Layer:
        env = host_environment.scan(
            tmp_path / "project", sys_path=[str(site)], site_folders=frozenset({str(site)})
        )
        image = environment_image.prepare(env, paths.cache_dir() / "host-environment")
        assert image is not None, "mkfs.ext4 is on every Debian host"
        return environment_image.image_layer("host-environment", image, [])

    def start(layer: Layer) -> tuple[VM, list[str]]:
        said: list[str] = []
        return launch_layered(config, [layer], name="image", progress=said.append), said

    probe = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import demo, importlib.metadata as md;"
        " print(demo.VALUE, md.version('demo'), int(os.stat(demo.__file__).st_mtime), demo.__file__)"
    )
    first = layer()
    vm, said = start(first)
    try:
        assert any(BUILDING in line for line in said), said
        out = vm.exec(["python3", "-c", probe, str(site)], check=True).stdout.split()
        assert out == ["one", "1.0", str(int(source.stat().st_mtime)), str(source)]
        vm.write_file(f"{site}/demo/written.txt", b"w")  # writable, as on the host
        assert vm.read_file(f"{site}/demo/written.txt") == b"w"
        mounts = vm.exec(["cat", "/proc/mounts"], check=True).stdout
        assert f"gondolin-env {site} overlay " in mounts, mounts
    finally:
        vm.close()

    vm, said = start(layer())
    try:
        assert not any(BUILDING in line for line in said), said  # nothing changed: cached
        assert vm.read_file(str(source)) == b"VALUE = 'one'\n"
    finally:
        vm.close()

    source.write_text("VALUE = 'two'\n")
    changed = layer()
    assert changed.key != first.key and changed.drive != first.drive
    vm, said = start(changed)
    try:
        assert any(BUILDING in line for line in said), said
        assert vm.read_file(str(source)) == b"VALUE = 'two'\n"  # never the stale layer
    finally:
        vm.close()

    # The image changed in place after a snapshot was saved with it: that
    # snapshot is never loaded with it (its guest holds the old file system's state).
    assert changed.drive is not None
    with changed.drive.open("r+b") as image:
        image.seek(1024)
        image.write(b"\0" * 1024)  # the superblock
    rebuilt = layer()
    assert rebuilt.key != changed.key and rebuilt.drive != changed.drive
    vm, said = start(rebuilt)
    try:
        assert any(BUILDING in line for line in said), said
        assert vm.read_file(str(source)) == b"VALUE = 'two'\n"
    finally:
        vm.close()


def test_an_image_that_fails_to_build_falls_back_to_unpacking(
    config: VMConfig, tmp_path: Path
) -> None:
    """mkfs failing (faked: it does not fail on its own here) costs time, not the run."""
    site = tmp_path / "venv" / "site-packages"
    site.mkdir(parents=True)
    install_distribution(site, "demo", {"demo/__init__.py": "VALUE = 'one'\n"}, version="1.0")
    env = host_environment.scan(
        tmp_path / "project", sys_path=[str(site)], site_folders=frozenset({str(site)})
    )
    cache = paths.cache_dir() / "host-environment"
    image = environment_image.prepare(env, cache)
    assert image is not None and image.build is not None

    def fails() -> None:
        raise GondolinError("mkfs.ext4 exited 1 (faked)")

    layer = environment_image.image_layer(
        "host-environment",
        dataclasses.replace(image, build=fails),
        [],
        fallback=host_environment.layer_items(env, cache / "packs"),
    )
    vm = launch_layered(config, [layer], name="fallback")
    try:
        assert vm.read_file(str(site / "demo" / "__init__.py")) == b"VALUE = 'one'\n"
        mounts = vm.exec(["cat", "/proc/mounts"], check=True).stdout
        assert "gondolin-env" not in mounts, mounts  # unpacked, not mounted
    finally:
        vm.close()
    # Nothing names that image: the next session builds a new one, never this layer's.
    again = environment_image.prepare(env, cache)
    assert again is not None and again.key != image.key


def test_an_image_over_a_folder_the_guest_already_has_keeps_the_guests_files(
    config: VMConfig, tmp_path: Path
) -> None:
    """A root the guest has files in (a Debian host's dist-packages, say): both are seen."""
    site = tmp_path / "site-packages"
    site.mkdir()
    install_distribution(site, "demo", {"demo/__init__.py": "VALUE = 'host'\n"}, version="1.0")
    env = host_environment.scan(
        tmp_path / "project", sys_path=[str(site)], site_folders=frozenset({str(site)})
    )
    image = environment_image.prepare(env, paths.cache_dir() / "host-environment")
    assert image is not None
    guest_own = Layer(
        "guest-own",
        uuid.uuid4().hex,
        lambda vm: vm.write_file(f"{site}/guestpkg/own.txt", b"guest"),
    )
    layers = [guest_own, environment_image.image_layer("host-environment", image, [])]
    vm = launch_layered(config, layers, name="under-image")
    try:
        assert vm.read_file(f"{site}/guestpkg/own.txt") == b"guest"
        assert vm.read_file(f"{site}/demo/__init__.py") == b"VALUE = 'host'\n"
        mounts = vm.exec(["cat", "/proc/mounts"], check=True).stdout
        assert f"lowerdir=/var/lib/gondolin/env/image{site}:{site}," in mounts, mounts
    finally:
        vm.close()


_LAUNCHER = """
import os, pickle, sys, time
from pathlib import Path
from pytest_gondolin import paths
from pytest_gondolin.sandbox import environment_image, host_environment
from pytest_gondolin.vm.layers import launch_layered

config_file, site, go, project = sys.argv[1:5]
config = pickle.loads(Path(config_file).read_bytes())
while not Path(go).exists():
    time.sleep(0.01)
env = host_environment.scan(Path(project), sys_path=[site], site_folders=frozenset({site}))
image = environment_image.prepare(env, paths.cache_dir() / "host-environment")
print("image", image.key, flush=True)
# Both processes have their image before either builds it (bounded: a minute).
Path(go).with_name(f"prepared-{os.getpid()}").touch()
for _ in range(1200):
    if len(list(Path(go).parent.glob("prepared-*"))) >= 2:
        break
    time.sleep(0.05)
layer = environment_image.image_layer("host-environment", image, [])
vm = launch_layered(config, [layer], name=sys.argv[5], progress=lambda line: print(line, flush=True))
try:
    print("demo", vm.exec(["python3", "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                           " import demo; print(demo.VALUE)", site], check=True).stdout, flush=True)
finally:
    vm.close()
"""


def test_two_processes_needing_one_new_image_build_it_and_its_layer_once(
    config: VMConfig, tmp_path: Path
) -> None:
    """The first run of ``-n 2``: both workers need the same new image at once. One builds
    the image and saves the layer; the other waits and restores that layer (same key)."""
    site = tmp_path / "venv" / "site-packages"
    site.mkdir(parents=True)
    install_distribution(site, "demo", {"demo/__init__.py": "VALUE = 'both'\n"}, version="1.0")
    (tmp_path / "config.pickle").write_bytes(pickle.dumps(config))
    (tmp_path / "launcher.py").write_text(_LAUNCHER)
    argv = [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "config.pickle")]
    argv += [str(site), str(tmp_path / "go"), str(tmp_path / "project")]
    procs = [
        subprocess.Popen([*argv, f"worker{n}"], stdout=subprocess.PIPE, text=True) for n in range(2)
    ]
    try:
        (tmp_path / "go").touch()
        outs = [proc.communicate(timeout=INNER_TIMEOUT)[0] for proc in procs]
    finally:
        for proc in procs:  # their QEMU dies with them (parent-death signal)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], outs
    keys = {line for out in outs for line in out.splitlines() if line.startswith("image ")}
    assert len(keys) == 1, outs  # one image, so one layer key
    assert all("demo both" in out for out in outs), outs
    built = [out for out in outs if BUILDING in out]
    assert len(built) == 1, outs  # the layer was built and saved once...
    restored = next(out for out in outs if BUILDING not in out)
    assert "restored from the cached ready snapshot with 1 layer(s)" in restored, (
        outs
    )  # ...and loaded
    images = list((paths.cache_dir() / "host-environment" / "images").glob("*.img"))
    assert len(images) == 1, images
