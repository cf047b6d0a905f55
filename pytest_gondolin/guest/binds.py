"""The agent's ``bind`` request: folders of the guest's disk bound over tmpfs folders, in-process.

The host puts a tree it carries under one of the guest's tmpfs folders
(``/tmp/work``, ``/root/.pyenv``) on the guest's disk instead
(``pytest_gondolin.vm.disk_backed``). Done by the agent itself, a bind
costs a round trip; done by a shell it started ``mkdir`` and ``mount``,
~0.15 s under TCG on the first test's path after every edit.

Each pair is ``(disk folder, folder)``. A folder that is a mount point
already is left as it is (binding is idempotent); a missing or empty one is
made, with its disk folder, and bound. A folder that holds files (or is
not a folder) is refused with ``ENOTEMPTY`` before anything is bound: the
host's shell then copies what it holds first, so a bind never hides a file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Final

from pytest_gondolin.guest.newroot import MS_BIND, libc, mount, parse_mountinfo

__all__ = ["MOUNTINFO", "bind_folders"]

#: Where the current mounts are listed.
MOUNTINFO: Final = "/proc/self/mountinfo"


def bind_folders(pairs: Sequence[tuple[str, str]], *, mountinfo: str = MOUNTINFO) -> None:
    """Bind each pair's disk folder over its folder (see the module docstring); OSError names the folder."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
        bound = {entry.point for entry in parse_mountinfo(fh.read())}
    todo = [(disk, folder) for disk, folder in pairs if folder not in bound]
    for _, folder in todo:
        if os.path.lexists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
            raise OSError(errno.ENOTEMPTY, "holds files: copy them to the disk first", folder)
    for disk, folder in todo:
        if folder in bound:  # named twice
            continue
        os.makedirs(disk, exist_ok=True)
        os.makedirs(folder, exist_ok=True)
        mount(disk, folder, "", MS_BIND)
        bound.add(folder)


# The C library is looked up now, as the agent starts: the first bind after
# a restore would otherwise pay for it (~0.1 s under TCG, in the copy of the
# tree on the first test's path).
libc()
