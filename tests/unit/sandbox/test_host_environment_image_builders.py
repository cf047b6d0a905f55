"""Several processes needing one new environment image (sandbox/environment_image.py).

Real processes (``subprocess``), the real ``mkfs.ext4`` behind a wrapper that
counts its runs, or a stand-in that writes garbage into the image and hangs
(a builder stuck, then killed, mid-``mkfs``). No VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_gondolin.paths as paths
from pytest_gondolin.errors import GondolinError
from pytest_gondolin.sandbox import environment_image, host_environment
from pytest_gondolin.sandbox.environment_image import prepare
from pytest_gondolin.vm.slot_images import images_folder, valid_id
from tests.fake_distributions import install_distribution

SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
MKFS = shutil.which("mkfs.ext4", path=SBIN)
DEBUGFS = shutil.which("debugfs", path=SBIN)
pytestmark = pytest.mark.skipif(
    MKFS is None or DEBUGFS is None, reason="e2fsprogs (mkfs.ext4, debugfs) not installed"
)
#: Generous: a builder process imports pytest-gondolin and runs mkfs on a loaded host.
PROCESS_TIMEOUT = 120.0
#: Where the hanging stand-in writes its garbage: past the end of the file
#: system the real mkfs makes here (~35 MiB), so only zeroing the image removes it.
GARBAGE_OFFSET = 100 * 2**20

_BUILDER = """
import json, os, sys, time
from pathlib import Path
from pytest_gondolin.sandbox import environment_image, host_environment

site, cache, go, project = sys.argv[1:5]
while not Path(go).exists():
    time.sleep(0.01)
env = host_environment.scan(Path(project), sys_path=[site], site_folders=frozenset({site}))
image = environment_image.prepare(env, Path(cache))
Path(go).with_name(f"prepared-{os.getpid()}").touch()
print(json.dumps({"key": image.key, "builds": image.build is not None}), flush=True)
if image.build is not None:
    image.build()
print("built", flush=True)
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "venv" / "site-packages"
    site.mkdir(parents=True)
    install_distribution(site, "demo", {"demo/__init__.py": "VALUE = 'one'\n"})
    return site


def _scan(tmp_path: Path, site: Path) -> host_environment.HostEnvironment:
    return host_environment.scan(
        tmp_path / "project", sys_path=[str(site)], site_folders=frozenset({str(site)})
    )


def _fake_mkfs(folder: Path, body: str) -> Path:
    """A folder holding an ``mkfs.ext4`` that logs its run to ``runs`` beside it, then does ``body``."""
    folder.mkdir()
    script = folder / "mkfs.ext4"
    script.write_text(f'#!/bin/sh\necho "$$" >> {folder / "runs"}\n{body}\n')
    script.chmod(0o755)
    return folder


def _runs(folder: Path) -> int:
    try:
        return len((folder / "runs").read_text().split())
    except FileNotFoundError:
        return 0


