"""A VM's own disk: a qcow2 overlay on a read-only base, or a copy of a saved overlay.

Every VM writes only to ``<rundir>/disk.qcow2``. A cold boot creates it as
an empty overlay whose backing file is the image's root disk (or a
checkpoint); a VM started from a saved state (a warm snapshot, a sandbox
clone) gets a copy of that state's overlay, reflinked where the filesystem
allows, so the copy costs no data blocks until one side writes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pytest_gondolin.errors import VMLaunchError
from pytest_gondolin.hosttools import require as require_tool

__all__ = ["copy_disk", "create_overlay"]


def create_overlay(disk: Path, backing: Path) -> None:
    """Create ``disk``, an empty qcow2 overlay on ``backing``; VMLaunchError if qemu-img fails."""
    qemu_img = require_tool("qemu-img")
    res = subprocess.run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(disk)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if res.returncode != 0:
        raise VMLaunchError(f"qemu-img create failed: {res.stderr.strip()}", command=res.args)


def copy_disk(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``, reflinking where the filesystem allows."""
    cp = shutil.which("cp")
    if cp:
        res = subprocess.run(
            [cp, "--reflink=auto", "--sparse=always", str(src), str(dst)], capture_output=True
        )
        if res.returncode == 0:
            return
    shutil.copyfile(src, dst)
