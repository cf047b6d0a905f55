"""Finding the host programs pytest-gondolin drives, with install hints."""

from __future__ import annotations

import shutil

from pytest_gondolin.errors import HostToolMissing

#: program -> (Debian/Ubuntu package that provides it, what we need it for)
TOOLS: dict[str, tuple[str, str]] = {
    "qemu-system-x86_64": ("qemu-system-x86", "run guest VMs"),
    "qemu-img": ("qemu-utils", "create VM disk overlays"),
    "mmdebstrap": ("mmdebstrap", "build the Debian guest image"),
    "mkfs.ext4": ("e2fsprogs", "build the guest root filesystem"),
}


def require(tool: str) -> str:
    """Return the absolute path of ``tool`` or raise :class:`HostToolMissing`."""
    path = shutil.which(tool)
    if path is None:
        package, purpose = TOOLS.get(tool, (tool, "run pytest-gondolin"))
        raise HostToolMissing(tool, package, purpose)
    return path
