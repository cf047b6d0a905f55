"""A hostile guest tries to change the host environment's image, which later VMs mount.

The image (``sandbox/environment_image.py``) sits in the VM's environment
slot, a virtio disk QEMU opens read-only (``read-only=on`` on the drive and
its file). Test code is root in the guest: it clears the disk's read-only
flag (``BLKROSET``), writes over the file system's start and superblock with
``O_DIRECT`` and syncs, and tries to remount the mounted image read-write.
Every attempt must be refused, and the image file on the host must hold the
same bytes, allocate no new blocks and keep its time stamp, so no later VM
(or session) sees a change. Control: the same writes to a file of the guest
go through.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pytest_gondolin.image.archive_environment import data_bytes
from pytest_gondolin.sandbox.environment_image import GUEST_ROOT
from pytest_gondolin.vm.qemu import ENV_SLOT_SERIAL
from tests.plugin.test_isolation import run_table

pytest_plugins = ("pytester",)

pytestmark = pytest.mark.integration

ATTACK = f"""
import ctypes
import fcntl
import glob
import mmap
import os
import struct
import subprocess

import pytest

BLKROSET = 0x125D


def _slot():
    for block in glob.glob("/sys/block/vd*"):
        with open(block + "/serial") as f:
            if f.read().strip() == "{ENV_SLOT_SERIAL}":
                return "/dev/" + os.path.basename(block)
    raise AssertionError("no environment slot in this guest")


def _write(path, flags):
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    buf.write(b"X" * 4096)
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        for offset in (0, 4096):  # the start, and the superblock's block
            os.pwrite(fd, buf, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.sandboxed
def test_writes_to_the_slot_are_refused():
    dev = _slot()
    refused = []
    try:
        fd = os.open(dev, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, BLKROSET, struct.pack("i", 0))
        finally:
            os.close(fd)
    except OSError as exc:
        refused.append(f"BLKROSET: {{exc}}")
    try:
        _write(dev, os.O_DIRECT | os.O_SYNC)
    except OSError as exc:
        refused.append(f"write: {{exc}}")
    else:
        raise AssertionError("the slot took a write")
    remount = subprocess.run(
        ["mount", "-o", "remount,rw", "{GUEST_ROOT}/image"], capture_output=True, text=True
    )
    assert remount.returncode != 0, "the image was remounted read-write"
    print("SLOT-REFUSED", refused, remount.stderr.strip())


@pytest.mark.sandboxed
def test_negative_control_the_same_writes_reach_a_guest_file():
    path = "/var/lib/slot-control"  # on the root disk (ext4): O_DIRECT works there
    with open(path, "wb") as f:
        f.write(b"\\0" * 8192)
    _write(path, os.O_DIRECT | os.O_SYNC)
    with open(path, "rb") as f:
        assert f.read() == b"X" * 8192
"""

WARM = """
import pytest


@pytest.mark.sandboxed
def test_nothing():
    pass
"""


def _images(cache: Path) -> dict[Path, tuple[int, int, str]]:
    """Each environment image in ``cache``: mtime, allocated blocks, digest of its file system."""
    found: dict[Path, tuple[int, int, str]] = {}
    for image in (cache / "host-environment" / "images").glob("*.img"):
        st = image.stat()
        length = data_bytes(image)
        digest = hashlib.sha256()
        with image.open("rb") as fh:
            left = length or 0
            while left > 0:
                chunk = fh.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
        found[image] = (st.st_mtime_ns, st.st_blocks, digest.hexdigest())
    return found


def test_a_guest_cannot_change_the_environment_image(
    tmp_path_factory: pytest.TempPathFactory, gondolin_cache: Path
) -> None:
    root = tmp_path_factory.mktemp("env-slot")
    # A first run builds (or finds) the image; the attack runs in the second one.
    warm = run_table(root, gondolin_cache, WARM, "vm")
    assert warm.statuses.get("test_nothing") == "PASSED", warm.text
    before = _images(gondolin_cache)
    run = run_table(root, gondolin_cache, ATTACK, "vm")
    text = run.text
    assert run.statuses.get("test_writes_to_the_slot_are_refused") == "PASSED", text
    assert run.statuses.get("test_negative_control_the_same_writes_reach_a_guest_file") == (
        "PASSED"
    ), text
    assert "SLOT-REFUSED" in text, text
    after = _images(gondolin_cache)
    assert before, "no environment image in the cache: the guest had no slot to attack"
    for image, facts in before.items():
        if image in after:  # another session may evict an image meanwhile, never change one
            assert after[image] == facts, f"{image} changed: {facts} -> {after[image]}"
