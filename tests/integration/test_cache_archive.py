"""A cache moved through ``gondolin cache export`` / ``import``: no image build, no cold boot.

Cache A holds the real image (hard links, no rebuild); a first inner pytest
run boots cold there and saves the ready snapshot and the sandbox's layers. A is exported with the
real ``gondolin`` command and imported into an empty ``GONDOLIN_CACHE_DIR``
B (another path, as on another machine); a ``vm`` test and a sandboxed test
in B then restore the imported snapshots (the sandbox's with its cached
layers): the progress lines say so, none says "cold" or "building" (no
image build, no layer build), and B gains no snapshot of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_gondolin import paths
from pytest_gondolin.image.info import image_status

pytestmark = pytest.mark.integration

#: A cold boot is ~6 s under TCG here; a loaded two-core host running others' VMs is slower.
INNER_TIMEOUT = 300.0

#: Progress lines of VMs started in the background reach the terminal only as log records.
LOG = ("-o", "log_cli=true", "--log-cli-level=INFO")

TEST_VM = """
import pytest


def test_vm(vm):
    assert vm.exec("echo ok").stdout == "ok\\n"


@pytest.mark.sandboxed
def test_sandboxed():
    import os

    assert os.uname().sysname == "Linux"
"""


@pytest.fixture(scope="module")
def real_image() -> Path:
    status = image_status("bookworm")
    if status.image is None:
        pytest.skip("the guest image is not built (gondolin image build)")
    return status.image.path


def _link_image(image: Path, cache: Path) -> None:
    target = cache / "images" / image.name
    target.mkdir(parents=True)
    for f in image.iterdir():
        try:
            os.link(f, target / f.name)
        except OSError:
            shutil.copy2(f, target / f.name)


def _env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GONDOLIN_CACHE_DIR": str(cache),
        "GONDOLIN_ACCEL": "tcg",
        "COLUMNS": "300",
    }


def _pytest(project: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "gondolin", "-p", "no:cacheprovider", *LOG],
        cwd=project,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
    )


def _gondolin(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_gondolin.cli", *args],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=INNER_TIMEOUT,
    )


def _gondolin_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Progress lines (on the terminal, or as log records when a VM started in the background)."""
    return [line for line in (result.stdout + result.stderr).splitlines() if "gondolin" in line]


def _built_or_booted(lines: list[str]) -> list[str]:
    """Lines that say an image or layer was built, or a VM booted cold."""
    return [line for line in lines if "building" in line or ("booting" in line and "cold" in line)]


def _qcow2_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".qcow2")


def _round_trip(real_image: Path, root: Path) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Run in A, move A to B through an archive, run in B: (B's new snapshot names, B's run)."""
    project = root / "project"
    project.mkdir(parents=True)
    (project / "test_it.py").write_text(TEST_VM)
    a, b = root / "a", root / "b"
    _link_image(real_image, a)

    first = _pytest(project, a)
    assert first.returncode == 0, first.stdout + first.stderr
    made = _built_or_booted(_gondolin_lines(first))  # the control: A starts from nothing
    assert any("cold" in line for line in made) and any("layer" in line for line in made), made

    archive = root / "cache.tar"
    exported = _gondolin(a, "cache", "export", str(archive))
    assert exported.returncode == 0, exported.stderr
    started = time.monotonic()
    imported = _gondolin(b, "cache", "import", str(archive))
    import_seconds = time.monotonic() - started
    assert imported.returncode == 0, imported.stderr
    assert "0 skipped" in imported.stdout, imported.stdout
    snapshots = _qcow2_names(b / "snapshots")
    assert snapshots == _qcow2_names(a / "snapshots")

    started = time.monotonic()
    second = _pytest(project, b)
    print(
        f"import {import_seconds:.1f} s, {archive.stat().st_size / 2**20:.0f} MiB; "
        f"run in B {time.monotonic() - started:.1f} s"
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert not list((b / "images").glob(".tmp-*"))  # no image build started
    return sorted(set(_qcow2_names(b / "snapshots")) - set(snapshots)), second


def test_an_imported_cache_runs_a_vm_test_without_build_or_cold_boot(
    real_image: Path, tmp_path: Path
) -> None:
    # A snapshot's key digests the guest code in the boot payload and the layers' inputs
    # (the host's environment). When those change between the run in A and the run in B
    # (in a checkout others edit, as here), B's keys are new and B must boot: that attempt
    # proves nothing either way, and the round trip is made once more.
    for attempt in (1, 2):
        new_keys, second = _round_trip(real_image, tmp_path / f"attempt{attempt}")
        if not new_keys:
            break
        print(f"attempt {attempt}: the keys changed under the test ({new_keys}); again")
    else:
        pytest.fail("the snapshot keys changed during both attempts: is the source tree changing?")
    output = second.stdout + second.stderr
    lines = _gondolin_lines(second)
    assert any("restored from the cached ready snapshot" in line for line in lines), output
    assert any(
        "sandbox" in line and "restored from the cached ready snapshot" in line for line in lines
    )
    assert _built_or_booted(lines) == [], "\n".join(
        line for line in output.splitlines() if "gondolin" in line or "WARNING" in line
    )


def test_a_foreign_qemu_snapshot_is_skipped_and_the_image_kept(
    real_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive whose snapshot names another QEMU: the real command imports the image only."""
    from pytest_gondolin.image.archive import export_cache
    from pytest_gondolin.image.archive_manifest import HostFacts

    a, b = tmp_path / "a", tmp_path / "b"
    _link_image(real_image, a)
    stray = a / "snapshots" / "0123456789abcdef01234567.qcow2"
    stray.parent.mkdir()
    rootfs = a / "images" / real_image.name / "rootfs.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(rootfs), str(stray)],
        check=True,
    )
    archive = tmp_path / "cache.tar"
    with monkeypatch.context() as m:
        m.setenv("GONDOLIN_CACHE_DIR", str(a))
        foreign = HostFacts("QEMU emulator version 99.0.0", "pc-q35-99.0", "tcg")
        export_cache(archive, progress=lambda msg: None, facts=foreign)
    imported = _gondolin(b, "cache", "import", str(archive))
    assert imported.returncode == 0, imported.stderr
    assert (
        "snapshots/0123456789abcdef01234567.qcow2: skipped, made with QEMU 'QEMU emulator version 99.0.0'"
        in imported.stdout
    )
    assert (b / "images" / real_image.name / "manifest.json").exists()
    assert not (b / "snapshots").exists()
    assert paths.cache_root() != b  # the outer session's cache was never touched