@pytest.fixture
def builders(tmp_path: Path, site: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Builder processes started by the test; each killed (its process group) at the end."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=PROCESS_TIMEOUT)


def _start(
    builders: list[subprocess.Popen[str]], tmp_path: Path, site: Path, fake: Path
) -> subprocess.Popen[str]:
    script = tmp_path / "builder.py"
    script.write_text(textwrap.dedent(_BUILDER))
    argv = [sys.executable, str(script), str(site), str(tmp_path / "cache"), str(tmp_path / "go")]
    proc = subprocess.Popen(
        [*argv, str(tmp_path / "project")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATH": f"{fake}:{os.environ.get('PATH', '')}"},
        start_new_session=True,  # its own group: killed with its mkfs
    )
    builders.append(proc)
    return proc


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the builder exited {proc.returncode}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_processes_needing_one_new_image_build_it_once(
    tmp_path: Path, site: Path, builders: list[subprocess.Popen[str]]
) -> None:
    # The real mkfs, once both processes have their image (at most a minute
    # later): whichever builds, the other asked for the image before it was built.
    both = f"[ $(ls {tmp_path} | grep -c '^prepared-') -ge 2 ]"
    fake = _fake_mkfs(
        tmp_path / "bin",
        f'i=0; until {both} || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done\nexec {MKFS} "$@"',
    )
    procs = [_start(builders, tmp_path, site, fake) for _ in range(2)]
    (tmp_path / "go").touch()
    outputs = [proc.communicate(timeout=PROCESS_TIMEOUT) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    said = [json.loads(out.splitlines()[0]) for out, _ in outputs]
    assert len(list(tmp_path.glob("prepared-*"))) == 2
    assert said[0]["key"] == said[1]["key"], said  # one image: one layer key for both
    assert [out.splitlines()[1] for out, _ in outputs] == ["built", "built"]
    assert _runs(fake) == 1, outputs
    folder = images_folder(tmp_path / "cache")
    images = sorted(p.name for p in folder.glob("*.img"))
    assert images == [f"{said[0]['key']}.img"], images
    assert not list(folder.glob("*.claim"))  # done: the claim went with the build
    # A later session uses it, building nothing.
    again = prepare(_scan(tmp_path, site), tmp_path / "cache")
    assert again is not None and again.key == said[0]["key"] and again.build is None


def _hung_builder(
    builders: list[subprocess.Popen[str]], tmp_path: Path, site: Path
) -> tuple[subprocess.Popen[str], str, Path]:
    """A builder hung in its mkfs, having written garbage into the image: (process, key, fake bin)."""
    ready = tmp_path / "mkfs-started"
    fake = _fake_mkfs(
        tmp_path / "bin",
        textwrap.dedent(
            f"""\
            for a in "$@"; do case "$a" in *.img)
                printf HALF-WRITTEN | dd of="$a" bs=1 seek={GARBAGE_OFFSET} conv=notrunc 2>/dev/null
            esac; done
            touch {ready}
            exec sleep 600"""
        ),
    )
    proc = _start(builders, tmp_path, site, fake)
    (tmp_path / "go").touch()
    _wait_for(ready, proc)
    assert proc.stdout is not None
    key = json.loads(proc.stdout.readline())["key"]
    return proc, key, fake


def _check_built(path: Path, site: Path) -> None:
    debugfs = [str(DEBUGFS), "-R", f"cat {site}/demo/__init__.py", str(path)]
    done = subprocess.run(debugfs, capture_output=True, text=True, check=True)
    assert done.stdout == "VALUE = 'one'\n"
    with path.open("rb") as image:
        image.seek(GARBAGE_OFFSET)
        assert image.read(12) == b"\0" * 12  # nothing the killed builder wrote is left


def test_a_stuck_builder_is_waited_for_a_bounded_time_then_named(
    tmp_path: Path,
    site: Path,
    builders: list[subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc, key, fake = _hung_builder(builders, tmp_path, site)
    monkeypatch.setattr(environment_image, "BUILD_WAIT_TIMEOUT", 1.0)
    image = prepare(_scan(tmp_path, site), tmp_path / "cache")
    assert image is not None and image.key == key and image.build is not None
    started = time.monotonic()
    with pytest.raises(GondolinError) as raised:
        image.build()
    assert time.monotonic() - started < PROCESS_TIMEOUT
    message = str(raised.value)
    assert f"gave up after 1 s waiting for process {proc.pid} " in message, message
    assert str(image.path) in message and ".build.lock" in message, message
    assert valid_id(image.path.parent, key.split("-")[0]) is None  # nothing recorded
    # Ended, as the message says: the next session builds that same image.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=PROCESS_TIMEOUT)
    again = prepare(_scan(tmp_path, site), tmp_path / "cache")
    assert again is not None and again.key == key and again.build is not None
    again.build()
    _check_built(again.path, site)
    assert _runs(fake) == 1  # the stand-in ran once; the real mkfs built it here


def test_a_builder_killed_mid_build_leaves_nothing_its_waiter_uses(
    tmp_path: Path, site: Path, builders: list[subprocess.Popen[str]]
) -> None:
    proc, key, _ = _hung_builder(builders, tmp_path, site)
    image = prepare(_scan(tmp_path, site), tmp_path / "cache")
    assert image is not None and image.key == key and image.build is not None
    build = image.build
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            build()
        except BaseException as exc:  # seen below, on the test's thread
            failed.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # the builder holds the build lock until it dies
    os.killpg(proc.pid, signal.SIGKILL)
    waiter.join(PROCESS_TIMEOUT)
    assert not waiter.is_alive() and not failed, failed
    assert valid_id(image.path.parent, key.split("-")[0]) == key.split("-", 1)[1]
    _check_built(image.path, site)


def test_a_read_only_cache_uses_a_built_image_and_builds_none(
    tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    built = prepare(_scan(tmp_path, site), cache)
    assert built is not None and built.build is not None
    built.build()
    # Made read-only the way the module sees it (tests run as root here).
    monkeypatch.setattr(paths, "can_write", lambda path: False)
    reused = prepare(_scan(tmp_path, site), cache)
    assert reused is not None and reused.key == built.key and reused.build is None
    (site / "demo" / "__init__.py").write_text("VALUE = 'changed'\n")
    assert prepare(_scan(tmp_path, site), cache) is None  # the tar layer, nothing written
    assert len(list(images_folder(cache).glob("*.img"))) == 1
