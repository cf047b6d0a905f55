"""Host trees carried into the guest under its tmpfs folders live on the guest's disk.

The guest mounts tmpfs on ``/tmp``, ``/root``, ``/var/tmp``, ``/var/cache``
and ``/var/log`` (:data:`pytest_gondolin.guest.sysinit.MOUNTS`, half the
guest's memory each at most). A host path under one of them — a project in
``/tmp/work``, a pyenv interpreter in ``/root/.pyenv``, a venv in
``/tmp/venv`` — would otherwise be unpacked into guest RAM: tens of MiB of
a 256 MiB guest, an out-of-memory kill of the test worker at collection,
and a bigger snapshot for every restore.

:func:`back_with_disk` reads which top-level folders a tar fills under such
a mount (``/tmp/work``, ``/root/.pyenv``) and, before it is unpacked, bind
mounts a folder of the guest's disk (:data:`DISK_ROOT`) over each one not
yet backed. The mount is kernel state, so a snapshot saved afterwards
(a cached layer, the worker snapshot) keeps it; it is idempotent, so the
project copy of every session can call it too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shlex
import tarfile
from collections.abc import Iterable, Sequence
from typing import Final

from pytest_gondolin.errors import AgentRequestError, VMError
from pytest_gondolin.guest.sysinit import MOUNTS
from pytest_gondolin.vm.machine import VM

__all__ = [
    "DISK_ROOT",
    "TMPFS_FOLDERS",
    "back_with_disk",
    "backing_command",
    "bind_folders",
    "disk_folder",
    "folders_to_back",
]

log = logging.getLogger(__name__)

#: Where on the guest's root disk the backed folders live.
DISK_ROOT: Final = "/var/lib/gondolin/disk"
#: The guest's tmpfs mount points a carried tree may fall under (``/dev/shm`` is
#: never a home for one).
TMPFS_FOLDERS: Final = tuple(
    target for fstype, target, _mode, _flags in MOUNTS if fstype == "tmpfs" and target != "/dev/shm"
)
#: Bind mounts a few commands can make in one exec; a tar naming more
#: top-level folders than this under tmpfs is a hostile or broken input.
MAX_FOLDERS: Final = 256
#: Mounting is instant; the bound covers a guest under heavy load.
BIND_TIMEOUT: Final = 60.0


def folders_to_back(tars: Iterable[bytes]) -> list[str]:
    """The folders ``<tmpfs mount>/<first component>`` that members of ``tars`` fill (sorted).

    ``tars`` are uncompressed tars (several may be joined) whose member names
    are relative to ``/``. A member directly in a mount's root (a file
    ``tmp/x``) needs no folder of its own and is left in the tmpfs.
    """
    found: set[str] = set()
    for data in tars:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:", ignore_zeros=True) as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                for mount in TMPFS_FOLDERS:
                    depth = mount.count("/")
                    prefix = mount.strip("/").split("/")
                    if (parts[:depth] == prefix and len(parts) > depth + 1) or (
                        parts[:depth] == prefix and len(parts) == depth + 1 and member.isdir()
                    ):
                        found.add(f"{mount}/{parts[depth]}")
    if len(found) > MAX_FOLDERS:
        raise VMError(f"{len(found)} top-level folders under the guest's tmpfs (max {MAX_FOLDERS})")
    return sorted(found)


def back_with_disk(vm: VM, tars: Iterable[bytes]) -> list[str]:
    """Bind a disk folder over each folder ``tars`` will fill under a tmpfs; return them."""
    folders = folders_to_back(tars)
    bind_folders(vm, folders)
    return folders


def bind_folders(vm: VM, folders: Sequence[str]) -> None:
    """Bind a disk folder over each of ``folders`` not bound yet.

    The agent does it in one round trip (``guest/binds.py``); where a folder
    already holds files in the tmpfs (or an agent does not know the request),
    :func:`backing_command`'s shell does, copying what it holds first.
    """
    if not folders:
        return
    try:
        vm.bind_folders([(disk_folder(folder), folder) for folder in folders])
    except AgentRequestError as exc:
        log.debug("%s: the agent did not bind %s (%s); the shell does", vm.name, folders, exc)
        vm.exec(backing_command(folders), check=True, timeout=BIND_TIMEOUT)


def disk_folder(folder: str) -> str:
    """The folder of the guest's disk bound over ``folder``."""
    return f"{DISK_ROOT}/{hashlib.sha256(folder.encode()).hexdigest()[:16]}"


def backing_command(folders: Iterable[str]) -> str:
    """A shell command binding a disk folder over each of ``folders`` not yet bound ("true": none).

    What :func:`back_with_disk` runs; a caller that runs a command in the
    guest anyway can prefix it with this one and save a round trip.
    """
    steps = []
    for folder in folders:
        disk = disk_folder(folder)
        q, d = shlex.quote(folder), shlex.quote(disk)
        listed = shlex.quote(_mountinfo_escaped(folder))
        # /proc/self/mountinfo's fifth field is the mount point: skip a bound
        # one (read by the shell itself: each process started costs ~0.1 s
        # under TCG). What the folder already holds in the tmpfs is copied
        # first, so the bind mount never hides a file (no cp when there is no
        # folder yet).
        steps.append(
            "{ b=; while read -r _ _ _ _ m _; do"
            f' [ "$m" = {listed} ] && b=1; done < /proc/self/mountinfo; if [ -z "$b" ]; then '
            f"if [ -e {q} ]; then mkdir -p {d} && cp -a {q}/. {d}/; else mkdir -p {d} {q}; fi"
            f" && mount --bind {d} {q}; fi; }}"
        )
    return " && ".join(steps) or "true"


def _mountinfo_escaped(path: str) -> str:
    """``path`` as ``/proc/self/mountinfo`` writes it: space, tab, newline and backslash in octal."""
    for char in "\\ \t\n":
        path = path.replace(char, f"\\{ord(char):03o}")
    return path
